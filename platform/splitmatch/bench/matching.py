"""`splitmatch bench matching`: Split Matching vs plain Hungarian matching on Mask2Former-sized inputs.

Batch 2, 100 seen + 50 candidate queries, 12,544 points, 20 targets per group, masks predicted at
1/4 of a 512 crop. Both matchers see the same outputs and targets; the split matcher solves two
smaller assignment problems on points sampled once, so it should cost no more than the plain one.
"""
from __future__ import annotations

import torch

from splitmatch.bench.timing import best_of
from splitmatch.config import LossConfig, MatchingConfig
from splitmatch.matcher import SplitMatcher, build_hungarian_matcher


def make_inputs(batch: int = 2, seen_queries: int = 100, candidate_queries: int = 50,
                targets_per_group: int = 20, num_classes: int = 156, crop: int = 512, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = seen_queries + candidate_queries
    k = num_classes + targets_per_group
    outputs = {"pred_logits": torch.randn(batch, q, k, generator=g),
               "pred_masks": torch.randn(batch, q, crop // 4, crop // 4, generator=g)}
    targets = []
    for _ in range(batch):
        seen = torch.randperm(num_classes, generator=g)[:targets_per_group]
        labels = torch.cat([seen, num_classes + torch.arange(targets_per_group)])
        masks = (torch.rand(2 * targets_per_group, crop, crop, generator=g) > 0.7).float()
        targets.append({"labels": labels, "masks": masks,
                        "is_candidate": torch.arange(2 * targets_per_group) >= targets_per_group})
    return outputs, targets


def run(repeats: int = 7, num_points: int = 12544, step_share: bool = True) -> dict:
    outputs, targets = make_inputs()
    plain = build_hungarian_matcher(MatchingConfig(), LossConfig(num_points=num_points))
    split = SplitMatcher(plain, 100, 50)
    # Interleave the two so drifting machine load hits both alike.
    t_plain, t_split = [], []
    for _ in range(repeats):
        t_plain.append(best_of(lambda: plain(outputs, targets), 1, warmup=True))
        t_split.append(best_of(lambda: split(outputs, targets), 1, warmup=True))
    plain_s, split_s = min(t_plain), min(t_split)
    print(f"inputs: batch 2, 100 seen + 50 candidate queries, {num_points} points, "
          f"20 seen + 20 candidate targets per image, masks 128x128 (pred) / 512x512 (target)")
    print(f"plain_matcher_ms_per_batch={plain_s * 1e3:.2f}")
    print(f"split_matcher_ms_per_batch={split_s * 1e3:.2f}")
    result = {"plain_s": plain_s, "split_s": split_s, "ratio": split_s / plain_s}
    if step_share:
        from splitmatch.bench.train_step import matcher_share_of_step
        share = matcher_share_of_step()
        print(f"toy_config_step_ms={share['step_s'] * 1e3:.1f} "
              f"matcher_ms_per_step={share['matcher_s'] * 1e3:.1f} "
              f"matcher_share_of_step={share['share']:.3f}")
        result.update(share)
    print(f"ratio_split_vs_plain={result['ratio']:.3f}")
    return result
