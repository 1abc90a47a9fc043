"""How runs are ranked and what became of them: one rule for `tune`'s summary and `compare`'s page.

A run's result is the weights chosen on the selection split: train_loop.py keeps the evaluation
with the best select_hIoU as best_model.pt and tests those. So a run's *selection figure* is its
best select_hIoU over its evaluations (what the tag best_select_hIoU records), not its last one,
and never its test hIoU, which is reported beside it. `ranked` orders runs on it, so the search's best
trial is the page's first row.

Pure Python: no Ray, no MLflow.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

T = TypeVar("T")

NO_FIGURE = -1.0  # train_loop.py's select_hIoU before any evaluation gave a number (and Tune's NaN)
STOPPED_EARLY = "stopped_early"  # tag splitmatch.status of a trial its scheduler stopped


def selection_figure(values: Iterable) -> float | None:
    """The best of a run's select_hIoU values (one per evaluation, or the best_select_hIoU tag);
    None when none is a number above NO_FIGURE: no selection split, or never evaluated."""
    best = None
    for value in values:
        try:
            number = float(value)
        except (TypeError, ValueError):  # an absent tag, a missing cell
            continue
        if math.isfinite(number) and number > NO_FIGURE:
            best = number if best is None else max(best, number)
    return best


def ranked(items: Sequence[T], figure: Callable[[T], float | None],
           finished: Callable[[T], bool]) -> list[T]:
    """`items` best first: runs that finished, by selection figure; then runs that did not finish
    (stopped early, failed, running) but have one, by it; then runs without one, as given.

    A run that did not finish was never tested: whatever it reached is not a result, so it never
    outranks one that is. Equal figures keep the given order.
    """
    def key(pair: tuple[int, T]) -> tuple:
        position, item = pair
        value = figure(item)
        if value is None:
            return (2, 0.0, position)
        return (0 if finished(item) else 1, -value, position)

    return [item for _, item in sorted(enumerate(items), key=key)]


def describe_state(status: str, iteration: float | None = None, error: str | None = None,
                   stopped_by: str | None = None) -> str:
    """What became of a run, in words: "finished", "stopped early at iteration 200 (ASHA)",
    "failed: <first line of the error>", "running (iteration 120)", "killed at iteration 50".

    `status`: MLflow's run status or splitmatch's (case ignored), or STOPPED_EARLY.
    """
    status = (status or "unknown").lower()
    at = "" if iteration is None or not math.isfinite(iteration) else f"{int(iteration)}"
    if status == "finished":
        return "finished"
    if status == STOPPED_EARLY:
        text = "stopped early" + (f" at iteration {at}" if at else "")
        return text + (f" ({stopped_by})" if stopped_by else "")
    if status == "failed":
        first = next((line.strip() for line in str(error or "").splitlines() if line.strip()), "")
        return f"failed: {first[:200]}" if first else "failed"
    if status == "killed":
        return "killed" + (f" at iteration {at}" if at else "")
    if status in ("running", "scheduled"):
        return status + (f" (iteration {at})" if at else "")
    return status
