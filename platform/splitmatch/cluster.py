"""Joining Ray, and checking that a piece of work fits on the cluster's nodes before it starts.

Every command that uses Ray (pseudo, train, tune, ablation) joins it through `init_ray`. A local
instance that it starts listens on 127.0.0.1 only; a cluster it joins keeps its own settings. Ray
would otherwise wait forever for a worker or actor that no node can hold: `check_fits` says so at
once, naming the config keys to change.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile

from splitmatch.config import ConfigError, StorageConfig
from splitmatch.errors import sigterm_as_interrupt


# Ray's switch between a node of a possible cluster (on the machine's routable address, its gRPC
# servers on every interface) and a single-machine instance (all of it on 127.0.0.1), "0". Named
# for Windows and macOS, where it is off by default; it works on Linux too.
ENABLE_CLUSTER = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


# Ray's start-up extras that a local instance, which serves this one command, never uses; each
# costs a short run's start seconds on a small machine (docs/performance.md). Read by the
# processes Ray starts from here; a user's own setting is kept.
LOCAL_INSTANCE_ENV = {
    # `ray.init` waits for one prestarted worker per CPU, started with an empty runtime env. Ray
    # Train gives its controller a runtime env, which its actors inherit, so none of them can
    # use those workers: they only took CPU from the start.
    "RAY_prestart_worker_first_driver": "0",
    # One more actor per run, which watches for nodes being preempted (spot instances): a
    # single-machine instance has none.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


def init_ray(storage: StorageConfig | None = None) -> None:
    """Join the cluster in RAY_ADDRESS (set by `ray job submit` and on cluster nodes) or the one
    that `ray start` runs on this machine, else start a local instance on 127.0.0.1. Idempotent.
    The workers get this command's object-store endpoint (`storage`), so every node reads and
    writes `s3://` locations at the same place."""
    import logging

    import ray
    import ray.data  # first: importing it sets its logger's level, which must stay ours

    from splitmatch.progress import verbose
    from splitmatch.storage import use_endpoint

    if not verbose():
        # Ray's own notices on the driver: the token-auth banner, Ray Data's plan and timing
        # lines, the core worker's C++ log (actor-restart warnings when Ray Data starts actors).
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
        for name in ("ray._private.authentication", "ray.data", "ray.train"):
            logging.getLogger(name).setLevel(logging.ERROR)
    if not ray.is_initialized():
        if _starts_local_instance():
            _keep_on_loopback()
            for name, value in LOCAL_INSTANCE_ENV.items():
                os.environ.setdefault(name, value)
        env = use_endpoint(storage.s3_endpoint_url if storage else None)
        # Quiet unless --verbose: the workers' and Ray Train's own lines and Ray Data's progress
        # blocks would bury the one progress display; what matters reaches the driver anyway
        # (errors as exceptions, rank 0's warnings through the training progress queue).
        with contextlib.nullcontext() if verbose() else _start_notice_held():
            ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=verbose(),
                     logging_level=logging.INFO if verbose() else logging.WARNING,
                     runtime_env={"env_vars": env} if env else None)
    ray.data.DataContext.get_current().enable_progress_bars = verbose()
    # `ray.init` makes SIGTERM a bare `sys.exit` in the driver, which took the workers down with
    # the driver and left the run RUNNING: SIGTERM takes the Ctrl-C path again, so the running
    # fit is stopped, its MLflow run marked KILLED, and the message says where to resume.
    sigterm_as_interrupt()


def _starts_local_instance() -> bool:
    """Whether `ray.init` will start an instance rather than join one (the address in RAY_ADDRESS,
    else the one `ray start` recorded on this machine): Ray's own lookup, so that the two agree."""
    from ray._private.services import canonicalize_bootstrap_address

    return canonicalize_bootstrap_address(os.environ.get("RAY_ADDRESS")) is None


def _keep_on_loopback() -> None:
    """Start the local instance on 127.0.0.1, unless the user chose with ENABLE_CLUSTER. Else Ray
    starts it as a cluster's head node: GCS, raylet, workers and this driver listen on every
    interface, its agents on the machine's address, open to whoever can reach the machine.
    `ray.init(_node_ip_address="127.0.0.1")` does not help: Ray maps it back to that address."""
    from ray._private import ray_constants

    if ENABLE_CLUSTER in os.environ:
        return
    # Ray's processes started from here inherit it. This one read it when it first imported ray,
    # which the launchers do before they call init_ray: Ray's copy of it is set as well.
    os.environ[ENABLE_CLUSTER] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


# What the core worker writes to standard error when it starts, whatever RAY_BACKEND_LOG_LEVEL
# says (it is the line that reports that setting).
_START_NOTICE = "Set ray log level from environment variable"


@contextlib.contextmanager
def _start_notice_held():
    """Hold file descriptor 2 in a file while `ray.init` runs and then write on what it got,
    less the core worker's start notice: that C++ line bypasses Python's streams. Ray's daemons
    write to their own log files, so only this process's writes pass through here."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [line for line in held.read().decode(errors="replace").splitlines(True)
                    if _START_NOTICE not in line]
            sys.stderr.write("".join(kept))
            sys.stderr.flush()


def node_resources() -> list[dict[str, float]]:
    """The total resources of each live node (not what is free now: busy nodes free up)."""
    import ray

    return [dict(node["Resources"]) for node in ray.nodes() if node["Alive"]]


def how_many_fit(nodes: list[dict[str, float]], per_item: dict[str, float]) -> int:
    """How many items needing `per_item` each the nodes can hold at once (each on one node)."""
    fits = 0
    for node in nodes:
        counts = [int(node.get(name, 0.0) // amount + 1e-9) for name, amount in per_item.items()
                  if amount > 0]
        fits += min(counts) if counts else 0
    return fits


def check_fits(what: str, count: int, per_item: dict[str, float], keys: str,
               nodes: list[dict[str, float]] | None = None) -> None:
    """Refuse, naming `keys`, `count` items of `per_item` resources that the nodes cannot all hold
    at once (`what` says what an item is: "Ray Train worker", "pseudo-mask actor")."""
    nodes = node_resources() if nodes is None else nodes
    needs = ", ".join(f"{amount:g} {name}" for name, amount in per_item.items() if amount > 0)
    largest = {name: max((node.get(name, 0.0) for node in nodes), default=0.0) for name in per_item}
    fit = how_many_fit(nodes, per_item)
    if fit == 0:
        have = ", ".join(f"{amount:g} {name}" for name, amount in largest.items())
        raise ConfigError(f"{keys}: one {what} needs {needs}, more than any of the "
                          f"{len(nodes)} node(s) of the Ray cluster has (the largest: {have}); "
                          f"lower it with --set or add a larger node")
    if fit < count:
        raise ConfigError(f"{keys}: {count} {what}s of {needs} each are needed at once, but the "
                          f"{len(nodes)} node(s) of the Ray cluster hold {fit}; lower them "
                          f"with --set or add nodes")
