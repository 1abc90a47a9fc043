"""What a user watches during `splitmatch tune`: one progress display counted in trials, as a
training run's is counted in iterations, instead of Ray Tune's status tables (those stay behind
--verbose). It shows the trials running, failed and stopped early, and the best figure so far
on the selection split, the one the search ranks on."""
from __future__ import annotations

from ray.tune import Callback

from splitmatch.progress import Progress


class SearchProgress(Callback):
    """A Tune callback (it runs in the driver, beside Tune's controller)."""

    def __init__(self, name: str, select_split: str, max_iters: int, stopped_by: str | None):
        self.name, self.select_split = name, select_split
        self.max_iters, self.stopped_by = max_iters, stopped_by
        self.bar: Progress | None = None

    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info) -> None:
        """Called by Tune when the search starts (again, when it is resumed)."""
        self.bar = Progress(total_num_samples or 0, f"search {self.name}", "trials")
        self.running: set[str] = set()
        self.ended = self.failed = self.stopped = 0
        self.best: float | None = None

    def __getstate__(self) -> dict:
        # Tune keeps its RunConfig, callbacks included, in the search's state on disk: the live
        # display (a terminal stream) stays out of it and is made again by `setup`.
        return {**self.__dict__, "bar": None}

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.running.add(trial.trial_id)
        self._show()

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        figure = result.get("select_hIoU")
        # -1 stands for "not evaluated yet" in the reports (see train_loop._Selection).
        if figure is not None and figure >= 0 and (self.best is None or figure > self.best):
            self.best = figure
            self._show()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        reached = (trial.last_result or {}).get("iteration")
        if reached is not None and reached < self.max_iters:
            self.stopped += 1
        self._end(trial)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.failed += 1
        self.bar.note(f"trial {trial} failed (see the summary below)")
        self._end(trial)

    def _end(self, trial) -> None:
        self.running.discard(trial.trial_id)
        self.ended += 1
        self._show()

    def _show(self) -> None:
        fields = {"running": len(self.running), "failed": self.failed}
        if self.stopped_by:
            fields["stopped early"] = self.stopped
        if self.best is not None:
            fields[f"best {self.select_split} hIoU"] = round(self.best, 2)
        self.bar.update(self.ended, **fields)

    def on_experiment_end(self, trials, **info) -> None:
        if self.bar is not None:
            self.bar.close()
