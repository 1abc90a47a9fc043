"""Training runs out of MLflow: one pandas row per run, ranked on its selection figure (its best
hIoU on the selection split, `splitmatch.selection`: the rule `tune` ranks its trials by), with the
test figures beside it, and what became of the run in words (finished, stopped early, failed...).

Reads through an explicit `MlflowClient(tracking_uri=...)`, never the process-wide tracking URI that
`mlflow.search_runs` depends on, so a dashboard built inside a training driver or a test cannot
redirect that process's own logging. The frame has `mlflow.search_runs`' layout (`run_id`,
`status`, `metrics.*`, `params.*`, `tags.*`) plus the experiment's name.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from splitmatch.config import redact
from splitmatch.selection import STOPPED_EARLY, describe_state, ranked, selection_figure

IOU_METRICS = ("hIoU", "sIoU", "uIoU", "mIoU")
PARENT_KIND_TAG = "tags.splitmatch.kind"  # "search" | "ablation": a parent, not a training run

# Ranked-table column → the MLflow param it shows (params are the flattened config, as strings).
KEY_PARAMS = {
    "candidate_queries": "params.model.num_candidate_queries",
    "kmeans_scales": "params.pseudo_masks.scales",
    "mfe_norm": "params.model.mfe.norm",
    "lr": "params.optim.lr",
    "matching": "params.matching.mode",
    "seed": "params.seed",
}
TABLE_COLUMNS = ["rank", "select_hIoU", *IOU_METRICS, "state", *KEY_PARAMS, "run_name", "page",
                 "run_id", "status", "experiment", "dataset", "unseen"]


@dataclass
class Scope:
    """What a report covers, for its header and for the "nothing found" message."""

    tracking_uri: str
    experiments: list[str] = field(default_factory=list)      # names that exist in the store
    experiment_ids: list[str] = field(default_factory=list)
    missing_experiments: list[str] = field(default_factory=list)
    parent_run_id: str | None = None
    parent_run_name: str | None = None
    parent_tags: dict = field(default_factory=dict)
    problem: str | None = None  # why nothing can be searched (no store, unknown parent, ...)

    def describe(self) -> str:
        names = ", ".join(self.experiments + self.missing_experiments) or "(none)"
        text = f"experiment(s) {names} at {redact(self.tracking_uri)}"
        if self.parent_run_id:
            text += f" (parent {self.parent_run_id})"
        return text


def make_client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def sqlite_store_missing(tracking_uri: str) -> Path | None:
    """The database path when an embedded store does not exist (opening it would create it)."""
    if tracking_uri.startswith("sqlite:///"):
        path = Path(tracking_uri[len("sqlite:///"):])
        if not path.is_file():
            return path
    return None


def resolve_scope(client, tracking_uri: str, experiments: list[str] | None,
                  parent_run_id: str | None) -> Scope:
    """Experiment ids to search: the named ones, else the parent's, else every active one."""
    from mlflow.exceptions import MlflowException

    scope = Scope(tracking_uri, parent_run_id=parent_run_id)
    if parent_run_id:
        try:
            parent = client.get_run(parent_run_id)
        except MlflowException:
            scope.problem = f"parent run {parent_run_id} not found"
            return scope
        scope.parent_run_name = parent.info.run_name
        scope.parent_tags = dict(parent.data.tags)
    if experiments:
        for name in experiments:
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                scope.missing_experiments.append(name)
            else:
                scope.experiments.append(experiment.name)
                scope.experiment_ids.append(experiment.experiment_id)
    elif parent_run_id:
        experiment = client.get_experiment(parent.info.experiment_id)
        scope.experiments, scope.experiment_ids = [experiment.name], [experiment.experiment_id]
    else:
        for experiment in _all_pages(client.search_experiments):
            scope.experiments.append(experiment.name)
            scope.experiment_ids.append(experiment.experiment_id)
    if not scope.experiment_ids:
        scope.problem = "no such experiment"
    return scope


def _all_pages(search, **kwargs) -> list:
    items, token = [], None
    while True:
        page = search(**kwargs, page_token=token)
        items.extend(page)
        token = page.token
        if not token:
            return items


def load_runs(client, scope: Scope) -> pd.DataFrame:
    """All active runs in scope (children of the parent only, when one is given), in MLflow's order
    (newest first); one column per metric (its last logged value), param and tag, and for a run
    that has select_hIoU but no best_select_hIoU tag yet (stopped, failed, running) the best of
    its select_hIoU history as `select_history_best`."""
    if scope.problem:
        return pd.DataFrame()
    filter_string = f"tags.mlflow.parentRunId = '{scope.parent_run_id}'" if scope.parent_run_id else ""
    runs = _all_pages(client.search_runs, experiment_ids=scope.experiment_ids,
                      filter_string=filter_string)
    names = dict(zip(scope.experiment_ids, scope.experiments))
    rows = []
    for run in runs:
        row = {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
               "experiment": names.get(run.info.experiment_id, run.info.experiment_id),
               "run_name": run.info.run_name, "status": run.info.status,
               "start_time": pd.to_datetime(run.info.start_time, unit="ms", utc=True)}
        row.update({f"metrics.{k}": v for k, v in run.data.metrics.items()})
        row.update({f"params.{k}": v for k, v in run.data.params.items()})
        row.update({f"tags.{k}": v for k, v in run.data.tags.items()})
        if "select_hIoU" in run.data.metrics and "best_select_hIoU" not in run.data.tags:
            # rank 0 sets the tag when it closes the run: an unclosed run has its evaluations only.
            row["select_history_best"] = selection_figure(
                m.value for m in client.get_metric_history(run.info.run_id, "select_hIoU"))
        rows.append(row)
    return pd.DataFrame(rows)


def rank_runs(frame: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """(training runs in `selection.ranked` order; how many parent runs were dropped).

    Adds the ranked-table columns (typed: numbers as numbers, scales as a normalised list string)
    to the full frame, which keeps the per-class `metrics.IoU/...` columns the plots need.
    """
    if frame.empty:
        return frame, 0
    is_parent = frame.get(PARENT_KIND_TAG, pd.Series(None, index=frame.index)).notna()
    runs = frame[~is_parent].copy()
    column = lambda key: runs.get(key, pd.Series(None, index=runs.index, dtype=object))  # noqa: E731
    for name in IOU_METRICS:
        runs[name] = pd.to_numeric(column(f"metrics.{name}"), errors="coerce")
    # hIoU is the test split's, measured once at the end, of the weights chosen on the selection
    # split; select_hIoU the selection figure they were chosen on (tag best_select_hIoU).
    runs["select_hIoU"] = pd.to_numeric(pd.Series(
        [selection_figure([tag, history]) for tag, history in
         zip(column("tags.best_select_hIoU"), column("select_history_best"))],
        index=runs.index, dtype=object), errors="coerce")
    runs["candidate_queries"] = pd.to_numeric(column(KEY_PARAMS["candidate_queries"]),
                                              errors="coerce").astype("Int64")
    runs["kmeans_scales"] = column(KEY_PARAMS["kmeans_scales"]).map(_scales)
    # With the MFE switched off its norm setting means nothing: show that, not a stale "gn".
    mfe_off = column("params.model.mfe.enabled").astype(str).str.lower().eq("false")
    runs["mfe_norm"] = column(KEY_PARAMS["mfe_norm"]).where(~mfe_off, "off")
    runs["lr"] = pd.to_numeric(column(KEY_PARAMS["lr"]), errors="coerce")
    runs["matching"] = column(KEY_PARAMS["matching"]).fillna(column("tags.matching"))
    runs["seed"] = pd.to_numeric(column(KEY_PARAMS["seed"]), errors="coerce").astype("Int64")
    runs["dataset"] = column("tags.dataset").fillna(column("params.data.dataset"))
    runs["unseen"] = column("tags.unseen")
    runs["page"] = column("tags.splitmatch.page")  # the run's own results page, if it wrote one
    runs["status"] = runs["status"].str.lower()
    stopped = column("tags.splitmatch.status").eq(STOPPED_EARLY)
    runs["state"] = [describe_state(STOPPED_EARLY if stop else status, _number(iteration),
                                    _text(error), _text(by))
                     for stop, status, iteration, error, by in
                     zip(stopped, runs["status"], column("metrics.iteration"), column("tags.error"),
                         column("tags.stopped_by"))]
    figures, finished = runs["select_hIoU"].to_numpy(), runs["status"].eq("finished").to_numpy()
    order = ranked(range(len(runs)), figure=lambda i: None if pd.isna(figures[i]) else figures[i],
                   finished=lambda i: finished[i])
    runs = runs.iloc[order].reset_index(drop=True)
    runs["rank"] = range(1, len(runs) + 1)
    return runs, int(is_parent.sum())


def _number(value) -> float | None:
    number = pd.to_numeric(value, errors="coerce")
    return None if pd.isna(number) else float(number)


def _text(value) -> str | None:
    return value if isinstance(value, str) else None


def _scales(value) -> str | None:
    """"[6,8,10]" and "[6, 8, 10]" are the same scale set; non-JSON values are shown as they are."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    try:
        parsed = json.loads(value)
    except (TypeError, ValueError):
        return str(value)
    return json.dumps(parsed) if isinstance(parsed, list) else str(value)


def ranked_table(runs: pd.DataFrame) -> pd.DataFrame:
    """The columns of runs.csv and of the report's table, in ranking order."""
    return runs[TABLE_COLUMNS].copy()


def unseen_classes(runs: pd.DataFrame) -> list[str]:
    """Unseen class names over the given runs, in first-seen order (tag `unseen`, comma-joined)."""
    names: list[str] = []
    for value in runs["unseen"].dropna():
        for name in str(value).split(","):
            if name.strip() and name.strip() not in names:
                names.append(name.strip())
    return names


def metric_histories(client, run_ids: list[str], keys: tuple[str, ...]
                     ) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """run id → metric → [(step, value)] sorted by step; absent metrics give empty lists."""
    return {run_id: {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
                     for key in keys}
            for run_id in run_ids}
