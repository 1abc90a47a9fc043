"""The failures a user is shown as one line. The command line catches them once (`cli.main`):
the message on the terminal, the traceback in a log file whose path it prints.

`UserError` is bad input (a config key, a data file, a checkpoint or run made under another
config, a cluster token): the same input fails the same way, so nothing retries it. `RunFailed`
is work that failed for another reason (a worker group that kept dying, images that failed).
"""
import signal
import threading


class UserError(Exception):
    """Bad input; the message names the key or file and the cause. Exit code 2."""


class RunFailed(Exception):
    """The work failed after what could be retried was; the message says where to look. Exit 1."""


class RunInUse(UserError):
    """A run folder that another live process is working on (see `checkpoints.run_lock`)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, taken as Ctrl-C is (the CLI exits 143 instead of 130)."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated("terminated (SIGTERM)")


def sigterm_as_interrupt() -> None:
    """SIGTERM (`kill`, `splitmatch jobs stop`) takes the Ctrl-C path: what the command started
    (a fit, an MLflow server) is stopped and what it made is kept. Signal handlers live in the
    main thread only."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)
