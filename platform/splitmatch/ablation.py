"""`splitmatch ablation`: the paper's ablation tables on any config, every row with the same data,
seed and budget, on one or several unseen-class splits, every row an MLflow run under one parent:
- Table 2 (default): baseline, +SM, +SM+MFE, +SM+MFE+RQ;
- Table 3 (`--table 3`): the candidates' class embedding in training: MFE features Fu, Fu + MLP,
  CLIP CLS tokens Cu (`model.candidate_embedding`), each the full model with random queries;
- Table 4 (`--table 4`): the MFE dense blocks' normalisation: none, BN, GN (`model.mfe.norm`).

A gain measured on the one split its settings were chosen on is no evidence, so `--splits K` runs
every row on K splits (`splits.draw_unseen_splits`: the standard split first, then splits drawn
reproducibly from `--split-seed`) and reports a table per split plus the mean ± std over all
(split, seed) pairs. Settings are chosen on the standard split and held fixed for the others.

Random queries only exist at inference, so the +RQ row evaluates the +SM+MFE model again with
`inference.num_random_queries` extra queries instead of training a fourth, identical model.

The whole protocol is resumable: a row is kept when its run directory holds a finished run whose
stored config matches the row's config (`train.check_run_config`), a half-trained row resumes
from its latest checkpoint, and a row made under another config is refused by name. A row whose
config equals, but for its name, a finished row of another table (Table 3's Cu and Table 4's GN
are both the full model) takes that row's figures instead of training the same model again.
"""
from __future__ import annotations

import json
import math
import statistics

from splitmatch.config import (Config, ConfigError, apply_overrides, config_differences,
                               config_from_dict, flatten, to_dict)
from splitmatch.splits import draw_unseen_splits
from splitmatch.tracking import Tracker, default_tracking_uri, open_parent_run

METRICS = ("hIoU", "sIoU", "uIoU")
# Rows of every table: what each row changes in the config (`--set` overrides). Table 2's +RQ
# row trains nothing (see EVALUATES); Tables 3 and 4 vary the full model, which is then tested
# with the config's random queries, as the paper's figures for them are.
FULL_MODEL = ["matching.mode=split", "model.mfe.enabled=true"]
TABLES: dict[int, dict[str, list[str]]] = {
    2: {"baseline": ["matching.mode=baseline", "model.mfe.enabled=false"],
        "+SM": ["matching.mode=split", "model.mfe.enabled=false"],
        "+SM+MFE": FULL_MODEL, "+SM+MFE+RQ": []},
    3: {"Fu": [*FULL_MODEL, "model.candidate_embedding=dense"],
        "Fu+MLP": [*FULL_MODEL, "model.candidate_embedding=dense_mlp"],
        "Cu": [*FULL_MODEL, "model.candidate_embedding=cls"]},
    4: {"no norm": [*FULL_MODEL, "model.mfe.norm=none"],
        "BN": [*FULL_MODEL, "model.mfe.norm=bn"],
        "GN": [*FULL_MODEL, "model.mfe.norm=gn"]},
}
ROWS = tuple(TABLES[2])
# Random queries only exist at inference: this row evaluates that row's model with them.
EVALUATES = {"+SM+MFE+RQ": "+SM+MFE"}


def split_config(cfg: Config, unseen: tuple[str, ...]) -> Config:
    return config_from_dict({**to_dict(cfg), "data": {**to_dict(cfg)["data"],
                                                      "unseen": list(unseen)}}, "ablation split")


def parent_name(cfg: Config, table: int) -> str:
    return f"{cfg.name}-ablation" if table == 2 else f"{cfg.name}-table{table}"


def twin_rows(base: Config, table: int, wanted: Config, seed: int,
              split_index: int) -> list[Config]:
    """The trained rows of the other tables whose config equals `wanted` (this row's) in
    everything that can change a result (only their names differ): the same model, trained once."""
    twins = []
    for other, rows in TABLES.items():
        if other == table:
            continue
        for name in (r for r in rows if r not in EVALUATES):
            candidate = row_config(base, name, seed, parent_name(base, other), split_index)
            if not config_differences(candidate, wanted):
                twins.append(candidate)
    return twins


def _finished_twin(base: Config, table: int, wanted: Config, seed: int, split_index: int):
    """(config, run folder) of a twin row (`twin_rows`) that has finished, or None."""
    from splitmatch.train import FINAL_METRICS, run_directory

    for twin in twin_rows(base, table, wanted, seed, split_index):
        run_dir = run_directory(twin)
        if (run_dir / FINAL_METRICS).is_file():
            return twin, run_dir
    return None


def row_config(cfg: Config, row: str, seed: int, parent: str, split_index: int = 0) -> Config:
    """The config of one trained row (the RQ row reuses +SM+MFE's model)."""
    table = next(number for number, rows in TABLES.items() if row in rows)
    data = to_dict(cfg)
    data["seed"] = seed
    data["name"] = f"{parent}-u{split_index}-s{seed}-{row.replace('+', 'plus_').replace(' ', '_')}"
    apply_overrides(data, TABLES[table][EVALUATES.get(row, row)], f"ablation row {row}")
    if table == 2:
        # Without RQ, rows evaluate the trained queries only; the RQ row adds them.
        data["inference"]["num_random_queries"] = 0
    data["tune"] = {}
    return config_from_dict(data, f"ablation row {row}")


def run_ablation(cfg: Config, seeds: int = 1, splits: int = 1, split_seed: int = 0,
                 table: int = 2, log=print) -> dict:
    """Train and evaluate every row for every (split, seed); returns the mean/std per row over
    all of them, the per-split tables and the per-class report."""
    from mlflow.tracking import MlflowClient

    from splitmatch.config import resolve_paths
    from splitmatch.diagnose import class_report, format_class_report
    from splitmatch.train import (FINAL_METRICS, check_run_config, evaluate_checkpoint,
                                  result_checkpoint, launch, run_directory, run_location)

    cfg = resolve_paths(cfg)
    if table not in TABLES:
        raise ConfigError(f"--table {table}: the ablation tables are {sorted(TABLES)}")
    rows = tuple(TABLES[table])
    if cfg.inference.num_random_queries == 0:
        raise ConfigError("inference.num_random_queries is 0: the +RQ row would equal +SM+MFE; "
                          "set it (the paper adds 50 + 50 at test time)")
    unseen_splits = draw_unseen_splits(cfg.data.dataset, splits, split_seed, first=cfg.data.unseen)
    uri = cfg.tracking.uri or default_tracking_uri(cfg.train.storage_path)
    client = MlflowClient(uri)
    parent = parent_name(cfg, table)
    parent_id, _ = open_parent_run(client, uri, cfg, parent, "ablation", {
        "table": str(table), "unseen": " | ".join(",".join(u) for u in unseen_splits)})
    # per_run[split][row]: one entry per seed, {"hIoU", "sIoU", "uIoU", "per_class"}
    per_run: list[dict[str, list[dict]]] = []
    reports = []
    for split_index, unseen in enumerate(unseen_splits):
        base = split_config(cfg, unseen)
        results: dict[str, list[dict]] = {row: [] for row in rows}
        where = f"split {split_index} ({', '.join(unseen)})"
        for offset in range(seeds):
            seed = cfg.seed + offset
            tag = f"[{where}, seed {seed}]"
            for row in (r for r in rows if r not in EVALUATES):
                row_cfg = row_config(base, row, seed, parent, split_index)
                run_dir = run_directory(row_cfg)
                done = run_dir / FINAL_METRICS
                if done.is_file():
                    check_run_config(run_dir, row_cfg)  # launch(resume=True) checks the others
                    # Finished by an earlier, interrupted ablation under the same config: keep
                    # what it measured (a resumed Train run with nothing left would report nothing).
                    log(f"{tag} {row}: already trained, figures from {done}")
                    metrics = json.loads(done.read_text())
                elif found := _finished_twin(base, table, row_cfg, seed, split_index):
                    twin, twin_dir = found
                    check_run_config(twin_dir, row_cfg)
                    log(f"{tag} {row}: the same model as {twin.name}, figures from "
                        f"{twin_dir / FINAL_METRICS}")
                    metrics = json.loads((twin_dir / FINAL_METRICS).read_text())
                    _log_row(uri, row_cfg, parent_id, row_cfg.name, run_location(row_cfg),
                             run_dir / "mlflow_offline.jsonl", flatten(row_cfg),
                             {"row": row, "reuses": twin.name}, metrics, log)
                else:
                    log(f"{tag} training {row} ({row_cfg.name})")
                    result = launch(row_cfg, resume=True, build_pseudo_masks=True, may_grow=(),
                                    parent_run_id=parent_id, log=lambda *_: None)
                    if result.error is not None:
                        raise RuntimeError(f"ablation row {row} ({where}, seed {seed}) failed: "
                                           f"{result.error}; finished rows are kept: rerun the "
                                           f"command to go on")
                    metrics = result.metrics
                results[row].append(_row_result(metrics))
                log(f"{tag} {row}: " + "  ".join(f"{k} {metrics[k]:.2f}" for k in METRICS))
            for row in (r for r in rows if r in EVALUATES):
                # +RQ: the +SM+MFE model, evaluated with the extra random queries.
                trained = row_config(base, EVALUATES[row], seed, parent, split_index)
                rq_cfg = config_from_dict({**to_dict(trained), "inference": {
                    **to_dict(trained)["inference"],
                    "num_random_queries": cfg.inference.num_random_queries}})
                run_dir = run_directory(trained)
                metrics = evaluate_checkpoint(rq_cfg, result_checkpoint(run_dir),
                                              log=lambda *_: None)
                _log_row(uri, rq_cfg, parent_id,
                         f"{parent}-u{split_index}-s{seed}-{row.replace('+', 'plus_')}",
                         run_location(trained) + "+RQ", run_dir / "mlflow_offline_rq.jsonl",
                         {"seed": seed, "data.unseen": list(unseen),
                          "inference.num_random_queries": cfg.inference.num_random_queries,
                          "evaluates": trained.name}, {"row": row}, metrics, log)
                results[row].append(_row_result(metrics))
                log(f"{tag} {row}: " + "  ".join(f"{k} {metrics[k]:.2f}" for k in METRICS))
        per_run.append(results)
        report = class_report(base, {row: [r["per_class"] for r in runs]
                                     for row, runs in results.items()})
        reports.append(report)
        split_table = _table({row: [{k: r[k] for k in METRICS} for r in runs]
                              for row, runs in results.items()})
        text = f"{where}, {seeds} seed(s):\n{split_table}\n{format_class_report(report)}"
        log(text)
        client.log_text(parent_id, text, f"split{split_index}_table.txt")

    pooled = {row: [{k: r[k] for k in METRICS} for split in per_run for r in split[row]]
              for row in rows}
    summary = {row: {k: statistics.fmean(r[k] for r in runs) for k in METRICS}
               for row, runs in pooled.items()}
    spread = {row: {k: statistics.pstdev([r[k] for r in runs]) for k in METRICS}
              for row, runs in pooled.items()}
    text = _table(pooled)
    per_split = [{row: {k: statistics.fmean(r[k] for r in split[row]) for k in METRICS}
                  for row in rows} for split in per_run]
    client.log_text(parent_id, text, "ablation_table.txt")
    client.log_dict(parent_id, {"mean": summary, "std": spread, "per_split": per_split,
                                "splits": [list(u) for u in unseen_splits], "seeds": seeds,
                                "class_reports": reports,
                                "per_run": [{row: [{k: r[k] for k in METRICS} for r in runs]
                                             for row, runs in split.items()} for split in per_run]},
                    "ablation.json")
    for row in rows:
        for k in METRICS:  # MLflow names allow no "+": "+SM+MFE/hIoU" is logged as "SM_MFE/hIoU"
            client.log_metric(parent_id, f"{metric_prefix(row)}/{k}", summary[row][k])
    client.set_terminated(parent_id, status="FINISHED")
    runs = len(unseen_splits) * seeds
    log(f"ablation over {len(unseen_splits)} split(s) x {seeds} seed(s) "
        f"(mean{' ± std' if runs > 1 else ''} over {runs} run(s) per row):\n{text}")
    log(json.dumps({row: {k: round(summary[row][k], 2) for k in METRICS} for row in rows}))
    return {"mean": summary, "std": spread, "per_split": per_split, "class_reports": reports,
            "splits": unseen_splits, "parent_run_id": parent_id}


def _log_row(uri: str, cfg: Config, parent_id: str, run_name: str, run_key: str, offline_path,
             params: dict, tags: dict, metrics: dict, log) -> None:
    """The MLflow child run of a row that trained nothing itself (+RQ, or a twin's figures)."""
    result = _row_result(metrics)
    tracker = Tracker(uri, cfg.tracking.experiment, run_key, run_name, offline_path, parent_id,
                      log=log)
    tracker.open(params, tags)
    tracker.log_metrics({k: metrics[k] for k in (*METRICS, "mIoU")
                         if not math.isnan(metrics[k])}, step=cfg.train.max_iters)
    tracker.log_metrics({f"IoU/{name}": v for name, v in result["per_class"].items()
                         if not math.isnan(v)}, step=cfg.train.max_iters)
    tracker.finish()


def _row_result(metrics: dict) -> dict:
    """hIoU/sIoU/uIoU plus per-class IoU, from a training report ("IoU/<class>" keys) or an
    evaluation result ("per_class")."""
    per_class = metrics.get("per_class") or {k[4:]: v for k, v in metrics.items()
                                             if k.startswith("IoU/")}
    return {**{k: metrics[k] for k in METRICS}, "per_class": per_class}


def _table(rows: dict[str, list[dict]]) -> str:
    """One line per row: the mean (± std when there is more than one run) of each metric."""
    lines = ["row            " + "".join(f"{k:>16}" for k in METRICS)]
    for row, runs in rows.items():
        cells = ""
        for k in METRICS:
            values = [r[k] for r in runs]
            mean = statistics.fmean(values)
            cells += (f"{mean:>9.2f} ± {statistics.pstdev(values):4.2f}" if len(values) > 1
                      else f"{mean:>16.2f}")
        lines.append(f"{row:<15}{cells}")
    return "\n".join(lines)


def metric_prefix(row: str) -> str:
    """"+SM+MFE" -> "SM_MFE", "no norm" -> "no_norm": a row name MLflow accepts in a metric name."""
    return row.lstrip("+").replace("+", "_").replace(" ", "_")
