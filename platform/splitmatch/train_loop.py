"""The per-worker training loop under Ray Train: set-up, the loop (step; log; select on the
selection split; test once at the end; report and checkpoint), finish. The Ray calls are visible
here, not hidden in a framework; the step itself is the Ray-free `engine`.

`train_loop_per_worker` runs on every Ray Train worker (DDP over gloo on CPU, NCCL on GPU); rank 0
alone talks to MLflow and tells the driver its progress (`progress_relay`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from splitmatch import storage
from splitmatch.averaging import WeightAverage, averaged, weights_loaded
from splitmatch.calibration import (METRIC_KEYS, Calibration, calibrate, calibration_metrics,
                                    evaluate, fixed_at)
from splitmatch.checkpoints import (AVERAGE, BEST_MODEL, CALIBRATION, FINAL_METRICS,
                                    CheckpointError, load_state, newest_checkpoint,
                                    save_checkpoint, share)
from splitmatch.config import Config, config_from_dict, flatten, use_credentials
from splitmatch.engine import (TrainingParts, StepTimer, Timeline, build_optimizer, build_parts,
                               optimization_step, prediction_pictures, step_metrics,
                               training_batches)
from splitmatch.files import write_atomic
from splitmatch.progress_relay import teller

# Rank 0's timeline of the run (phases and iterations, `engine.Timeline`), in the run folder's
# workers/ beside the ranks' pids: `train.launch` hands it to a caller that asks (the paired bench).
TIMELINE = "rank0.timeline.json"


def _restore(run_dir: Path, location: str, selecting: bool) -> tuple[dict | None, dict | None]:
    """(the newest training state, the weights selected so far) of a restarted worker group or a
    resumed run; (None, None) for a new one."""
    import ray.train

    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            try:
                state = load_state(directory)
            except CheckpointError:  # passed over, as on the disk below (the driver said so)
                state = None
    on_disk = newest_checkpoint(run_dir)  # what Ray's snapshot may not name yet (see there)
    if on_disk is not None and (state is None or on_disk[1] > state["iteration"]):
        state = load_state(on_disk[0])
    if state is None or not selecting:
        return state, None
    if storage.is_remote(location):
        storage.pull(storage.join(location, BEST_MODEL), run_dir / BEST_MODEL, refresh=True)
    best = load_state(run_dir / BEST_MODEL)["model"] if (run_dir / BEST_MODEL).is_file() else None
    return state, best


def _open_tracker(cfg: Config, config: dict, run_dir: Path, parts: TrainingParts,
                  state: dict | None, tell):
    """Rank 0's MLflow run: opened (or found again) with params and tags, config.yaml logged."""
    import ray

    from splitmatch.tracking import OFFLINE_FILE, Tracker, git_commit

    tracker = Tracker(config["tracking_uri"], cfg.tracking.experiment, config["run_key"],
                      cfg.name, run_dir / OFFLINE_FILE, config.get("parent_run_id"),
                      log=lambda message: tell({"note": message}))
    tags = config.get("tags") or {}
    tracker.open(flatten(cfg), {
        # The commit that launch saw (tracking.source_tags), if it did: one commit per run.
        "git_commit": tags.get("mlflow.source.git.commit") or git_commit(),
        "dataset": cfg.data.dataset,
        "split": f"{cfg.data.train_split}/{cfg.data.select_split or '-'}/{cfg.data.test_split}",
        "unseen": ",".join(parts.classes.unseen), "matching": cfg.matching.mode,
        "pseudo_cache_key": parts.candidates.root.name if parts.candidates else "none",
        "ray_node": ray.get_runtime_context().get_node_id(),  # where rank 0 ran
        **tags})
    tracker.log_inputs(_datasets(cfg, parts))
    tracker.start_system_metrics()
    if state is not None:
        tracker.set_tags({"resumed_from_iteration": state["iteration"]})
    updates = config.get("config_updates") or {}
    if state is None or updates:
        # launch() wrote it; MLflow params cannot change, so a grown budget is a tag.
        tracker.log_artifact(run_dir / "config.yaml")
        tracker.set_tags({f"resumed_with.{key}": f"{old} -> {new}"
                          for key, (old, new) in updates.items()})
    return tracker


def _datasets(cfg: Config, parts: TrainingParts) -> list[dict]:
    """The run's splits as MLflow datasets (its runs table and run page show them). A split is
    named by what defines it (the dataset, the split, the unseen classes, the toy world's seeds or
    the data folder); the training split's digest is the pseudo-mask cache key when it trains on
    pseudo masks, which also keys the CLIP and settings that made them."""
    from splitmatch.files import content_key
    from splitmatch.pseudo.cache import cache_inputs

    roles = [("training", cfg.data.train_split, parts.train_set),
             ("validation", cfg.data.select_split, parts.select_set),
             ("test", cfg.data.test_split, parts.test_set)]
    datasets = []
    for context, split, images in roles:
        if split is None:
            continue
        described = cache_inputs(cfg, split)["dataset"]
        digest = (parts.candidates.root.name if context == "training" and parts.candidates
                  else content_key(described))
        datasets.append({
            "name": f"{cfg.data.dataset}-{split}", "digest": digest, "context": context,
            # The toy world is generated by code, from the seeds in `source`.
            "source_type": "code" if cfg.data.dataset == "toyworld" else "local",
            "source": json.dumps(described),
            "profile": json.dumps({"images": len(images), "unseen": described["unseen"]})})
    return datasets


@dataclass
class _Worker:
    """One Ray Train worker of a run: who it is, where it computes, where the run's files are."""

    rank: int
    world_size: int
    device: torch.device
    run_dir: Path  # this node's folder (a remote run: a mirror on each node)
    location: str  # the run's folder or remote prefix
    stored_config: dict  # the config as saved with every checkpoint

    def publish(self, name: str, write) -> None:
        """Rank 0 writes the run file `name` with `write(handle)` (whole or not at all) and
        shares it."""
        if self.rank == 0:
            write_atomic(self.run_dir / name, write)
            share(self.run_dir, self.location, name)


@dataclass
class _Selection:
    """What evaluation on the selection split has chosen so far."""

    best_hiou: float = -1.0
    best_state: dict | None = None
    latest_hiou: float = -1.0  # carried by every report: Tune's schedulers read it
    calibration: float | None = None  # chosen for the result weights at the end of the run
    average: WeightAverage | None = None  # under train.ema_decay: the weights evaluated


def train_loop_per_worker(config: dict) -> None:
    """The whole training of one Ray Train worker: set-up, the loop (step; log; select on the
    selection split; test once at the end; report and checkpoint), finish."""
    import ray.train
    import ray.train.torch

    # ---------------------------------------------------------------- set-up
    entered = time.time()
    cfg = config_from_dict(config["cfg"], "<train loop>")
    use_credentials(config.get("credentials"))  # before any MLflow call
    context = ray.train.get_context()
    rank, location = context.get_world_rank(), config["run_location"]
    worker = _Worker(rank, context.get_world_size(), ray.train.torch.get_device(),
                     storage.local_path(location), location, config["cfg"])
    tell = teller(config.get("progress") if rank == 0 else None)
    if rank == 0 and storage.is_remote(location):  # the driver wrote it, maybe on another node
        storage.pull(storage.join(location, "config.yaml"), worker.run_dir / "config.yaml",
                     refresh=True)
    torch.manual_seed(cfg.seed + rank)  # different dropout/sampling noise per rank
    torch.set_num_threads(max(1, cfg.train.cpus_per_worker))
    (worker.run_dir / "workers").mkdir(parents=True, exist_ok=True)
    (worker.run_dir / "workers" / f"rank{rank}.pid").write_text(str(os.getpid()))

    parts = build_parts(cfg, rank, worker.world_size, worker.device)
    state, best_state = _restore(worker.run_dir, location, parts.select_set is not None)
    iteration, epoch, selection = 0, 0, _Selection(best_state=best_state)
    if state is not None:
        parts.model.load_state_dict(state["model"])
        iteration, epoch = state["iteration"], state["epoch"]
        selection.best_hiou = selection.latest_hiou = max(state["best_hiou"], -1.0)
    model = ray.train.torch.prepare_model(parts.model)  # DDP + device
    core = model.module if hasattr(model, "module") else model
    optimizer = build_optimizer(core, cfg.optim)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    if cfg.train.ema_decay > 0:
        selection.average = WeightAverage(core, cfg.train.ema_decay,
                                          state.get(AVERAGE) if state is not None else None)
    parts_built = time.time()
    tracker = _open_tracker(cfg, config, worker.run_dir, parts, state, tell) if rank == 0 else None
    use_amp = cfg.train.amp and worker.device.type == "cuda"
    timer = StepTimer(parts.matcher, worker.device)
    timeline = Timeline(iteration, cfg.train.max_iters)
    timeline.marks.update(loop_entered=entered, parts_built=parts_built)
    timeline.mark("set_up")
    model.train()
    # ---------------------------------------------------------------- loop
    for epoch, batch in training_batches(parts, epoch, cfg.train.max_iters - iteration, timer):
        loss, losses = optimization_step(model, optimizer, parts, cfg, batch, iteration,
                                         worker.device, use_amp, timer)
        if selection.average is not None:
            selection.average.update(core)
        iteration += 1
        timeline.iteration_done(iteration)
        last = iteration == cfg.train.max_iters
        wants_checkpoint = iteration % cfg.train.checkpoint_every == 0 or last
        metrics: dict[str, float] = {}
        if iteration % cfg.train.log_every == 0 or last:
            metrics.update(step_metrics(loss, losses, optimizer, worker.device, timer))
        if parts.select_set is not None and (wants_checkpoint
                                             or iteration % cfg.train.eval_every == 0):
            metrics.update(_select(core, parts, cfg, worker, selection, tell))
        _tell_progress(tell, iteration, metrics, cfg.data.select_split)
        if last:
            metrics.update(_test_once(core, parts, cfg, worker, selection, tracker, iteration,
                                      tell))
        if metrics:
            _report(metrics, iteration, tracker, selection, parts.select_set is not None, worker,
                    (core, optimizer, epoch) if wants_checkpoint else None)
    # ---------------------------------------------------------------- finish
    if tracker is not None:
        # A run's weights reach MLflow once: a run of its own (train, demo) gets them as its
        # logged model when its caller publishes it (publish.py); a run under a parent (a
        # search's trial, an ablation row) keeps them as this artifact.
        if (worker.run_dir / BEST_MODEL).exists():
            if config.get("parent_run_id"):
                tracker.log_artifact(worker.run_dir / BEST_MODEL, "checkpoints")
            tracker.set_tags({"best_select_hIoU": f"{selection.best_hiou:.4f}"})
        tracker.finish("FINISHED")
    if rank == 0:
        timeline.mark("loop_finished")
        _write_timeline(worker.run_dir / "workers" / TIMELINE, timeline)


def _write_timeline(path: Path, timeline: Timeline) -> None:
    """Rank 0's timeline, and the thread settings and niceness its steps ran with (the paired
    bench shows them beside the in-process side's)."""
    figures = {"marks": timeline.marks, "middle": timeline.middle, "last": timeline.last,
               "torch_threads": torch.get_num_threads(),
               "interop_threads": torch.get_num_interop_threads(),
               "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
               "niceness": os.getpriority(os.PRIO_PROCESS, 0)}
    write_atomic(path, lambda handle: handle.write(json.dumps(figures).encode()))


def _select(core: nn.Module, parts: TrainingParts, cfg: Config, worker: _Worker,
            selection: _Selection, tell) -> dict[str, float]:
    """Evaluate on the selection split (under calibration auto at the grid's best value, so that
    weights and calibration are chosen together); weights that beat the best so far become
    best_model.pt. Under train.ema_decay the averaged weights are the ones evaluated and kept."""
    with averaged(core, selection.average):
        result = calibrate(core, parts.select_set, cfg.data.select_split, parts.classes,
                           cfg.inference, worker.device, cfg.eval.batch_size, worker.rank,
                           worker.world_size,
                           _evaluation_progress(tell, cfg.data.select_split)).select
        hiou = result["hIoU"]
        better = not math.isnan(hiou) and hiou > selection.best_hiou
        if better:
            selection.best_state = {k: v.detach().cpu().clone()
                                    for k, v in core.state_dict().items()}
    if better:
        selection.best_hiou = hiou
        worker.publish(BEST_MODEL, lambda handle: torch.save(
            {"model": selection.best_state, "config": worker.stored_config}, handle))
    selection.latest_hiou = -1.0 if math.isnan(hiou) else hiou
    return {f"select_{k}": result[k] for k in METRIC_KEYS}


def _evaluation_progress(tell, split: str) -> Callable[[int, int], None]:
    return lambda done, total: tell({"evaluating": split, "done": done, "total": total})


def _tell_progress(tell, iteration: int, metrics: dict, select_split: str | None) -> None:
    shown = {"loss": metrics["loss"]} if "loss" in metrics else {}
    if "select_hIoU" in metrics:
        shown[f"{select_split} hIoU"] = metrics["select_hIoU"]
    tell({"iteration": iteration, **shown})


def _test_once(core: nn.Module, parts: TrainingParts, cfg: Config, worker: _Worker,
               selection: _Selection, tracker, iteration: int, tell) -> dict[str, float]:
    """The end of training: the calibration and the test split's figures, the prediction
    pictures, final_metrics.json. The result weights keep their calibration (predict reads it):
    best_model.pt is written again with it, the final checkpoint gets it in `_report`."""
    if selection.best_state is None and selection.average is not None:
        # No selection gave a figure (NaN throughout): the result is still the average.
        selection.best_state = selection.average.state_dict()["weights"]
    final, calibration = _test(core, selection.best_state, parts, cfg, worker, tell)
    selection.calibration = calibration.value
    if selection.best_state is not None:
        worker.publish(BEST_MODEL, lambda handle: torch.save(
            {"model": selection.best_state, "config": worker.stored_config,
             CALIBRATION: calibration.value}, handle))
    if worker.rank == 0:
        tested = dataclasses.replace(cfg, inference=fixed_at(cfg.inference, calibration.value))
        for path in prediction_pictures(core, parts.test_set, parts.classes, tested, worker.device,
                               worker.run_dir / "viz", iteration):
            tracker.log_artifact(path, "predictions")
        # The finished run's figures next to its checkpoints, so callers that come back later
        # (a rerun ablation) read what was measured.
        figures = {"iteration": iteration, "selected": selection.best_state is not None, **final,
                   **calibration_metrics(calibration, "select_")}
        worker.publish(FINAL_METRICS, lambda handle: handle.write(json.dumps(figures, indent=1).encode()))
    # Logged as final_select_*: select_* is the series of the periodic evaluations.
    return {**final, **calibration_metrics(calibration, "final_select_", grid=True)}


def _report(metrics: dict[str, float], iteration: int, tracker, selection: _Selection,
            selecting: bool, worker: _Worker, checkpoint: tuple | None) -> None:
    """Log to MLflow (rank 0) and report to Ray Train, with a checkpoint when `checkpoint` is
    (model, optimizer, epoch)."""
    import ray.train

    metrics["iteration"] = iteration
    if tracker is not None:
        tracker.log_metrics({k: v for k, v in metrics.items() if not math.isnan(v)},
                            step=iteration)
    # ray.train.report is a barrier: every rank reports at the same iterations, and only rank 0
    # hands over a checkpoint. With a selection split every report carries select_hIoU (the
    # latest evaluation's): Tune schedulers require it.
    reported = {**metrics, "select_hIoU": selection.latest_hiou} if selecting else metrics
    if checkpoint is None:
        ray.train.report(reported)
        return
    core, optimizer, epoch = checkpoint
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if worker.rank == 0:
            ckpt = ray.train.Checkpoint.from_directory(save_checkpoint(
                Path(tmp), core, optimizer, iteration, epoch, selection.best_hiou,
                worker.stored_config,
                # the final weights' calibration, when they are the result
                selection.calibration if selection.best_state is None else None,
                selection.average.state_dict() if selection.average is not None else None))
        ray.train.report(reported, checkpoint=ckpt)


def _test(core: nn.Module, best_state: dict | None, parts: TrainingParts, cfg: Config,
          worker: _Worker, tell) -> tuple[dict[str, float], Calibration]:
    """The one evaluation on the test split: of the selected weights when a selection split chose
    some (the training weights are put back afterwards), else of the final ones; at the
    calibration `calibrate` gives those weights on the selection split (chosen there under
    auto). Returns the test figures and that calibration."""
    common = (worker.device, cfg.eval.batch_size, worker.rank, worker.world_size)
    with weights_loaded(core, best_state):
        calibration = calibrate(core, parts.select_set, cfg.data.select_split, parts.classes,
                                cfg.inference, *common,
                                _evaluation_progress(tell, cfg.data.select_split))
        result = evaluate(core, parts.test_set, parts.classes,
                          fixed_at(cfg.inference, calibration.value), *common,
                          _evaluation_progress(tell, cfg.data.test_split))
    return {**{k: result[k] for k in METRIC_KEYS},
            **{f"IoU/{name}": v for name, v in result["per_class"].items()}}, calibration
