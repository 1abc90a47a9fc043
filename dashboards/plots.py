"""The comparison plots, written as PNG through matplotlib's Agg canvas.

Figures are built as `matplotlib.figure.Figure` objects (no pyplot: no global figure registry, no
backend switch in the caller's process) and styled inside an `rc_context`, so nothing leaks. Each
function returns the path it wrote, or None when the runs hold nothing it could draw.
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from splitmatch.dashboards.runs import unseen_classes

STYLE = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 9.5,
         "xtick.labelsize": 10, "ytick.labelsize": 10, "figure.titlesize": 13,
         "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
         "axes.spines.right": False}
DPI = 120
MARKERS = "osD^vPX*<>"
IOU_UNIT = "(%)"


def run_color(position: int):
    """The colour of the run at `position` among the best runs: the same in every plot."""
    return matplotlib.colormaps["tab10"](position % 10)


def run_label(row, width: int = 30) -> str:
    name = row.run_name if isinstance(row.run_name, str) and row.run_name else row.run_id[:8]
    if len(name) > width:
        name = "…" + name[-(width - 1):]
    return f"#{row.rank} {name} (hIoU {row.hIoU:.1f})"


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, facecolor="white")
    return path


def plot_iou_vs_queries(runs: pd.DataFrame, path: str | Path) -> Path | None:
    """hIoU / sIoU / uIoU (last evaluation) against the number of candidate queries, one series
    per (K-means scale set, MFE norm); runs sharing a setting (seeds) give the mean and a min–max
    bar. Runs with a matching mode other than "split" form series of their own."""
    metrics = ["hIoU", "sIoU", "uIoU"]
    usable = runs.dropna(subset=["candidate_queries"])
    usable = usable[usable[metrics].notna().any(axis=1)].copy()
    if usable.empty:
        return None
    usable["candidate_queries"] = usable["candidate_queries"].astype(int)
    modes = set(usable["matching"].fillna("?"))
    label_mode = modes != {"split"}
    usable["series"] = [
        (f"{row.matching or '?'} matching · " if label_mode else "")
        + f"K-means scales {row.kmeans_scales or '?'} · MFE norm {row.mfe_norm or '?'}"
        for row in usable.itertuples()]
    series = sorted(usable["series"].unique())
    queries = sorted(usable["candidate_queries"].unique())
    # Offset the series a little along x so that markers at the same query count stay visible.
    spread = (max(queries) - min(queries)) or 1
    step = 0.012 * spread
    aggregated = usable.groupby(["series", "candidate_queries"]).size().max() > 1

    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(13, 5.2), layout="constrained")
        axes = fig.subplots(1, 3)
        for ax, metric in zip(axes, metrics):
            for i, name in enumerate(series):
                stats = (usable[usable["series"] == name].groupby("candidate_queries")[metric]
                         .agg(["mean", "min", "max"]).dropna())
                if stats.empty:
                    continue
                x = stats.index.to_numpy(dtype=float) + (i - (len(series) - 1) / 2) * step
                ax.errorbar(x, stats["mean"], yerr=[stats["mean"] - stats["min"],
                                                    stats["max"] - stats["mean"]],
                            marker=MARKERS[i % len(MARKERS)], markersize=7, capsize=3,
                            linewidth=1.6, color=matplotlib.colormaps["tab10"](i % 10), label=name)
            ax.set_xticks(queries)
            ax.set_xlabel("candidate queries (count)")
            ax.set_ylabel(f"{metric} {IOU_UNIT}")
            ax.set_title(metric)
        handles, labels = axes[0].get_legend_handles_labels()
        for ax in axes[1:]:  # a series may lack the first metric; collect every label once
            for handle, label in zip(*ax.get_legend_handles_labels()):
                if label not in labels:
                    handles.append(handle)
                    labels.append(label)
        fig.legend(handles, labels, loc="outside lower center", ncol=_legend_columns(labels),
                   title="series", frameon=False)
        note = "\nmarkers: mean over runs with the same setting; bars: min–max" if aggregated else ""
        fig.suptitle(f"Zero-shot IoU against the number of candidate queries "
                     f"(last evaluation, {len(usable)} runs){note}")
        return _save(fig, Path(path))


def plot_unseen_class_iou(best: pd.DataFrame, path: str | Path) -> Path | None:
    """Grouped bars: IoU of each unseen class (x) for each of the best runs (bars, colour = run).
    Classes a run did not log (absent from its val split) are marked "n/a"."""
    classes = unseen_classes(best)
    if best.empty or not classes:
        return None
    values = np.array([[_number(row.get(f"metrics.IoU/{name}")) for name in classes]
                       for _, row in best.iterrows()])  # [runs, classes]
    if np.isnan(values).all():
        return None
    n_runs, n_classes = values.shape
    width = 0.8 / n_runs
    top = np.nanmax(values)
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(min(22, max(9, 1.2 + 0.32 * n_runs * n_classes + 0.4 * n_classes)),
                              5.6), layout="constrained")
        ax = fig.subplots()
        centers = np.arange(n_classes)
        for i, row in enumerate(best.itertuples()):
            x = centers + (i - (n_runs - 1) / 2) * width
            heights = np.nan_to_num(values[i], nan=0.0)
            bars = ax.bar(x, heights, width * 0.92, color=run_color(i), label=run_label(row))
            if n_runs * n_classes <= 40:
                ax.bar_label(bars, labels=["" if math.isnan(v) else f"{v:.0f}" for v in values[i]],
                             fontsize=8, padding=1)
            for xi, value in zip(x, values[i]):
                if math.isnan(value):
                    ax.text(xi, top * 0.02, "n/a", rotation=90, ha="center", va="bottom",
                            fontsize=8, color="0.4")
        ax.set_xticks(centers, classes, rotation=30 if n_classes > 6 else 0,
                      ha="right" if n_classes > 6 else "center")
        ax.set_xlabel("unseen class")
        ax.set_ylabel(f"IoU {IOU_UNIT}")
        ax.set_ylim(0, min(100.0, top * 1.15 + 1))
        ax.grid(axis="x", visible=False)
        ax.set_title(f"Per-class IoU of the unseen classes, best {n_runs} ranked run(s) "
                     f"(last evaluation)")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), title="run (rank, name, hIoU %)")
        return _save(fig, Path(path))


def plot_training_curves(best: pd.DataFrame, histories: dict, path: str | Path) -> Path | None:
    """Training loss and hIoU against iteration for the best runs (colour = run, as in the bars)."""
    has = lambda key: any(histories.get(r, {}).get(key) for r in best["run_id"])  # noqa: E731
    if best.empty or not (has("loss") or has("hIoU")):
        return None
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(13, 5.2), layout="constrained")
        loss_ax, hiou_ax = fig.subplots(1, 2)
        losses = []
        for i, row in enumerate(best.itertuples()):
            history = histories.get(row.run_id, {})
            if history.get("loss"):
                steps, values = zip(*history["loss"])
                losses.extend(values)
                loss_ax.plot(steps, values, color=run_color(i), linewidth=1.5, label=run_label(row))
            if history.get("hIoU"):
                steps, values = zip(*history["hIoU"])
                hiou_ax.plot(steps, values, color=run_color(i), marker=MARKERS[i % len(MARKERS)],
                             markersize=5, linewidth=1.5, label=run_label(row))
        positive = [v for v in losses if v > 0]
        log_scale = len(positive) == len(losses) > 0 and max(positive) / min(positive) > 20
        if log_scale:  # losses fall by orders of magnitude: a linear axis hides the late part
            loss_ax.set_yscale("log")
        loss_ax.set_ylabel("training loss (weighted sum of terms" + (", log scale)" if log_scale
                                                                      else ")"))
        loss_ax.set_title("Training loss")
        hiou_ax.set_ylabel(f"hIoU {IOU_UNIT}")
        hiou_ax.set_title("hIoU at each evaluation")
        for ax in (loss_ax, hiou_ax):
            ax.set_xlabel("iteration (optimizer steps)")
            if not ax.lines:
                ax.text(0.5, 0.5, "not logged by these runs", transform=ax.transAxes,
                        ha="center", va="center", color="0.4")
        # One entry per run, whichever panel it appears in.
        handles = [Line2D([], [], color=run_color(i), marker=MARKERS[i % len(MARKERS)],
                          linewidth=1.5, label=run_label(row))
                   for i, row in enumerate(best.itertuples())]
        fig.legend(handles=handles, loc="outside lower center",
                   ncol=_legend_columns([h.get_label() for h in handles]),
                   title="run (rank, name, last hIoU %)", frameon=False)
        fig.suptitle(f"Training curves of the best {len(best)} ranked run(s)")
        return _save(fig, Path(path))


def plot_row_intervals(table: pd.DataFrame, path: str | Path, split: str) -> Path | None:
    """An ablation's rows (x, in table order) with the mean (marker) and 95% interval (bar) of
    hIoU, sIoU and uIoU over each row's (split, seed) runs: the columns of `ablation.summary_table`;
    `split` says whose figures ("val, the selection split"). A row of one run has a marker and no
    bar; a row without figures is left empty."""
    metrics = ["hIoU", "sIoU", "uIoU"]
    means = table[metrics].apply(pd.to_numeric, errors="coerce")
    if table.empty or means.isna().all().all():
        return None
    positions = np.arange(len(table))
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(min(22, max(11, 4.2 * len(table))), 5.2), layout="constrained")
        axes = fig.subplots(1, 3)
        for ax, metric, color in zip(axes, metrics, ("tab:blue", "tab:orange", "tab:green")):
            mean = means[metric].to_numpy(dtype=float)
            low = pd.to_numeric(table[f"{metric} ci95 lo"], errors="coerce").to_numpy(dtype=float)
            high = pd.to_numeric(table[f"{metric} ci95 hi"], errors="coerce").to_numpy(dtype=float)
            # No interval (one run): no bar rather than a bar of zero length that looks certain.
            errors = np.nan_to_num(np.vstack([mean - low, high - mean]), nan=0.0)
            ax.errorbar(positions, mean, yerr=errors, fmt="o", markersize=7, capsize=5,
                        linewidth=1.8, color=color)
            for x, value in zip(positions, mean):
                if not math.isnan(value):
                    ax.annotate(f"{value:.1f}", (x, value), textcoords="offset points",
                                xytext=(8, 0), va="center", fontsize=9)
            ax.set_xticks(positions, table["row"], rotation=20 if len(table) > 4 else 0,
                          ha="right" if len(table) > 4 else "center")
            ax.set_xlim(-0.5, len(table) - 0.5)
            ax.set_xlabel("row")
            ax.set_ylabel(f"{metric} {IOU_UNIT}")
            ax.set_title(metric)
        pairs = ", ".join(f"{row} {int(n)}" for row, n in zip(table["row"], table["pairs"]))
        fig.suptitle(f"Ablation rows on {split}: mean and 95% interval over (split, seed) "
                     f"runs\nruns per row: {pairs}")
        return _save(fig, Path(path))


def _legend_columns(labels: list[str], width_chars: int = 150) -> int:
    """As many legend columns as fit the figure width for labels this long (at most 3)."""
    longest = max((len(label) for label in labels), default=1)
    return max(1, min(3, len(labels), width_chars // (longest + 8)))


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan
