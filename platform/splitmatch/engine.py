"""The training engine, without Ray or MLflow: the parts one worker trains with (classes, model,
matcher, criterion, data), one optimization step, the batches of the loop and their timing.

`train_loop.train_loop_per_worker` drives it on every Ray Train worker; `splitmatch bench train
--in-process` and the tests drive it in-process.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler

from splitmatch.clip import TEMPLATES, build_clip
from splitmatch.config import Config, ConfigError, OptimConfig
from splitmatch.criterion import SetCriterion, build_criterion, pseudo_label_map
from splitmatch.data import build_dataset, collate
from splitmatch.matcher import build_matcher
from splitmatch.model import build_segmentor
from splitmatch.splits import class_names as dataset_classes
from splitmatch.splits import default_unseen
from splitmatch.splits import seen_ids as dataset_seen_ids
from splitmatch.targets import (build_targets, class_embedding_sets, embedding_center,
                                pooled_candidates, seen_lookup)


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
    # Fused: one kernel over all tensors; PyTorch's default on the CPU is a loop per tensor, a
    # visible share of a toy-world training step.
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
                  candidate_embedding: str = "cls", pool_max_cosine: float | None = None
                  ) -> dict[str, Tensor]:
    """Forward + weighted losses for one batch (no backward: the caller owns the optimizer).

    `candidate_embedding` is `model.candidate_embedding`: "cls" uses the cached CLIP Cu,
    "dense"/"dense_mlp" the model's own MFE features pooled over each candidate mask. With
    `pool_max_cosine` (`loss.candidate_pool: batch`), every image is scored against the batch's
    candidates (`targets.pooled_candidates`).

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
    pooled = None
    if candidate_maps is not None and pool_max_cosine is not None:
        candidate_maps, candidate_embeds, pooled = pooled_candidates(candidate_maps,
                                                                     candidate_embeds,
                                                                     pool_max_cosine)
    targets = build_targets(labels, classes.seen_lut, candidate_maps, classes.num_seen)
    core = model.module if hasattr(model, "module") else model
    seen_text = core.class_space(classes.seen_text.to(device))
    class_embeds, class_valid = class_embedding_sets(seen_text, candidate_embeds, images.shape[0])
    if pooled is not None:
        class_valid[:, classes.num_seen:] &= pooled
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


def prediction_pictures(model, dataset, classes: ClassSpace, cfg: Config, device, out_dir: Path,
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


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this worker so far: allocated GPU memory on a GPU, else the process's
    maximum resident set (what a CPU node must have free)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024 ** 3
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # KiB on Linux


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


def optimization_step(model: nn.Module, optimizer, parts: TrainingParts, cfg: Config, batch: dict,
                      iteration: int, device, amp: bool, timer: StepTimer) -> tuple[Tensor, dict]:
    """One step of the loop on a fetched batch: learning rate, forward and losses, backward,
    gradient clipping, update. Returns the summed loss and the named losses."""
    set_learning_rate(optimizer, iteration, cfg.train.max_iters, cfg.optim)
    losses = training_step(model, parts.criterion, batch, parts.classes,
                           cfg.matching.mode == "split", device, amp=amp,
                           candidate_embedding=cfg.model.candidate_embedding,
                           pool_max_cosine=(cfg.loss.candidate_pool_max_cosine
                                            if cfg.loss.candidate_pool == "batch" else None))
    loss = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    before_step = timer.now()
    if cfg.optim.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    optimizer.step()
    timer.add(before_step, timer.now())
    return loss, losses


def step_metrics(loss: Tensor, losses: dict[str, Tensor], optimizer, device,
                  timer: StepTimer) -> dict[str, float]:
    """The logged figures of a step: losses (not the auxiliary layers'), lr, memory, timing."""
    return {"loss": loss.item(), "lr": optimizer.param_groups[0]["lr"],
            **{k: v.item() for k, v in losses.items() if "_aux" not in k},
            "memory/peak_gb": peak_memory_gb(device), **timer.report()}


class Timeline:
    """Wall-clock marks (`time.time()`, comparable between the processes of one machine) of a
    run's phases and of three of its iterations: the first, the middle and the last of the
    iterations from `start` to `end`. The second half's seconds per iteration count whatever the
    loop does between steps (progress, reports), which the StepTimer leaves out: it is how
    `splitmatch bench train --paired` compares a loop on Ray Train with the same loop in-process."""

    def __init__(self, start: int, end: int):
        self.first, self.middle, self.last = start + 1, (start + end) // 2, end
        self.marks: dict[str, float] = {}

    def mark(self, name: str) -> None:
        self.marks[name] = time.time()

    def iteration_done(self, iteration: int) -> None:
        for name, at in (("first_iteration", self.first), ("middle_iteration", self.middle),
                         ("last_iteration", self.last)):
            if iteration == at:
                self.mark(name)

    def second_half_step_s(self) -> float:
        """Seconds per iteration from the middle iteration's end to the last one's."""
        return ((self.marks["last_iteration"] - self.marks["middle_iteration"])
                / max(self.last - self.middle, 1))
