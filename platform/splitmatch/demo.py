"""`splitmatch demo`: the whole method end to end on embedded defaults, on a laptop.

Toy world (generated) → toy CLIP (comes with the package, else pretrained once; cached) → pseudo
masks on Ray Data (cached) → Split Matching on Ray Train → evaluation → everything in the local
MLflow store.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from splitmatch.config import Config, config_from_dict, load_config, to_dict
from splitmatch.examples import configs_folder

DEMO_CONFIG = configs_folder() / "toyworld.yaml"  # the packaged one: the demo runs from any folder
# The demo's budget on the toy config, applied before --quick and --set: ResNet-10 instead of
# resnet18 and 500 iterations at twice the learning rate instead of 1000, so that a first run fits
# in minutes on a laptop's CPU. Its toy CLIP is the toy config's, which comes with the package
# (toyclip/checkpoint.py, SHIPPED): a shorter one pretrained on the spot was weaker on some CPUs.
# At test time the seen classes' scores are calibrated as the toy config says (`auto`: the value
# with the best hIoU on val, from inference.calibration_grid), as for every run of that config.
# The measurements are in docs/results/toyworld-demo-budget.md and docs/performance.md.
BUDGET = ["model.backbone=resnet10", "train.max_iters=500", "optim.lr=6.0e-4",
          "train.checkpoint_every=500", "train.eval_every=500"]
# --quick: the same pipeline, and the same toy CLIP, on a smaller budget (the smoke test CI runs,
# <= 3 minutes).
QUICK = ["data.toyworld.num_train=64", "data.toyworld.num_test=24", "train.max_iters=30",
         "train.checkpoint_every=30", "train.eval_every=30", "train.log_every=10",
         "train.num_visualizations=2"]


def demo_config(config: str | Path = DEMO_CONFIG, quick: bool = False,
                overrides: list[str] | None = None) -> Config:
    cfg = load_config(config, BUDGET + (QUICK if quick else []) + list(overrides or []))
    data = to_dict(cfg)
    # A fresh run name each time (the caches are what get reused).
    data["name"] = f"{cfg.name}-{'quick-' if quick else ''}{time.strftime('%Y%m%d-%H%M%S')}"
    return config_from_dict(data, str(config))


def run_demo(config: str | Path = DEMO_CONFIG, quick: bool = False,
             overrides: list[str] | None = None, log=print) -> dict:
    from splitmatch.cluster import init_ray
    from splitmatch.config import resolve_paths
    from splitmatch.splits import default_unseen
    from splitmatch.toyclip import with_toy_clip
    from splitmatch.tracking import default_tracking_uri
    from splitmatch.publish import publish_results
    from splitmatch.train import launch, open_pseudo_masks

    start = time.perf_counter()
    phases: dict[str, float] = {}

    def phase(name: str, since: float) -> float:
        now = time.perf_counter()
        phases[name] = now - since
        return now

    cfg = with_toy_clip(demo_config(config, quick, overrides), log=log)
    mark = phase("toy CLIP", start)
    log(f"demo{' (quick)' if quick else ''}: {cfg.data.toyworld.num_train} train / "
        f"{cfg.data.toyworld.num_test} test toy images, unseen classes "
        f"{', '.join(cfg.data.unseen or default_unseen(cfg.data.dataset))}, {cfg.train.max_iters} "
        f"iterations, seen-score calibration {cfg.inference.seen_score_calibration}")
    init_ray(cfg.storage)
    open_pseudo_masks(resolve_paths(cfg), build=True, config_path=str(config), log=log)
    mark = phase("pseudo masks", mark)
    result = launch(cfg, config_path=str(config), log=log)
    if result.error is not None:
        raise RuntimeError(f"demo training failed: {result.error}")
    mark = phase("training and test", mark)
    metrics = result.metrics
    storage = Path(cfg.train.storage_path).resolve()
    run_dir = storage / cfg.name
    uri = cfg.tracking.uri or default_tracking_uri(storage)
    log("")
    log(f"hIoU {metrics['hIoU']:.2f}  sIoU {metrics['sIoU']:.2f}  uIoU {metrics['uIoU']:.2f}  "
        f"(mIoU {metrics['mIoU']:.2f}) after {cfg.train.max_iters} iterations"
        + _calibration_note(run_dir, cfg))
    log(f"run directory: {run_dir}")
    log(f"prediction pictures: {run_dir / 'viz'}")
    publish_results(cfg, log=log)
    phase("results page and model", mark)
    seconds = time.perf_counter() - start
    log(f"MLflow: experiment '{cfg.tracking.experiment}', run '{cfg.name}' in {uri}")
    if uri.startswith("sqlite:"):
        log(f"open the MLflow UI: splitmatch ui --storage-path {storage}  (or: mlflow ui "
            f"--backend-store-uri {uri} --host 127.0.0.1 --port 5000)")
    log("time per phase: " + ", ".join(f"{name} {sec:.0f} s" for name, sec in phases.items())
        + f"; total {seconds:.0f} s")
    return {"metrics": metrics, "run_dir": str(run_dir), "seconds": seconds, "config": cfg,
            "phases": phases}


def _calibration_note(run_dir: Path, cfg: Config) -> str:
    """", seen-score calibration 0.05 (chosen on val)" as the run's final_metrics.json says."""
    from splitmatch.checkpoints import FINAL_METRICS
    try:
        used = json.loads((run_dir / FINAL_METRICS).read_text())["seen_score_calibration"]
    except (OSError, KeyError, ValueError):
        return ""
    how = f" (chosen on {cfg.data.select_split})" if (
        cfg.inference.seen_score_calibration == "auto") else ""
    return f", seen-score calibration {used:g}{how}"
