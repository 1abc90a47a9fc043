"""`splitmatch demo --quick`: the README's main job, end to end, as a new user runs it."""
import re

import pytest
from mlflow.tracking import MlflowClient

from splitmatch.clip import build_clip
from splitmatch.config import ClipConfig, flatten, load_config
from splitmatch.demo import DEMO_CONFIG, demo_config
from splitmatch.toyclip import zero_shot_report
from helpers import finish, splitmatch


def test_the_demo_runs_the_toy_config_on_its_own_budget_which_set_overrides():
    toy = load_config(DEMO_CONFIG)
    demo = demo_config()
    assert (demo.train.max_iters, demo.optim.lr, demo.model.backbone) == (500, 6.0e-4, "resnet10")
    assert (toy.train.max_iters, toy.optim.lr, toy.model.backbone) == (1000, 3.0e-4, "resnet18")
    # Nothing but the budget and the run name differ from the toy config: the toy CLIP is the
    # toy config's own, the one that comes with the package.
    toy_values = flatten(toy)
    differ = {key for key, value in flatten(demo).items() if toy_values[key] != value}
    assert differ == {"name", "model.backbone", "train.max_iters", "optim.lr"}
    # Calibration is the toy config's protocol: chosen on val, as for every run of it.
    assert demo.inference.seen_score_calibration == "auto" and demo.data.select_split == "val"
    assert demo.train.checkpoint_every == demo.train.eval_every == 500  # one checkpoint, at the end
    # --quick uses the same toy CLIP.
    assert demo_config(quick=True).toy_clip == demo.toy_clip
    assert demo_config(quick=True).train.max_iters == 30
    assert demo_config(overrides=["train.max_iters=50"]).train.max_iters == 50


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path, ray_cluster):
    out = finish(splitmatch("demo", "--quick", "--set", f"train.storage_path={tmp_path / 'runs'}",
                            "--set", f"pseudo_masks.cache_dir={tmp_path / 'cache'}",
                            "--set", f"toy_clip.cache_dir={tmp_path / 'toy_clip'}",
                            address=ray_cluster), timeout=900)
    scores = re.search(r"hIoU (\S+)\s+sIoU (\S+)\s+uIoU (\S+)", out)
    assert scores, out[-3000:]
    assert "toy-world pseudo-mask quality" in out and "splitmatch ui --storage-path" in out
    timing = re.search(r"time per phase: toy CLIP (\d+) s, pseudo masks (\d+) s, training and test "
                       r"(\d+) s, results page and model (\d+) s; total (\d+) s", out)
    assert timing, out[-3000:]
    assert sum(map(int, timing.groups()[:4])) <= int(timing.group(5)) + 4
    assert "results page: " in out and "MLflow model: models:/" in out
    assert "TrainingReport(" not in out and "core_worker.cc" not in out  # Ray's lines hidden
    run_dir = re.search(r"run directory: (\S+)", out).group(1)
    pictures = list((tmp_path / "runs").glob("*/viz/*.png"))
    assert len(pictures) == 2 and str(pictures[0]).startswith(run_dir)
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("toyworld").experiment_id])
    assert run.info.status == "FINISHED"
    assert abs(run.data.metrics["uIoU"] - float(scores.group(3))) < 0.01

    # The toy CLIP came with the package (no pretraining on the spot), loaded the way any user
    # loads a checkpoint: >= 90% zero-shot accuracy over all ten classes, and on each unseen
    # class, on held-out images it never trained on.
    assert "comes with splitmatch" in out and "pretraining" not in out
    checkpoint = re.search(r"toy CLIP: using cached checkpoint (\S+\.pt)", out).group(1)
    clip = build_clip(ClipConfig(model_name="splitmatch-toy-vit", pretrained=checkpoint))
    report = zero_shot_report(clip, num_images=500)
    assert report["accuracy"] >= 0.90, report
    assert min(report["per_class"][c] for c in ("leaf", "starfish", "donut")) >= 0.90, report
