"""Batched K-means seeded by window means of the CLIP dense features (paper Eq. 1).

Everything runs on the features' device and handles many (image, scale) problems at once: seeds of
different scales are padded to one K with a validity mask, so a batch of B images and S scales is
one [B·S, N, C] Lloyd iteration of a few matrix products, not B·S Python-level K-means runs.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def window_stride(scale: int) -> int:
    """Eq. 1's index step ⌊s/2⌋ (at least 1, so s = 1 still tiles the grid)."""
    return max(1, scale // 2)


def window_starts(size: int, scale: int) -> list[int]:
    """Eq. 1's index set I = {0, ⌊s/2⌋, 2⌊s/2⌋, …, size − s} along one side of the grid.

    The step [s/2] is read as ⌊s/2⌋: for odd s the denser grid (2 rather than 3 for s = 5) gives
    each region more seeds. The last start is size − s even when it is off the step grid (14 and
    s = 5: 0, 2, 4, 6, 8, 9), so the last rows and columns of O always seed a cluster.
    """
    s = min(scale, size)
    starts = list(range(0, size - s + 1, window_stride(s)))
    if starts[-1] != size - s:
        starts.append(size - s)
    return starts


def window_seeds(features: Tensor, scale: int) -> Tensor:
    """Eq. 1 for one window size: features [B, C, H', W'] → seeds [B, K_s, C].

    Seed (i, j) is the mean of O[u, v] over the s×s window at (i, j), i and j from
    `window_starts`. A window larger than the grid is clamped to the grid.
    """
    height, width = features.shape[-2:]
    s = min(scale, height, width)
    every = F.avg_pool2d(features, kernel_size=s, stride=1)  # [B, C, H'−s+1, W'−s+1]: all windows
    rows = torch.tensor(window_starts(height, s), device=features.device)
    cols = torch.tensor(window_starts(width, s), device=features.device)
    return every[:, :, rows][:, :, :, cols].flatten(2).transpose(1, 2)  # [B, nI·nJ, C]


def multi_scale_seeds(features: Tensor, scales: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Seeds of all scales, padded: → seeds [B, S, Kmax, C], valid [S, Kmax]."""
    per_scale = [window_seeds(features, s) for s in scales]
    kmax = max(seeds.shape[1] for seeds in per_scale)
    b, c = features.shape[:2]
    padded = features.new_zeros(b, len(scales), kmax, c)
    valid = torch.zeros(len(scales), kmax, dtype=torch.bool, device=features.device)
    for i, seeds in enumerate(per_scale):
        padded[:, i, : seeds.shape[1]] = seeds
        valid[i, : seeds.shape[1]] = True
    return padded, valid


def _centroid_scores(points: Tensor, centroids: Tensor, valid: Tensor) -> Tensor:
    """‖c‖² − 2·x·c [P, N, K]: the squared distance minus ‖x‖², enough to pick the nearest centroid.
    Padding centroids score +inf."""
    scores = torch.baddbmm((centroids * centroids).sum(-1)[:, None, :], points,
                           centroids.transpose(1, 2), alpha=-2)
    return scores.masked_fill_(~valid[:, None, :], float("inf"))


def batched_kmeans(points: Tensor, seeds: Tensor, valid: Tensor | None = None, max_iters: int = 30,
                   tol: float = 1e-4) -> tuple[Tensor, Tensor, Tensor]:
    """Lloyd's K-means on P independent problems at once.

    points [P, N, C], seeds [P, K, C], valid [P, K] (False = padding seed, never used) →
    (centroids [P, K, C], assignment [P, N], inertia [P]).
    Stops when no assignment changes, or when every problem's total squared centroid shift is
    ≤ tol × (mean per-feature variance of its points) — scikit-learn's two convergence rules — or
    after `max_iters`. An empty cluster moves to a far point (scikit-learn's rule). Labels and
    inertia come from a final assignment to the final centroids. Deterministic: no random draw anywhere (the seeds are
    Eq. 1's window means).
    """
    p, n, c = points.shape
    k = seeds.shape[1]
    if valid is None:
        valid = torch.ones(p, k, dtype=torch.bool, device=points.device)
    points = points.float()
    centroids = seeds.float().clone()
    tol_abs = tol * points.var(dim=1, unbiased=False).mean(-1)  # [P]
    flat_points = points.reshape(p * n, c)
    offsets = (torch.arange(p, device=points.device) * k)[:, None]  # [P, 1]
    points_sq = (points * points).sum(-1)  # [P, N]
    previous = None
    for _ in range(max_iters):
        nearest, assign = _centroid_scores(points, centroids, valid).min(-1)  # [P, N]
        if previous is not None and torch.equal(assign, previous):
            break
        previous = assign
        # Sums and counts per (problem, cluster) with one scatter each instead of a one-hot matmul.
        flat_assign = (assign + offsets).flatten()
        sums = torch.zeros(p * k, c, dtype=points.dtype, device=points.device)
        sums.index_add_(0, flat_assign, flat_points)
        counts = torch.bincount(flat_assign, minlength=p * k).view(p, k, 1).to(points.dtype)
        updated = torch.where(counts > 0, sums.view(p, k, c) / counts.clamp_min(1), centroids)
        empty = (counts[..., 0] == 0) & valid  # [P, K]
        if bool(empty.any()):
            # As scikit-learn does, an empty cluster restarts at a point far from its centroid
            # (the r-th empty cluster of a problem takes its r-th farthest point).
            num_far = int(empty.sum(1).max())
            farthest = (nearest + points_sq).topk(num_far, dim=1).indices  # [P, E]
            rank = (empty.cumsum(1) - 1).clamp(0, num_far - 1)  # [P, K]
            far_points = points.gather(1, farthest.gather(1, rank)[..., None].expand(-1, -1, c))
            updated = torch.where(empty[..., None], far_points, updated)
        shift = ((updated - centroids) ** 2).sum((1, 2))  # [P]
        centroids = updated
        if bool((shift <= tol_abs).all()):
            break
    scores = _centroid_scores(points, centroids, valid)
    best, assign = scores.min(-1)
    inertia = (best + points_sq).clamp_min(0).sum(-1)
    return centroids, assign, inertia


def multi_scale_kmeans(features: Tensor, scales: Sequence[int], max_iters: int = 30,
                       tol: float = 1e-4) -> tuple[Tensor, Tensor, Tensor]:
    """Eq. 1 seeds + K-means for every image and scale of `features` [B, C, H', W'].

    → centroids [B, S, Kmax, C], assignment [B, S, H'·W'], valid [S, Kmax].
    """
    b, c = features.shape[:2]
    seeds, valid = multi_scale_seeds(features, scales)  # [B, S, Kmax, C], [S, Kmax]
    s, kmax = valid.shape
    points = features.flatten(2).transpose(1, 2)  # [B, N, C]
    points = points[:, None].expand(b, s, -1, c).reshape(b * s, -1, c)  # [B·S, N, C]
    problem_valid = valid[None].expand(b, s, kmax).reshape(b * s, kmax)
    centroids, assign, _ = batched_kmeans(points, seeds.reshape(b * s, kmax, c), problem_valid,
                                          max_iters, tol)
    return centroids.view(b, s, kmax, c), assign.view(b, s, -1), valid
