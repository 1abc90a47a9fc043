"""The matcher's share of one CPU training step of `experiments/toyworld.yaml`."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from splitmatch.clip import build_clip
from splitmatch.config import load_config
from splitmatch.criterion import build_criterion
from splitmatch.data import build_dataset, collate
from splitmatch.demo import DEMO_CONFIG
from splitmatch.matcher import build_matcher
from splitmatch.model import build_segmentor
from splitmatch.toyclip import with_toy_clip
from splitmatch.engine import TimedMatcher, build_class_space, build_optimizer, training_step

TOY_CONFIG = DEMO_CONFIG  # the toy world of the demo


def toy_batch_with_candidates(cfg, clip) -> dict:
    """A training batch whose unseen objects stand in for pseudo masks (same sizes and counts)."""
    val = build_dataset(cfg.data, cfg.data.test_split, train=False)
    batch = collate([val[i] for i in range(cfg.train.batch_size)])
    unseen = torch.tensor(val.unseen_ids)
    cmaps, embeds = torch.zeros_like(batch["label"], dtype=torch.uint8), []
    for b, label in enumerate(batch["label"]):
        masks = [label == u for u in unseen.tolist() if (label == u).any()]
        for j, m in enumerate(masks):
            cmaps[b][m] = j + 1
        embeds.append(clip.masked_cls(batch["image"][b:b + 1], torch.stack(masks),
                                      torch.zeros(len(masks), dtype=torch.long))
                      if masks else torch.zeros(0, clip.embed_dim))
    batch["label"][torch.isin(batch["label"], unseen)] = 255
    return {**batch, "candidate_map": cmaps, "candidate_embeds": embeds}


def matcher_share_of_step(steps: int = 5, config: Path = TOY_CONFIG) -> dict:
    cfg = with_toy_clip(load_config(config))
    torch.manual_seed(cfg.seed)
    clip = build_clip(cfg.clip)
    classes = build_class_space(cfg, clip)
    model = build_segmentor(cfg.model, clip.embed_dim)
    matcher = TimedMatcher(build_matcher(cfg.matching, cfg.loss, cfg.model.num_seen_queries,
                                         cfg.model.num_candidate_queries))
    criterion = build_criterion(cfg.loss, matcher, cfg.data.ignore_index,
                                cfg.model.num_seen_queries if cfg.matching.mode == "split" else None)
    optimizer = build_optimizer(model, cfg.optim)
    batch = toy_batch_with_candidates(cfg, clip)
    device = torch.device("cpu")

    def step():
        loss = sum(training_step(model, criterion, batch, classes, True, device).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()  # warm-up
    matcher.seconds = 0.0
    start = time.perf_counter()
    for _ in range(steps):
        step()
    step_s = (time.perf_counter() - start) / steps
    matcher_s = matcher.seconds / steps
    return {"step_s": step_s, "matcher_s": matcher_s, "share": matcher_s / step_s}
