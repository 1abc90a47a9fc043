"""Training: the per-worker loop (set-up, loop, evaluate, report/checkpoint) and its Ray Train
launcher. The Ray calls are visible in the loop, not hidden in a framework.

`train_loop_per_worker` runs on every Ray Train worker (DDP over gloo on CPU, NCCL on GPU); rank 0
alone talks to MLflow. `launch` builds the `TorchTrainer` on the driver and is what
`splitmatch train` (and each Tune trial) calls.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler

from splitmatch import storage
from splitmatch.calibration import (METRIC_KEYS, Calibration, calibrate, calibration_metrics,
                                    fixed_at)
from splitmatch.calibration import evaluate  # noqa: F401 - train.evaluate, for its callers
from splitmatch.checkpoints import (BEST_MODEL, CALIBRATION, FINAL_METRICS, RESUME_MAY_GROW,
                                    CheckpointError,
                                    check_checkpoint_config, check_run_config, load_state,
                                    newest_checkpoint, remove_unloadable_checkpoints,
                                    result_checkpoint, save_checkpoint)
from splitmatch.clip import TEMPLATES, build_clip
from splitmatch.config import (RESULT_NEUTRAL_KEYS, Config, ConfigError, OptimConfig,
                               config_from_dict, dump_config, flatten, redact, resolve_paths,
                               to_dict, tracking_credentials, use_credentials)
from splitmatch.criterion import SetCriterion, build_criterion, pseudo_label_map
from splitmatch.data import build_dataset, collate
from splitmatch.splits import class_names as dataset_classes
from splitmatch.splits import HOLDOUT, check_split_use, default_unseen
from splitmatch.splits import seen_ids as dataset_seen_ids
from splitmatch.errors import RunFailed, RunInUse, UserError
from splitmatch.failures import StorageFailed, fit_with_restarts, storage_cause
from splitmatch.files import Busy, held_lock, write_atomic
from splitmatch.matcher import build_matcher
from splitmatch.model import build_segmentor
from splitmatch.model.backbone import IMAGENET, imagenet_weights_file
from splitmatch.progress import Progress
from splitmatch.targets import build_targets, class_embedding_sets, embedding_center, seen_lookup


@dataclass
class ClassSpace:
    """The classes of a run: who is seen, and the frozen CLIP text embeddings of every class."""

    names: tuple[str, ...]
    unseen: tuple[str, ...]
    seen_ids: list[int]
    seen_lut: Tensor  # [256] global id → seen index (see targets.seen_lookup)
    text: Tensor  # [N, C] text embeddings of all classes (used only at test time)
    ignore_index: int = 255

    @property
    def seen_text(self) -> Tensor:  # [Ns, C]: the only text embeddings training ever sees
        return self.text[self.seen_ids]

    @property
    def num_seen(self) -> int:
        return len(self.seen_ids)


def build_class_space(cfg: Config, clip) -> ClassSpace:
    names = dataset_classes(cfg.data.dataset)
    unseen = tuple(cfg.data.unseen) if cfg.data.unseen is not None else default_unseen(cfg.data.dataset)
    seen = dataset_seen_ids(cfg.data.dataset, list(unseen))
    text = clip.text_embeddings(names, TEMPLATES[cfg.clip.templates]).float().cpu()
    return ClassSpace(names, unseen, seen, seen_lookup(seen, cfg.data.ignore_index), text,
                      cfg.data.ignore_index)


def build_optimizer(model: nn.Module, optim_cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW with Mask2Former's groups: backbone at lr × backbone_lr_mult, no decay on norms/biases."""
    backbone_params = {id(p) for p in model.backbone.parameters()}
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_backbone = id(param) in backbone_params
        no_decay = param.ndim <= 1 or "query" in name or "level_embed" in name
        groups.setdefault((is_backbone, no_decay), []).append(param)
    param_groups = []
    for (is_backbone, no_decay), params in groups.items():
        lr = optim_cfg.lr * (optim_cfg.backbone_lr_mult if is_backbone else 1.0)
        param_groups.append({"params": params, "lr": lr, "initial_lr": lr,
                             "weight_decay": 0.0 if no_decay else optim_cfg.weight_decay})
    # Fused: one kernel over all tensors; PyTorch's default on the CPU is a loop per tensor,
    # which took 6% of a toy-world training step.
    return torch.optim.AdamW(param_groups, lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay,
                             fused=True)


def lr_factor(iteration: int, max_iters: int, optim_cfg: OptimConfig) -> float:
    """Linear warm-up, then Mask2Former's poly decay (or cosine) over the iteration budget."""
    if iteration < optim_cfg.warmup_iters:
        return (iteration + 1) / optim_cfg.warmup_iters
    progress = min(iteration / max(max_iters, 1), 1.0)
    if optim_cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    return (1 - progress) ** optim_cfg.poly_power


def set_learning_rate(optimizer, iteration: int, max_iters: int, optim_cfg: OptimConfig) -> None:
    """Every parameter group at its initial rate times the schedule's factor for `iteration`."""
    factor = lr_factor(iteration, max_iters, optim_cfg)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor


def training_step(model: nn.Module, criterion: SetCriterion, batch: dict, classes: ClassSpace,
                  split_matching: bool, device: torch.device, amp: bool = False,
                  candidate_embedding: str = "cls") -> dict[str, Tensor]:
    """Forward + weighted losses for one batch (no backward: the caller owns the optimiser).

    `candidate_embedding` is `model.candidate_embedding`: "cls" uses the cached CLIP Cu,
    "dense"/"dense_mlp" the model's own MFE features pooled over each candidate mask.

    With `amp`, only the model runs under bf16 autocast (no loss scaling needed, unlike fp16); the
    matcher and the losses stay in float32, as in Mask2Former, since Hungarian costs in bf16 can
    flip assignments.
    """
    images = batch["image"].to(device, non_blocking=True)  # [B, 3, H, W] uint8
    labels = batch["label"].to(device, non_blocking=True)  # [B, H, W] global ids, unseen = ignore
    candidate_maps, candidate_embeds = None, None
    if split_matching and "candidate_map" in batch:
        candidate_maps = batch["candidate_map"].to(device)  # [B, H, W], 0 = no candidate
        candidate_embeds = [c.to(device).float() for c in batch["candidate_embeds"]]  # B × [U_b, C]
    targets = build_targets(labels, classes.seen_lut, candidate_maps, classes.num_seen)
    core = model.module if hasattr(model, "module") else model
    seen_text = core.class_space(classes.seen_text.to(device))
    class_embeds, class_valid = class_embedding_sets(seen_text, candidate_embeds, images.shape[0])
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        outputs = model(images, class_embeds)
        if candidate_maps is not None and candidate_embedding != "cls":
            # Table 3's alternatives: candidates named by the model's own features Fu instead
            # of CLIP's Cu; the predictions are scored again against those.
            candidate_embeds = core.dense_candidate_embeds(outputs, candidate_maps)
            class_embeds, class_valid = class_embedding_sets(seen_text, candidate_embeds,
                                                             images.shape[0])
            outputs = core.rescore(outputs, class_embeds)
    pseudo_labels = pseudo_label_map(labels, classes.seen_lut, candidate_maps, classes.num_seen,
                                     classes.ignore_index)
    return criterion(outputs, targets, class_valid, candidate_embeds=candidate_embeds,
                     num_seen_classes=classes.num_seen, pseudo_labels=pseudo_labels)


class TimedMatcher(nn.Module):
    """Adds up the wall time spent inside the wrapped matcher (for the step-time breakdown)."""

    def __init__(self, matcher: nn.Module):
        super().__init__()
        self.matcher, self.seconds = matcher, 0.0

    def forward(self, *args, **kwargs):
        start = time.perf_counter()
        result = self.matcher(*args, **kwargs)
        self.seconds += time.perf_counter() - start
        return result


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


def _visualize(model, dataset, classes: ClassSpace, cfg: Config, device, out_dir: Path,
               iteration: int) -> list[Path]:
    """Pictures of the first validation images (rank 0): what the model predicts and what its
    candidate queries claim."""
    from splitmatch.visualize import prediction_figure, save_figure

    model.eval()
    paths = []
    ks, ku = cfg.model.num_seen_queries, cfg.model.num_candidate_queries
    with torch.no_grad():
        for i in range(min(cfg.train.num_visualizations, len(dataset))):
            sample = dataset[i]
            image = sample["image"][None].to(device)
            out = model(image, model.class_space(classes.text.to(device)),
                        num_random_queries=cfg.inference.num_random_queries)
            masks = torch.nn.functional.interpolate(out["pred_masks"].float(), size=image.shape[-2:],
                                                    mode="bilinear", align_corners=False)[0]
            winner = (masks.sigmoid() * out["pred_logits"][0].float().sigmoid().max(-1).values[:, None, None]
                      ).argmax(0)  # [H, W] query that wins each pixel
            owner = torch.where((winner >= ks) & (winner < ks + ku), winner - ks,
                                torch.full_like(winner, -1))
            pred = model.predict(image, classes.text.to(device), cfg.inference,
                                 classes.seen_ids)[0]
            fig = prediction_figure(sample["image"], sample["label"], pred, owner, classes.names,
                                    classes.unseen, classes.ignore_index)
            paths.append(save_figure(fig, out_dir / f"it{iteration:07d}_test{i}.png"))
    model.train()
    return paths


# Ray Train's controller poll interval unless the user sets RAY_TRAIN_HEALTH_CHECK_INTERVAL_S
# (see `launch`).
HEALTH_CHECK_INTERVAL_S = 0.25


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this worker so far: allocated GPU memory on a GPU, else the process's
    maximum resident set (what a CPU node must have free)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024 ** 3
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # KiB on Linux


def run_location(cfg: Config) -> str:
    """Where the run `cfg.name` lives: a folder under `train.storage_path`, or a prefix on object
    storage (Ray Train writes its checkpoints there itself)."""
    return storage.join(cfg.train.storage_path, cfg.name)


def run_directory(cfg: Config) -> Path:
    """The run's local folder: the run itself, or this node's mirror of a remote one, holding
    what the driver needs to check and report it (`pull_run`)."""
    run_dir = storage.local_path(run_location(cfg))
    if storage.is_remote(cfg.train.storage_path):
        pull_run(run_location(cfg), run_dir)
    return run_dir


def pull_run(location: str, run_dir: Path) -> None:
    """Mirror a remote run's config, selected weights, final figures and checkpoints (only those
    the remote still has: a mirrored checkpoint the run has since dropped must not look newest)."""
    for name in ("config.yaml", BEST_MODEL, FINAL_METRICS):
        storage.pull(storage.join(location, name), run_dir / name, refresh=True)
    remote = {name for name in storage.listdir(location) if name.startswith("checkpoint_")}
    for stale in run_dir.glob("checkpoint_*"):
        if stale.name not in remote:
            shutil.rmtree(stale, ignore_errors=True)
    for name in remote:
        storage.pull(storage.join(location, name, "state.pt"), run_dir / name / "state.pt")


def run_key(cfg: Config) -> str:
    """What the run's MLflow run is tagged with (tracking.RUN_KEY_TAG): the same from every
    machine for a run on object storage, the local folder otherwise."""
    location = run_location(cfg)
    return location if storage.is_remote(location) else str(storage.local_path(location))


def publish_results(cfg: Config, log=print) -> Path | None:
    """After a finished run: its HTML results page next to it (dashboards/run_page.py), logged to
    its MLflow run, and its weights as the run's MLflow logged model (a pyfunc model, pyfunc.py).
    Returns the page's local path, or None when MLflow does not know the run (an unreachable
    server)."""
    from splitmatch.dashboards.run_page import PAGE_NAME, write_run_page
    from splitmatch.pyfunc import log_model
    from splitmatch.tracking import default_tracking_uri, find_run

    cfg = resolve_paths(cfg)
    uri = cfg.tracking.uri or default_tracking_uri(cfg.train.storage_path)
    run = find_run(uri, cfg.tracking.experiment, run_key(cfg))
    if run is None:
        log(f"no results page: MLflow at {redact(uri)} has no run of {cfg.name}")
        return None
    run_dir = run_directory(cfg)
    page = write_run_page(cfg, uri, run.info.run_id, run_dir)
    _share(run_dir, run_location(cfg), PAGE_NAME)
    log(f"results page: {page}")
    clip_weights = storage.resolve_file(cfg.clip.pretrained) if cfg.clip.pretrained else None
    # Linked to the run's figures of its last step: the test split's hIoU, sIoU, uIoU among them.
    model = log_model(uri, run.info.run_id, result_checkpoint(run_dir), clip_weights,
                      list(dataset_classes(cfg.data.dataset)),
                      step=int(run.data.metrics.get("iteration", 0)))
    log(f"MLflow model: {model} (mlflow.pyfunc.load_model(...).predict(images, "
        f"params={{'classes': [...]}}))")
    return page


def _share(run_dir: Path, location: str, *names: str) -> None:
    """Push files written in a remote run's local folder to the run's remote prefix."""
    if storage.is_remote(location):
        for name in names:
            storage.push(run_dir / name, storage.join(location, name))


@dataclass
class TrainingParts:
    """What one worker trains with, built from the config."""

    classes: ClassSpace
    model: nn.Module
    matcher: TimedMatcher
    criterion: SetCriterion
    candidates: object | None  # the pseudo masks training reads, under Split Matching
    train_set: object
    test_set: object
    select_set: object | None
    sampler: DistributedSampler
    loader: DataLoader


def build_parts(cfg: Config, rank: int, world_size: int, device) -> TrainingParts:
    clip = build_clip(cfg.clip, device=device)
    classes = build_class_space(cfg, clip)
    split_matching = cfg.matching.mode == "split"
    candidates = None
    if split_matching:
        from splitmatch.pseudo.training_candidates import training_candidates
        candidates = training_candidates(cfg, clip, classes.seen_text)
    del clip  # frozen CLIP is only needed for text embeddings here: free it
    model = build_segmentor(cfg.model, embed_dim=classes.text.shape[1])
    if cfg.model.center_embeddings:
        model.text_center.copy_(embedding_center(classes.seen_text))  # seen names only
    matcher = TimedMatcher(build_matcher(cfg.matching, cfg.loss, cfg.model.num_seen_queries,
                                         cfg.model.num_candidate_queries))
    criterion = build_criterion(cfg.loss, matcher, cfg.data.ignore_index,
                                cfg.model.num_seen_queries if split_matching else None)
    train_set = build_dataset(cfg.data, cfg.data.train_split, train=True, seed=cfg.seed,
                              candidates=candidates)
    test_set = build_dataset(cfg.data, cfg.data.test_split, train=False)
    select_set = (build_dataset(cfg.data, cfg.data.select_split, train=False)
                  if cfg.data.select_split else None)
    sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True,
                                 seed=cfg.seed, drop_last=True)
    loader = DataLoader(train_set, batch_size=cfg.train.batch_size // world_size, sampler=sampler,
                        drop_last=True, collate_fn=collate, num_workers=cfg.train.loader_workers)
    if len(loader) == 0:
        raise ConfigError(f"'train.batch_size' ({cfg.train.batch_size}, over {world_size} workers) is "
                          f"more than the {len(train_set)} images of split "
                          f"'{cfg.data.train_split}': lower it with --set")
    return TrainingParts(classes, model, matcher, criterion, candidates, train_set, test_set,
                         select_set, sampler, loader)


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

    from splitmatch.tracking import Tracker, git_commit

    tracker = Tracker(config["tracking_uri"], cfg.tracking.experiment, config["run_key"],
                      cfg.name, run_dir / "mlflow_offline.jsonl", config.get("parent_run_id"),
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


class StepTimer:
    """Where the steps since the last report went: data loading, matching, the optimizer step.

    On a GPU it waits for the queued kernels before each reading, or their time would be charged
    to whichever later call happens to wait for them (the matcher, which copies costs to the CPU,
    waits anyway, so training loses little by it)."""

    def __init__(self, matcher: TimedMatcher, device: torch.device):
        self.matcher = matcher
        self.cuda = device.type == "cuda"
        self.reset()

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def reset(self) -> None:
        self.data = self.step = self.optimizer = 0.0
        self.steps = 0
        self.matcher.seconds = 0.0

    def fetched(self, start: float) -> None:
        """A batch arrived; the step began at `start` (when the previous one ended)."""
        self.start, self.arrived = start, time.perf_counter()

    def add(self, before_step: float, done: float) -> None:
        self.data += self.arrived - self.start
        self.optimizer += done - before_step
        self.step += done - self.start
        self.steps += 1

    def report(self) -> dict[str, float]:
        figures = {"time/step_s": self.step / self.steps,
                   "time/data_fraction": self.data / self.step,
                   "time/matcher_fraction": self.matcher.seconds / self.step,
                   "time/optimizer_fraction": self.optimizer / self.step}
        self.reset()
        return figures


def training_batches(parts: TrainingParts, epoch: int, steps: int, timer: StepTimer):
    """The next `steps` batches of the training split from `epoch` on, as (epoch, batch): each
    epoch reshuffled; the timer learns when each batch arrived and when its step began (when the
    caller came back for it)."""
    done = 0
    while done < steps:
        parts.sampler.set_epoch(epoch)
        parts.train_set.set_epoch(epoch)
        tick = time.perf_counter()
        for batch in parts.loader:
            timer.fetched(tick)
            yield epoch, batch
            done += 1
            if done == steps:
                return
            tick = time.perf_counter()
        epoch += 1


def optimisation_step(model: nn.Module, optimizer, parts: TrainingParts, cfg: Config, batch: dict,
                      iteration: int, device, amp: bool, timer: StepTimer) -> tuple[Tensor, dict]:
    """One step of the loop on a fetched batch: learning rate, forward and losses, backward,
    gradient clipping, update. Returns the summed loss and the named losses."""
    set_learning_rate(optimizer, iteration, cfg.train.max_iters, cfg.optim)
    losses = training_step(model, parts.criterion, batch, parts.classes,
                           cfg.matching.mode == "split", device, amp=amp,
                           candidate_embedding=cfg.model.candidate_embedding)
    loss = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    before_step = timer.now()
    if cfg.optim.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    optimizer.step()
    timer.add(before_step, timer.now())
    return loss, losses


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
            _share(self.run_dir, self.location, name)


@dataclass
class _Selection:
    """What evaluation on the selection split has chosen so far."""

    best_hiou: float = -1.0
    best_state: dict | None = None
    latest_hiou: float = -1.0  # carried by every report: Tune's schedulers read it
    calibration: float | None = None  # chosen for the result weights at the end of the run


def train_loop_per_worker(config: dict) -> None:
    """The whole training of one Ray Train worker: set-up, the loop (step; log; select on the
    selection split; test once at the end; report and checkpoint), finish."""
    import ray.train
    import ray.train.torch

    # ---------------------------------------------------------------- set-up
    cfg = config_from_dict(config["cfg"], "<train loop>")
    use_credentials(config.get("credentials"))  # before any MLflow call
    context = ray.train.get_context()
    rank, location = context.get_world_rank(), config["run_location"]
    worker = _Worker(rank, context.get_world_size(), ray.train.torch.get_device(),
                     storage.local_path(location), location, config["cfg"])
    tell = _teller(config.get("progress") if rank == 0 else None)
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
    tracker = _open_tracker(cfg, config, worker.run_dir, parts, state, tell) if rank == 0 else None
    use_amp = cfg.train.amp and worker.device.type == "cuda"
    timer = StepTimer(parts.matcher, worker.device)
    model.train()
    # ---------------------------------------------------------------- loop
    for epoch, batch in training_batches(parts, epoch, cfg.train.max_iters - iteration, timer):
        loss, losses = optimisation_step(model, optimizer, parts, cfg, batch, iteration,
                                         worker.device, use_amp, timer)
        iteration += 1
        last = iteration == cfg.train.max_iters
        wants_checkpoint = iteration % cfg.train.checkpoint_every == 0 or last
        metrics: dict[str, float] = {}
        if iteration % cfg.train.log_every == 0 or last:
            metrics.update(_step_metrics(loss, losses, optimizer, worker.device, timer))
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
        if (worker.run_dir / BEST_MODEL).exists():
            tracker.log_artifact(worker.run_dir / BEST_MODEL, "checkpoints")
            tracker.set_tags({"best_select_hIoU": f"{selection.best_hiou:.4f}"})
        tracker.finish("FINISHED")


def _step_metrics(loss: Tensor, losses: dict[str, Tensor], optimizer, device,
                  timer: StepTimer) -> dict[str, float]:
    """The logged figures of a step: losses (not the auxiliary layers'), lr, memory, timing."""
    return {"loss": loss.item(), "lr": optimizer.param_groups[0]["lr"],
            **{k: v.item() for k, v in losses.items() if "_aux" not in k},
            "memory/peak_gb": peak_memory_gb(device), **timer.report()}


def _select(core: nn.Module, parts: TrainingParts, cfg: Config, worker: _Worker,
            selection: _Selection, tell) -> dict[str, float]:
    """Evaluate on the selection split (under calibration auto at the grid's best value, so that
    weights and calibration are chosen together); weights that beat the best so far become
    best_model.pt."""
    result = calibrate(core, parts.select_set, cfg.data.select_split, parts.classes,
                       cfg.inference, worker.device, cfg.eval.batch_size, worker.rank,
                       worker.world_size, _evaluation_progress(tell, cfg.data.select_split)).select
    hiou = result["hIoU"]
    if not math.isnan(hiou) and hiou > selection.best_hiou:
        selection.best_hiou = hiou
        selection.best_state = {k: v.detach().cpu().clone() for k, v in core.state_dict().items()}
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
    final, calibration = _test(core, selection.best_state, parts, cfg, worker, tell)
    selection.calibration = calibration.value
    if selection.best_state is not None:
        worker.publish(BEST_MODEL, lambda handle: torch.save(
            {"model": selection.best_state, "config": worker.stored_config,
             CALIBRATION: calibration.value}, handle))
    if worker.rank == 0:
        tested = dataclasses.replace(cfg, inference=fixed_at(cfg.inference, calibration.value))
        for path in _visualize(core, parts.test_set, parts.classes, tested, worker.device,
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
                selection.calibration if selection.best_state is None else None))
        ray.train.report(reported, checkpoint=ckpt)


def _test(core: nn.Module, best_state: dict | None, parts: TrainingParts, cfg: Config,
          worker: _Worker, tell) -> tuple[dict[str, float], Calibration]:
    """The one evaluation on the test split: of the selected weights when a selection split chose
    some (the training weights are put back afterwards), else of the final ones; at the
    calibration `calibrate` gives those weights on the selection split (chosen there under
    auto). Returns the test figures and that calibration."""
    final_state = None
    if best_state is not None:
        final_state = {k: v.detach().clone() for k, v in core.state_dict().items()}
        core.load_state_dict(best_state)
    common = (worker.device, cfg.eval.batch_size, worker.rank, worker.world_size)
    try:
        calibration = calibrate(core, parts.select_set, cfg.data.select_split, parts.classes,
                                cfg.inference, *common,
                                _evaluation_progress(tell, cfg.data.select_split))
        result = evaluate(core, parts.test_set, parts.classes,
                          fixed_at(cfg.inference, calibration.value), *common,
                          _evaluation_progress(tell, cfg.data.test_split))
    finally:
        if final_state is not None:
            core.load_state_dict(final_state)
    return {**{k: result[k] for k in METRIC_KEYS},
            **{f"IoU/{name}": v for name, v in result["per_class"].items()}}, calibration


def launch(cfg: Config, resume: bool = False, build_pseudo_masks: bool = False,
           config_path: str = "CONFIG", parent_run_id: str | None = None, callbacks=None,
           may_grow: tuple[str, ...] = RESUME_MAY_GROW, log=print, progress: bool = True,
           holdout: bool = False, tags: dict[str, str] | None = None):
    """Run training on Ray Train (local instance, or the cluster in RAY_ADDRESS); returns the Result.

    The run lives in `train.storage_path/name`; starting the same name again resumes it from its
    newest checkpoint, so that needs `resume=True` to be deliberate, and the config must match
    the stored one except for the keys in `may_grow` (ablation rows pass none). A held-out split
    (splits.py) is refused unless `holdout` (the --holdout flag) says the run is for reporting.
    `tags` go on the MLflow run with the usual ones.
    """
    from splitmatch.tracking import source_tags

    cfg = resolve_paths(cfg)
    family = check_split_use(cfg.data, "train", holdout)
    tags = {**source_tags(), **(tags or {}), "split_family": family,
            **({"holdout_flag": "--holdout"} if family == HOLDOUT else {})}
    with run_lock(cfg.name, storage.local_path(run_location(cfg))):
        try:
            return _launch(cfg, resume, build_pseudo_masks, config_path, parent_run_id,
                           callbacks, may_grow, log, progress, tags)
        except OSError as exc:  # the run's own files, before or after training
            cause = storage_cause(exc)
            if cause is None:
                raise
            raise StorageFailed(f"the run's storage {run_location(cfg)} failed: {cause}") from exc


@contextlib.contextmanager
def run_lock(name: str, run_dir: Path):
    """Held while a process works on the run folder `run_dir`: a second `train` of the same name
    (or a trial, or an ablation row) is refused in one line, whichever starts second, before it
    touches the folder or Ray. On object storage it holds on this machine only (the local
    mirror's folder)."""
    import sys

    holder = (f"pid {os.getpid()} ({Path(sys.argv[0]).name} {' '.join(sys.argv[1:2])}), "
              f"since {time.strftime('%Y-%m-%d %H:%M:%S')}")
    try:  # beside the folder, not in it: a command refused before it starts leaves no run folder
        with held_lock(run_dir.parent / f".{name}.lock", holder):
            yield
    except Busy as busy:
        raise RunInUse(f"run '{name}' in {run_dir} is in use by {busy.holder or 'another process'}:"
                       f" wait for it to end, or choose another name (--set name=...)") from None



def _launch(cfg: Config, resume: bool, build_pseudo_masks: bool, config_path: str,
            parent_run_id: str | None, callbacks, may_grow: tuple[str, ...], log, progress: bool,
            tags: dict[str, str]):
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from splitmatch.cluster import check_fits, init_ray
    from splitmatch.rendezvous import LoopbackTorchConfig
    from splitmatch.tracking import default_tracking_uri, mark_ended

    location = run_location(cfg)
    run_dir = run_directory(cfg)
    tracking_uri = cfg.tracking.uri or default_tracking_uri(cfg.train.storage_path)
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
    if cfg.model.backbone_weights == IMAGENET:
        # Fetched here, before any Ray worker starts, so that an offline machine fails in seconds
        # with one line; each worker then finds the file in its node's torch hub cache.
        imagenet_weights_file(cfg.model.backbone)
    init_ray(cfg.storage)
    # Ray Train would wait forever for workers that no node can hold: say so instead.
    check_fits("Ray Train worker", cfg.train.num_workers,
               {"CPU": cfg.train.cpus_per_worker, "GPU": 1.0 if cfg.train.use_gpu else 0.0},
               "train.num_workers / train.cpus_per_worker / train.use_gpu")
    open_pseudo_masks(cfg, build_pseudo_masks, config_path, log)  # fails early if it is missing
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
        _share(run_dir, location, "config.yaml")
    loop_config = {"cfg": to_dict(cfg), "run_location": location, "tracking_uri": tracking_uri,
                   "run_key": run_key(cfg), "parent_run_id": parent_run_id, "tags": tags,
                   "config_updates": {k: list(v) for k, v in updates.items()},
                   "credentials": tracking_credentials()}
    resources = {"CPU": cfg.train.cpus_per_worker}
    if cfg.train.use_gpu:
        resources["GPU"] = 1
    # The controller waits this long between polls of its workers, and a run goes through
    # several polls before its first step and after its last: at Ray's 2 s a tiny run spent
    # ~6 s of its ~21 s there (0.25 s: ~14.5 s, on 2 cores). A poll is one small RPC per worker.
    # Read from this process's environment and passed on to the controller and workers.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(HEALTH_CHECK_INTERVAL_S))
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
                # Restarts are decided below, where a deterministic error can end them.
                failure_config=FailureConfig(max_failures=0)),
        )

    log(f"training {cfg.name} on {cfg.train.num_workers} {'GPU' if cfg.train.use_gpu else 'CPU'} "
        f"worker(s); run directory {location}; MLflow {redact(tracking_uri)}")
    watcher = _Watcher(cfg.name, cfg.train.max_iters, newest[1] if newest else 0) if progress else None
    loop_config["progress"] = watcher.queue if watcher else None
    if watcher is not None:
        callbacks = [*(callbacks or []), _controller_to_driver(watcher.queue)]
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
            newest = newest_checkpoint(run_dir)
            raise StorageFailed(
                f"{failure}; " + (f"{len(removed)} partial checkpoint(s) removed; " if removed
                                  else "") + "the MLflow run is marked FAILED; " +
                (f"the newest checkpoint is at iteration {newest[1]}" if newest
                 else "there was no checkpoint yet") +
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


TELL_EVERY_S = 1.0  # bare iteration counts go to the driver at most this often


def _teller(queue):
    """Rank 0's line to the driver's progress display (`_Watcher`); best effort: a driver that is
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


def _controller_to_driver(queue):
    """A Ray Train controller callback that, when the controller starts, puts the controller's
    own actor handle on the driver's queue ({"controller": handle}): Ctrl-C can then abort the
    run as Ray Train's own SIGINT handler would (it installs one only when `fit` runs in the
    main thread, see `_fit_in_thread`)."""
    # Ray Train V2 runs RunConfig callbacks that are not UserCallbacks as controller callbacks
    # ("custom workarounds built on top of internal callbacks", in its own words); the class is
    # internal, one more reason why ray is pinned below its next minor.
    from ray.train.v2._internal.execution.callback import ControllerCallback

    class ControllerToDriver(ControllerCallback):
        def after_controller_start(self, train_run_context) -> None:
            import ray

            try:
                queue.put_nowait({"controller": ray.get_runtime_context().current_actor})
            except Exception:  # noqa: BLE001 - without it Ctrl-C cannot abort; no reason to fail
                pass

    return ControllerToDriver()


class _Watcher:
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


def evaluate_checkpoint(cfg: Config, checkpoint: str | Path, out_csv: str | Path | None = None,
                        log=print) -> dict:
    """`splitmatch eval`: a finished model on the test split, per-class IoU to CSV. The checkpoint's
    stored config must match `cfg` in all but how it is evaluated (`EVAL_MAY_DIFFER`).

    Returns the test split's {hIoU, sIoU, uIoU, mIoU, per_class}, `seen_score_calibration` (the
    value tested with: under auto chosen on data.select_split as training chooses it) and, with a
    selection split, `select`: its {hIoU, sIoU, uIoU, mIoU} at that value."""
    import csv

    cfg = resolve_paths(cfg)  # as the stored config is
    if storage.is_remote(checkpoint):  # s3://.../best_model.pt, or a checkpoint_* folder there
        checkpoint = storage.pull(str(checkpoint)) or storage.pull_tree(str(checkpoint))
    state = load_state(checkpoint)
    checked = check_checkpoint_config(checkpoint, state, cfg)
    device = torch.device("cuda" if cfg.train.use_gpu and torch.cuda.is_available() else "cpu")
    clip = build_clip(cfg.clip, device=device)
    classes = build_class_space(cfg, clip)
    model = build_segmentor(cfg.model, embed_dim=classes.text.shape[1])
    model.load_state_dict(state["model"])
    model.to(device)
    select_split = cfg.data.select_split
    if select_split is None:
        calibration = calibrate(model, None, None, classes, cfg.inference, device)
    else:  # the same choice as at the end of training, on the weights given
        select_set = build_dataset(cfg.data, select_split, train=False)
        with Progress(len(select_set), f"evaluating {select_split}", "img") as bar:
            calibration = calibrate(model, select_set, select_split, classes, cfg.inference,
                                    device, cfg.eval.batch_size,
                                    progress=lambda done, total: bar.update(done))
    test_set = build_dataset(cfg.data, cfg.data.test_split, train=False)
    with Progress(len(test_set), f"evaluating {cfg.data.test_split}", "img") as bar:
        result = evaluate(model, test_set, classes, fixed_at(cfg.inference, calibration.value),
                          device, cfg.eval.batch_size, progress=lambda done, total: bar.update(done))
    result["seen_score_calibration"] = calibration.value
    if calibration.select is not None:
        result["select"] = {k: calibration.select[k] for k in METRIC_KEYS}
    if out_csv is not None:
        out_csv = Path(out_csv)
        out_csv.parent.mkdir(parents=True, exist_ok=True)
        with open(out_csv, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["class", "split", "IoU"])
            for name, iou in result["per_class"].items():
                writer.writerow([name, "unseen" if name in classes.unseen else "seen",
                                 "" if math.isnan(iou) else f"{iou:.4f}"])
    log(f"{len(test_set)} images of {cfg.data.dataset}/{cfg.data.test_split}: hIoU {result['hIoU']:.2f}  "
        f"sIoU {result['sIoU']:.2f}  uIoU {result['uIoU']:.2f}  mIoU {result['mIoU']:.2f}"
        + (f"; per-class IoU in {out_csv}" if out_csv else "")
        + f"; seen-score calibration {calibration.how} ({checked})")
    return result
