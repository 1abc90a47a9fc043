"""`compare --parent` on an ablation parent (tag splitmatch.kind=ablation): one line per row of the
table, the mean and 95% interval of hIoU, sIoU and uIoU over the row's (split, seed) runs, and the
paired differences against the baseline and against the row before, each "not shown" when its
interval contains 0. The statistics are `splitmatch.stats`' (the ablation command's own): nothing
is estimated here, only read out of MLflow and laid out.

What `splitmatch ablation` logs, and this reads: each child run has tags `row` and `split` and
param `seed`, metrics hIoU, sIoU, uIoU (test split) and final_select_hIoU, ... (the selection
split, at the end); the parent says which of the two the ablation reports (tag reported_split:
"val" or "test") and the rows' order (tag row_order: the names joined by " | ", baseline first).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from splitmatch import stats
from splitmatch.splits import DEV, HOLDOUT

METRICS = ("hIoU", "sIoU", "uIoU")
# Which figures of a child are reported → the child metric that holds each.
REPORTED_KEYS = {"test": "{}", "select": "final_select_{}"}
# The ablation's own rule, by the family of its splits (parent tag `family`): development splits
# report the selection split (choices are made there), held-out ones the test split. It decides
# when present: reported_split is a split's *name*, and VOC's test split is named "val".
FAMILY_REPORTS = {DEV: "select", HOLDOUT: "test"}
ROW_SEPARATOR = " | "
DELTAS = {"delta_vs_baseline": "vs baseline", "delta_vs_previous": "vs previous"}


@dataclass
class AblationRuns:
    """The children's figures of the reported split, by row (in table order) and (split, seed)."""

    rows: dict[str, dict[tuple, dict[str, float]]]
    reported_split: str  # as the page names it: "val, the selection split", "test, the test split"
    children: int
    notes: list[str] = field(default_factory=list)  # what the page says about the runs read


def is_ablation(parent_tags: dict) -> bool:
    return parent_tags.get("splitmatch.kind") == "ablation"


def ablation_runs(frame: pd.DataFrame, parent_tags: dict) -> AblationRuns:
    """The parent's children (`runs.load_runs`' frame, newest first) as `stats.summarize_rows`
    takes them. A (row, split, seed) logged twice (a rerun) counts once: its newest run."""
    notes = []
    name, family = parent_tags.get("reported_split"), parent_tags.get("family")
    reported = FAMILY_REPORTS.get(family) or {"test": "test", "val": "select"}.get(name)
    if reported is None:
        raise ValueError(f"ablation parent: cannot tell which figures it reports: tag "
                         f"reported_split is {name!r} (expected 'val' or 'test') and tag family "
                         f"is {family!r} (expected one of {sorted(FAMILY_REPORTS)})")
    order = [name for name in parent_tags.get("row_order", "").split(ROW_SEPARATOR) if name]
    rows: dict[str, dict[tuple, dict[str, float]]] = {name: {} for name in order}
    unlabeled = duplicates = without = 0
    # Oldest first, so that rows missing from row_order follow in the order they were run; a
    # newer run of the same (row, split, seed) replaces an older one.
    for child in reversed(frame.to_dict("records")):
        row, split, seed = child.get("tags.row"), child.get("tags.split"), child.get("params.seed")
        if not all(isinstance(v, str) for v in (row, split, seed)):
            unlabeled += 1
            continue
        figures = {m: _number(child.get(f"metrics.{REPORTED_KEYS[reported].format(m)}"))
                   for m in METRICS}
        without += all(math.isnan(v) for v in figures.values())
        duplicates += (split, seed) in rows.setdefault(row, {})
        rows[row][(split, seed)] = figures
    if not order and rows:
        notes.append("The parent run has no row_order tag: rows in the order they were run, "
                     "the first taken as the baseline.")
    elif set(rows) - set(order):
        notes.append(f"Rows not in the parent's row_order, after it: "
                     f"{', '.join(r for r in rows if r not in order)}.")
    if without:
        notes.append(f"{without} run(s) have none of the reported figures (failed, stopped or "
                     f"still running): left out of the means.")
    if duplicates:
        notes.append(f"{duplicates} run(s) repeat a (row, split, seed): the newest is used.")
    if unlabeled:
        notes.append(f"{unlabeled} child run(s) without a row, split or seed are left out.")
    label = f"{name or reported}, the {'test' if reported == 'test' else 'selection'} split"
    return AblationRuns(rows, label, len(frame), notes)


def summary_table(summary: dict) -> pd.DataFrame:
    """runs.csv of an ablation: per row its pairs, each metric's mean and interval, and each paired
    difference's mean, interval and whether it is shown; numbers as numbers."""
    records = []
    for row, entry in summary.items():
        record = {"row": row, "pairs": entry[METRICS[0]]["n"]}
        for metric in METRICS:
            record.update(_columns(metric, entry[metric]))
        for label, suffix in DELTAS.items():
            for metric in METRICS:
                delta = entry.get(label, {}).get(metric)
                record.update(_columns(f"{metric} {suffix}", delta, with_shown=True))
        record["interval"] = stats.INTERVAL
        records.append(record)
    return pd.DataFrame(records)


def text_table(summary: dict) -> pd.DataFrame:
    """The page's and the terminal's table: "mean [lo, hi]" per metric, the differences signed,
    "not shown" when their interval contains 0; the baseline's differences "–"."""
    records = []
    for row, entry in summary.items():
        record = {"row": row, "pairs": entry[METRICS[0]]["n"]}
        record.update({m: stats.format_estimate(entry[m]) for m in METRICS})
        for label, suffix in DELTAS.items():
            for metric in METRICS:
                delta = entry.get(label, {}).get(metric)
                record[f"{metric} {suffix}"] = ("–" if delta is None
                                                else stats.format_estimate(delta, signed=True))
        records.append(record)
    return pd.DataFrame(records)


def _columns(name: str, result: dict | None, with_shown: bool = False) -> dict:
    rounded = stats.rounded(result, 4) if result is not None else {"mean": None, "ci95": None}
    ci = rounded["ci95"] or [None, None]
    columns = {name: rounded["mean"], f"{name} ci95 lo": ci[0], f"{name} ci95 hi": ci[1]}
    if with_shown:
        columns[f"{name} shown"] = None if result is None else result["shown"]
    return columns


def _number(value) -> float:
    number = pd.to_numeric(value, errors="coerce")
    return math.nan if pd.isna(number) else float(number)
