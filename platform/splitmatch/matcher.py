"""Hungarian matching with Mask2Former's costs, and Split Matching on top of it.

Targets are a list (one entry per image) of dicts:
    "labels": LongTensor [T]     index into that image's class-embedding set E = cat(As, Cu)
    "masks":  Tensor [T, H, W]   binary masks at label resolution
    "is_candidate": BoolTensor [T]  True for unseen-candidate (pseudo-mask) targets
The model's outputs are the plain dict of `Segmentor.forward` ("pred_logits" [B, Q, K],
"pred_masks" [B, Q, h, w]). A match is a pair of LongTensors (query indices, target indices).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

Match = tuple[Tensor, Tensor]


def point_sample(masks: Tensor, coords: Tensor) -> Tensor:
    """Bilinear values of `masks` [N, H, W] at normalised points (x, y in [0, 1]) → [N, P]:
    `coords` [P, 2] are the same points for every mask, [N, P, 2] one set per mask (the losses'
    importance-sampled points). `masks` [N, C, H, W] → [N, C, P]: the C masks of item n share
    its points (the matcher's queries of one image)."""
    if coords.dim() == 2:
        coords = coords[None].expand(masks.shape[0], -1, -1)
    grid = (2.0 * coords - 1.0)[:, :, None]  # [N, P, 1, 2]
    if masks.dim() == 4:
        return F.grid_sample(masks.float(), grid, align_corners=False)[..., 0]
    return F.grid_sample(masks[:, None].float(), grid, align_corners=False)[:, 0, :, 0]


def batch_dice_cost(inputs: Tensor, targets: Tensor) -> Tensor:
    """Dice loss of every prediction against every target: inputs [Q, P] logits, targets [T, P] → [Q, T]."""
    probs = inputs.sigmoid()
    numerator = 2 * probs @ targets.T
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def batch_sigmoid_ce_cost(inputs: Tensor, targets: Tensor) -> Tensor:
    """Mean binary cross-entropy of every prediction against every target: [Q, P], [T, P] → [Q, T]."""
    # BCE(x, 1) = softplus(-x) and BCE(x, 0) = softplus(x), so the sum over points of
    # t·softplus(-x) + (1 - t)·softplus(x) is Σ softplus(x) - x·t: one matmul instead of two.
    return (F.softplus(inputs).sum(-1)[:, None] - inputs @ targets.T) / inputs.shape[1]


def focal_class_cost(logits: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Sigmoid-focal classification cost (Deformable-DETR form): logits [Q, K], labels [T] → [Q, T].

    The paper classifies with sigmoid(V·Eᵀ) and trains with a focal loss, so the matching cost is the
    focal loss of calling the target class positive minus that of calling it negative.
    """
    probs = logits[:, labels].sigmoid()
    neg = (1 - alpha) * probs.pow(gamma) * -(1 - probs + 1e-8).log()
    pos = alpha * (1 - probs).pow(gamma) * -(probs + 1e-8).log()
    return pos - neg


class HungarianMatcher(nn.Module):
    """Mask2Former's matcher: class + mask BCE + dice costs on points shared by all masks of an image."""

    def __init__(self, *, cost_class: float, cost_mask: float, cost_dice: float, num_points: int,
                 focal_alpha: float, focal_gamma: float):
        super().__init__()
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def cost_matrix(self, logits: Tensor, pred_points: Tensor, labels: Tensor,
                    target_points: Tensor) -> Tensor:
        """Total cost [Q, T] from class logits [Q, K] and point samples [Q, P], [T, P]."""
        cost = self.cost_class * focal_class_cost(logits, labels, self.focal_alpha, self.focal_gamma)
        cost = cost + self.cost_mask * batch_sigmoid_ce_cost(pred_points, target_points)
        return cost + self.cost_dice * batch_dice_cost(pred_points, target_points)

    def batch_costs(self, outputs: dict, targets: list[dict], num_queries: int,
                    generator: torch.Generator | None = None) -> list[np.ndarray]:
        """The cost [Q, T_b] of the first `num_queries` queries against each image's targets.

        Each image draws its own uniform random points, shared by all its predicted and target
        masks, as Mask2Former does; but the whole batch is sampled and costed in a handful of
        calls: per-image loops cost a training step of the toy config a large share of its time
        in small ops.
        The costs are computed for every query against every target of the batch and each image
        keeps its own block (B times the arithmetic of the blocks, still a few small matmuls).
        """
        pred_masks = outputs["pred_masks"][:, :num_queries]
        b, q = pred_masks.shape[:2]
        device = pred_masks.device
        coords = torch.rand(b, self.num_points, 2, generator=generator,
                            device=generator.device if generator is not None else device)
        coords = coords.to(device)
        counts = [t["labels"].numel() for t in targets]
        if sum(counts) == 0:
            return [np.zeros((q, 0), dtype=np.float32) for _ in targets]
        pred_points = point_sample(pred_masks, coords)  # [B, Q, P]
        owner = torch.repeat_interleave(torch.arange(b, device=device),
                                        torch.tensor(counts, device=device))
        target_points = point_sample(torch.cat([t["masks"] for t in targets]), coords[owner])
        cost = self.cost_matrix(outputs["pred_logits"][:, :num_queries].flatten(0, 1).float(),
                                pred_points.flatten(0, 1), torch.cat([t["labels"] for t in targets]),
                                target_points)
        cost = cost.view(b, q, -1).cpu().numpy()
        ends = np.cumsum(counts)
        return [cost[i, :, end - n:end] for i, (n, end) in enumerate(zip(counts, ends))]

    @staticmethod
    def solve(cost: np.ndarray) -> Match:
        rows, cols = linear_sum_assignment(cost)
        return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict],
                generator: torch.Generator | None = None) -> list[Match]:
        """Plain matching of all queries against all targets, image by image."""
        costs = self.batch_costs(outputs, targets, outputs["pred_logits"].shape[1], generator)
        return [self.solve(cost) if cost.shape[1] else _empty_match() for cost in costs]


class SplitMatcher(nn.Module):
    """Split Matching (paper Sec. 3.2): seen queries ↔ seen targets, candidate queries ↔ candidates.

    Queries [0, Ks) are seen queries and [Ks, Ks + Ku) candidate queries. The two Hungarian problems
    are solved separately and their assignments concatenated into one σ*, so no seen query is ever
    assigned a candidate target and vice versa. Points are sampled once per image and shared by both
    groups, so the split costs no more than plain matching.
    """

    def __init__(self, matcher: HungarianMatcher, num_seen_queries: int, num_candidate_queries: int):
        super().__init__()
        self.matcher = matcher
        self.num_seen_queries = num_seen_queries
        self.num_candidate_queries = num_candidate_queries

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict],
                generator: torch.Generator | None = None) -> list[Match]:
        ks, ku = self.num_seen_queries, self.num_candidate_queries
        # Only the queries that can be matched are costed (random queries never are).
        costs = self.matcher.batch_costs(outputs, targets, ks + ku, generator)
        matches = []
        for cost, target in zip(costs, targets):
            is_candidate = target["is_candidate"].cpu().numpy()
            query_idx, target_idx = [], []
            for first, count, wanted in ((0, ks, False), (ks, ku, True)):
                group = np.flatnonzero(is_candidate == wanted)
                if count == 0 or group.size == 0:
                    continue
                rows, cols = self.matcher.solve(cost[first:first + count, group])
                query_idx.append(rows + first)
                target_idx.append(torch.as_tensor(group[cols.numpy()], dtype=torch.long))
            if not query_idx:
                matches.append(_empty_match())
                continue
            matches.append((torch.cat(query_idx), torch.cat(target_idx)))
        return matches


def _empty_match() -> Match:
    return torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)


def build_hungarian_matcher(matching_cfg, loss_cfg) -> HungarianMatcher:
    """The plain matcher of a config: its costs (`matching`), its points and focal terms (`loss`,
    shared with the mask losses as in Mask2Former)."""
    return HungarianMatcher(cost_class=matching_cfg.cost_class, cost_mask=matching_cfg.cost_mask,
                            cost_dice=matching_cfg.cost_dice, num_points=loss_cfg.num_points,
                            focal_alpha=loss_cfg.focal_alpha, focal_gamma=loss_cfg.focal_gamma)


def build_matcher(matching_cfg, loss_cfg, num_seen_queries: int,
                  num_candidate_queries: int) -> nn.Module:
    """`SplitMatcher` in "split" mode; in "baseline" mode the plain matcher over all queries."""
    matcher = build_hungarian_matcher(matching_cfg, loss_cfg)
    if matching_cfg.mode == "baseline":
        return matcher
    return SplitMatcher(matcher, num_seen_queries, num_candidate_queries)
