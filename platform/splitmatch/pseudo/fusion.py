"""Mask fusion (CLIP-ZSS): merge clusters of all scales whose centroids are alike, then cut masks.

K-means at several window sizes finds the same region several times (and one region sometimes as
two clusters). Clusters whose centroids have cosine similarity above a threshold are merged,
transitively (connected components of the similarity graph); each merged group gets the
size-weighted mean of its members' centroids, and every pixel goes to the most similar group.
That yields one partition of the image, with no overlapping masks to reconcile.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor


def connected_groups(similarity: Tensor, threshold: float) -> Tensor:
    """Group id per node [..., G] of the graphs `similarity [..., G, G] > threshold`; a group's id is
    its smallest member.

    Transitive closure by repeated squaring of the reachability matrix: ⌈log2 G⌉ small batched
    matrix products with no host round trip, which matters on a GPU where a data-dependent loop
    would synchronise at every step.
    """
    g = similarity.shape[-1]
    eye = torch.eye(g, dtype=torch.bool, device=similarity.device)
    reach = ((similarity > threshold) | eye).float()
    for _ in range(max(1, math.ceil(math.log2(max(g, 2))))):
        reach = ((reach @ reach) > 0).float()
    return reach.argmax(dim=-1)  # first reachable node = smallest index in the component


def fuse_clusters(centroids: Tensor, sizes: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """Merge the clusters of every image at once.

    centroids [B, G, C] (all scales' clusters, padding allowed), sizes [B, G] (points per cluster,
    0 = padding or empty) → (group centroids [B, G, C], group_valid [B, G]). Group g is stored in the
    slot of its smallest member; its centroid is the size-weighted mean of its members' unit
    centroids, re-normalised. Slots that hold no group are marked invalid.
    """
    present = sizes > 0
    unit = F.normalize(centroids.float(), dim=-1)
    similarity = unit @ unit.transpose(1, 2)  # [B, G, G]
    # Padding and empty clusters join nothing (and nothing joins them).
    similarity = similarity.masked_fill(~(present[:, :, None] & present[:, None, :]), -2.0)
    groups = connected_groups(similarity, threshold)  # [B, G]
    weighted = torch.zeros_like(unit).scatter_add_(
        1, groups[..., None].expand_as(unit), unit * sizes[..., None].to(unit.dtype))
    group_valid = torch.zeros_like(present).scatter_(1, groups, present)
    return F.normalize(weighted, dim=-1), group_valid


def region_scores(features: Tensor, group_centroids: Tensor, group_valid: Tensor) -> Tensor:
    """Cosine similarity of every pixel to every group: features [B, C, h, w] → [B, G, h, w].

    Invalid slots score −2, below any cosine, so they never win a pixel (finite, so bilinear
    upsampling stays well defined).
    """
    unit = F.normalize(features.float(), dim=1)
    scores = torch.einsum("bgc,bchw->bghw", group_centroids, unit)
    return scores.masked_fill(~group_valid[:, :, None, None], -2.0)


def cut_candidates(scores: Tensor, unannotated: Tensor, min_area: int,
                   max_candidates: int = 255, min_area_per: str = "cluster") -> Tensor:
    """Candidate-id map [H, W] uint8 (0 = none) from group scores [G, h, w] at label size [H, W].

    Scores are upsampled bilinearly (smoother boundaries than upsampling hard assignments), each
    pixel takes its best group, and only `unannotated` pixels (ignore/unseen in the training label)
    are kept, so a seen object is never a candidate. Parts smaller than `min_area` pixels are
    dropped: whole groups (`min_area_per="cluster"`), or each connected region of a group on its
    own (`"region"`, 8-connected), which also removes slivers and rings left around seen objects
    by a group that is large elsewhere. The rest are numbered 1..U by decreasing area.
    """
    height, width = unannotated.shape
    out = torch.zeros(height, width, dtype=torch.uint8, device=scores.device)
    if scores.shape[0] == 0:
        return out
    upsampled = F.interpolate(scores[None].float(), size=(height, width), mode="bilinear",
                              align_corners=False)[0]
    region = upsampled.argmax(0)  # [H, W]
    region = torch.where(unannotated, region, torch.full_like(region, -1))
    if min_area_per == "region":
        region = drop_small_regions(region, min_area)
    elif min_area_per != "cluster":
        raise ValueError(f"min_area_per must be 'cluster' or 'region', got {min_area_per!r}")
    areas = torch.bincount(region[region >= 0], minlength=scores.shape[0])  # [U]
    order = torch.argsort(areas, descending=True, stable=True)
    kept = order[areas[order] >= max(min_area, 1)][:max_candidates]
    new_id = torch.zeros(scores.shape[0] + 1, dtype=torch.uint8, device=scores.device)
    new_id[kept] = torch.arange(1, len(kept) + 1, dtype=torch.uint8, device=scores.device)
    return new_id[region.clamp_min(-1)]  # region −1 reads new_id[−1] = 0 (the extra slot)


def drop_small_regions(region: Tensor, min_area: int) -> Tensor:
    """Group map [H, W] (−1 = none) with every 8-connected region under `min_area` pixels set to −1."""
    labels = region.cpu().numpy()
    out = labels.copy()
    for group in np.unique(labels[labels >= 0]):
        components, _ = ndimage.label(labels == group, structure=np.ones((3, 3), dtype=bool))
        sizes = np.bincount(components.ravel())
        small = sizes < min_area
        small[0] = False  # background of this group's mask
        out[small[components]] = -1
    return torch.from_numpy(out).to(region.device)
