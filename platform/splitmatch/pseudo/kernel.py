"""The pseudo-mask kernel: images + training labels → unseen-candidate maps and CLS embeddings Cu.

Pure PyTorch on whatever device the frozen CLIP lives on; `pipeline.py` runs it on Ray Data.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from splitmatch.clip import FrozenClip
from splitmatch.pseudo.fusion import cut_candidates, fuse_clusters, region_scores
from splitmatch.pseudo.kmeans import multi_scale_kmeans

# Bump when the algorithm changes: it is part of the cache key, so old caches are never reused.
KERNEL_VERSION = 2  # 2: Eq. 1 always seeds the last window (size − s)


@dataclass
class Candidates:
    """One image's unseen candidates."""

    candidate_map: Tensor  # [H, W] uint8: candidate j (1..U) per pixel, 0 = none
    embeds: Tensor  # [U, C] float16: CLIP CLS embedding of the image masked to candidate j

    @property
    def areas(self) -> list[int]:
        counts = torch.bincount(self.candidate_map.flatten().long(), minlength=self.embeds.shape[0] + 1)
        return counts[1:].tolist()


class PseudoMaskKernel:
    """Multi-scale K-means (Eq. 1 seeds) → mask fusion → unannotated candidates → masked CLS."""

    def __init__(self, clip: FrozenClip, *, scales: Sequence[int], merge_threshold: float,
                 min_area: int, kmeans_iters: int, kmeans_tol: float, image_size: int | None,
                 ignore_index: int, min_area_per: str, cls_input: str):
        self.clip = clip
        self.scales = list(scales)
        self.merge_threshold = merge_threshold
        self.min_area = min_area
        self.min_area_per = min_area_per
        self.cls_input = cls_input
        self.kmeans_iters = kmeans_iters
        self.kmeans_tol = kmeans_tol
        # CLIP input side for the dense features (None = the model's own); larger gives finer masks.
        self.image_size = image_size
        self.ignore_index = ignore_index

    @property
    def input_size(self) -> tuple[int, int]:
        return (self.image_size, self.image_size) if self.image_size else tuple(self.clip.image_size)

    def stack(self, images: Sequence[Tensor]) -> Tensor:
        """One uint8 batch [B, 3, H, W]; images of different sizes are resized to the CLIP input."""
        if all(img.shape == images[0].shape for img in images):
            return torch.stack(list(images))
        resized = [F.interpolate(img[None].float(), size=self.input_size, mode="bilinear",
                                 align_corners=False, antialias=True)[0] for img in images]
        return torch.stack(resized).round().clamp(0, 255).to(torch.uint8)

    def candidate_maps(self, batch: Tensor, labels: Sequence[Tensor]) -> tuple[list[Tensor], Tensor]:
        """Candidate-id maps at each label's size, plus the dense features they came from."""
        dense = self.clip.dense_features(batch, image_size=self.image_size)  # [B, C, h, w]
        centroids, assign, valid = multi_scale_kmeans(dense.float(), self.scales, self.kmeans_iters,
                                                      self.kmeans_tol)
        b, num_scales, kmax, c = centroids.shape
        sizes = F.one_hot(assign, kmax).sum(2) * valid  # [B, S, Kmax] points per cluster
        groups, group_valid = fuse_clusters(centroids.view(b, num_scales * kmax, c),
                                            sizes.view(b, -1), self.merge_threshold)
        scores = region_scores(dense, groups, group_valid)  # [B, G, h, w]
        maps = [cut_candidates(scores[i], label.to(dense.device) == self.ignore_index, self.min_area,
                               min_area_per=self.min_area_per)
                for i, label in enumerate(labels)]
        return maps, dense

    def candidate_embeddings(self, batch: Tensor, maps: Sequence[Tensor]) -> list[Tensor]:
        """Cu of every candidate of the batch, in one batched masked-CLS pass."""
        masks, owner = [], []
        size = batch.shape[-2:]
        for b, cmap in enumerate(maps):
            count = int(cmap.max())
            if count == 0:
                continue
            onehot = cmap[None].long() == torch.arange(1, count + 1, device=cmap.device)[:, None, None]
            # Area resampling keeps a soft mask where a label pixel straddles CLIP pixels.
            masks.append(F.interpolate(onehot[:, None].float(), size=size, mode="area")[:, 0])
            owner += [b] * count
        if not masks:
            return [torch.zeros(0, self.clip.embed_dim, dtype=torch.float16) for _ in maps]
        embeds = self.clip.masked_cls(batch, torch.cat(masks).to(batch.device),
                                      torch.tensor(owner, device=batch.device),
                                      cls_input=self.cls_input)  # [ΣU, C]
        counts = [int(cmap.max()) for cmap in maps]
        return [e.to(torch.float16).cpu() for e in torch.split(embeds, counts)]

    @torch.no_grad()
    def __call__(self, images: Sequence[Tensor], labels: Sequence[Tensor]) -> list[Candidates]:
        """images: uint8 [3, H_i, W_i]; labels: [H_i, W_i] training labels (unseen already ignore)."""
        device = self.clip.device
        batch = self.stack([img.to(device) for img in images])
        maps, _ = self.candidate_maps(batch, labels)
        embeds = self.candidate_embeddings(batch, maps)
        return [Candidates(m.cpu(), e) for m, e in zip(maps, embeds)]


def build_kernel(cfg, clip: FrozenClip, ignore_index: int) -> PseudoMaskKernel:
    """From a `PseudoMaskConfig`."""
    return PseudoMaskKernel(clip, scales=cfg.scales, merge_threshold=cfg.merge_threshold,
                            min_area=cfg.min_area, kmeans_iters=cfg.kmeans_iters,
                            kmeans_tol=cfg.kmeans_tol, image_size=cfg.image_size,
                            ignore_index=ignore_index, min_area_per=cfg.min_area_per,
                            cls_input=cfg.cls_input)


def quality_summary(segments: float, best_iou_sum: float, covered: float, unseen: float) -> dict:
    """Totals of `candidate_quality` over images -> mean best-match IoU per hidden unseen segment
    and the fraction of unseen pixels that some candidate covers."""
    return {"unseen_segments": int(segments),
            "best_match_iou": best_iou_sum / segments if segments else float("nan"),
            "coverage": covered / unseen if unseen else float("nan")}


def candidate_quality(candidate_map: Tensor, full_label: Tensor, unseen_ids: Sequence[int]) -> dict:
    """How well candidates cover the hidden unseen objects of one image (toy world only).

    For each unseen class present in `full_label` (the label with unseen classes visible): the best
    IoU of any single candidate mask with that class's region, and the fraction of its pixels that
    some candidate covers. Returned as sums so images can be aggregated, plus `best_match`:
    (class id, index of its best candidate) per segment that has one.
    """
    best_iou_sum, covered, total, segments, best_match = 0.0, 0, 0, 0, []
    count = int(candidate_map.max())
    candidates = candidate_map[None].long() == torch.arange(1, count + 1)[:, None, None]  # [U, H, W]
    for u in unseen_ids:
        region = full_label == u
        area = int(region.sum())
        if area == 0:
            continue
        segments += 1
        total += area
        covered += int((region & (candidate_map > 0)).sum())
        if count:
            inter = (candidates & region).flatten(1).sum(1).float()
            union = (candidates | region).flatten(1).sum(1).float()
            iou = inter / union
            best_iou_sum += float(iou.max())
            best_match.append((u, int(iou.argmax())))
    return {"segments": segments, "best_iou_sum": best_iou_sum, "covered_pixels": covered,
            "unseen_pixels": total, "best_match": best_match}
