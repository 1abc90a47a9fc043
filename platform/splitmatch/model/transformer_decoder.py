"""Mask2Former's masked-attention transformer decoder, with an open-vocabulary classifier.

Each query yields a mask (mask embedding dotted with the stride-4 mask features) and a C-dim
embedding V in CLIP space; classification is sigmoid(scale * cos(V, E) + bias) against whatever
class embeddings E are passed in (docs/method.md, "Model"), so the same weights classify seen,
candidate and, at test time, unseen classes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splitmatch.model.pixel_decoder import sine_position_encoding


class MLP(nn.Module):
    """Linear layers with ReLU between them (none after the last)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class EmbeddingClassifier(nn.Module):
    """logits = exp(logit_scale) * (v . e) + logit_bias for L2-normalised v and class embeddings e.

    Shared by the query head and MFE so both score pixels/queries on one calibrated scale.
    """

    # CLIP's cap on its learned temperature: beyond 100 the logits explode and training diverges.
    max_log_scale = math.log(100.0)

    def __init__(self, prior_prob: float = 0.01) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        # Focal-loss prior (RetinaNet): start every class at probability ~0.01 so the many
        # negatives (each query against each class) do not swamp the loss in the first iterations.
        self.logit_bias = nn.Parameter(torch.tensor(-math.log((1 - prior_prob) / prior_prob)))

    def forward(self, embeds: Tensor, class_embeds: Tensor, channel_dim: int = -1) -> Tensor:
        """embeds [B, N, C] (or [B, C, h, w] with channel_dim=1), normalised; class_embeds [K, C]
        shared or [B, K, C] per image -> logits [B, N, K] (or [B, K, h, w])."""
        if channel_dim == 1:
            equation = "bchw,kc->bkhw" if class_embeds.dim() == 2 else "bchw,bkc->bkhw"
        else:
            equation = "bnc,kc->bnk" if class_embeds.dim() == 2 else "bnc,bkc->bnk"
        similarity = torch.einsum(equation, embeds, class_embeds.to(embeds.dtype))
        scale = self.logit_scale.clamp(max=self.max_log_scale).exp()
        return scale * similarity + self.logit_bias


def attention_mask_from_masks(mask_logits: Tensor, size: tuple[int, int],
                              num_heads: int) -> Tensor:
    """Mask2Former's masked attention: query q may only attend to pixels of its own predicted
    mask. mask_logits [B, Q, H, W] -> bool [B*heads, Q, h*w], True = blocked (nn.MultiheadAttention
    convention).

    A query whose mask is empty at this level would have every key blocked and softmax would give
    NaN; such rows are unblocked so the query attends everywhere instead. The mask is detached:
    it routes attention but is not itself trained through this path.
    """
    resized = F.interpolate(mask_logits.detach(), size=size, mode="bilinear",
                            align_corners=False)  # [B, Q, h, w]
    blocked = (resized.sigmoid() < 0.5).flatten(2)  # [B, Q, h*w]
    fully_blocked = blocked.all(dim=-1, keepdim=True)  # [B, Q, 1]
    blocked = blocked & ~fully_blocked
    batch, num_queries, num_keys = blocked.shape
    # nn.MultiheadAttention wants one mask per (image, head), image-major.
    return blocked[:, None].expand(batch, num_heads, num_queries, num_keys).reshape(
        batch * num_heads, num_queries, num_keys)


class CrossAttentionLayer(nn.Module):
    """Post-norm masked cross-attention from queries to one feature level."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, queries: Tensor, query_pos: Tensor, memory: Tensor, memory_pos: Tensor,
                attn_mask: Tensor | None) -> Tensor:
        """queries [B, Q, D], memory [B, S, D], attn_mask [B*heads, Q, S] -> [B, Q, D]"""
        # need_weights=False lets PyTorch use its fused scaled-dot-product kernel.
        attended, _ = self.attn(queries + query_pos, memory + memory_pos, memory,
                                attn_mask=attn_mask, need_weights=False)
        return self.norm(queries + attended)


class SelfAttentionLayer(nn.Module):
    """Post-norm self-attention among the queries."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, queries: Tensor, query_pos: Tensor) -> Tensor:
        """[B, Q, D] -> [B, Q, D]"""
        keys = queries + query_pos
        attended, _ = self.attn(keys, keys, queries, need_weights=False)
        return self.norm(queries + attended)


class FFNLayer(nn.Module):
    """Post-norm feed-forward block."""

    def __init__(self, dim: int, dim_feedforward: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, queries: Tensor) -> Tensor:
        return self.norm(queries + self.linear2(F.relu(self.linear1(queries))))


class MaskedTransformerDecoder(nn.Module):
    """Learned queries refined by `num_layers` x (masked cross-attn, self-attn, FFN), reading the
    three pixel-decoder levels round-robin (F0, F1, F2, F0, ...); predictions after the initial
    queries and after every layer (deep supervision)."""

    num_levels = 3

    def __init__(self, hidden_dim: int, mask_dim: int, embed_dim: int, num_queries: int,
                 num_heads: int, dim_feedforward: int, num_layers: int,
                 random_query_seed: int = 0) -> None:
        super().__init__()
        self.hidden_dim, self.num_heads, self.num_queries = hidden_dim, num_heads, num_queries
        self.embed_dim = embed_dim
        self.random_query_seed = random_query_seed
        # nn.Embedding's N(0, 1) init, as Mask2Former: random inference queries (below) are drawn
        # from the same distribution the learned ones started from.
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.level_embed = nn.Embedding(self.num_levels, hidden_dim)
        self.cross_attention = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, num_heads) for _ in range(num_layers))
        self.self_attention = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, num_heads) for _ in range(num_layers))
        self.ffn = nn.ModuleList(FFNLayer(hidden_dim, dim_feedforward) for _ in range(num_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)
        self.class_embed = MLP(hidden_dim, hidden_dim, embed_dim, 2)
        self.classifier = EmbeddingClassifier()
        for layers in (self.cross_attention, self.self_attention, self.ffn):
            for p in layers.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)

    def random_queries(self, count: int, device: torch.device, dtype: torch.dtype
                       ) -> tuple[Tensor, Tensor]:
        """`count` extra (features, positional embeddings) [count, D] from N(0, 1).

        A fixed-seed CPU generator makes them identical on every call and every device, so
        inference with random queries is deterministic.
        """
        generator = torch.Generator().manual_seed(self.random_query_seed)
        drawn = torch.randn(2, count, self.hidden_dim, generator=generator)
        drawn = drawn.to(device=device, dtype=dtype)
        return drawn[0], drawn[1]

    def predict(self, queries: Tensor, mask_features: Tensor, class_embeds: Tensor
                ) -> dict[str, Tensor]:
        """queries [B, Q, D] -> {"pred_logits" [B, Q, K], "pred_masks" [B, Q, H/4, W/4],
        "pred_embeds" [B, Q, C]}"""
        normed = self.decoder_norm(queries)
        mask_embed = self.mask_embed(normed)  # [B, Q, mask_dim]
        masks = torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features)
        embeds = F.normalize(self.class_embed(normed), dim=-1)  # [B, Q, C]
        logits = self.classifier(embeds, class_embeds)  # [B, Q, K]
        return {"pred_logits": logits, "pred_masks": masks, "pred_embeds": embeds}

    def forward(self, multi_scale: list[Tensor], mask_features: Tensor, class_embeds: Tensor,
                num_random_queries: int = 0) -> dict:
        """multi_scale [F0, F1, F2] each [B, D, h, w]; mask_features [B, mask_dim, H/4, W/4];
        class_embeds [K, C] or [B, K, C] -> final predictions + "aux_outputs" (one dict per
        earlier prediction)."""
        batch = mask_features.shape[0]
        memories, memory_pos, sizes = [], [], []
        for level, feature in enumerate(multi_scale):
            _, dim, h, w = feature.shape
            sizes.append((h, w))
            memories.append(feature.flatten(2).transpose(1, 2)
                            + self.level_embed.weight[level])  # [B, h*w, D]
            pos = sine_position_encoding(h, w, dim, feature.device, feature.dtype)
            memory_pos.append(pos.flatten(1).T[None])  # [1, h*w, D]

        query_feat, query_pos = self.query_feat.weight, self.query_embed.weight  # [Q, D]
        if num_random_queries > 0:
            extra_feat, extra_pos = self.random_queries(num_random_queries, query_feat.device,
                                                        query_feat.dtype)
            query_feat = torch.cat([query_feat, extra_feat])
            query_pos = torch.cat([query_pos, extra_pos])
        queries = query_feat[None].expand(batch, -1, -1)  # [B, Q, D]
        query_pos = query_pos[None].expand(batch, -1, -1)

        predictions = [self.predict(queries, mask_features, class_embeds)]
        num_layers = len(self.cross_attention)
        for i in range(num_layers):
            level = i % self.num_levels
            attn_mask = attention_mask_from_masks(predictions[-1]["pred_masks"], sizes[level],
                                                  self.num_heads)
            queries = self.cross_attention[i](queries, query_pos, memories[level],
                                              memory_pos[level], attn_mask)
            queries = self.self_attention[i](queries, query_pos)
            queries = self.ffn[i](queries)
            predictions.append(self.predict(queries, mask_features, class_embeds))

        output = dict(predictions[-1])
        output["aux_outputs"] = predictions[:-1]
        return output
