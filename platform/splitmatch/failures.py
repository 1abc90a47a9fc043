"""How a training run's failures end: restarted, or reported in one line.

A worker group that fails is started again from the newest checkpoint, up to train.max_failures
times, unless the failure cannot go away by itself: the input's (a UserError on any rank) or the
storage's (a full disk, an object store that is gone or has no such bucket), which would fail
the same way again. Every failure's tracebacks go to the run's error.log, or, when the run's
storage is what failed, to a log beside the system's temporary files.
"""
from __future__ import annotations

import errno
import re
import tempfile
import threading
import time
from pathlib import Path

from splitmatch import storage
from splitmatch.errors import RunFailed, UserError

# Errors of the storage itself: retrying on the same storage fails the same way.
STORAGE_ERRNOS = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded",
                  errno.EROFS: "Read-only file system", errno.EACCES: "Permission denied"}
# What pyarrow's S3 file system says for a bucket that is not there or a store that is gone.
_STORE_ERRORS = (
    (re.compile(r"NO_SUCH_BUCKET|The specified bucket does not exist"), "the bucket does not exist"),
    (re.compile(r"NETWORK_CONNECTION|Could not connect|Connection refused|curlCode: \d+"),
     "the object store cannot be reached"),
)


class StorageFailed(RunFailed):
    """The run's storage failed (full, gone, no such bucket); exit 1. `--resume` continues once
    it is back."""


def storage_cause(exc: BaseException) -> str | None:
    """What went wrong with the storage, if that is what `exc` (a Ray Train error, with its
    workers' failures and its chain of causes) comes down to; else None."""
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        error = pending.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in STORAGE_ERRNOS:
            return STORAGE_ERRNOS[error.errno]
        text = str(error)
        for pattern, meaning in _STORE_ERRORS:
            found = pattern.search(text)
            if found:
                return f"{meaning} ({_store_error(text, found)})"
        for number, reason in STORAGE_ERRNOS.items():
            if f"[Errno {number}]" in text or f"[errno {number}]" in text:
                return reason
        pending += [error.__cause__, error.__context__, getattr(error, "cause", None),
                    *(getattr(error, "worker_failures", None) or {}).values()]
    return None


def _store_error(text: str, found: re.Match) -> str:
    """The S3 error's name and the bucket or key it was about, from pyarrow's message."""
    about = re.search(r"(?:key '[^']*' in )?bucket '[^']*'", text)
    return found.group(0) + (f", {about.group(0)}" if about else "")


def write_error_log(run_dir: Path, location: str, heading: str, text: str) -> Path:
    """Append a failure's tracebacks to the run's error.log (and share it, for a run on object
    storage); when the run's storage is what fails, to a file under the temporary folder."""
    entry = f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {heading}\n{text}\n"
    path = Path(run_dir) / "error.log"
    try:
        with open(path, "a") as handle:
            handle.write(entry)
        if storage.is_remote(location):
            storage.push(path, storage.join(location, "error.log"))
        return path
    except OSError:
        fallback = Path(tempfile.gettempdir()) / "splitmatch-errors" / f"{Path(run_dir).name}.log"
        fallback.parent.mkdir(parents=True, exist_ok=True)
        with open(fallback, "a") as handle:
            handle.write(entry)
        return fallback


def fit_with_restarts(make_trainer, max_failures: int, run_dir: Path, location: str, log,
                      abort=lambda: None):
    """Fit; when the worker group fails, start it again from the newest checkpoint (up to
    `max_failures` times) unless the failure is the input's or the storage's (see the module).
    On Ctrl-C, `abort()` stops the running fit before KeyboardInterrupt goes on."""
    from ray.train import ControllerError, WorkerGroupError

    failures = 0
    while True:
        try:
            return fit_in_thread(make_trainer(), abort)
        except (WorkerGroupError, ControllerError) as exc:
            errors = getattr(exc, "worker_failures", None) or {}  # {rank: the error there}
            cause = storage_cause(exc)
            error_log = write_error_log(run_dir, location, "training failed", str(exc))
            if cause is not None:
                raise StorageFailed(f"the run's storage {location} failed: {cause} (traceback in "
                                    f"{error_log})") from exc
            rank, first = min(errors.items(), key=lambda item: item[0]) if errors else (None, exc)
            user = next(((r, e) for r, e in sorted(errors.items()) if isinstance(e, UserError)), None)
            if user is not None:
                raise type(user[1])(f"{user[1]} (rank {user[0]}; traceback in {error_log})") from exc
            if failures >= max_failures:
                raise RunFailed(f"training failed {failures + 1} time(s), last on rank {rank}: "
                                f"{type(first).__name__}: {first} (train.max_failures="
                                f"{max_failures}; tracebacks in {error_log})") from exc
            failures += 1
            log(f"the worker group failed on rank {rank} ({type(first).__name__}); restarting from "
                f"the newest checkpoint ({failures} of train.max_failures={max_failures})")


def fit_in_thread(trainer, abort=lambda: None):
    """`trainer.fit()`, with Ctrl-C left to us: in the main thread Ray Train installs its own SIGINT
    handler, which aborts the run and exits the process (status 1) before the caller can close
    the MLflow run or say where to resume. Off the main thread it installs none (as under Tune),
    so on Ctrl-C we `abort()` the run as that handler would and wait for `fit` to return: the
    caller then shuts Ray down with no thread inside a Ray call."""
    outcome: dict = {}

    def fit():
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.5)  # short waits: the main thread must stay able to take the interrupt
    except KeyboardInterrupt:
        abort()
        thread.join(60)
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
