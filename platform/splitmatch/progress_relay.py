"""The driver's progress relay of a training run: rank 0 tells (`teller`), the driver shows
(`Watcher`), and a controller callback hands the driver the Ray Train controller, so that Ctrl-C
can abort the run (`controller_to_driver`)."""
from __future__ import annotations

import threading
import time

from splitmatch.progress import Progress


TELL_EVERY_S = 1.0  # bare iteration counts go to the driver at most this often


def teller(queue):
    """Rank 0's line to the driver's progress display (`Watcher`); best effort: a driver that is
    gone must not stop training. A put is a round trip to the queue actor, so a bare iteration
    count (of iterations, or of an evaluation's images) goes at most every `TELL_EVERY_S`, fine
    enough for a run of minutes; notes, counts with figures and an evaluation's end always go."""
    last = -TELL_EVERY_S

    def tell(item: dict) -> None:
        nonlocal last
        if queue is None:
            if "note" in item:
                print(item["note"])
            return
        now = time.monotonic()
        bare = item.keys() == {"iteration"} or ("evaluating" in item
                                                and 0 < item["done"] < item["total"])
        if bare and now - last < TELL_EVERY_S:
            return
        last = now
        try:
            queue.put_nowait(item)
        except Exception:  # noqa: BLE001 - progress is only a display
            pass
    return tell


def controller_to_driver(queue):
    """A Ray Train controller callback that, when the controller starts, puts the controller's
    own actor handle on the driver's queue ({"controller": handle, "started_at": its clock}, a
    phase of the run's start-up for the paired bench): Ctrl-C can then abort the
    run as Ray Train's own SIGINT handler would (it installs one only when `fit` runs in the
    main thread, see `failures.fit_in_thread`)."""
    # Ray Train V2 runs RunConfig callbacks that are not UserCallbacks as controller callbacks
    # ("custom workarounds built on top of internal callbacks", in its own words); the class is
    # internal, one more reason why ray is pinned below its next minor.
    from ray.train.v2._internal.execution.callback import ControllerCallback

    class ControllerToDriver(ControllerCallback):
        def after_controller_start(self, train_run_context) -> None:
            import ray

            try:
                queue.put_nowait({"controller": ray.get_runtime_context().current_actor,
                                  "started_at": time.time()})
            except Exception:  # noqa: BLE001 - without it Ctrl-C cannot abort; no reason to fail
                pass

    return ControllerToDriver()


class Watcher:
    """The driver's side of a run: rank 0 puts {"iteration", shown values...}, {"evaluating":
    split, "done", "total"} or {"note": sentence} on a Ray queue (an actor, so it works from any
    node), and the controller its handle ({"controller": handle}); a thread here shows the
    iterations as one progress display, an evaluation's images as another while it lasts, and
    keeps the newest controller for `abort`."""

    def __init__(self, name: str, total: int, initial: int):
        import ray
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # On the driver's node, as Ray Train puts its controller: a queue on another node goes
        # with that node, and the next controller, putting its handle here, fails the run.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
        self.bar = Progress(total, f"training {name}", "it", initial=initial)
        self.evaluation: Progress | None = None
        self.controller = None
        self.controller_started: float | None = None  # time.time() when the newest one started
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._show, name="progress", daemon=True)
        self.thread.start()

    def note(self, message: str) -> None:
        self.bar.note(message)

    def abort(self) -> None:
        """Abort the running fit the way Ray Train's SIGINT handler does: the controller
        stops the worker group and exits, so `trainer.fit()` returns with an error."""
        import ray

        if self.controller is None:  # Ctrl-C before the controller started
            return
        try:
            ray.get(self.controller.abort.remote(), timeout=60)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass  # the controller exits inside `abort`, as it is meant to

    def _show(self) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                item = self.queue.get(timeout=0.5)
            except Empty:
                if self.done.is_set():
                    return
                continue
            except Exception:  # noqa: BLE001 - the queue went with the cluster
                return
            if "controller" in item:
                self.controller = item["controller"]
                self.controller_started = item.get("started_at")
            elif "note" in item:
                self.bar.note(item["note"])
            elif "evaluating" in item:
                self._evaluation(item)
            else:
                self.bar.update(item.pop("iteration"), **item)

    def _evaluation(self, item: dict) -> None:
        if self.evaluation is None or item["done"] == 0:  # an evaluation's start always comes
            self._end_evaluation()
            # Gone when it ends (leave=False): the split's figures follow on the training line.
            self.evaluation = Progress(item["total"], f"evaluating {item['evaluating']}", "img",
                                       leave=False)
        self.evaluation.update(item["done"])
        if item["done"] >= item["total"]:
            self._end_evaluation()

    def _end_evaluation(self) -> None:
        if self.evaluation is not None:
            self.evaluation.close()
            self.evaluation = None

    def stop(self) -> None:
        import ray

        self.done.set()
        self.thread.join(timeout=10)
        self._end_evaluation()
        self.bar.close()
        try:
            ray.kill(self.queue.actor)
        except Exception:  # noqa: BLE001 - already gone with the cluster
            pass
