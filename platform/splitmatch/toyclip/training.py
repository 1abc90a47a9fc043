"""Contrastive pretraining of the toy CLIP: the soft-target loss, the model, the loop.

A change to how the model is fitted bumps `checkpoint.TOY_CLIP_FORMAT`, so it is retrained rather
than reused with weights made another way (a golden training run in tests/test_toyclip.py fails
until then).
"""
from __future__ import annotations

import logging
import math
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import open_clip
import torch
from torch import Tensor, nn

from splitmatch.clip import PACKAGE_MODEL_CONFIGS, normalize, register_config_dir
from splitmatch.config import ConfigError, ToyClipConfig
from splitmatch.progress import Progress, verbose
from splitmatch.toyclip.captions import DEFAULT_RECIPE, ToyClipRecipe, training_batch


# ----------------------------------------------------------------------------- loss


def jaccard_targets(class_sets: Tensor) -> Tensor:
    """Row-stochastic contrastive targets [B, B] from class sets [B, K]: Jaccard overlap, normalised.

    With all sets distinct this is the identity, i.e. the standard CLIP loss; images and captions
    that name the same classes are positives of each other instead of false negatives, and a scene
    partly matching a caption gets partial credit. J is symmetric, so one matrix serves both
    directions.
    """
    sets = class_sets.float()
    inter = sets @ sets.T                                               # [B, B]
    union = sets.sum(1, keepdim=True) + sets.sum(1)[None] - inter
    jaccard = inter / union.clamp_min(1.0)
    return jaccard / jaccard.sum(1, keepdim=True)


def contrastive_loss(image_embeds: Tensor, text_embeds: Tensor, logit_scale: Tensor,
                     targets: Tensor) -> Tensor:
    """Symmetric InfoNCE with soft targets; embeddings [B, C] L2-normalised, targets [B, B]."""
    logits = logit_scale * image_embeds @ text_embeds.T                # [B, B] image x caption
    image_to_text = -(targets * logits.log_softmax(dim=1)).sum(1).mean()
    text_to_image = -(targets * logits.T.log_softmax(dim=1)).sum(1).mean()
    return (image_to_text + text_to_image) / 2


# ----------------------------------------------------------------------------- model


def model_config_path(model_name: str) -> Path:
    """The package model config of the toy CLIP; the toy CLIP is always a package config, so its
    architecture travels with the code and is part of the cache key."""
    path = PACKAGE_MODEL_CONFIGS / f"{model_name}.json"
    if not path.is_file():
        raise ConfigError(f"'toy_clip.model_name' = {model_name!r}: no model config {path}")
    return path


def create_model(model_name: str) -> nn.Module:
    """A randomly initialised open_clip model from the package config (draws from torch's RNG)."""
    model_config_path(model_name)
    register_config_dir(PACKAGE_MODEL_CONFIGS)
    # Random weights are the point here: open_clip's root-logger warning that none were loaded
    # would read to a user as a failure.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        return open_clip.create_model(model_name, pretrained=None)
    finally:
        root.setLevel(level)


class _Batches:
    """Batch i of the toy CLIP's training data (images, caption tokens, class sets): a pure
    function of (seed, step), so any process can draw any batch."""

    def __init__(self, cfg: ToyClipConfig, recipe: ToyClipRecipe):
        self.cfg, self.recipe = cfg, recipe
        self.tokenizer = open_clip.get_tokenizer(cfg.model_name)

    def __call__(self, step: int) -> tuple[Tensor, Tensor, Tensor]:
        images, captions, class_sets = training_batch(self.cfg.seed, step, self.cfg.batch_size,
                                                      self.cfg.image_size, self.recipe)
        return images, self.tokenizer(captions), class_sets


def _draw(step: int) -> tuple[Tensor, Tensor, Tensor]:
    return _DRAWER(step)


def _start_drawer(batches: _Batches) -> None:
    global _DRAWER
    torch.set_num_threads(1)  # rendering is numpy; one drawer per core
    _DRAWER = batches


_DRAWER: _Batches | None = None
ROUND = 100  # batches drawn per round: ~80 MB at 64 images of 64 px


def batches_in_rounds(cfg: ToyClipConfig, recipe: ToyClipRecipe, processes: int,
                      round_size: int = ROUND):
    """The training batches in step order, drawn `round_size` at a time by `processes` drawers
    while the model waits, then trained on while the drawers wait.

    With one loader process drawing beside the model, the loader took a core from the model's
    threads, which then waited on each other; in turns, each uses every core, and pretraining is
    faster. The batches are the same either way, so the weights do not depend on how they were
    drawn."""
    batches = _Batches(cfg, recipe)
    if processes <= 1:
        yield from map(batches, range(cfg.steps))
        return
    # fork, as torch's DataLoader does: spawned drawers would re-import the caller's main
    # module, and a script without a main guard would start pretraining again in each. The
    # drawers run numpy and one torch thread (`_start_drawer`), never the model's thread pool.
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(processes, mp_context=context, initializer=_start_drawer,
                             initargs=(batches,)) as drawers:
        for start in range(0, cfg.steps, round_size):
            steps = range(start, min(start + round_size, cfg.steps))
            chunk = max(1, len(steps) // processes)
            yield from list(drawers.map(_draw, steps, chunksize=chunk))


def _learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup to `peak`, then cosine decay to 0 at the last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * peak * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------- training


def train_toy_clip(cfg: ToyClipConfig, recipe: ToyClipRecipe = DEFAULT_RECIPE,
                   log: Callable[[str], None] = print, device: str | torch.device = "cpu"
                   ) -> tuple[nn.Module, list[dict]]:
    """Contrastive pretraining on toy captions; returns the trained model (eval mode, on the CPU)
    and a log. Weights are reproducible for a given device and thread count."""
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model_name).to(device)
    model.train()
    preprocess_cfg = open_clip.get_model_preprocess_cfg(model)
    mean = torch.tensor(preprocess_cfg["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(preprocess_cfg["std"], device=device).view(1, 3, 1, 1)
    input_size = tuple(model.visual.image_size)
    # CLIP's recipe: no weight decay on gains, biases and the temperature (all 0-/1-d tensors).
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": recipe.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    # Fused AdamW: one kernel over all tensors instead of a loop per tensor, most of the work
    # being the 49408-row token embedding.
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6, fused=True)
    warmup = max(1, round(recipe.warmup_fraction * cfg.steps))
    max_log_scale = math.log(recipe.max_logit_scale)
    history: list[dict] = []
    start = time.perf_counter()
    running = 0.0
    bar = Progress(cfg.steps, "toy CLIP pretraining", "step")
    drawn = batches_in_rounds(cfg, recipe, processes=torch.get_num_threads())
    for step, (images, tokens, class_sets) in enumerate(drawn):
        lr = _learning_rate(step, cfg.steps, cfg.lr, warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        image_embeds = model.encode_image(normalize(images.to(device), mean, std, input_size),
                                          normalize=True)                   # [B, C]
        text_embeds = model.encode_text(tokens.to(device), normalize=True)  # [B, C]
        class_sets = class_sets.to(device)
        loss = contrastive_loss(image_embeds, text_embeds, model.logit_scale.exp(),
                                jaccard_targets(class_sets))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0.0, max_log_scale)
        running += float(loss.detach())
        if (step + 1) % recipe.log_every == 0 or step + 1 == cfg.steps:
            count = (step % recipe.log_every) + 1
            entry = {"step": step + 1, "loss": running / count, "lr": lr,
                     "logit_scale": float(model.logit_scale.detach().exp()),
                     "seconds": time.perf_counter() - start}
            history.append(entry)
            bar.update(step + 1, loss=entry["loss"])
            if verbose():
                log(f"toy CLIP step {entry['step']}/{cfg.steps}  loss {entry['loss']:.4f}  "
                    f"lr {lr:.2e}  logit scale {entry['logit_scale']:.1f}  {entry['seconds']:.0f} s")
            running = 0.0
        else:
            bar.update(step + 1)
    bar.close()
    model.eval()
    return model.cpu(), history
