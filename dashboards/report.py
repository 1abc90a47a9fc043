"""`splitmatch compare`: rank training runs by hIoU and write a mailable comparison report.

`build_report` loads the runs (see `runs.py`), writes runs.csv, the plots (see `plots.py`) and one
self-contained report.html (inline CSS, PNGs as base64 data URIs) into `out_dir`, and optionally
logs them as artifacts `compare/...` of a run (typically the search's parent run). Everything is
written into a staging folder first and moved into place only when complete, so a failure (or a
search with no runs) never leaves a half-written report behind.
"""
from __future__ import annotations

import base64
import html
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from splitmatch.config import redact
from splitmatch.dashboards import plots
from splitmatch.dashboards.runs import (Scope, load_runs, make_client,
                                        metric_histories, rank_runs, ranked_table, resolve_scope,
                                        sqlite_store_missing)

ARTIFACT_DIR = "compare"
CSV_NAME, REPORT_NAME = "runs.csv", "report.html"
# file name → (section title, caption); the report shows them in this order.
PLOTS = {
    "iou_vs_queries.png": (
        "hIoU, sIoU and uIoU against the number of candidate queries",
        "One series per (K-means scale set, MFE norm); runs without the metric or without a "
        "candidate-query count are left out."),
    "unseen_class_iou.png": (
        "Per-class IoU of the unseen classes, best runs",
        "Classes a run did not log (absent from its validation split) are marked n/a."),
    "training_curves.png": (
        "Training curves of the best runs",
        "Loss at each logging step and hIoU at each evaluation, from the MLflow metric history."),
}
OUTPUT_NAMES = (CSV_NAME, REPORT_NAME, *PLOTS)


def build_report(tracking_uri: str, out_dir: str | Path, experiments: list[str] | None = None,
                 parent_run_id: str | None = None, top_k: int = 5,
                 log_to_run_id: str | None = None) -> dict:
    """Compare the training runs in `experiments` (default: the parent's experiment, else all) —
    only the children of `parent_run_id` when given; parent runs (tag splitmatch.kind) are never
    ranked — and write report.html, runs.csv and the plots into `out_dir`.

    Returns {"runs": number ranked, "message", "out_dir", "report", "csv", "plots" (name → path),
    "skipped_plots" (name → why), "table" (the ranked DataFrame), "logged_to" (run id or None)};
    with no matching runs only {"runs": 0, "message", "table" (empty)}, and nothing is written.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    missing_db = sqlite_store_missing(tracking_uri)
    if missing_db is not None:  # opening it would create an empty store as a side effect
        return _nothing(f"no MLflow store at {missing_db} (tracking URI {tracking_uri})")
    client = make_client(tracking_uri)
    if log_to_run_id:
        client.get_run(log_to_run_id)  # fails now, naming the run, before anything is written
    scope = resolve_scope(client, tracking_uri, experiments, parent_run_id)
    runs, parents_dropped = rank_runs(load_runs(client, scope))
    if runs.empty:
        why = f": {scope.problem}" if scope.problem else ""
        return _nothing(f"no runs found in {scope.describe()}{why}")

    table = ranked_table(runs)
    best = runs.dropna(subset=["hIoU"]).head(top_k)
    histories = metric_histories(client, list(best["run_id"]), ("loss", "hIoU"))

    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".compare-staging-", dir=out_dir))
    try:
        table.to_csv(staging / CSV_NAME, index=False)
        drawn = {
            "iou_vs_queries.png": plots.plot_iou_vs_queries(runs, staging / "iou_vs_queries.png"),
            "unseen_class_iou.png": plots.plot_unseen_class_iou(best,
                                                                staging / "unseen_class_iou.png"),
            "training_curves.png": plots.plot_training_curves(best, histories,
                                                              staging / "training_curves.png"),
        }
        skipped = {name: _why_skipped(name, best) for name, path in drawn.items() if path is None}
        page = render_html(table, scope, {n: p for n, p in drawn.items() if p is not None},
                           skipped, parents_dropped, len(best))
        (staging / REPORT_NAME).write_text(page, encoding="utf-8")
        for name in OUTPUT_NAMES:  # a plot from an earlier report must not outlive its data
            (out_dir / name).unlink(missing_ok=True)
        written = sorted(staging.iterdir())
        for path in written:
            path.replace(out_dir / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    paths = {path.name: out_dir / path.name for path in written}
    if log_to_run_id:
        for path in paths.values():
            client.log_artifact(log_to_run_id, str(path), ARTIFACT_DIR)

    top = table.iloc[0]
    headline = (f"best {top.run_name} hIoU {top.hIoU:.2f}" if pd.notna(top.hIoU)
                else "no run has an hIoU yet")
    return {
        "runs": len(table),
        "message": f"{len(table)} run(s) from {scope.describe()} ranked; {headline}; "
                   f"report at {paths[REPORT_NAME]}",
        "out_dir": str(out_dir),
        "report": str(paths[REPORT_NAME]),
        "csv": str(paths[CSV_NAME]),
        "plots": {name: str(paths[name]) for name in PLOTS if name in paths},
        "skipped_plots": skipped,
        "table": table,
        "logged_to": log_to_run_id,
    }


def _nothing(message: str) -> dict:
    return {"runs": 0, "message": message, "table": pd.DataFrame()}


def _why_skipped(name: str, best: pd.DataFrame) -> str:
    if best.empty:
        return "no run has an hIoU"
    return {"iou_vs_queries.png": "no run has both a candidate-query count and an IoU",
            "unseen_class_iou.png": "the best runs log no per-class IoU of unseen classes "
                                    "(tag `unseen`, metrics `IoU/<class>`)",
            "training_curves.png": "the best runs have no loss or hIoU history"}[name]


# ---------------------------------------------------------------------------------------- HTML

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1400px; padding: 0 1.5em; color: #1d1d1f; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
dl.scope { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }
dl.scope dt { font-weight: 600; color: #555; }
dl.scope dd { margin: 0; font-family: ui-monospace, Menlo, Consolas, monospace; }
.table-wrap { overflow-x: auto; }
table.runs { border-collapse: collapse; font-size: 0.9em; white-space: nowrap; }
table.runs th, table.runs td { border: 1px solid #ddd; padding: 0.3em 0.6em; }
table.runs th { background: #f3f4f6; position: sticky; top: 0; }
table.runs td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.runs td.missing { color: #999; text-align: center; }
table.runs tr.best td { background: #eaf6ea; font-weight: 600; }
table.runs tbody tr:nth-child(even):not(.best) td { background: #fafafa; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption, .note { color: #555; font-size: 0.9em; }
"""

# Column → (header, format of a present value); None format = text.
COLUMN_FORMATS = {
    "rank": ("rank", "{:d}"), "hIoU": ("hIoU %", "{:.2f}"), "sIoU": ("sIoU %", "{:.2f}"),
    "uIoU": ("uIoU %", "{:.2f}"), "mIoU": ("mIoU %", "{:.2f}"),
    "select_hIoU": ("hIoU on selection split %", "{:.2f}"), "candidate_queries": ("candidate queries", "{:d}"),
    "kmeans_scales": ("K-means scales", None), "mfe_norm": ("MFE norm", None),
    "lr": ("lr", "{:.3g}"), "matching": ("matching", None), "seed": ("seed", "{:d}"),
    "run_name": ("run name", None), "run_id": ("run id", None), "status": ("status", None),
    "experiment": ("experiment", None), "dataset": ("dataset", None),
    "unseen": ("unseen classes", None), "page": ("results page", None),
}


def render_html(table: pd.DataFrame, scope: Scope, plot_paths: dict[str, Path],
                skipped: dict[str, str], parents_dropped: int, n_best: int) -> str:
    """The whole report as one HTML string with the PNGs inlined."""
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    without_hiou = int(table["hIoU"].isna().sum())
    scope_rows = [("MLflow store", redact(scope.tracking_uri)),
                  ("experiment(s)", ", ".join(scope.experiments))]
    if scope.missing_experiments:
        scope_rows.append(("not found", ", ".join(scope.missing_experiments)))
    scope_rows.append(("parent run", f"{scope.parent_run_name} ({scope.parent_run_id})"
                       if scope.parent_run_id else "none: all runs of the experiment(s)"))
    scope_rows.append(("runs ranked", f"{len(table)} ({without_hiou} without hIoU, ranked last; "
                                      f"{parents_dropped} parent run(s) left out)"))
    scope_rows.append(("generated", now))
    scope_html = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>"
                         for k, v in scope_rows)

    sections = []
    for name, (title, caption) in PLOTS.items():
        if name in plot_paths:
            data = base64.b64encode(Path(plot_paths[name]).read_bytes()).decode("ascii")
            sections.append(f'<h2>{html.escape(title)}</h2><figure><img alt="{html.escape(title)}" '
                            f'src="data:image/png;base64,{data}"><figcaption>'
                            f'{html.escape(caption)}</figcaption></figure>')
        else:
            sections.append(f'<h2>{html.escape(title)}</h2><p class="note">Not drawn: '
                            f'{html.escape(skipped.get(name, "no data"))}.</p>')

    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>splitmatch compare — {html.escape(", ".join(scope.experiments))}</title>
<style>{CSS}</style></head>
<body>
<h1>splitmatch run comparison</h1>
<dl class="scope">{scope_html}</dl>
<h2>Runs ranked by hIoU</h2>
<p class="note">IoU values are percentages on each run's test split, measured once on its
result (hIoU on selection split: what the run's weights were chosen on, when it had such a split). The per-class and training-curve plots cover the best {n_best} run(s)
with an hIoU.</p>
<div class="table-wrap">{table_html(table)}</div>
{"".join(sections)}
</body></html>
"""


def table_html(table: pd.DataFrame) -> str:
    """The ranked table, escaped, numbers right-aligned, the best run highlighted."""
    head = "".join(f"<th>{html.escape(COLUMN_FORMATS[c][0])}</th>" for c in table.columns)
    rows = []
    for position, record in enumerate(table.to_dict("records")):
        cells = []
        for column in table.columns:
            value, fmt = record[column], COLUMN_FORMATS[column][1]
            if value is None or (not isinstance(value, str) and pd.isna(value)):
                cells.append('<td class="missing">–</td>')
            elif column == "page":  # written on this machine by `train` / the demo
                cells.append(f'<td><a href="{html.escape(Path(value).as_uri())}">page</a></td>')
            elif fmt is None:
                cells.append(f"<td>{html.escape(str(value))}</td>")
            else:
                number = int(value) if fmt == "{:d}" else float(value)
                cells.append(f'<td class="num">{fmt.format(number)}</td>')
        best = position == 0 and pd.notna(record["hIoU"])
        row_class = ' class="best"' if best else ""
        rows.append(f'<tr{row_class}>{"".join(cells)}</tr>')
    return (f'<table class="runs"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')
