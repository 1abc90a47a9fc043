"""A finished run's model as an MLflow pyfunc model, logged as an MLflow 3 logged model of its run
(the run's Models column and page), so that

    mlflow.pyfunc.load_model("models:/<model id>").predict(images, params={"classes": [...]})

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
              classes: list[str], step: int = 0) -> str:
    """Log the pyfunc model of `checkpoint` as an MLflow logged model of the run, linked to the
    run's metrics of `step` (its final figures); returns its model URI (models:/<model id>).

    It holds what predicting needs once each: the segmentor's weights, its config and calibration
    (no optimizer state: a final checkpoint's Adam moments double the weights), the CLIP weights
    (when they are a local file) and the package's code without the CLIP weights it ships. A run
    that already has a model of the same weights gets no second one."""
    from mlflow.entities import LoggedModelStatus
    from mlflow.models import Model, ModelSignature
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    from splitmatch.checkpoints import CALIBRATION, load_state, save_weights
    from splitmatch.files import file_sha256

    client = mlflow.tracking.MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    state = load_state(checkpoint)
    weights = {key: state[key] for key in ("model", "config", CALIBRATION) if key in state}
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),  # RGB images
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1))]),  # class index per pixel
        params=ParamSchema([ParamSpec("classes", "string", classes, shape=(-1,))]))
    with tempfile.TemporaryDirectory() as tmp:
        save_weights(Path(tmp) / "weights.pt", weights)
        sha256 = file_sha256(Path(tmp) / "weights.pt")
        found = client.search_logged_models(
            [run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
        for model in found:
            if model.tags.get(WEIGHTS_TAG) == sha256 and model.status == LoggedModelStatus.READY:
                return f"models:/{model.model_id}"
        (Path(tmp) / "classes.json").write_text(json.dumps(classes))
        artifacts = {"checkpoint": str(Path(tmp) / "weights.pt"),
                     "classes": str(Path(tmp) / "classes.json")}
        if clip_pretrained and Path(clip_pretrained).is_file():
            artifacts["clip_weights"] = clip_pretrained
        with warnings.catch_warnings():  # MLflow's advice on type hints and input examples
            warnings.simplefilter("ignore")
            logging.getLogger("mlflow.pyfunc").setLevel(logging.ERROR)
            # What mlflow.pyfunc.log_model does, for a run that is not this process's active
            # one: Model.log links the model to the run (and to its metrics of `step`) when
            # given the run's id, but would create it in the process's active experiment.
            model = client.create_logged_model(
                run.info.experiment_id, name=ARTIFACT_PATH, source_run_id=run_id,
                params=run.data.params, tags={WEIGHTS_TAG: sha256}, model_type="segmentation")
            with _use_tracking_uri(tracking_uri):  # Model.log's client is the process's
                Model.log(None, name=ARTIFACT_PATH, flavor=mlflow.pyfunc, model_id=model.model_id,
                          run_id=run_id, step=step, python_model=SplitMatchModel(),
                          artifacts=artifacts, signature=signature,
                          code_paths=[str(package_code(Path(tmp) / "code"))],
                          pip_requirements=[f"{name}=={metadata.version(name)}"
                                            for name in REQUIREMENTS])
    return f"models:/{model.model_id}"


WEIGHTS_TAG = "splitmatch.weights_sha256"


def package_code(folder: Path) -> Path:
    """A copy of the splitmatch package in `folder`, as a wheel lays it out, less the toy CLIP
    weights it ships (the model's own CLIP weights are an artifact of it) and compiled files."""
    from splitmatch.package_copy import copy_package
    from splitmatch.toyclip.checkpoint import SHIPPED

    return copy_package(folder, leave_out=[SHIPPED])