"""Multi-scale Feature Enhancement (paper Sec. 3.3, training only).

MFE is an auxiliary branch hanging off the pixel decoder's F0..F2: its per-pixel logits are
supervised against the pseudo label Yp (L_MFE), and the only thing it changes in the rest of the
model is the gradient that flows back into the pixel decoder (and backbone). The transformer decoder
never reads MFE's output, so dropping MFE at inference leaves the decoder and its predictions
exactly as trained.
"""
from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn


MFENorm = Literal["gn", "bn", "none"]


def dense_block(channels: int, norm: MFENorm, num_groups: int) -> nn.Sequential:
    """3x3 conv -> norm -> ReLU (the paper's "dense block"; its Table 4 compares the norms)."""
    if norm == "gn":
        if channels % num_groups:
            raise ValueError(f"MFE GroupNorm: num_groups {num_groups} must divide the feature "
                             f"width {channels}")
        norm_layer: nn.Module = nn.GroupNorm(num_groups, channels)
    elif norm == "bn":
        norm_layer = nn.BatchNorm2d(channels)
    elif norm == "none":
        norm_layer = nn.Identity()
    else:
        raise ValueError(f"unknown MFE norm {norm!r}; expected 'gn', 'bn' or 'none'")
    # A bias before a normalisation is cancelled by its mean subtraction.
    conv = nn.Conv2d(channels, channels, 3, padding=1, bias=norm == "none")
    return nn.Sequential(conv, norm_layer, nn.ReLU(inplace=True))


class MultiScaleFeatureEnhancement(nn.Module):
    """F0, F1, F2 -> Fu = up(up(B0(F0)) + B1(F1)) + B2(F2), projected to CLIP space at F2's size."""

    def __init__(self, channels: int, embed_dim: int, norm: MFENorm = "gn",
                 num_groups: int = 32) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(dense_block(channels, norm, num_groups) for _ in range(3))
        # Fu lives in pixel-decoder space; a 1x1 projection puts it in CLIP space so it can be
        # scored against the same class embeddings (seen text + candidate CLS) as the queries.
        self.proj = nn.Conv2d(channels, embed_dim, 1)

    def fuse(self, multi_scale: list[Tensor]) -> Tensor:
        """[F0 (stride 32), F1 (16), F2 (8)] each [B, D, h_i, w_i] -> Fu [B, D, h2, w2]"""
        coarse, middle, fine = (block(f) for block, f in zip(self.blocks, multi_scale))
        fused = middle + F.interpolate(coarse, size=middle.shape[-2:], mode="bilinear",
                                       align_corners=False)
        return fine + F.interpolate(fused, size=fine.shape[-2:], mode="bilinear",
                                    align_corners=False)

    def forward(self, multi_scale: list[Tensor]) -> Tensor:
        """Fu in CLIP space, L2-normalised per pixel: [B, C, h2, w2]. The segmentor scores it with
        the query head's classifier, so MFE and queries share one learned logit scale and bias."""
        return F.normalize(self.proj(self.fuse(multi_scale)), dim=1)
