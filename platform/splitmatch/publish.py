"""A finished run's results, published: its HTML results page (dashboards/run_page.py) and its
weights as the run's MLflow logged model (pyfunc.py)."""
from __future__ import annotations

from pathlib import Path

from splitmatch import storage
from splitmatch.checkpoints import result_checkpoint, run_directory, run_key, run_location, share
from splitmatch.config import Config, redact, resolve_paths
from splitmatch.dashboards.run_page import PAGE_NAME, write_run_page
from splitmatch.pyfunc import log_model
from splitmatch.splits import class_names as dataset_classes
from splitmatch.tracking import OFFLINE_FILE, default_tracking_uri, find_run


def publish_results(cfg: Config, log=print) -> Path | None:
    """After a finished run: its HTML results page next to it (dashboards/run_page.py), logged to
    its MLflow run, and its weights as the run's MLflow logged model (a pyfunc model, pyfunc.py).
    Returns the page's local path, or None when MLflow does not know the run (an unreachable
    server)."""
    cfg = resolve_paths(cfg)
    uri = cfg.tracking.uri or default_tracking_uri(cfg.train.storage_path)
    run = find_run(uri, cfg.tracking.experiment, run_key(cfg))
    if run is None:
        # The server was away: the run's records wait in its offline file, and replaying them
        # logs the page and the model too.
        offline = storage.local_path(run_location(cfg)) / OFFLINE_FILE
        log(f"no results page or MLflow model yet: MLflow at {redact(uri)} has no run of "
            f"{cfg.name}; `splitmatch sync-mlflow {offline}` logs them with the run's records"
            if offline.is_file() else
            f"no results page: MLflow at {redact(uri)} has no run of {cfg.name}")
        return None
    run_dir = run_directory(cfg)
    page = write_run_page(cfg, uri, run.info.run_id, run_dir)
    share(run_dir, run_location(cfg), PAGE_NAME)
    log(f"results page: {page}")
    clip_weights = storage.resolve_file(cfg.clip.pretrained) if cfg.clip.pretrained else None
    # Linked to the run's figures of its last step: the test split's hIoU, sIoU, uIoU among them.
    model = log_model(uri, run.info.run_id, result_checkpoint(run_dir), clip_weights,
                      list(dataset_classes(cfg.data.dataset)),
                      step=int(run.data.metrics.get("iteration", 0)))
    log(f"MLflow model: {model} (mlflow.pyfunc.load_model(...).predict(images, "
        f"params={{'classes': [...]}}))")
    return page
