"""Training's launcher and driver: `launch` checks the run folder and the config, joins Ray,
opens the pseudo-mask cache, and runs `train_loop.train_loop_per_worker` on Ray Train's
`TorchTrainer`, showing its progress (`progress_relay`), restarting failed worker groups
(`failures`) and closing the MLflow run of one that fails or is interrupted.

It is what `splitmatch train` (and each Tune trial, and each ablation row) calls.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from splitmatch import storage
from splitmatch.checkpoints import (RESUME_MAY_GROW, check_run_config, newest_checkpoint,
                                    remove_unloadable_checkpoints, run_directory, run_key,
                                    run_location, run_lock, share)
from splitmatch.config import (Config, dump_config, redact, resolve_paths, to_dict,
                               tracking_credentials)
from splitmatch.errors import RunFailed, UserError
from splitmatch.failures import StorageFailed, fit_with_restarts, storage_cause
from splitmatch.files import write_atomic
from splitmatch.model.backbone import check_weights
from splitmatch.progress_relay import Watcher, controller_to_driver
from splitmatch.splits import HOLDOUT, check_split_use
from splitmatch.tracking import default_tracking_uri, mark_ended, source_tags
from splitmatch.train_loop import TIMELINE, train_loop_per_worker


def open_pseudo_masks(cfg: Config, build: bool = False, config_path: str = "CONFIG", log=print):
    """The pseudo-mask cache of the training split (Split Matching needs it; the baseline does not).

    Missing → an error naming the command that builds it, or, with `build`, it is built first.
    """
    from splitmatch.pseudo.cache import PseudoMaskCache
    from splitmatch.pseudo.pipeline import run_pseudo

    if cfg.matching.mode != "split":
        return None
    try:
        return PseudoMaskCache.open(cfg, cfg.data.train_split, config_path)
    except FileNotFoundError:  # missing, incomplete or damaged
        if not build:
            raise
    # Trials with equal pseudo-mask settings share one cache: run_pseudo lets one build it while
    # the others wait, then finds it complete.
    run_pseudo(cfg, cfg.data.train_split, log=log)
    return PseudoMaskCache.open(cfg, cfg.data.train_split, config_path)


# Ray Train's controller poll interval unless the user sets RAY_TRAIN_HEALTH_CHECK_INTERVAL_S
# (see `launch`).
HEALTH_CHECK_INTERVAL_S = 0.25
# What Ray adds to the training workers' niceness unless the user sets RAY_worker_niceness
# (Ray's own: 15).
WORKER_NICENESS = 0


def launch(cfg: Config, resume: bool = False, build_pseudo_masks: bool = False,
           config_path: str = "CONFIG", parent_run_id: str | None = None, callbacks=None,
           may_grow: tuple[str, ...] = RESUME_MAY_GROW, log=print, progress: bool = True,
           holdout: bool = False, tags: dict[str, str] | None = None,
           timeline: dict | None = None):
    """Run training on Ray Train (local instance, or the cluster in RAY_ADDRESS); returns the Result.

    The run lives in `train.storage_path/name`; starting the same name again resumes it from its
    newest checkpoint, so that needs `resume=True` to be deliberate, and the config must match
    the stored one except for the keys in `may_grow` (ablation rows pass none). A held-out split
    (splits.py) is refused unless `holdout` (the --holdout flag) says the run is for reporting.
    `tags` go on the MLflow run with the usual ones. A `timeline` dict gets the run's phases
    (`time.time()` marks: Ray up, fit started, controller started, rank 0's own, fit returned)
    and rank 0's thread settings, when rank 0 ran on this node (`splitmatch bench train`).
    """
    cfg = resolve_paths(cfg)
    family = check_split_use(cfg.data, "train", holdout)
    tags = {**source_tags(), **(tags or {}), "split_family": family,
            **({"holdout_flag": "--holdout"} if family == HOLDOUT else {})}
    with run_lock(cfg.name, storage.local_path(run_location(cfg))):
        try:
            return _launch(cfg, resume, build_pseudo_masks, config_path, parent_run_id,
                           callbacks, may_grow, log, progress, tags, timeline)
        except OSError as exc:  # the run's own files, before or after training
            cause = storage_cause(exc)
            if cause is None:
                raise
            raise StorageFailed(f"the run's storage {run_location(cfg)} failed: {cause}") from exc


def _launch(cfg: Config, resume: bool, build_pseudo_masks: bool, config_path: str,
            parent_run_id: str | None, callbacks, may_grow: tuple[str, ...], log, progress: bool,
            tags: dict[str, str], timeline: dict | None):
    import ray.train.torch  # noqa: F401 - imported before init_ray, which quietens its logger

    from splitmatch.cluster import check_fits, init_ray

    tracking_uri = cfg.tracking.uri or default_tracking_uri(cfg.train.storage_path)
    run_dir, updates = _check_run(cfg, resume, may_grow, tracking_uri, log)
    init_ray(cfg.storage)
    ray_up = time.time()
    # Ray Train would wait forever for workers that no node can hold: say so instead.
    check_fits("Ray Train worker", cfg.train.num_workers,
               {"CPU": cfg.train.cpus_per_worker, "GPU": 1.0 if cfg.train.use_gpu else 0.0},
               "train.num_workers / train.cpus_per_worker / train.use_gpu")
    open_pseudo_masks(cfg, build_pseudo_masks, config_path, log)  # fails early if it is missing
    newest = _open_run_folder(cfg, run_dir, resume, updates, log)
    loop_config = {"cfg": to_dict(cfg), "run_location": run_location(cfg),
                   "tracking_uri": tracking_uri, "run_key": run_key(cfg),
                   "parent_run_id": parent_run_id, "tags": tags,
                   "config_updates": {k: list(v) for k, v in updates.items()},
                   "credentials": tracking_credentials()}
    log(f"training {cfg.name} on {cfg.train.num_workers} {'GPU' if cfg.train.use_gpu else 'CPU'} "
        f"worker(s); run directory {run_location(cfg)}; MLflow {redact(tracking_uri)}")
    watcher = Watcher(cfg.name, cfg.train.max_iters, newest[1] if newest else 0) if progress else None
    loop_config["progress"] = watcher.queue if watcher else None
    if watcher is not None:
        callbacks = [*(callbacks or []), controller_to_driver(watcher.queue)]
    fit_started = time.time()
    result = _fit(cfg, _trainer_factory(cfg, loop_config, callbacks), run_dir, tracking_uri,
                  watcher, log)
    if timeline is not None:
        timeline.update(ray_up=ray_up, fit_started=fit_started, fit_returned=time.time())
        if watcher is not None and watcher.controller_started is not None:
            timeline["controller_started"] = watcher.controller_started
        worker = run_dir / "workers" / TIMELINE
        if worker.is_file():
            ranks = json.loads(worker.read_text())
            timeline.update(ranks.pop("marks"), rank0=ranks)
    return result


def _check_run(cfg: Config, resume: bool, may_grow: tuple[str, ...], tracking_uri: str,
               log) -> tuple[Path, dict]:
    """Before Ray: the run folder may be (re)used with this config, a run left RUNNING by a
    process that is gone is closed, the backbone weights the config names are at hand. Returns
    the run's local folder and the config keys that grow on resume."""
    run_dir = run_directory(cfg)
    if (run_dir / "config.yaml").is_file() and mark_ended(
            tracking_uri, cfg.tracking.experiment, run_key(cfg), "KILLED",
            "left RUNNING by a process that is gone; closed by the next command"):
        # We hold the run's lock: whoever left it RUNNING (a driver killed with -9) is gone.
        log(f"the MLflow run of {cfg.name} was left RUNNING by a process that is gone: "
            f"marked KILLED")
    if run_dir.exists() and any(run_dir.glob("checkpoint_*")) and not resume:
        raise FileExistsError(f"run '{cfg.name}' already exists in {run_dir}: pass --resume to "
                              f"continue it, or choose another name (--set name=...)")
    updates = check_run_config(run_dir, cfg, may_grow) if resume else {}
    # Before any Ray worker starts: a missing weights file fails the command (or the Tune trial)
    # in seconds with one line, not a worker group later; the ImageNet weights are fetched here
    # so that an offline machine does too, and each worker finds them in its node's hub cache.
    check_weights(cfg.model.backbone, cfg.model.backbone_weights)
    return run_dir, updates


def _open_run_folder(cfg: Config, run_dir: Path, resume: bool, updates: dict,
                     log) -> tuple[Path, int] | None:
    """The run folder made, with its config.yaml; returns the newest checkpoint a resumed run
    continues from (None: iteration 0)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    passed_over: list[tuple[Path, str]] = []
    newest = newest_checkpoint(run_dir, passed_over) if resume else None
    for directory, why in passed_over:
        log(f"passed over {directory}: its state.pt does not load ({why})")
    if resume:
        log(f"resuming {cfg.name} from {newest[0].name} (iteration {newest[1]})" if newest else
            f"resuming {cfg.name}: no complete checkpoint in {run_dir}, starting at iteration 0")
    for key, (old, new) in updates.items():
        log(f"{key}: {old} -> {new} on resume (recorded in config.yaml and the MLflow run's tags)")
    if newest is None or updates or not (run_dir / "config.yaml").is_file():
        # Written before any worker starts: whatever the run leaves behind can be checked.
        write_atomic(run_dir / "config.yaml", lambda handle: handle.write(dump_config(cfg).encode()))
        share(run_dir, run_location(cfg), "config.yaml")
    return newest


def _saved_checkpoints(location: str, run_dir: Path) -> str:
    """What a run whose storage failed has saved, for its last line. On object storage the store
    is what failed, and the local mirror holds only what an earlier start pulled from it."""
    if storage.is_remote(location):
        return f"the checkpoints it saved are kept under {location}"
    newest = newest_checkpoint(run_dir)
    return (f"the newest checkpoint is at iteration {newest[1]}" if newest
            else "there was no checkpoint yet")


def _trainer_factory(cfg: Config, loop_config: dict, callbacks):
    """What makes the run's `TorchTrainer` (a fresh one for each restart)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from splitmatch.rendezvous import LoopbackTorchConfig

    resources = {"CPU": cfg.train.cpus_per_worker}
    if cfg.train.use_gpu:
        resources["GPU"] = 1
    # The controller waits this long between polls of its workers, and a run goes through
    # several polls before its first step and after its last; a poll is one small RPC per worker
    # (docs/architecture.md has what Ray's 2 s cost a short run). Read from this process's
    # environment and passed on to the controller and workers.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(HEALTH_CHECK_INTERVAL_S))
    # Ray adds 15 to its workers' niceness so that its own processes stay responsive. A
    # training worker is the one process that computes: at 15, every wake-up of the raylet,
    # the driver or a helper actor preempts its compute threads (on 2 cores, about 1,000 times
    # a second): about half of what Ray Train added to a step (docs/performance.md). The
    # user's RAY_worker_niceness, if set, is kept.
    niceness = os.environ.get("RAY_worker_niceness", str(WORKER_NICENESS))

    def trainer():
        return TorchTrainer(
            train_loop_per_worker,
            train_loop_config=loop_config,
            torch_config=LoopbackTorchConfig(),  # a local instance's process group on 127.0.0.1
            scaling_config=ScalingConfig(num_workers=cfg.train.num_workers,
                                         use_gpu=cfg.train.use_gpu, resources_per_worker=resources),
            run_config=RunConfig(
                name=cfg.name, storage_path=cfg.train.storage_path, callbacks=callbacks,
                # The latest checkpoint only: it is what a resumed run continues from. The
                # selected weights, if any, are best_model.pt.
                checkpoint_config=CheckpointConfig(num_to_keep=1),
                worker_runtime_env={"env_vars": {"RAY_worker_niceness": niceness}},
                # Restarts are decided in `_fit`, where a deterministic error can end them.
                failure_config=FailureConfig(max_failures=0)),
        )
    return trainer


def _fit(cfg: Config, trainer, run_dir: Path, tracking_uri: str, watcher: Watcher | None, log):
    """Ray Train's fit with restarts; a failed or interrupted run's MLflow run closed, and one
    line for the user that says where to continue from."""
    import ray

    location = run_location(cfg)
    try:
        return fit_with_restarts(trainer, cfg.train.max_failures, run_dir, location,
                                 watcher.note if watcher else log,
                                 abort=watcher.abort if watcher else lambda: None)
    except (RunFailed, UserError) as failure:  # one line for the user; the run says FAILED
        if watcher is not None:
            watcher.stop()
            watcher = None
        removed = remove_unloadable_checkpoints(run_dir) if not storage.is_remote(location) else []
        mark_ended(tracking_uri, cfg.tracking.experiment, run_key(cfg), "FAILED",
                   " ".join(str(failure).split())[:500])
        if isinstance(failure, StorageFailed):
            raise StorageFailed(
                f"{failure}; " + (f"{len(removed)} partial checkpoint(s) removed; " if removed
                                  else "") + "the MLflow run is marked FAILED; " +
                _saved_checkpoints(location, run_dir) +
                ": continue with --resume once the storage is back") from failure
        raise
    except KeyboardInterrupt as interrupt:  # Ctrl-C, or SIGTERM (errors.Terminated)
        # The run was aborted (its workers are gone) and nothing of Ray's is in use any more:
        # shutting Ray down while another thread waits in a Ray call can crash the process.
        if watcher is not None:
            watcher.stop()
            watcher = None
        ray.shutdown()
        # The workers could not close their MLflow run: close it here.
        mark_ended(tracking_uri, cfg.tracking.experiment, run_key(cfg), "KILLED", "killed")
        newest = newest_checkpoint(run_directory(cfg))
        raise type(interrupt)(f"interrupted: the MLflow run of {cfg.name} is marked KILLED; " + (
            f"its newest checkpoint is at iteration {newest[1]}: continue with --resume" if newest
            else "it had no checkpoint yet")) from None
    finally:
        if watcher is not None:
            watcher.stop()
