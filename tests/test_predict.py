"""`splitmatch predict` and the pyfunc model: a checkpoint (random weights, the tiny test model) on
images of any size with a vocabulary the model never trained on."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from splitmatch.clip import build_clip
from splitmatch.config import ConfigError, config_from_dict, to_dict
from splitmatch.data.toyworld import render
from splitmatch.model import build_segmentor
from splitmatch.predict import Segmenter, predict
from helpers import TINY

CLASSES = ["tomato", "zebra", "sky", "a red bicycle"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """What a run leaves as best_model.pt: weights and the config that made them."""
    cfg = config_from_dict(TINY)
    model = build_segmentor(cfg.model, embed_dim=build_clip(cfg.clip).embed_dim)
    path = tmp_path_factory.mktemp("run") / "best_model.pt"
    torch.save({"model": model.state_dict(), "config": to_dict(cfg)}, path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two images in a folder and one on its own, of three sizes."""
    root = tmp_path_factory.mktemp("images")
    (root / "folder").mkdir()
    paths = []
    for i, (size, where) in enumerate([(64, "folder/a.png"), (80, "folder/b.jpg"), (48, "c.png")]):
        image, _ = render(seed=i, size=size, n_objects=2)
        Image.fromarray(image).save(root / where)
        paths.append(root / where)
    return root, paths


def test_predict_writes_a_label_and_an_overlay_per_image(tmp_path, checkpoint, images, capsys):
    root, paths = images
    lines = []
    labels = predict(checkpoint, [root / "folder", root / "c.png"], ",".join(CLASSES),
                     tmp_path / "out", log=lines.append)
    assert capsys.readouterr().out.startswith("predicting: 3/3 img (100%)")  # its progress
    assert [p.name for p in labels] == ["a.png", "b.png", "c.png"]
    segmenter = Segmenter(checkpoint)
    for label_path, image_path in zip(labels, paths):
        image = np.asarray(Image.open(image_path).convert("RGB"))
        label = np.asarray(Image.open(label_path))
        assert label.shape == image.shape[:2] and label.max() < len(CLASSES)
        assert np.array_equal(label, segmenter.segment(image, CLASSES))
        overlay = Image.open(label_path.with_name(label_path.stem + "_overlay.png"))
        assert np.asarray(overlay).std() > 5  # a picture, not a blank
    assert json.loads((tmp_path / "out" / "classes.json").read_text()) == CLASSES
    assert "3 image(s) segmented into tomato, zebra, sky, a red bicycle" in lines[-1]


def test_the_vocabulary_is_asked_at_prediction_time(checkpoint, images):
    _, paths = images
    image = np.asarray(Image.open(paths[0]).convert("RGB"))
    segmenter = Segmenter(checkpoint)
    two = segmenter.segment(image, ["tomato", "zebra"])
    assert set(np.unique(two)) <= {0, 1}
    one = segmenter.segment(image, ["zebra"])
    assert (one == 0).all()


@pytest.mark.integration
def test_bad_requests_are_one_line_each(tmp_path, checkpoint, images):
    root, _ = images
    with pytest.raises(ConfigError, match="--classes: give at least one class name"):
        predict(checkpoint, [root / "c.png"], " , ", tmp_path)
    with pytest.raises(ConfigError, match="--classes: a name is given twice"):
        predict(checkpoint, [root / "c.png"], "cat,cat", tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.png: no such image or folder"):
        predict(checkpoint, [root / "nope.png"], "cat", tmp_path)
    cli = subprocess.run([sys.executable, "-m", "splitmatch.cli", "predict", str(checkpoint),
                          str(root / "c.png"), "--classes", "", "--out", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, SPLITMATCH_LOG_DIR=str(tmp_path)))
    assert cli.returncode == 2 and cli.stderr.startswith("config error: --classes")


@pytest.mark.integration
def test_pyfunc_model_predicts_without_the_command_line(tmp_path, checkpoint, images):
    from mlflow.tracking import MlflowClient

    from splitmatch.pyfunc import log_model

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("models", artifact_location=(tmp_path / "art").as_uri())
    run = client.create_run(experiment)
    model_uri = log_model(uri, run.info.run_id, checkpoint, None, CLASSES)
    _, paths = images
    image = np.asarray(Image.open(paths[0]).convert("RGB"))
    np.save(tmp_path / "batch.npy", np.stack([image, image[:, ::-1]]))
    # Another process that only knows MLflow: load the model, predict with a vocabulary.
    script = (f"import mlflow, numpy as np; mlflow.set_tracking_uri({uri!r}); "
              f"model = mlflow.pyfunc.load_model({model_uri!r}); "
              f"out = model.predict(np.load({str(tmp_path / 'batch.npy')!r}), "
              f"params={{'classes': ['zebra', 'tomato']}}); "
              f"np.save({str(tmp_path / 'out.npy')!r}, out); "
              f"print(model.metadata.get_params_schema().to_dict())")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = np.load(tmp_path / "out.npy")
    segmenter = Segmenter(checkpoint)
    assert out.shape == (2, *image.shape[:2]) and out.dtype == np.uint8
    assert np.array_equal(out[0], segmenter.segment(image, ["zebra", "tomato"]))
    assert np.array_equal(out[1], segmenter.segment(np.ascontiguousarray(image[:, ::-1]),
                                                    ["zebra", "tomato"]))
    assert "'name': 'classes'" in done.stdout  # the vocabulary is a parameter of the signature


def test_a_folder_can_go_through_ray_data_actors(tmp_path, checkpoint, images, ray_cluster,
                                                capsys):
    root, paths = images
    lines = []  # this process is the session cluster's driver already (ray_cluster)
    labels = predict(checkpoint, [root / "folder", root / "c.png"], CLASSES, tmp_path / "out",
                     use_ray=True, log=lines.append)
    assert lines[0].startswith("predicting 3 images on ") and "Ray Data actor" in lines[0]
    assert "predicting: 3/3 img (100%)" in capsys.readouterr().out  # its progress, counted here
    segmenter = Segmenter(checkpoint)
    for label_path, image_path in zip(labels, paths):
        image = np.asarray(Image.open(image_path).convert("RGB"))
        assert np.array_equal(np.asarray(Image.open(label_path)), segmenter.segment(image, CLASSES))
        assert label_path.with_name(label_path.stem + "_overlay.png").is_file()
