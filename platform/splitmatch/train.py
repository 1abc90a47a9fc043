"""The training loop: set-up, loop, evaluate, checkpoint (style.md practice 5).

Pure PyTorch; the Ray Train launcher wraps `train_loop` rather than re-implementing it.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from splitmatch.clip import TEMPLATES, build_clip
from splitmatch.config import Config, OptimConfig, dump_config
from splitmatch.criterion import SetCriterion, build_criterion, pseudo_label_map
from splitmatch.data import build_dataset, collate
from splitmatch.data.splits import class_names as dataset_classes
from splitmatch.data.splits import default_unseen
from splitmatch.data.splits import seen_ids as dataset_seen_ids
from splitmatch.evaluation import ZSSEvaluator
from splitmatch.matcher import build_matcher
from splitmatch.model import build_segmentor
from splitmatch.targets import build_targets, class_embedding_sets, seen_lookup


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
    return torch.optim.AdamW(param_groups, lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay)


def lr_factor(iteration: int, max_iters: int, optim_cfg: OptimConfig) -> float:
    """Linear warm-up, then Mask2Former's poly decay (or cosine) over the iteration budget."""
    if iteration < optim_cfg.warmup_iters:
        return (iteration + 1) / optim_cfg.warmup_iters
    progress = min(iteration / max(max_iters, 1), 1.0)
    if optim_cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    return (1 - progress) ** optim_cfg.poly_power


def training_step(model: nn.Module, criterion: SetCriterion, batch: dict, classes: ClassSpace,
                  split_matching: bool, device: torch.device, amp: bool = False) -> dict[str, Tensor]:
    """Forward + weighted losses for one batch (no backward: the caller owns the optimiser).

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
    class_embeds, class_valid = class_embedding_sets(classes.seen_text.to(device), candidate_embeds,
                                                     images.shape[0])
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        outputs = model(images, class_embeds)
    pseudo_labels = pseudo_label_map(labels, classes.seen_lut, candidate_maps, classes.num_seen,
                                     classes.ignore_index)
    return criterion(outputs, targets, class_valid, candidate_embeds=candidate_embeds,
                     num_seen_classes=classes.num_seen, pseudo_labels=pseudo_labels)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, classes: ClassSpace, num_random_queries: int,
             seen_score_calibration: float, device: torch.device) -> dict:
    """Full-split ZSS metrics; classification is against the text embeddings of all classes."""
    model.eval()
    evaluator = ZSSEvaluator(classes.names, classes.unseen, classes.ignore_index)
    text = classes.text.to(device)
    for batch in loader:
        pred = model.predict(batch["image"].to(device), text, num_random_queries=num_random_queries,
                             seen_class_ids=classes.seen_ids,
                             seen_score_calibration=seen_score_calibration)
        evaluator.update(pred.cpu(), batch["label"])
    model.train()
    return evaluator.compute()


def open_pseudo_masks(cfg: Config, build: bool = False, config_path: str = "CONFIG", log=print):
    """The pseudo-mask cache of the training split (Split Matching needs it; the baseline does not).

    Missing → an error naming the command that builds it, or, with `build`, it is built first.
    """
    from splitmatch.pseudo.cache import PseudoMaskCache

    if cfg.matching.mode != "split":
        return None
    try:
        return PseudoMaskCache.open(cfg, cfg.data.train_split, config_path)
    except FileNotFoundError:
        if not build:
            raise
    from splitmatch.pseudo.pipeline import run_pseudo

    run_pseudo(cfg, cfg.data.train_split, log=log)
    return PseudoMaskCache.open(cfg, cfg.data.train_split, config_path)


def train_local(cfg: Config, run_dir: str | Path, log=print, candidates=None) -> dict:
    """Single-process training + evaluation; writes config, checkpoint and metrics to `run_dir`.

    `candidates` is the pseudo-mask cache of the training split (see `open_pseudo_masks`); without
    it Split Matching has no candidate targets and trains like the baseline.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if cfg.train.use_gpu and torch.cuda.is_available() else "cpu")

    clip = build_clip(cfg.clip, device=device)
    classes = build_class_space(cfg, clip)
    model = build_segmentor(cfg.model, embed_dim=clip.embed_dim).to(device)
    split_matching = cfg.matching.mode == "split"
    matcher = build_matcher(cfg.matching, cfg.loss, cfg.model.num_seen_queries,
                            cfg.model.num_candidate_queries)
    criterion = build_criterion(cfg.loss, matcher, cfg.data.ignore_index)
    optimizer = build_optimizer(model, cfg.optim)

    train_set = build_dataset(cfg.data, cfg.data.train_split, train=True, seed=cfg.seed,
                              candidates=candidates)
    val_set = build_dataset(cfg.data, cfg.data.val_split, train=False)
    generator = torch.Generator().manual_seed(cfg.seed)
    train_loader = DataLoader(train_set, batch_size=cfg.train.batch_size, shuffle=True,
                              drop_last=True, collate_fn=collate, generator=generator,
                              num_workers=cfg.train.loader_workers)
    val_loader = DataLoader(val_set, batch_size=cfg.eval.batch_size, collate_fn=collate,
                            num_workers=cfg.train.loader_workers)

    log(f"training {cfg.name}: {len(train_set)} train / {len(val_set)} val images, "
        f"{classes.num_seen} seen + {len(classes.unseen)} unseen classes, matching={cfg.matching.mode}, "
        f"pseudo masks={'cache ' + candidates.root.name if candidates else 'none'}, device={device}")
    use_amp = cfg.train.amp and device.type == "cuda"
    model.train()
    iteration, epoch, start = 0, 0, time.perf_counter()
    history: list[dict] = []
    while iteration < cfg.train.max_iters:
        if hasattr(train_set, "set_epoch"):
            train_set.set_epoch(epoch)
        for batch in train_loader:
            if iteration >= cfg.train.max_iters:
                break
            factor = lr_factor(iteration, cfg.train.max_iters, cfg.optim)
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * factor
            losses = training_step(model, criterion, batch, classes, split_matching, device,
                                   amp=use_amp)
            loss = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            iteration += 1
            if iteration % cfg.train.log_every == 0 or iteration == 1:
                record = {"iteration": iteration, "loss": loss.item(),
                          "lr": optimizer.param_groups[0]["lr"],
                          **{k: v.item() for k, v in losses.items() if "_aux" not in k}}
                history.append(record)
                log(f"it {iteration:>6} loss {record['loss']:.4f} "
                    f"({(time.perf_counter() - start) / iteration:.3f} s/it)")
        epoch += 1

    metrics = evaluate(model, val_loader, classes, cfg.inference.num_random_queries,
                       cfg.inference.seen_score_calibration, device)
    torch.save(model.state_dict(), run_dir / "model.pt")
    summary = {k: metrics[k] for k in ("hIoU", "sIoU", "uIoU", "mIoU")}
    (run_dir / "metrics.json").write_text(json.dumps(
        {**summary, "per_class": metrics["per_class"], "history": history,
         "seconds": time.perf_counter() - start}, indent=2))
    log("hIoU {hIoU:.2f}  sIoU {sIoU:.2f}  uIoU {uIoU:.2f}  mIoU {mIoU:.2f}".format(**summary))
    log(f"run directory: {run_dir.resolve()}")
    return metrics
