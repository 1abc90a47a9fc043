"""Mask fusion (CLIP-ZSS): merge clusters of all scales whose centroids are alike, then cut masks.

K-means at several window sizes finds the same region several times (and one region sometimes as
two clusters). Clusters whose centroids have cosine similarity above a threshold are merged,
transitively (connected components of the similarity graph); each merged group gets the
size-weighted mean of its members' centroids, and every pixel goes to the most similar group.
That yields one partition of the image, with no overlapping masks to reconcile.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def connected_groups(similarity: Tensor, threshold: float) -> Tensor:
    """Group id per node [G] of the graph `similarity > threshold` (ids are the smallest member).

    Min-label propagation: each node repeatedly takes the smallest label among its neighbours;
    it converges in at most G rounds and stays on the device.
    """
    g = similarity.shape[0]
    adjacency = (similarity > threshold) | torch.eye(g, dtype=torch.bool, device=similarity.device)
    labels = torch.arange(g, device=similarity.device)
    big = torch.full_like(labels, g)
    for _ in range(g):
        spread = torch.where(adjacency, labels[None, :], big[None, :]).min(dim=1).values
        if torch.equal(spread, labels):
            break
        labels = spread
    return labels


def fuse_clusters(centroids: Tensor, sizes: Tensor, threshold: float) -> Tensor:
    """Merged, L2-normalised group centroids [U, C] from cluster centroids [G, C] with sizes [G]."""
    keep = sizes > 0
    centroids, sizes = centroids[keep], sizes[keep].to(centroids.dtype)
    unit = F.normalize(centroids, dim=-1)
    groups = connected_groups(unit @ unit.T, threshold)
    _, group_index = torch.unique(groups, return_inverse=True)  # [G] → 0..U-1
    num_groups = int(group_index.max()) + 1 if group_index.numel() else 0
    weighted = torch.zeros(num_groups, centroids.shape[1], dtype=centroids.dtype,
                           device=centroids.device)
    weighted.index_add_(0, group_index, unit * sizes[:, None])
    return F.normalize(weighted, dim=-1)


def region_scores(features: Tensor, group_centroids: Tensor) -> Tensor:
    """Cosine similarity of every pixel to every group: features [C, h, w] → [U, h, w]."""
    unit = F.normalize(features, dim=0)
    return torch.einsum("uc,chw->uhw", group_centroids, unit)


def cut_candidates(scores: Tensor, unannotated: Tensor, min_area: int,
                   max_candidates: int = 255) -> Tensor:
    """Candidate-id map [H, W] uint8 (0 = none) from group scores [U, h, w] at label size [H, W].

    Scores are upsampled bilinearly (smoother boundaries than upsampling hard assignments), each
    pixel takes its best group, and only `unannotated` pixels (ignore/unseen in the training label)
    are kept, so a seen object is never a candidate. Parts smaller than `min_area` pixels are dropped;
    the rest are numbered 1..U by decreasing area.
    """
    height, width = unannotated.shape
    out = torch.zeros(height, width, dtype=torch.uint8, device=scores.device)
    if scores.shape[0] == 0:
        return out
    upsampled = F.interpolate(scores[None].float(), size=(height, width), mode="bilinear",
                              align_corners=False)[0]
    region = upsampled.argmax(0)  # [H, W]
    region = torch.where(unannotated, region, torch.full_like(region, -1))
    areas = torch.bincount(region[region >= 0], minlength=scores.shape[0])  # [U]
    order = torch.argsort(areas, descending=True, stable=True)
    kept = order[areas[order] >= max(min_area, 1)][:max_candidates]
    new_id = torch.zeros(scores.shape[0] + 1, dtype=torch.uint8, device=scores.device)
    new_id[kept] = torch.arange(1, len(kept) + 1, dtype=torch.uint8, device=scores.device)
    return new_id[region.clamp_min(-1)]  # region −1 reads new_id[−1] = 0 (the extra slot)
