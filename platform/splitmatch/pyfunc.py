"""A finished run's model as an MLflow pyfunc model (`<run>/model`), so that

    mlflow.pyfunc.load_model("runs:/<run id>/model").predict(images, params={"classes": [...]})

segments uint8 RGB images [B, H, W, 3] into class indices [B, H, W] with any vocabulary, with no
splitmatch command line and no file of the training machine: the model folder carries the weights,
the CLIP weights (when they are a local file), the package's code and the pinned requirements.
"""
from __future__ import annotations

import json
import logging
import tempfile
import warnings
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np

ARTIFACT_PATH = "model"
REQUIREMENTS = ("torch", "torchvision", "open_clip_torch", "mlflow", "numpy", "pillow", "pyyaml",
                "scipy", "matplotlib")


# MLflow wraps `predict` when the class is defined and advises type hints (its validation would
# then take over the input, a plain uint8 array here). It resets the warning filters for that
# advice itself, so only not showing it keeps it off the user's screen.
_show, warnings.showwarning = warnings.showwarning, lambda *args, **kwargs: None
try:

    class SplitMatchModel(mlflow.pyfunc.PythonModel):
        def load_context(self, context) -> None:
            from splitmatch.predict import Segmenter

            self.segmenter = Segmenter(context.artifacts["checkpoint"],
                                       clip_weights=context.artifacts.get("clip_weights"))
            self.default_classes = json.loads(Path(context.artifacts["classes"]).read_text())

        def predict(self, context, model_input, params: dict | None = None) -> np.ndarray:
            from splitmatch.predict import parse_classes

            classes = parse_classes((params or {}).get("classes") or self.default_classes)
            images = np.asarray(model_input, dtype=np.uint8)
            if images.ndim == 3:
                images = images[None]
            return np.stack([self.segmenter.segment(image, classes) for image in images])
finally:
    warnings.showwarning = _show


def log_model(tracking_uri: str, run_id: str, checkpoint: Path, clip_pretrained: str | None,
              classes: list[str]) -> str:
    """Save the pyfunc model of `checkpoint` and log it under the run; returns its model URI."""
    import splitmatch
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),  # RGB images
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1))]),  # class index per pixel
        params=ParamSchema([ParamSpec("classes", "string", classes, shape=(-1,))]))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "classes.json").write_text(json.dumps(classes))
        artifacts = {"checkpoint": str(checkpoint), "classes": str(Path(tmp) / "classes.json")}
        if clip_pretrained and Path(clip_pretrained).is_file():
            artifacts["clip_weights"] = clip_pretrained
        model_dir = Path(tmp) / ARTIFACT_PATH
        with warnings.catch_warnings():  # MLflow's advice on type hints and input examples
            warnings.simplefilter("ignore")
            logging.getLogger("mlflow.pyfunc").setLevel(logging.ERROR)
            mlflow.pyfunc.save_model(
                model_dir, python_model=SplitMatchModel(), artifacts=artifacts, signature=signature,
                code_paths=[str(Path(splitmatch.__file__).parent)],
                pip_requirements=[f"{name}=={metadata.version(name)}" for name in REQUIREMENTS])
        client = mlflow.tracking.MlflowClient(tracking_uri)
        client.log_artifacts(run_id, str(model_dir), ARTIFACT_PATH)
    return f"runs:/{run_id}/{ARTIFACT_PATH}"
