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

from splitmatch import cli
from splitmatch.bench.predict import large_photo, peak_rss_gb
from splitmatch.clip import build_clip
from splitmatch.config import ConfigError, config_from_dict, to_dict
from splitmatch.data.toyworld import render
from splitmatch.model import build_segmentor
from splitmatch.predict import Segmenter, predict
from helpers import TINY

CLASSES = ["tomato", "zebra", "sky", "a red bicycle"]


def save_checkpoint(path, inference=None, mask_gain=1.0):
    """What a run leaves as best_model.pt: weights and the config that made them. `mask_gain`
    sharpens the random masks, so that the classes vary over an image (test data, not a model)."""
    cfg = config_from_dict({**TINY, "inference": {**TINY["inference"], **(inference or {})}})
    torch.manual_seed(0)
    model = build_segmentor(cfg.model, embed_dim=build_clip(cfg.clip).embed_dim)
    state = model.state_dict()
    for key in ("weight", "bias"):
        state[f"transformer_decoder.mask_embed.layers.2.{key}"] *= mask_gain
    torch.save({"model": state, "config": to_dict(cfg)}, path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("run") / "best_model.pt")


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
    from splitmatch.engine import build_optimizer

    # What a run without a selection split publishes: its final checkpoint, Adam moments and
    # all, and a CLIP whose weights are a file.
    state = torch.load(checkpoint, weights_only=True)
    cfg = config_from_dict(state["config"])
    model = build_segmentor(cfg.model, embed_dim=build_clip(cfg.clip).embed_dim)
    model.load_state_dict(state["model"])
    optimizer = build_optimizer(model, cfg.optim)
    for weight in model.parameters():
        weight.grad = torch.zeros_like(weight)
    optimizer.step()
    final = tmp_path / "checkpoint_000002" / "state.pt"
    final.parent.mkdir()
    torch.save({**state, "optimizer": optimizer.state_dict(), "iteration": 2}, final)
    clip_file = tmp_path / "clip.pt"
    torch.manual_seed(1)
    torch.save(build_clip(cfg.clip).model.state_dict(), clip_file)

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("models", artifact_location=(tmp_path / "art").as_uri())
    run = client.create_run(experiment)
    client.log_metric(run.info.run_id, "hIoU", 12.5, step=2)
    model_uri = log_model(uri, run.info.run_id, final.parent, str(clip_file), CLASSES, step=2)
    # The run's MLflow 3 logged model, linked to the run and to its figures of that step.
    [logged] = client.search_logged_models([experiment])
    assert model_uri == f"models:/{logged.model_id}" and logged.source_run_id == run.info.run_id
    assert [(m.key, m.value, m.step) for m in logged.metrics] == [("hIoU", 12.5, 2)]
    assert [o.model_id for o in client.get_run(run.info.run_id).outputs.model_outputs] == [logged.model_id]
    assert log_model(uri, run.info.run_id, final.parent, str(clip_file), CLASSES, step=2) == model_uri
    # What it stores: the weights without optimizer state, the CLIP once, code without weights.
    stored = tmp_path / "art" / "models" / logged.model_id / "artifacts"
    files = {path.relative_to(stored).as_posix(): path.stat().st_size
             for path in stored.rglob("*") if path.is_file()}
    assert set(torch.load(stored / "artifacts" / "weights.pt", weights_only=True)) == {"model", "config"}
    assert files["artifacts/weights.pt"] < final.stat().st_size / 2
    assert [name for name, size in files.items() if size == clip_file.stat().st_size] == [
        "artifacts/clip.pt"]
    assert not [name for name in files if "/shipped/" in name or name.endswith((".pt", ".pyc"))
                and not name.startswith("artifacts/")]
    assert "code/splitmatch/pyfunc.py" in files
    # The package as a wheel lays it out, from a checkout too (dashboards/ lies outside platform/).
    assert {"code/splitmatch/dashboards/run_page.py", "code/splitmatch/experiments/toyworld.yaml"
            } <= set(files)

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
    segmenter = Segmenter(checkpoint, clip_weights=str(clip_file))
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


def wide_photo(path, size=(240, 384)):
    """A toy picture of (height, width) `size`, larger than the limits the tests set."""
    image, _ = render(seed=5, size=100, n_objects=3)
    Image.fromarray(image).resize(size[::-1], Image.BILINEAR).save(path)
    return np.asarray(Image.open(path).convert("RGB"))


def test_a_large_image_is_segmented_scaled_down_and_labeled_at_its_own_size(
        tmp_path, checkpoint, monkeypatch, capsys):
    image = wide_photo(tmp_path / "big.png")  # 384x240: over the checkpoint's 64-pixel limit
    sharp = save_checkpoint(tmp_path / "sharp.pt", {"max_image_side": 64}, mask_gain=100.0)
    lines = []
    (label_path,) = predict(sharp, [tmp_path / "big.png"], CLASSES, tmp_path / "out",
                            log=lines.append)
    label = np.asarray(Image.open(label_path))
    assert label.shape == (240, 384)  # the label map has the input's own size
    assert lines[-1] == ("1 image(s) larger than inference.max_image_side were segmented scaled "
                         "down, their label maps scaled back to full size (--max-image-side N "
                         "changes the limit, 0 lifts it): big.png 384x240 -> 64x40")
    # What the model saw is the photo at 64x40; each pixel's class is that of the small label
    # pixel whose area holds its centre (nearest: class indices are never blended; no centre
    # lies on an edge at these sizes).
    small = np.asarray(Image.fromarray(image).resize((64, 40), Image.BILINEAR))
    unlimited = Segmenter(sharp, max_image_side=0)
    small_label = unlimited.segment(small, CLASSES)  # [40, 64]
    assert len(np.unique(small_label)) > 1  # a test that can tell classes apart
    rows = ((np.arange(240) + 0.5) * 40 / 240).astype(int)
    cols = ((np.arange(384) + 0.5) * 64 / 384).astype(int)
    assert np.array_equal(label, small_label[rows][:, cols])
    overlay = Image.open(label_path.with_name("big_overlay.png"))
    assert np.asarray(overlay).std() > 5
    # --max-image-side overrides the checkpoint's inference.max_image_side; 0 lifts it.
    monkeypatch.chdir(tmp_path)
    assert cli.main(["predict", str(sharp), str(tmp_path / "big.png"), "--classes",
                     ",".join(CLASSES), "--out", str(tmp_path / "full"),
                     "--max-image-side", "0"]) == 0
    assert "scaled" not in capsys.readouterr().out
    full = np.asarray(Image.open(tmp_path / "full" / "big.png"))
    assert np.array_equal(full, unlimited.segment(image, CLASSES)) and full.shape == (240, 384)
    assert Segmenter(checkpoint).max_image_side == 1536  # the default


def test_the_image_limit_is_checked_where_it_is_set(checkpoint):
    with pytest.raises(ConfigError, match="'inference.max_image_side' must be at least 32"):
        config_from_dict({"inference": {"max_image_side": 16}}, "exp.yaml")
    with pytest.raises(ConfigError, match="--max-image-side: must be at least 32 pixels"):
        Segmenter(checkpoint, max_image_side=-1)


@pytest.mark.integration
def test_a_6000_pixel_photo_is_predicted_in_under_2_gb(tmp_path, checkpoint):
    # Unbounded, the score maps of this photo alone took several GB (10.8 GB on the toy preset).
    large_photo(tmp_path / "photo.png", 6000)
    peak_gb, _, code = peak_rss_gb(
        [sys.executable, "-m", "splitmatch.cli", "predict", str(checkpoint),
         str(tmp_path / "photo.png"), "--classes", ",".join(CLASSES), "--out",
         str(tmp_path / "out")], tmp_path / "predict.log")
    output = (tmp_path / "predict.log").read_text()
    print(f"splitmatch predict, one 6000x6000 PNG, tiny model: peak RSS {peak_gb:.2f} GB")
    assert code == 0, output[-3000:]
    assert "photo.png 6000x6000 -> 1536x1536" in output
    assert Image.open(tmp_path / "out" / "photo.png").size == (6000, 6000)
    assert peak_gb < 2.0, f"peak RSS {peak_gb:.2f} GB"


def test_a_folder_names_what_it_skipped_and_one_without_images_is_refused(
        tmp_path, checkpoint, images, monkeypatch, capsys):
    root, paths = images
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.png").write_bytes(paths[0].read_bytes())
    for name in ("notes.txt", "meta.json", ".DS_Store"):
        (folder / name).write_text("x")
    (folder / "raw").mkdir()
    lines = []
    labels = predict(checkpoint, [folder], CLASSES, tmp_path / "out", log=lines.append)
    assert [p.name for p in labels] == ["a.png"]
    assert lines[0] == (f"{folder}: skipped 4 file(s) that are not images (.png, .jpg, .jpeg, "
                        f".bmp, .webp): .DS_Store, meta.json, notes.txt, raw/")
    # A folder with no image at all is a mistake, even beside images that are fine.
    empty = tmp_path / "docs"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    monkeypatch.chdir(tmp_path)  # the traceback log goes under ./runs
    code = cli.main(["predict", str(checkpoint), str(empty), str(root / "c.png"),
                     "--classes", "cat", "--out", str(tmp_path / "out2")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {empty}: no images in this folder (looked for .png, .jpg")
    assert not (tmp_path / "out2").exists()


def test_an_empty_class_name_is_refused_in_one_line(tmp_path, checkpoint, images, monkeypatch,
                                                    capsys):
    root, _ = images
    monkeypatch.chdir(tmp_path)
    code = cli.main(["predict", str(checkpoint), str(root / "c.png"), "--classes", "cat,,dog",
                     "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("config error: --classes 'cat,,dog': entry 2 of 3 is empty; separate "
                          "the class names with single commas [traceback: ")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="--classes 'cat,dog,': entry 3 of 3 is empty"):
        predict(checkpoint, [root / "c.png"], "cat,dog,", tmp_path / "out")
    with pytest.raises(ConfigError, match="entry 2 of 2 is empty"):  # the pyfunc model's list
        predict(checkpoint, [root / "c.png"], ["cat", " "], tmp_path / "out")
