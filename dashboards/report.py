"""`splitmatch compare`: rank training runs and write a mailable comparison report.

`build_report` loads the runs (see `runs.py`), writes runs.csv, the plots (see `plots.py`) and one
self-contained report.html (inline CSS, PNGs as base64 data URIs) into `out_dir`, and optionally
logs them as artifacts `compare/...` of a run (typically the search's parent run). Runs are ranked
on their selection figure (`splitmatch.selection`, the rule `tune` picks its best trial by), with
the test figures beside it. The children of an ablation parent are not ranked: they give one line
per row of the ablation, with intervals (see `ablation.py`). Everything is written into a staging
folder first and moved into place only when complete, so a failure (or a search with no runs)
never leaves a half-written report behind.
"""
from __future__ import annotations

import base64
import html
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from splitmatch import stats
from splitmatch.config import redact
from splitmatch.dashboards import plots
from splitmatch.dashboards.ablation import (METRICS as ABLATION_METRICS, AblationRuns,
                                            ablation_runs, is_ablation, summary_table, text_table)
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
    "row_intervals.png": (
        "hIoU, sIoU and uIoU of each row, with 95% intervals",
        f"Markers: the mean over the row's (split, seed) runs; bars: the 95% interval "
        f"({stats.INTERVAL}). A row of one run has no bar."),
}
RANKED_PLOTS = ("iou_vs_queries.png", "unseen_class_iou.png", "training_curves.png")
ABLATION_PLOTS = ("row_intervals.png",)
OUTPUT_NAMES = (CSV_NAME, REPORT_NAME, *PLOTS)
# What the terminal shows of the ranked table (the CSV and the page have every column).
PRINTED_COLUMNS = ("rank", "select_hIoU", "hIoU", "sIoU", "uIoU", "state", "candidate_queries",
                   "kmeans_scales", "mfe_norm", "lr", "matching", "run_name")


def build_report(tracking_uri: str, out_dir: str | Path, experiments: list[str] | None = None,
                 parent_run_id: str | None = None, top_k: int = 5,
                 log_to_run_id: str | None = None) -> dict:
    """Compare the training runs in `experiments` (default: the parent's experiment, else all) —
    only the children of `parent_run_id` when given; parent runs (tag splitmatch.kind) are never
    ranked — and write report.html, runs.csv and the plots into `out_dir`. The children of an
    ablation parent give one line per row instead (`_ablation_report`).

    Returns {"runs": number ranked (an ablation: its child runs), "kind": "runs" | "ablation",
    "message", "out_dir", "report", "csv", "plots" (name → path), "skipped_plots" (name → why),
    "table" (the CSV's DataFrame), "text" (the table as the terminal shows it), "logged_to" (run id
    or None)}; with no matching runs only {"runs": 0, "message", "table" (empty)}, and nothing is
    written.
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
    frame = load_runs(client, scope)
    if is_ablation(scope.parent_tags) and not frame.empty:
        return _ablation_report(client, scope, frame, out_dir, log_to_run_id)
    runs, parents_dropped = rank_runs(frame)
    if runs.empty:
        why = f": {scope.problem}" if scope.problem else ""
        return _nothing(f"no runs found in {scope.describe()}{why}")

    table = ranked_table(runs)
    best = runs.dropna(subset=["hIoU"]).head(top_k)
    histories = metric_histories(client, list(best["run_id"]), ("loss", "hIoU"))
    skipped: dict[str, str] = {}

    def write(staging: Path) -> None:
        table.to_csv(staging / CSV_NAME, index=False)
        drawn = {
            "iou_vs_queries.png": plots.plot_iou_vs_queries(runs, staging / "iou_vs_queries.png"),
            "unseen_class_iou.png": plots.plot_unseen_class_iou(best,
                                                                staging / "unseen_class_iou.png"),
            "training_curves.png": plots.plot_training_curves(best, histories,
                                                              staging / "training_curves.png"),
        }
        skipped.update({name: _why_skipped(name, best) for name, path in drawn.items()
                        if path is None})
        page = render_html(table, scope, {n: p for n, p in drawn.items() if p is not None},
                           skipped, parents_dropped, len(best))
        (staging / REPORT_NAME).write_text(page, encoding="utf-8")

    paths = _publish(out_dir, write, client, log_to_run_id)
    return _result("runs", len(table), f"{len(table)} run(s) from {scope.describe()} ranked; "
                   f"{headline(table)}", out_dir, paths, skipped, table, ranked_text(table),
                   log_to_run_id)


def _ablation_report(client, scope: Scope, frame: pd.DataFrame, out_dir: str | Path,
                     log_to_run_id: str | None) -> dict:
    """The report of an ablation parent: one line per row (see `ablation.py`)."""
    data = ablation_runs(frame, scope.parent_tags)
    if not data.rows:
        return _nothing(f"no child run of ablation {scope.describe()} has the row / split / seed "
                        f"labels of `splitmatch ablation`")
    summary = stats.summarize_rows(data.rows, ABLATION_METRICS)
    table, text = summary_table(summary), text_table(summary)
    skipped: dict[str, str] = {}

    def write(staging: Path) -> None:
        table.to_csv(staging / CSV_NAME, index=False)
        drawn = {"row_intervals.png": plots.plot_row_intervals(
            table, staging / "row_intervals.png", data.reported_split)}
        skipped.update({name: f"no row has figures on {data.reported_split}"
                        for name, path in drawn.items() if path is None})
        page = render_ablation_html(text, data, scope,
                                    {n: p for n, p in drawn.items() if p is not None}, skipped)
        (staging / REPORT_NAME).write_text(page, encoding="utf-8")

    paths = _publish(out_dir, write, client, log_to_run_id)
    footer = "\n".join([f"figures on {data.reported_split}; pairs: (split, seed) runs of each row; "
                        f"intervals: {stats.INTERVAL}; a difference is 'not shown' when its "
                        f"interval contains 0", *data.notes])
    return _result("ablation", data.children, f"{len(table)} ablation row(s) from "
                   f"{data.children} run(s) of {scope.describe()}", out_dir, paths, skipped,
                   table, text.to_string(index=False) + "\n" + footer, log_to_run_id)


def _result(kind: str, runs: int, message: str, out_dir, paths: dict[str, Path], skipped: dict,
            table: pd.DataFrame, text: str, log_to_run_id: str | None) -> dict:
    """What `build_report` returns, for either kind of page."""
    return {"runs": runs, "kind": kind, "message": f"{message}; report at {paths[REPORT_NAME]}",
            "out_dir": str(Path(out_dir).resolve()), "report": str(paths[REPORT_NAME]),
            "csv": str(paths[CSV_NAME]),
            "plots": {name: str(paths[name]) for name in PLOTS if name in paths},
            "skipped_plots": skipped, "table": table, "text": text,
            "logged_to": log_to_run_id}


def _publish(out_dir: str | Path, write, client, log_to_run_id: str | None) -> dict[str, Path]:
    """`write(staging)` into a staging folder of `out_dir`, then what it wrote replaces every
    earlier output there (a plot from an earlier report must not outlive its data); logged as
    artifacts of `log_to_run_id` when given. Returns name → path."""
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".compare-staging-", dir=out_dir))
    try:
        write(staging)
        for name in OUTPUT_NAMES:
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
    return paths


def headline(table: pd.DataFrame) -> str:
    """The best run in words, as `tune`'s last line gives its best trial."""
    top = table.iloc[0]
    if pd.isna(top.select_hIoU) or top.status != "finished":
        return "no finished run has a selection figure (runs listed newest first)"
    test = f"{top.hIoU:.2f}" if pd.notna(top.hIoU) else "none"
    return (f"best {top.run_name}: best hIoU {top.select_hIoU:.2f} on the selection split "
            f"(ranked on it), {test} on the test split")


def ranked_text(table: pd.DataFrame) -> str:
    columns = [c for c in PRINTED_COLUMNS if c in table]
    return table[columns].to_string(index=False, float_format=lambda v: f"{v:.3g}"
                                    if 0 < abs(v) < 0.01 else f"{v:.2f}")


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
table.runs td.muted { color: #888; }
table.runs tr.best td { background: #eaf6ea; font-weight: 600; }
table.runs tbody tr:nth-child(even):not(.best) td { background: #fafafa; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption, .note { color: #555; font-size: 0.9em; }
"""

# Column → (header, format of a present value); None format = text.
COLUMN_FORMATS = {
    "rank": ("rank", "{:d}"),
    "select_hIoU": ("selection hIoU % (ranked on)", "{:.2f}"),
    "hIoU": ("test hIoU %", "{:.2f}"), "sIoU": ("test sIoU %", "{:.2f}"),
    "uIoU": ("test uIoU %", "{:.2f}"), "mIoU": ("test mIoU %", "{:.2f}"),
    "state": ("state", None), "candidate_queries": ("candidate queries", "{:d}"),
    "kmeans_scales": ("K-means scales", None), "mfe_norm": ("MFE norm", None),
    "lr": ("lr", "{:.3g}"), "matching": ("matching", None), "seed": ("seed", "{:d}"),
    "run_name": ("run name", None), "run_id": ("run id", None), "status": ("MLflow status", None),
    "experiment": ("experiment", None), "dataset": ("dataset", None),
    "unseen": ("unseen classes", None), "page": ("results page", None),
}


def render_html(table: pd.DataFrame, scope: Scope, plot_paths: dict[str, Path],
                skipped: dict[str, str], parents_dropped: int, n_best: int) -> str:
    """The ranked page as one HTML string with the PNGs inlined."""
    no_figure = int(table["select_hIoU"].isna().sum())
    rows = _scope_rows(scope)
    rows.insert(-1, ("runs ranked", f"{len(table)} ({no_figure} without a selection figure, "
                                    f"listed last; {parents_dropped} parent run(s) left out)"))
    without = (f" {no_figure} run(s) have no selection figure (trained without a selection "
               f"split, or never evaluated on it): they come last, in MLflow's order (newest "
               f"first), not ranked.") if no_figure else ""
    body = f"""<h2>Runs ranked on their selection figure</h2>
<p class="note">Ranked on each run's selection figure: its best hIoU on the selection split over its
evaluations, which chose the weights it kept and tested (the rule `splitmatch tune` picks its best
trial by). Runs that did not finish (state) come after those that did, whatever they reached.
The test figures (hIoU, sIoU, uIoU, mIoU: percentages on the test split, measured once on the kept
weights) are shown beside it, never ranked on.{without} The per-class and training-curve plots
cover the first {n_best} run(s) with a test hIoU.</p>
<div class="table-wrap">{table_html(table)}</div>
{_sections(RANKED_PLOTS, plot_paths, skipped)}"""
    return _page("splitmatch run comparison", scope, rows, body)


def render_ablation_html(text: pd.DataFrame, data: AblationRuns, scope: Scope,
                         plot_paths: dict[str, Path], skipped: dict[str, str]) -> str:
    """An ablation parent's page: one line per row, its intervals and paired differences."""
    rows = _scope_rows(scope)
    rows.insert(-1, ("runs", f"{data.children} child run(s), {len(text)} row(s)"))
    rows.insert(-1, ("reported split", data.reported_split))
    rows.insert(-1, ("interval", stats.INTERVAL))
    notes = "".join(f'<p class="note">{html.escape(note)}</p>' for note in data.notes)
    body = f"""<h2>Ablation rows, figures on {html.escape(data.reported_split)}</h2>
<p class="note">Each figure is the mean over the row's (split, seed) runs ("pairs") with its 95%
interval ({html.escape(stats.INTERVAL)}). A difference is paired: the same (split, seed) in both
rows, one difference per pair, against the first row (baseline) and against the row before; it is
"not shown" when its interval contains 0.</p>{notes}
<div class="table-wrap">{text_table_html(text)}</div>
{_sections(ABLATION_PLOTS, plot_paths, skipped)}"""
    return _page("splitmatch ablation", scope, rows, body)


def _scope_rows(scope: Scope) -> list[tuple[str, str]]:
    """The page header's (label, value) pairs, "generated" last."""
    rows = [("MLflow store", redact(scope.tracking_uri)),
            ("experiment(s)", ", ".join(scope.experiments))]
    if scope.missing_experiments:
        rows.append(("not found", ", ".join(scope.missing_experiments)))
    rows.append(("parent run", f"{scope.parent_run_name} ({scope.parent_run_id})"
                 if scope.parent_run_id else "none: all runs of the experiment(s)"))
    rows.append(("generated", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")))
    return rows


def _sections(names: tuple[str, ...], plot_paths: dict[str, Path], skipped: dict[str, str]) -> str:
    sections = []
    for name in names:
        title, caption = PLOTS[name]
        if name in plot_paths:
            data = base64.b64encode(Path(plot_paths[name]).read_bytes()).decode("ascii")
            sections.append(f'<h2>{html.escape(title)}</h2><figure><img alt="{html.escape(title)}" '
                            f'src="data:image/png;base64,{data}"><figcaption>'
                            f'{html.escape(caption)}</figcaption></figure>')
        else:
            sections.append(f'<h2>{html.escape(title)}</h2><p class="note">Not drawn: '
                            f'{html.escape(skipped.get(name, "no data"))}.</p>')
    return "".join(sections)


def _page(heading: str, scope: Scope, scope_rows: list[tuple[str, str]], body: str) -> str:
    scope_html = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>"
                         for k, v in scope_rows)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>{html.escape(heading)} — {html.escape(", ".join(scope.experiments))}</title>
<style>{CSS}</style></head>
<body>
<h1>{html.escape(heading)}</h1>
<dl class="scope">{scope_html}</dl>
{body}
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
                text = "no selection figure" if column == "select_hIoU" else "–"
                cells.append(f'<td class="missing">{text}</td>')
            elif column == "page":  # written on this machine by `train` / the demo
                cells.append(f'<td><a href="{html.escape(Path(value).as_uri())}">page</a></td>')
            elif fmt is None:
                cells.append(f"<td>{html.escape(str(value))}</td>")
            else:
                number = int(value) if fmt == "{:d}" else float(value)
                cells.append(f'<td class="num">{fmt.format(number)}</td>')
        best = (position == 0 and pd.notna(record["select_hIoU"])
                and record["status"] == "finished")
        row_class = ' class="best"' if best else ""
        rows.append(f'<tr{row_class}>{"".join(cells)}</tr>')
    return (f'<table class="runs"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def text_table_html(table: pd.DataFrame) -> str:
    """A table of ready-made text cells (the ablation's), escaped; "not shown" greyed."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns)
    rows = []
    for record in table.to_dict("records"):
        cells = []
        for column in table.columns:
            value = str(record[column])
            kind = ("missing" if value in ("–", "nan") else "num muted" if "not shown" in value
                    else "num" if column != "row" else "")
            cells.append(f'<td class="{kind}">{html.escape(value)}</td>' if kind
                         else f"<td>{html.escape(value)}</td>")
        rows.append(f'<tr>{"".join(cells)}</tr>')
    return (f'<table class="runs"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')
