"""`splitmatch ablation`: the paper's Table 2 on any config — baseline, +SM, +SM+MFE, +SM+MFE+RQ —
with the same seed, data and budget, every row an MLflow run under one parent run.

Random queries only exist at inference, so the +RQ row evaluates the +SM+MFE model again with
`inference.num_random_queries` extra queries instead of training a fourth, identical model.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from splitmatch.config import Config, config_from_dict, to_dict
from splitmatch.tracking import (Tracker, artifact_root, default_tracking_uri, find_or_create_run,
                                 git_commit)

ROWS = ("baseline", "+SM", "+SM+MFE", "+SM+MFE+RQ")
METRICS = ("hIoU", "sIoU", "uIoU")


def row_config(cfg: Config, row: str, seed: int, parent: str) -> Config:
    """The config of one trained row (the RQ row reuses +SM+MFE's model)."""
    data = to_dict(cfg)
    data["seed"] = seed
    data["name"] = f"{parent}-s{seed}-{row.replace('+', 'plus_')}"
    data["matching"]["mode"] = "baseline" if row == "baseline" else "split"
    data["model"]["mfe"]["enabled"] = row in ("+SM+MFE", "+SM+MFE+RQ")
    # Without RQ, rows evaluate the trained queries only; the RQ row adds them.
    data["inference"]["num_random_queries"] = 0
    data["tune"] = {}
    return config_from_dict(data, f"ablation row {row}")


def run_ablation(cfg: Config, seeds: int = 1, log=print) -> dict:
    """Train and evaluate every row for `seeds` seeds; returns {row: {metric: mean}} (+ std)."""
    from mlflow.tracking import MlflowClient

    from splitmatch.config import resolve_paths
    from splitmatch.train import FINAL_METRICS, evaluate_checkpoint, launch

    cfg = resolve_paths(cfg)
    if cfg.inference.num_random_queries == 0:
        raise ValueError("inference.num_random_queries is 0: the +RQ row would equal +SM+MFE; "
                         "set it (the paper adds 50 + 50 at test time)")
    uri = cfg.tracking.uri or default_tracking_uri(cfg.train.storage_path)
    client = MlflowClient(uri)
    parent_name = f"{cfg.name}-ablation"
    parent_id, _ = find_or_create_run(
        client, cfg.tracking.experiment, str(Path(cfg.train.storage_path) / parent_name), parent_name,
        tags={"splitmatch.kind": "ablation", "git_commit": git_commit(), "dataset": cfg.data.dataset,
              "unseen": ",".join(cfg.data.unseen or [])},
        artifact_location=artifact_root(uri))
    results: dict[str, list[dict]] = {row: [] for row in ROWS}
    for offset in range(seeds):
        seed = cfg.seed + offset
        for row in ROWS[:3]:
            row_cfg = row_config(cfg, row, seed, parent_name)
            done = Path(row_cfg.train.storage_path) / row_cfg.name / FINAL_METRICS
            if done.is_file():
                # Finished by an earlier, interrupted ablation: keep what it measured (a resumed
                # Train run with nothing left to do would report nothing).
                log(f"[seed {seed}] {row}: already trained, figures from {done}")
                metrics = json.loads(done.read_text())
            else:
                log(f"[seed {seed}] training {row} ({row_cfg.name})")
                result = launch(row_cfg, resume=True, build_pseudo_masks=True,
                                parent_run_id=parent_id, log=lambda *_: None)
                if result.error is not None:
                    raise RuntimeError(f"ablation row {row} (seed {seed}) failed: {result.error}; "
                                       f"finished rows are kept: rerun the command to go on")
                metrics = result.metrics
            results[row].append({k: metrics[k] for k in METRICS})
            log(f"[seed {seed}] {row}: " + "  ".join(f"{k} {metrics[k]:.2f}" for k in METRICS))
        # +RQ: the +SM+MFE model, evaluated with the extra random queries.
        trained = row_config(cfg, "+SM+MFE", seed, parent_name)
        rq_cfg = config_from_dict({**to_dict(trained), "inference": {
            **to_dict(trained)["inference"], "num_random_queries": cfg.inference.num_random_queries}})
        run_dir = Path(trained.train.storage_path) / trained.name
        metrics = evaluate_checkpoint(rq_cfg, _final_model(run_dir), log=lambda *_: None)
        rq_name = f"{parent_name}-s{seed}-plus_SMplus_MFEplus_RQ"
        tracker = Tracker(uri, cfg.tracking.experiment, str(run_dir) + "+RQ", rq_name,
                          run_dir / "mlflow_offline_rq.jsonl", parent_id, log=log)
        tracker.open({"seed": seed, "inference.num_random_queries": cfg.inference.num_random_queries,
                      "evaluates": trained.name}, {"row": "+SM+MFE+RQ"})
        tracker.log_metrics({k: metrics[k] for k in (*METRICS, "mIoU") if not math.isnan(metrics[k])},
                            step=cfg.train.max_iters)
        tracker.finish()
        results["+SM+MFE+RQ"].append({k: metrics[k] for k in METRICS})
        log(f"[seed {seed}] +SM+MFE+RQ: " + "  ".join(f"{k} {metrics[k]:.2f}" for k in METRICS))

    summary = {row: {k: statistics.fmean(r[k] for r in rows) for k in METRICS}
               for row, rows in results.items()}
    spread = {row: {k: statistics.pstdev([r[k] for r in rows]) for k in METRICS}
              for row, rows in results.items()}
    table = ["row            " + "".join(f"{k:>16}" for k in METRICS)]
    for row in ROWS:
        cells = "".join(f"{summary[row][k]:>9.2f} ± {spread[row][k]:4.2f}" if seeds > 1
                        else f"{summary[row][k]:>16.2f}" for k in METRICS)
        table.append(f"{row:<15}{cells}")
    text = "\n".join(table)
    client.log_text(parent_id, text, "ablation_table.txt")
    client.log_dict(parent_id, {"mean": summary, "std": spread, "per_seed": results,
                                "seeds": seeds}, "ablation.json")
    for row in ROWS:
        for k in METRICS:  # MLflow names allow no "+": "+SM+MFE/hIoU" is logged as "SM_MFE/hIoU"
            client.log_metric(parent_id, f"{metric_prefix(row)}/{k}", summary[row][k])
    client.set_terminated(parent_id, status="FINISHED")
    log(f"ablation over {seeds} seed(s) (mean{' ± std' if seeds > 1 else ''}):\n{text}")
    log(json.dumps({row: {k: round(summary[row][k], 2) for k in METRICS} for row in ROWS}))
    return {"mean": summary, "std": spread, "per_seed": results, "parent_run_id": parent_id}


def metric_prefix(row: str) -> str:
    """"+SM+MFE" -> "SM_MFE": a row name MLflow accepts in a metric name."""
    return row.lstrip("+").replace("+", "_")


def _final_model(run_dir: Path) -> Path:
    """The last checkpoint of a finished run (rows are compared at equal budget, not best-of)."""
    import torch

    checkpoints = [p for p in run_dir.glob("checkpoint_*") if (p / "state.pt").is_file()]
    if not checkpoints:
        raise FileNotFoundError(f"no checkpoint in {run_dir}")
    return max(checkpoints, key=lambda p: torch.load(p / "state.pt", map_location="cpu",
                                                    weights_only=True)["iteration"])
