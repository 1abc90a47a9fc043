"""Pixel decoders: backbone res2..res5 -> stride-4 mask features + three multi-scale features.

Both decoders return `(mask_features [B, mask_dim, H/4, W/4], [F0, F1, F2])` with F0 at stride 32,
F1 at 16 and F2 at 8, each [B, hidden_dim, h, w]. F0..F2 are the keys/values of the transformer
decoder (round-robin) and the inputs of MFE; mask_features are dotted with the mask embeddings.

`MSDeformAttnPixelDecoder` is Mask2Former's: a multi-scale deformable-attention encoder over
res3..res5 (Deformable DETR) in pure PyTorch, plus an FPN step on res2. `FPNPixelDecoder` is a light
FPN for CPU work.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def group_norm(channels: int) -> nn.GroupNorm:
    # Mask2Former uses 32 groups everywhere; toy widths that 32 does not divide get the largest
    # power-of-two group count that does, instead of failing.
    return nn.GroupNorm(math.gcd(32, channels), channels)


def sine_position_encoding(height: int, width: int, dim: int, device: torch.device | None = None,
                           dtype: torch.dtype = torch.float32, temperature: float = 10000.0
                           ) -> Tensor:
    """DETR's normalised sine encoding of pixel centres -> [dim, height, width] (no batch dim).

    The first dim//2 channels encode y, the rest x; channel pairs alternate sin/cos over
    geometrically spaced frequencies. Coordinates are normalised to (0, 2*pi) so the encoding
    means the same relative position at every feature level and input size.
    """
    def encode(length: int, channels: int) -> Tensor:  # [length, channels]
        coords = (torch.arange(length, device=device, dtype=torch.float32) + 0.5) / length
        coords = coords * 2 * math.pi
        index = torch.arange(channels, device=device)
        freqs = temperature ** (2 * (index // 2) / channels)
        angles = coords[:, None] / freqs[None, :]
        return torch.where(index % 2 == 0, angles.sin(), angles.cos())

    dim_y = dim // 2
    pos_y = encode(height, dim_y)[:, None, :].expand(height, width, dim_y)
    pos_x = encode(width, dim - dim_y)[None, :, :].expand(height, width, dim - dim_y)
    return torch.cat([pos_y, pos_x], dim=-1).permute(2, 0, 1).to(dtype)  # [dim, h, w]


# ----------------------------------------------------------------------------- deformable attention


def ms_deform_attn_sample(value: Tensor, spatial_shapes: list[tuple[int, int]],
                          sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """Multi-scale deformable attention core: bilinear samples weighted and summed.

    value [B, S, M, Dh] (S = sum of h*w over levels, M heads); sampling_locations
    [B, Lq, M, L, P, 2] as (x, y) in [0, 1] of each level's extent; attention_weights
    [B, Lq, M, L, P] -> [B, Lq, M*Dh]. Samples outside the map read zeros.
    """
    batch, _, heads, head_dim = value.shape
    _, num_query, _, num_levels, num_points, _ = sampling_locations.shape
    value_levels = value.split([h * w for h, w in spatial_shapes], dim=1)
    # grid_sample works on [-1, 1] coordinates; with align_corners=False, -1 and 1 are the outer
    # edges of the border pixels, matching a location in [0, 1] of the map's extent.
    grids = 2 * sampling_locations - 1
    sampled = []
    for level, (h, w) in enumerate(spatial_shapes):
        # [B, h*w, M, Dh] -> [B*M, Dh, h, w]: heads ride along the batch axis of grid_sample.
        value_map = value_levels[level].permute(0, 2, 3, 1).reshape(batch * heads, head_dim, h, w)
        # [B, Lq, M, P, 2] -> [B*M, Lq, P, 2]
        grid = grids[:, :, :, level].transpose(1, 2).reshape(batch * heads, num_query, num_points, 2)
        sampled.append(F.grid_sample(value_map, grid, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))  # [B*M, Dh, Lq, P]
    samples = torch.stack(sampled, dim=-2).flatten(-2)  # [B*M, Dh, Lq, L*P]
    weights = attention_weights.transpose(1, 2).reshape(
        batch * heads, 1, num_query, num_levels * num_points)
    output = (samples * weights).sum(-1)  # [B*M, Dh, Lq]
    return output.view(batch, heads * head_dim, num_query).transpose(1, 2)  # [B, Lq, M*Dh]


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Deformable DETR): each query reads P points per level
    and head around its reference point, at learned offsets, with learned softmax weights."""

    def __init__(self, dim: int, num_heads: int, num_levels: int, num_points: int = 4) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads, self.num_levels, self.num_points = num_heads, num_levels, num_points
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Offsets start as a fixed star: head m looks along angle 2*pi*m/M, point p at distance
        # p+1 (in pixels of each level), so the heads cover different directions from step one.
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2 * math.pi / self.num_heads)
        directions = torch.stack([angles.cos(), angles.sin()], dim=-1)  # [M, 2]
        directions = directions / directions.abs().max(dim=-1, keepdim=True).values
        distance = torch.arange(1, self.num_points + 1, dtype=torch.float32)
        star = directions[:, None, None, :] * distance[None, None, :, None]  # [M, 1, P, 2]
        star = star.expand(self.num_heads, self.num_levels, self.num_points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(star.reshape(-1))
        # Uniform attention over the points at start.
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for layer in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, query: Tensor, reference_points: Tensor, value_input: Tensor,
                spatial_shapes: list[tuple[int, int]]) -> Tensor:
        """query [B, Lq, D], reference_points [B or 1, Lq, L, 2] (x, y in [0, 1]),
        value_input [B, S, D] -> [B, Lq, D]."""
        batch, num_query, _ = query.shape
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        value = self.value_proj(value_input).view(batch, value_input.shape[1], heads, -1)
        offsets = self.sampling_offsets(query).view(batch, num_query, heads, levels, points, 2)
        weights = self.attention_weights(query).view(batch, num_query, heads, levels * points)
        weights = weights.softmax(-1).view(batch, num_query, heads, levels, points)
        # Offsets are in pixels of each level: divide by (w, h) to move in [0, 1] coordinates.
        extent = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=query.dtype,
                              device=query.device)  # [L, 2]
        locations = (reference_points[:, :, None, :, None, :]
                     + offsets / extent[None, None, None, :, None, :])  # [B, Lq, M, L, P, 2]
        output = ms_deform_attn_sample(value, spatial_shapes, locations, weights)
        return self.output_proj(output)


class DeformableEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention over all levels, then an FFN."""

    def __init__(self, dim: int, num_heads: int, dim_feedforward: int, num_levels: int,
                 num_points: int = 4) -> None:
        super().__init__()
        # Mask2Former runs this encoder with dropout 0.0, so there is none here.
        self.self_attn = MSDeformAttn(dim, num_heads, num_levels, num_points)
        self.norm1 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, tokens: Tensor, pos: Tensor, reference_points: Tensor,
                spatial_shapes: list[tuple[int, int]]) -> Tensor:
        """tokens, pos [B, S, D] -> [B, S, D]"""
        attended = self.self_attn(tokens + pos, reference_points, tokens, spatial_shapes)
        tokens = self.norm1(tokens + attended)
        return self.norm2(tokens + self.linear2(F.relu(self.linear1(tokens))))


def encoder_reference_points(spatial_shapes: list[tuple[int, int]], num_levels: int,
                             device: torch.device, dtype: torch.dtype) -> Tensor:
    """Pixel centres of every level as (x, y) in [0, 1] -> [1, S, L, 2].

    No padding masks are used (all valid ratios are 1), so a token's reference point is the same
    normalised location on every level.
    """
    centers = []
    for h, w in spatial_shapes:
        y = (torch.arange(h, device=device, dtype=dtype) + 0.5) / h
        x = (torch.arange(w, device=device, dtype=dtype) + 0.5) / w
        grid_y, grid_x = torch.meshgrid(y, x, indexing="ij")
        centers.append(torch.stack([grid_x, grid_y], dim=-1).reshape(-1, 2))
    points = torch.cat(centers, dim=0)  # [S, 2]
    return points[None, :, None, :].expand(1, points.shape[0], num_levels, 2)


class MSDeformAttnPixelDecoder(nn.Module):
    """Mask2Former's pixel decoder: deformable encoder over res3..res5 + FPN step on res2."""

    def __init__(self, in_channels: dict[str, int], hidden_dim: int, mask_dim: int,
                 num_heads: int, dim_feedforward: int, num_layers: int,
                 num_points: int = 4) -> None:
        super().__init__()
        # Coarse to fine, as Mask2Former orders its levels: F0 = res5, F1 = res4, F2 = res3.
        self.encoder_features = ("res5", "res4", "res3")
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(in_channels[name], hidden_dim, 1), group_norm(hidden_dim))
            for name in self.encoder_features)
        self.level_embed = nn.Parameter(torch.empty(len(self.encoder_features), hidden_dim))
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(hidden_dim, num_heads, dim_feedforward,
                                   len(self.encoder_features), num_points)
            for _ in range(num_layers))
        self.lateral_conv = nn.Sequential(
            nn.Conv2d(in_channels["res2"], hidden_dim, 1, bias=False), group_norm(hidden_dim))
        self.output_conv = nn.Sequential(
            nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, bias=False), group_norm(hidden_dim),
            nn.ReLU(inplace=True))
        self.mask_features = nn.Conv2d(hidden_dim, mask_dim, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        nn.init.normal_(self.level_embed)
        for conv in (self.lateral_conv[0], self.output_conv[0], self.mask_features):
            # detectron2's c2_xavier_fill: kaiming-uniform with a=1.
            nn.init.kaiming_uniform_(conv.weight, a=1)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)

    def forward(self, features: dict[str, Tensor]) -> tuple[Tensor, list[Tensor]]:
        """{"res2".."res5"} -> (mask_features [B, mask_dim, H/4, W/4], [F0, F1, F2])"""
        tokens, pos, shapes = [], [], []
        for level, name in enumerate(self.encoder_features):
            projected = self.input_proj[level](features[name])  # [B, D, h, w]
            _, dim, h, w = projected.shape
            shapes.append((h, w))
            tokens.append(projected.flatten(2).transpose(1, 2))  # [B, h*w, D]
            level_pos = sine_position_encoding(h, w, dim, projected.device, projected.dtype)
            # The level embedding tells the shared attention which scale a token came from.
            pos.append((level_pos.flatten(1).T + self.level_embed[level])[None])  # [1, h*w, D]
        memory = torch.cat(tokens, dim=1)  # [B, S, D]
        pos_all = torch.cat(pos, dim=1)  # [1, S, D]
        reference_points = encoder_reference_points(shapes, len(shapes), memory.device,
                                                    memory.dtype)
        for layer in self.layers:
            memory = layer(memory, pos_all, reference_points, shapes)

        batch = memory.shape[0]
        multi_scale = [level_tokens.transpose(1, 2).reshape(batch, -1, h, w)
                       for level_tokens, (h, w) in zip(memory.split([h * w for h, w in shapes], 1),
                                                       shapes)]  # [F0, F1, F2]
        # FPN step: res2 lateral + upsampled stride-8 output gives the stride-4 mask features.
        res2 = self.lateral_conv(features["res2"])
        fused = res2 + F.interpolate(multi_scale[-1], size=res2.shape[-2:], mode="bilinear",
                                     align_corners=False)
        mask_features = self.mask_features(self.output_conv(fused))  # [B, mask_dim, H/4, W/4]
        return mask_features, multi_scale


class FPNPixelDecoder(nn.Module):
    """A plain FPN (Mask2Former's BasePixelDecoder): 1x1 lateral + 3x3 output convs, top-down."""

    def __init__(self, in_channels: dict[str, int], hidden_dim: int, mask_dim: int) -> None:
        super().__init__()
        self.names = ("res5", "res4", "res3", "res2")  # coarse to fine
        self.lateral_convs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(in_channels[name], hidden_dim, 1, bias=False),
                          group_norm(hidden_dim))
            for name in self.names)
        self.output_convs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, bias=False),
                          group_norm(hidden_dim), nn.ReLU(inplace=True))
            for _ in self.names)
        self.mask_features = nn.Conv2d(hidden_dim, mask_dim, 1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_uniform_(module.weight, a=1)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, features: dict[str, Tensor]) -> tuple[Tensor, list[Tensor]]:
        """{"res2".."res5"} -> (mask_features [B, mask_dim, H/4, W/4], [F0, F1, F2])"""
        outputs: list[Tensor] = []
        top_down: Tensor | None = None
        for lateral, output_conv, name in zip(self.lateral_convs, self.output_convs, self.names):
            lateral_map = lateral(features[name])  # [B, D, h, w]
            if top_down is not None:
                # Nearest upsampling as in FPN/BasePixelDecoder: cheap, and the 3x3 output conv
                # smooths the blockiness.
                lateral_map = lateral_map + F.interpolate(top_down, size=lateral_map.shape[-2:],
                                                          mode="nearest")
            top_down = lateral_map
            outputs.append(output_conv(lateral_map))
        mask_features = self.mask_features(outputs[-1])  # [B, mask_dim, H/4, W/4]
        return mask_features, outputs[:3]
