"""Turn label maps and unseen-candidate pseudo masks into per-image matching targets.

The class-embedding set of image b is E_b = cat(As, Cu_b) (paper Sec. 3.2): the Ns seen text
embeddings followed by that image's U_b candidate CLS embeddings, so candidate j has label Ns + j.
Images have different U_b; the batch is padded to the largest and a validity mask says which
columns are real.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


class UnseenLabelError(ValueError):
    """A label map handed to training still contains an unseen (or unknown) class id."""


def seen_lookup(seen_ids: list[int], ignore_index: int = 255) -> Tensor:
    """LUT [256]: global class id → seen index, ignore → -1, anything else (unseen) → -2."""
    lut = torch.full((256,), -2, dtype=torch.long)
    lut[ignore_index] = -1
    lut[torch.as_tensor(seen_ids, dtype=torch.long)] = torch.arange(len(seen_ids))
    return lut


def build_targets(labels: Tensor, lut: Tensor, candidate_maps: Tensor | None = None,
                  num_seen: int = 0) -> list[dict]:
    """Per-image targets from labels [B, H, W] (global ids) and candidate maps [B, H, W] (0 = none).

    Raises `UnseenLabelError` if a label still holds an unseen id: in inductive ZSS unseen pixels are
    relabelled ignore by the dataset before anything else sees them, and this is the last line of
    defence that keeps an unseen class from ever reaching the loss.
    """
    targets = []
    for b in range(labels.shape[0]):
        mapped = lut.to(labels.device)[labels[b].long()]  # [H, W]: seen index, -1 ignore, -2 unseen
        if (mapped == -2).any():
            bad = sorted(set(labels[b][mapped == -2].unique().tolist()))
            raise UnseenLabelError(f"label map {b} of the batch contains unseen/unknown class ids "
                                   f"{bad}; training labels must have them set to ignore")
        present = mapped[mapped >= 0].unique()  # [Ts]
        masks = [mapped[None] == present[:, None, None]]  # [Ts, H, W]
        labels_b = [present]
        is_candidate = [torch.zeros(len(present), dtype=torch.bool, device=labels.device)]
        if candidate_maps is not None:
            cmap = candidate_maps[b].long()
            ids = cmap[cmap > 0].unique()  # candidate ids 1..U_b
            masks.append(cmap[None] == ids[:, None, None])
            labels_b.append(num_seen + ids - 1)
            is_candidate.append(torch.ones(len(ids), dtype=torch.bool, device=labels.device))
        targets.append({
            "labels": torch.cat(labels_b),
            "masks": torch.cat(masks).float(),
            "is_candidate": torch.cat(is_candidate),
        })
    return targets


def pooled_candidates(candidate_maps: Tensor, candidate_embeds: list[Tensor], max_cosine: float
                      ) -> tuple[Tensor, list[Tensor], Tensor]:
    """The batch's candidates as every image's candidate columns (`loss.candidate_pool: batch`).

    Image b's candidate j becomes column offset_b + j of one pooled Cu [U, C] that every image
    is scored against, so a candidate query is told apart from the other images' candidates too,
    not only from the one to three of its own image. Another image's candidate whose Cu lies
    within `max_cosine` of one of the image's own is likely the same kind of object: it is not
    that image's negative (CLIP embeddings only, no label). Returns the candidate maps relabelled
    to the pooled columns, the pooled Cu once per image, and which pooled columns each image is
    scored against [B, U].
    """
    counts = [len(c) for c in candidate_embeds]
    offsets = torch.tensor([0, *counts[:-1]], device=candidate_maps.device).cumsum(0)
    maps = candidate_maps.long()  # pooled ids may pass a uint8 map's 255
    maps = torch.where(maps > 0, maps + offsets.view(-1, 1, 1), maps)
    pooled = torch.cat(candidate_embeds)  # [U, C]
    owner = torch.repeat_interleave(torch.arange(len(counts), device=pooled.device),
                                    torch.tensor(counts, device=pooled.device))  # [U]
    unit = F.normalize(pooled.float(), dim=-1)
    cosine = unit @ unit.T  # [U, U]
    own = owner[None, :] == torch.arange(len(counts), device=pooled.device)[:, None]  # [B, U]
    # For image b and column k: the largest cosine of Cu_k to one of b's own candidates (-inf
    # for an image without any: every column is its negative).
    nearest = cosine[None].masked_fill(~own[:, :, None], -math.inf).amax(1)  # [B, U]
    keep = own | (nearest <= max_cosine)
    return maps, [pooled] * len(counts), keep


def class_embedding_sets(seen_text: Tensor, candidate_embeds: list[Tensor] | None,
                         batch_size: int) -> tuple[Tensor, Tensor]:
    """E [B, Ns + Umax, C] and its validity mask [B, Ns + Umax] (padding columns are False)."""
    num_seen, dim = seen_text.shape
    umax = max((c.shape[0] for c in candidate_embeds), default=0) if candidate_embeds else 0
    embeds = seen_text.new_zeros(batch_size, num_seen + umax, dim)
    valid = torch.zeros(batch_size, num_seen + umax, dtype=torch.bool, device=seen_text.device)
    embeds[:, :num_seen] = seen_text
    valid[:, :num_seen] = True
    for b, cu in enumerate(candidate_embeds or []):
        embeds[b, num_seen:num_seen + len(cu)] = cu.to(embeds)
        valid[b, num_seen:num_seen + len(cu)] = True
    return embeds, valid


def centered(embeds: Tensor, center: Tensor) -> Tensor:
    """L2-normalised `embeds` [..., C] less `center` [C] (model.center_embeddings); a zero
    center leaves normalised embeddings as they are."""
    return F.normalize(embeds.float() - center.to(embeds.device, torch.float32), dim=-1)


def embedding_center(embeds: Tensor) -> Tensor:
    """[C]: the mean of the L2-normalised rows of `embeds` [N, C] (not normalised itself)."""
    return F.normalize(embeds.float(), dim=-1).mean(0)
