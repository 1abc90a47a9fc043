"""Means, 95% intervals and paired differences over (split, seed) runs: one home for how every
table of the platform (ablation, compare) says how sure it is.

The interval is a two-stage (cluster) bootstrap: resample the splits with replacement, then within
each drawn split its seeds with replacement, and take the mean of what was drawn; the 2.5th and
97.5th percentiles of 10,000 such means are the interval. Runs of one split share its classes and
images, so they are not independent: resampling seeds alone would make the interval too narrow.
A difference between two rows is paired: the same (split, seed) in both rows, one difference per
pair, bootstrapped the same way. A difference is *shown* only when its interval excludes 0.

Pure numpy, fixed seed: the same runs always give the same interval.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

Pair = tuple[object, object]  # (split, seed): any hashable labels
RESAMPLES = 10_000
INTERVAL = "two-stage bootstrap over splits, then seeds within a split (10,000 resamples, 95%)"


def _groups(values: Mapping[Pair, float]) -> list[np.ndarray]:
    """The finite values grouped by split, in a stable order."""
    by_split: dict[object, list[float]] = {}
    for (split, _seed), value in sorted(values.items(), key=lambda kv: (str(kv[0][0]),
                                                                       str(kv[0][1]))):
        if value is not None and math.isfinite(value):
            by_split.setdefault(split, []).append(float(value))
    return [np.asarray(v) for v in by_split.values()]


def estimate(values: Mapping[Pair, float], resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """{"mean", "ci95": [lo, hi] or None, "n"} of the values keyed by (split, seed).

    `ci95` is None when fewer than two runs are finite: one run has no spread to measure.
    """
    groups = _groups(values)
    n = sum(len(g) for g in groups)
    if n == 0:
        return {"mean": math.nan, "ci95": None, "n": 0}
    mean = float(np.mean(np.concatenate(groups)))
    if n < 2:
        return {"mean": mean, "ci95": None, "n": n}
    rng = np.random.default_rng(seed)
    sizes = np.array([len(g) for g in groups])
    picks = rng.integers(0, len(groups), size=(resamples, len(groups)))  # [R, G] splits drawn
    totals, counts = np.zeros(resamples), np.zeros(resamples)
    rows = np.arange(resamples)
    for slot in range(len(groups)):
        # Each drawn split gets its own draw of seeds, even when one split is drawn twice.
        sums = np.stack([g[rng.integers(0, len(g), size=(resamples, len(g)))].sum(1)
                         for g in groups], axis=1)  # [R, G]
        totals += sums[rows, picks[:, slot]]
        counts += sizes[picks[:, slot]]
    draws = totals / counts
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return {"mean": mean, "ci95": [float(lo), float(hi)], "n": n}


def paired_difference(values: Mapping[Pair, float], reference: Mapping[Pair, float],
                      resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """`estimate` of values − reference over the (split, seed) pairs both have, plus "shown":
    whether the interval excludes 0."""
    common = {pair: values[pair] - reference[pair] for pair in values if pair in reference
              and _finite(values[pair]) and _finite(reference[pair])}
    result = estimate(common, resamples, seed)
    result["shown"] = shown(result)
    return result


def shown(result: dict) -> bool:
    """A difference is shown when it has an interval and the interval lies on one side of 0."""
    ci = result.get("ci95")
    return ci is not None and (ci[0] > 0 or ci[1] < 0)


def summarize_rows(rows: Mapping[str, Mapping[Pair, Mapping[str, float]]],
                   metrics: Sequence[str]) -> dict[str, dict]:
    """Per row (in the given order): each metric's `estimate`, and `delta_vs_baseline` (the first
    row) and `delta_vs_previous` (the row before), each a `paired_difference` per metric.

    `rows[row][(split, seed)][metric]` holds one run's figure. The first row gets no deltas.
    """
    names = list(rows)
    summary: dict[str, dict] = {}
    for position, row in enumerate(names):
        entry: dict = {k: estimate(_column(rows[row], k)) for k in metrics}
        if position > 0:
            for label, other in (("delta_vs_baseline", names[0]),
                                 ("delta_vs_previous", names[position - 1])):
                entry[label] = {k: paired_difference(_column(rows[row], k),
                                                     _column(rows[other], k)) for k in metrics}
        summary[row] = entry
    return summary


def format_estimate(result: dict, signed: bool = False, digits: int = 2) -> str:
    """"62.01 [55.10, 68.90]"; a difference "+12.30 [4.10, 20.20]", or "... not shown" when its
    interval contains 0; a single run "62.01 (1 run)"."""
    mean = result["mean"]
    if mean is None or not math.isfinite(mean):
        return "nan"
    sign = "+" if signed else ""
    text = f"{mean:{sign}.{digits}f}"
    ci = result.get("ci95")
    if ci is None:
        return f"{text} ({result.get('n', 0)} run{'s' if result.get('n', 0) != 1 else ''})"
    text += f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    if "shown" in result and not result["shown"]:
        text += " not shown"
    return text


def rounded(result: dict, digits: int = 2) -> dict:
    """The JSON form of an estimate: {"mean": ..., "ci95": [lo, hi] or null} (+ "shown")."""
    out = {"mean": _round(result["mean"], digits),
           "ci95": None if result.get("ci95") is None else [_round(v, digits)
                                                             for v in result["ci95"]]}
    if "shown" in result:
        out["shown"] = result["shown"]
    return out


def _column(runs: Mapping[Pair, Mapping[str, float]], metric: str) -> dict[Pair, float]:
    return {pair: figures.get(metric, math.nan) for pair, figures in runs.items()}


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)


def _round(value, digits: int):
    return None if value is None or not math.isfinite(value) else round(float(value), digits)
