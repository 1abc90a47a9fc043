"""`splitmatch ablation`: the paper's ablation tables on any config, every row with the same data,
seeds, budget and test-time protocol, over (split, seed) pairs, every row an MLflow run under one
parent:
- Table 2 (default): baseline, +SM, +SM+MFE, +SM+MFE+RQ;
- Table 3 (`--table 3`): the candidates' class embedding in training: MFE features Fu, Fu + MLP,
  CLIP CLS tokens Cu (`model.candidate_embedding`), each the full model with random queries;
- Table 4 (`--table 4`): the MFE dense blocks' normalisation: none, BN, GN (`model.mfe.norm`);
- the deviations table (`--table paper`): the config (the project's preset), the same with each
  of its deviations from the paper switched off in turn, and the paper as written (all off).

Splits come from the two families of `splits.py`: `--splits K` runs on the first K development
splits and reports their **val** figures (what choices are made on); `--holdout K` runs on the
first K held-out splits and reports their **test** figures (read once the choices are fixed).
Every row is scored over the same (split, seed) pairs: mean and 95% interval per row, and paired
differences to the baseline (first row) and to the row before (`stats.py`).

Every row has the config's test-time protocol: `inference.seen_score_calibration` (a number, or
`auto`: chosen per row on val from `inference.calibration_grid`) applies to all rows alike, and
the value each row used is logged and printed.

Rows that only change how a trained model is evaluated (random queries, calibration off) evaluate
that model again instead of training an identical one. The whole protocol is resumable: a row is
kept when its run directory holds a finished run whose stored config matches the row's
(`train.check_run_config`), a half-trained row resumes from its latest checkpoint, and a row made
under another config is refused by name. A row whose config equals, but for its name and how it
is evaluated, a finished row of another table uses that row's model instead of training the same
one again (its figures, or the model evaluated with this row's settings).
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass

from splitmatch import splits as split_families
from splitmatch.config import (RESULT_NEUTRAL_KEYS, Config, ConfigError, apply_overrides,
                               config_differences, config_from_dict, flatten, resolve_paths,
                               to_dict)
from splitmatch.splits import DEV, HOLDOUT, Split
from splitmatch.stats import INTERVAL, format_estimate, rounded, summarize_rows
from splitmatch.tracking import Tracker, default_tracking_uri, open_parent_run

METRICS = ("hIoU", "sIoU", "uIoU")
FULL_MODEL = ["matching.mode=split", "model.mfe.enabled=true"]
# The project's deviations from the paper as written (docs/method.md, "Where we differ"): each
# is switched off by these overrides. The paper-as-written preset is the config with all of them.
DEVIATIONS: dict[str, list[str]] = {
    "centring": ["model.center_embeddings=false"],
    "background filter": ["pseudo_masks.background_prompts=[]"],
    "candidate negatives": ["loss.candidate_negatives=all"],
    "per-group normalisation": ["loss.normalization=joint"],
    "masked crop": ["pseudo_masks.cls_input=masked"],
    "calibration": ["inference.seen_score_calibration=0.0"],
}
PAPER_OVERRIDES = [o for overrides in DEVIATIONS.values() for o in overrides]
# Rows of every table: what each row changes in the config (`--set` overrides).
TABLES: dict[str, dict[str, list[str]]] = {
    "2": {"baseline": ["matching.mode=baseline", "model.mfe.enabled=false"],
          "+SM": ["matching.mode=split", "model.mfe.enabled=false"],
          "+SM+MFE": FULL_MODEL, "+SM+MFE+RQ": FULL_MODEL},
    "3": {"Fu": [*FULL_MODEL, "model.candidate_embedding=dense"],
          "Fu+MLP": [*FULL_MODEL, "model.candidate_embedding=dense_mlp"],
          "Cu": [*FULL_MODEL, "model.candidate_embedding=cls"]},
    "4": {"no norm": [*FULL_MODEL, "model.mfe.norm=none"],
          "BN": [*FULL_MODEL, "model.mfe.norm=bn"],
          "GN": [*FULL_MODEL, "model.mfe.norm=gn"]},
    "paper": {"preset": FULL_MODEL,
              **{f"preset - {name}": [*FULL_MODEL, *overrides]
                 for name, overrides in DEVIATIONS.items()},
              "paper": [*FULL_MODEL, *PAPER_OVERRIDES]},
}
ROWS = tuple(TABLES["2"])
# Rows that only change how a trained model is evaluated -> the row whose model they evaluate.
# Random queries exist only at inference, and calibration is a test-time constant.
EVALUATES: dict[str, str] = {"+SM+MFE+RQ": "+SM+MFE", "preset - calibration": "preset"}


def parent_name(cfg: Config, table: str, family: str, first: int = 0) -> str:
    """The parent run's (and folder's) name; `first` held-out splits skipped (`--holdout-from`)
    make another read, under a parent of its own."""
    kind = "ablation" if table == "2" else f"table{table}"
    held_out = "-holdout" + (f"-from{first}" if first else "")
    return f"{cfg.name}-{kind}" + (held_out if family == HOLDOUT else "")


def slug(row: str) -> str:
    """"+SM+MFE" -> "plus_SMplus_MFE", "preset - masked crop" -> "preset_-_masked_crop": a row
    name that fits a run name."""
    return re.sub(r"[^A-Za-z0-9.-]", "_", row.replace("+", "plus_")).replace("__", "_")


def metric_prefix(row: str) -> str:
    """"+SM+MFE" -> "SM_MFE", "no norm" -> "no_norm": a row name MLflow accepts in a metric name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", row.lstrip("+").replace("+", "_")).strip("_")


def table_of(row: str) -> str:
    return next(number for number, rows in TABLES.items() if row in rows)


def on_split(cfg: Config, split: Split) -> Config:
    """`cfg` on `split`, with a selection split to read val figures (and choose calibration) on."""
    data = to_dict(cfg)
    data["data"]["unseen"] = list(split.unseen)
    if split.world_seed is not None:
        data["data"]["toyworld"]["seed"] = split.world_seed
    if data["data"]["select_split"] is None:
        if cfg.data.dataset != "toyworld":
            raise ConfigError("data.select_split is not set: the ablation reads every row's "
                              "val figures (and chooses calibration) on it; set it")
        data["data"]["select_split"] = "val"
    return config_from_dict(data, f"ablation split {split.label}")


def row_config(cfg: Config, row: str, seed: int, parent: str, split: str = "dev0") -> Config:
    """The config of one row on one (split, seed); `cfg` is already on that split (`on_split`)."""
    table = table_of(row)
    data = to_dict(cfg)
    data["seed"] = seed
    data["name"] = f"{parent}-{split}-s{seed}-{slug(row)}"
    apply_overrides(data, TABLES[table][row], f"ablation row {row}")
    if table == "2" and row != "+SM+MFE+RQ":
        # Without RQ, rows evaluate the trained queries only; the RQ row adds them.
        data["inference"]["num_random_queries"] = 0
    data["tune"] = {}
    return config_from_dict(data, f"ablation row {row}")


def trained_config(cfg: Config, row: str, seed: int, parent: str, split: str) -> Config:
    """The config of the model a row's figures come from: its own, or (EVALUATES) the trained
    row's, which differs only in how it is evaluated."""
    if row not in EVALUATES:
        return row_config(cfg, row, seed, parent, split)
    return row_config(cfg, EVALUATES[row], seed, parent, split)


# Keys that do not change what is trained: a row that differs from a trained row only in these
# evaluates that row's model instead of training it again (the model is the one selected on val
# under the trained row's own evaluation settings).
EVALUATION_KEYS = ("inference.",)


def twin_rows(base: Config, table: str, wanted: Config, seed: int, split: str,
              family: str, first: int = 0) -> list[Config]:
    """The trained rows of the other tables whose config equals `wanted` (this row's) in
    everything that can change what is trained (only their names and evaluation settings
    differ): the same model, trained once."""
    twins = []
    for other, rows in TABLES.items():
        if other == table:
            continue
        for name in (r for r in rows if r not in EVALUATES):
            try:
                candidate = row_config(base, name, seed, parent_name(base, other, family, first),
                                       split)
            except ConfigError:  # a row this config cannot have (Table 3's Fu with a batch
                continue         # pool of Cu) was never trained: no twin
            if not config_differences(candidate, wanted,
                                      neutral=(*RESULT_NEUTRAL_KEYS, *EVALUATION_KEYS)):
                twins.append(candidate)
    return twins


def _finished_twin(base: Config, table: str, wanted: Config, seed: int, split: str,
                   family: str, first: int = 0) -> Config | None:
    """The first twin row (`twin_rows`) whose training has finished, or None."""
    from splitmatch.checkpoints import FINAL_METRICS, run_directory

    return next((twin for twin in twin_rows(base, table, wanted, seed, split, family, first)
                 if (run_directory(twin) / FINAL_METRICS).is_file()), None)


def deviation_rows(cfg: Config, log=print) -> tuple[str, ...]:
    """The deviations table's rows for `cfg`: a deviation the config does not take (its row
    would be the preset again) is left out, and said so."""
    preset = row_config(cfg, "preset", cfg.seed, "x")
    rows = []
    for row in TABLES["paper"]:
        if row.startswith("preset - ") and not config_differences(
                preset, row_config(cfg, row, cfg.seed, "x"), neutral=("name", "tune.")):
            log(f"{row}: the config does not take this deviation; row left out")
            continue
        rows.append(row)
    return tuple(rows)


def chosen_rows(table: str, rows: tuple[str, ...], wanted: str) -> tuple[str, ...]:
    """The rows of `rows` named in `wanted` ("preset,preset - calibration"), in the table's order.
    A row that evaluates another row's model needs that row beside it."""
    names = [name.strip() for name in wanted.split(",") if name.strip()]
    unknown = [name for name in names if name not in rows]
    if unknown or not names:
        raise ConfigError(f"--rows: {', '.join(map(repr, unknown)) or 'no row named'}: table "
                          f"{table}'s rows are {', '.join(map(repr, rows))}")
    for name in names:
        if name in EVALUATES and EVALUATES[name] not in names:
            raise ConfigError(f"--rows: '{name}' evaluates the model of '{EVALUATES[name]}'; "
                              f"name that row too")
    return tuple(row for row in rows if row in names)


def ablation_splits(cfg: Config, dev: int, holdout: int, first: int = 0
                    ) -> tuple[str, list[Split]]:
    """(family, splits) the ablation runs on: with `holdout`, held-out splits `first` to
    `first + holdout - 1`. A config that names its own split (data.unseen, or a toy-world seed
    other than 0) runs on exactly that one, if it is a development split."""
    if dev and holdout:
        raise ConfigError("--splits and --holdout: an ablation runs on development splits (their "
                          "val figures, for choices) or on held-out ones (test, for reporting)")
    dataset = cfg.data.dataset
    world_seed = cfg.data.toyworld.seed if dataset == "toyworld" else None
    own = cfg.data.unseen is not None or bool(world_seed)
    if holdout:
        if own:
            raise ConfigError("--holdout draws its splits from the held-out family: leave "
                              "data.unseen and data.toyworld.seed at the standard split's")
        return HOLDOUT, split_families.draw_family(dataset, HOLDOUT, first + holdout)[first:]
    if own:
        split_families.check_split_use(cfg.data, "ablation", holdout=False)
        if dev > 1:
            raise ConfigError(f"--splits {dev}: the config names its own split (data.unseen, "
                              f"data.toyworld.seed); leave them unset to run on the first "
                              f"{dev} development splits")
        unseen = tuple(n for n in split_families.class_names(dataset)
                       if n in (cfg.data.unseen or split_families.default_unseen(dataset)))
        drawn = [s for s in split_families.draw_family(dataset, DEV, 32)
                 if s.unseen == unseen and s.world_seed == world_seed]
        return DEV, drawn or [Split("custom", 0, unseen, world_seed)]
    return DEV, split_families.draw_family(dataset, DEV, max(dev, 1))


def run_ablation(cfg: Config, seeds: int = 1, splits: int = 0, holdout: int = 0,
                 table: str = "2", log=print, rows: str | None = None,
                 holdout_from: int = 0) -> dict:
    """Train and evaluate every row (or those named in `rows`, comma-separated) for every
    (split, seed); returns the per-row summary (mean and interval of each metric, paired
    differences) of the reported split, and the runs."""
    from mlflow.tracking import MlflowClient

    cfg = resolve_paths(cfg)
    plan = _plan(cfg, str(table), seeds, splits, holdout, log, rows, holdout_from)
    client = MlflowClient(plan.uri)
    plan.parent_id, _ = open_parent_run(client, plan.uri, cfg, plan.parent, "ablation", {
        "table": plan.table, "family": plan.family, "reported_split": plan.reported_name,
        "row_order": " | ".join(plan.rows), "splits": " | ".join(s.describe() for s in plan.drawn),
        **({"holdout": f"--holdout {holdout}"
                       + (f" --holdout-from {holdout_from}" if holdout_from else "")}
           if plan.family == HOLDOUT else {})})
    # runs[row][(split label, seed)]: {"test": {...}, "select": {...}, "calibration", "per_class"}
    runs: dict[str, dict[tuple[str, int], dict]] = {row: {} for row in plan.rows}
    reports = [_run_split(cfg, plan, split, runs, client, log) for split in plan.drawn]
    summary = summarize_rows({row: {pair: r[plan.reported] for pair, r in by_pair.items()}
                              for row, by_pair in runs.items()}, METRICS)
    text, result = _record_summary(cfg, plan, runs, summary, reports, client)
    client.set_terminated(plan.parent_id, status="FINISHED")
    log(text)
    log(json.dumps(result))
    return {"rows": result, "summary": summary, "runs": runs, "family": plan.family,
            "splits": plan.drawn, "class_reports": reports, "parent_run_id": plan.parent_id}


@dataclass
class _Plan:
    """What an ablation runs: the table's rows on which splits and seeds, what it reports, and
    where it records."""

    table: str
    rows: tuple[str, ...]
    family: str
    drawn: list[Split]
    seeds: int
    reported: str  # "test" or "select": which figures of each run the tables show
    reported_name: str  # that split's name
    uri: str
    parent: str
    first: int = 0  # held-out splits skipped (--holdout-from)
    parent_id: str = ""


def _plan(cfg: Config, table: str, seeds: int, splits: int, holdout: int, log,
          wanted: str | None = None, first: int = 0) -> _Plan:
    if table not in TABLES:
        raise ConfigError(f"--table {table}: the ablation tables are {sorted(TABLES)}")
    rows = tuple(TABLES[table])
    if cfg.inference.num_random_queries == 0:
        raise ConfigError("inference.num_random_queries is 0: the +RQ row would equal +SM+MFE; "
                          "set it (the paper adds 50 + 50 at test time)")
    if first and not holdout:
        raise ConfigError("--holdout-from skips held-out splits: it goes with --holdout")
    family, drawn = ablation_splits(cfg, splits, holdout, first)
    if table == "paper":
        rows = deviation_rows(cfg, log)
    if wanted is not None:
        rows = chosen_rows(table, rows, wanted)
    return _Plan(table, rows, family, drawn, seeds,
                 reported="test" if family == HOLDOUT else "select",
                 reported_name=(cfg.data.test_split if family == HOLDOUT
                                else (cfg.data.select_split or "val")),
                 uri=cfg.tracking.uri or default_tracking_uri(cfg.train.storage_path),
                 parent=parent_name(cfg, table, family, first), first=first)


def _run_split(cfg: Config, plan: _Plan, split: Split, runs: dict, client, log) -> dict:
    """Every row for every seed on one split, into `runs`; logs the split's table and returns its
    per-class report."""
    from splitmatch.class_report import class_report, format_class_report

    base = on_split(cfg, split)
    where = split.describe()
    for offset in range(plan.seeds):
        seed = cfg.seed + offset
        for row in plan.rows:
            result = _run_row(base, plan, row, seed, split, log)
            runs[row][(split.label, seed)] = result
            log(f"[{where}, seed {seed}] {row}: " + _figures(result, plan.reported))
    per_split = {row: {pair: r for pair, r in runs[row].items() if pair[0] == split.label}
                 for row in plan.rows}
    report = class_report(base, {row: [r["per_class"] for r in per_split[row].values()]
                                 for row in plan.rows})
    text = (f"{where}, {plan.seeds} seed(s), {plan.reported_name} split:\n"
            f"{format_table(per_split, plan.reported, deltas=False)}\n"
            f"{format_class_report(report)}")
    log(text)
    client.log_text(plan.parent_id, text, f"{split.label}_table.txt")
    return report


def _record_summary(cfg: Config, plan: _Plan, runs: dict, summary: dict, reports: list[dict],
                    client) -> tuple[str, dict]:
    """The parent run's table, JSON and per-row metrics; returns the table and the rows' JSON."""
    settings = row_settings(cfg, plan.table, runs)
    pairs = len(plan.drawn) * plan.seeds
    text = (f"{table_name(plan.table)} on {len(plan.drawn)} {plan.family} split(s) x "
            f"{plan.seeds} seed(s), {plan.reported_name} figures; mean [95% interval] over the "
            f"{pairs} (split, seed) pairs ({INTERVAL}); a difference is paired over the same "
            f"pairs and 'not shown' when its interval contains 0:\n"
            f"{format_table(runs, plan.reported, summary=summary)}\nrow settings:\n"
            + "\n".join(f"  {row}: {line}" for row, line in settings.items()))
    client.log_text(plan.parent_id, text, "ablation_table.txt")
    result = {row: _json_row(entry) for row, entry in summary.items()}
    client.log_dict(plan.parent_id, {
        "table": plan.table, "family": plan.family, "reported_split": plan.reported_name,
        "interval": INTERVAL, "splits": [s.__dict__ for s in plan.drawn],
        "seeds": list(range(cfg.seed, cfg.seed + plan.seeds)),
        "rows": result, "settings": settings, "class_reports": reports,
        "runs": {row: [{"split": label, "seed": seed, **_plain(r)}
                       for (label, seed), r in by_pair.items()] for row, by_pair in runs.items()}},
        "ablation.json")
    for row in plan.rows:
        _log_row_metrics(client, plan.parent_id, metric_prefix(row), summary[row])
    return text, result


def _log_row_metrics(client, parent_id: str, prefix: str, entry: dict) -> None:
    """A row's mean, interval and difference to the baseline as the parent run's metrics."""
    for k in METRICS:  # MLflow names allow no "+": "+SM+MFE/hIoU" is logged as "SM_MFE/hIoU"
        if math.isfinite(entry[k]["mean"]):
            client.log_metric(parent_id, f"{prefix}/{k}", entry[k]["mean"])
        if entry[k]["ci95"] is not None:
            client.log_metric(parent_id, f"{prefix}/{k}_ci95_lo", entry[k]["ci95"][0])
            client.log_metric(parent_id, f"{prefix}/{k}_ci95_hi", entry[k]["ci95"][1])
        delta = entry.get("delta_vs_baseline", {}).get(k)
        if delta is not None and math.isfinite(delta["mean"]):
            client.log_metric(parent_id, f"{prefix}/{k}_vs_baseline", delta["mean"])


def _run_row(base: Config, plan: _Plan, row: str, seed: int, split: Split, log) -> dict:
    """One row on one (split, seed): trained (or kept, or a twin's figures), or evaluated again."""
    from splitmatch.checkpoint_evaluation import evaluate_checkpoint
    from splitmatch.checkpoints import (FINAL_METRICS, check_run_config, result_checkpoint,
                                        run_directory, run_location)
    from splitmatch.train import launch

    table, family, parent, parent_id, uri = (plan.table, plan.family, plan.parent,
                                             plan.parent_id, plan.uri)
    tag = f"[{split.describe()}, seed {seed}]"
    row_cfg = row_config(base, row, seed, parent, split.label)
    tags = {"row": row, "split": split.label, "family": family}
    if row in EVALUATES:
        trained = trained_config(base, row, seed, parent, split.label)
        run_dir = run_directory(trained)
        if not (run_dir / FINAL_METRICS).is_file():  # the trained row took a twin's model
            twin = _finished_twin(base, table, trained, seed, split.label, family, plan.first)
            run_dir = run_directory(twin) if twin is not None else run_dir
        metrics = evaluate_checkpoint(row_cfg, result_checkpoint(run_dir), log=lambda *_: None)
        _log_row(uri, row_cfg, parent_id, row_cfg.name, run_location(trained) + "+" + slug(row),
                 run_dir / f"mlflow_offline_{slug(row)}.jsonl",
                 {**flatten(row_cfg), "evaluates": run_dir.name}, tags, metrics, log)
        return _row_result(metrics)
    run_dir = run_directory(row_cfg)
    done = run_dir / FINAL_METRICS
    if done.is_file():
        check_run_config(run_dir, row_cfg)  # launch(resume=True) checks the others
        # Finished by an earlier, interrupted ablation under the same config: keep what it
        # measured (a resumed Train run with nothing left would report nothing).
        log(f"{tag} {row}: already trained, figures from {done}")
        return _row_result(json.loads(done.read_text()))
    twin = _finished_twin(base, table, row_cfg, seed, split.label, family, plan.first)
    if twin is not None:
        twin_dir = run_directory(twin)
        check_run_config(twin_dir, twin)
        if config_differences(twin, row_cfg):  # evaluated otherwise: evaluate it again
            log(f"{tag} {row}: the same model as {twin.name}, evaluated with this row's settings")
            metrics = evaluate_checkpoint(row_cfg, result_checkpoint(twin_dir),
                                          log=lambda *_: None)
        else:
            log(f"{tag} {row}: the same model as {twin.name}, figures from "
                f"{twin_dir / FINAL_METRICS}")
            metrics = json.loads((twin_dir / FINAL_METRICS).read_text())
        _log_row(uri, row_cfg, parent_id, row_cfg.name, run_location(row_cfg),
                 run_dir / "mlflow_offline.jsonl", flatten(row_cfg),
                 {**tags, "reuses": twin.name}, metrics, log)
        return _row_result(metrics)
    log(f"{tag} training {row} ({row_cfg.name})")
    result = launch(row_cfg, resume=True, build_pseudo_masks=True, may_grow=(),
                    parent_run_id=parent_id, log=lambda *_: None, holdout=family == HOLDOUT,
                    tags=tags)
    if result.error is not None:
        raise RuntimeError(f"ablation row {row} ({split.describe()}, seed {seed}) failed: "
                           f"{result.error}; finished rows are kept: rerun the command to go on")
    return _row_result(json.loads(done.read_text()) if done.is_file() else result.metrics)


def _log_row(uri: str, cfg: Config, parent_id: str, run_name: str, run_key: str, offline_path,
             params: dict, tags: dict, metrics: dict, log) -> None:
    """The MLflow child run of a row that trained nothing itself (an evaluation, or a twin's)."""
    result = _row_result(metrics)
    tracker = Tracker(uri, cfg.tracking.experiment, run_key, run_name, offline_path, parent_id,
                      log=log)
    tracker.open(params, tags)
    figures = {**{k: metrics[k] for k in (*METRICS, "mIoU")},
               **{f"final_select_{k}": v for k, v in result["select"].items()},
               "seen_score_calibration": result["calibration"]}
    tracker.log_metrics({k: v for k, v in figures.items() if v is not None and not math.isnan(v)},
                        step=cfg.train.max_iters)
    tracker.log_metrics({f"IoU/{name}": v for name, v in result["per_class"].items()
                         if not math.isnan(v)}, step=cfg.train.max_iters)
    tracker.finish()


def _row_result(metrics: dict) -> dict:
    """The test and selection figures, the calibration used and the per-class IoU, from a
    training's final_metrics.json ("IoU/<class>", "select_<metric>" keys) or an evaluation's
    result ("per_class", "select": {...})."""
    per_class = metrics.get("per_class") or {k[4:]: v for k, v in metrics.items()
                                             if k.startswith("IoU/")}
    select = metrics.get("select") or {k: metrics.get(f"select_{k}", math.nan)
                                       for k in (*METRICS, "mIoU")}
    return {"test": {k: metrics[k] for k in METRICS},
            "select": {k: select.get(k, math.nan) for k in METRICS},
            "calibration": float(metrics.get("seen_score_calibration", math.nan)),
            "per_class": per_class}


def _plain(result: dict) -> dict:
    return {"test": result["test"], "val": result["select"], "calibration": result["calibration"]}


def _figures(result: dict, reported: str) -> str:
    """"val hIoU .. sIoU .. uIoU ..; test hIoU ..; calibration 0.05" for one run. A development
    split's run shows val only: choices are made there, and a test figure in sight invites one."""
    shown = [("select", "val"), ("test", "test")] if reported == "test" else [("select", "val")]
    parts = [f"{name} " + "  ".join(f"{k} {result[key][k]:.2f}" for k in METRICS)
             for key, name in shown]
    return "; ".join(parts) + f"; calibration {result['calibration']:g}"


def format_table(runs: dict[str, dict], reported: str, summary: dict | None = None,
                 deltas: bool = True) -> str:
    """One line per row: each metric's mean [95% interval]; with `deltas`, the paired
    differences of hIoU and uIoU to the baseline and to the row before."""
    if summary is None:
        summary = summarize_rows({row: {p: r[reported] for p, r in by_pair.items()}
                                  for row, by_pair in runs.items()}, METRICS)
    width = max(len(row) for row in runs) + 2
    header = f"{'row':<{width}}" + "".join(f"{k:>24}" for k in METRICS)
    if deltas:
        header += "".join(f"{label:>34}" for label in ("hIoU vs baseline", "hIoU vs previous",
                                                        "uIoU vs baseline", "uIoU vs previous"))
    lines = [header]
    for row, entry in summary.items():
        line = f"{row:<{width}}" + "".join(f"{format_estimate(entry[k]):>24}" for k in METRICS)
        if deltas:
            for metric in ("hIoU", "uIoU"):
                for label in ("delta_vs_baseline", "delta_vs_previous"):
                    delta = entry.get(label, {}).get(metric)
                    cell = "" if delta is None else format_estimate(delta, signed=True)
                    line += f"{cell:>34}"
        lines.append(line.rstrip())
    return "\n".join(lines)


def row_settings(cfg: Config, table: str, runs: dict[str, dict]) -> dict[str, str]:
    """What each row changes in the config, and the calibration it was evaluated with."""
    grid = "/".join(f"{v:g}" for v in cfg.inference.calibration_grid)
    out = {}
    for row, overrides in TABLES[table].items():
        if row not in runs:
            continue
        used = Counter(f"{r['calibration']:g}" for r in runs[row].values())
        changes = [o for o in overrides if o not in FULL_MODEL or table == "2"]
        if row in EVALUATES:
            changes = [*changes, f"(evaluates {EVALUATES[row]}'s model)"]
        calibration = flatten(row_config(cfg, row, cfg.seed, "x"))[
            "inference.seen_score_calibration"]
        how = (f"calibration auto from {grid} on val" if calibration == "auto"
               else f"calibration {calibration}")
        out[row] = (", ".join(changes) or "the config as it is") + f"; {how} (used: " + ", ".join(
            f"{value} x{count}" for value, count in sorted(used.items())) + ")"
    return out


def table_name(table: str) -> str:
    return "the deviations table" if table == "paper" else f"Table {table}"


def _json_row(entry: dict) -> dict:
    """One row of the JSON last line: {metric: {mean, ci95}}, plus each delta in the same form."""
    out = {k: rounded(entry[k]) for k in METRICS}
    for label in ("delta_vs_baseline", "delta_vs_previous"):
        if label in entry:
            out[label] = {k: rounded(v) for k, v in entry[label].items()}
    return out
