"""Leave out the unseen candidates that CLIP reads as background (an option; not in the paper).

K-means splits every unannotated region into candidates, the background included. On the toy
world three quarters of the candidates are background, and their Cu pull the candidate queries'
embeddings towards one background direction that sits near some class texts (docs/method.md,
"Background candidates"). A candidate is left out of the targets when its Cu is nearer the
background prompts' embedding than to every *seen* class text: no unseen name is involved.
The cache keeps every candidate; the choice is made when training reads them
(`pseudo.training_candidates`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def background_candidates(embeds: Tensor, seen_text: Tensor, background_text: Tensor) -> Tensor:
    """bool [U]: Cu [U, C] nearer the background embedding [C] than to each seen text [Ns, C]."""
    if embeds.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool)
    cu = F.normalize(embeds.float(), dim=-1)
    to_seen = (cu @ F.normalize(seen_text.float(), dim=-1).T).max(dim=1).values
    return cu @ F.normalize(background_text.float(), dim=0) > to_seen


def drop_candidates(candidate_map: Tensor, embeds: Tensor, drop: Tensor) -> tuple[Tensor, Tensor]:
    """The candidate map [H, W] (ids 1..U, 0 none) and Cu [U, C] without the candidates marked in
    `drop` [U]; the kept ones are renumbered 1..U' in their old order."""
    new_ids = torch.zeros(embeds.shape[0] + 1, dtype=candidate_map.dtype)
    keep = ~drop
    new_ids[1:][keep] = torch.arange(1, int(keep.sum()) + 1, dtype=candidate_map.dtype)
    return new_ids[candidate_map.long()], embeds[keep]


def background_embedding(clip, prompts) -> Tensor:
    """[C]: the mean of the prompts' L2-normalised CLIP text embeddings, normalised."""
    return F.normalize(clip.prompt_embeddings(list(prompts)).mean(0), dim=0).cpu()
