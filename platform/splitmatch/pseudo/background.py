"""Leave out the unseen candidates that CLIP reads as background (an option; not in the paper).

K-means splits every unannotated region into candidates, the background included. On the toy
world three quarters of the candidates are background, and their Cu pull the candidate queries'
embeddings towards one background direction that sits near some class texts (docs/method.md,
"Background candidates"). A candidate is left out of the targets when its Cu is nearer the
background prompts' embedding than to every *seen* class text: no unseen name is involved.
The cache keeps every candidate; the choice is made when training reads them.
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


class WithoutBackground:
    """A pseudo-mask cache as training reads it: `get` leaves out the background candidates."""

    def __init__(self, cache, seen_text: Tensor, background_text: Tensor) -> None:
        self.cache, self.seen_text, self.background_text = cache, seen_text, background_text
        self.root = cache.root

    def __contains__(self, index: int) -> bool:
        return index in self.cache

    def get(self, index: int) -> tuple[Tensor, Tensor]:
        candidate_map, embeds = self.cache.get(index)
        drop = background_candidates(embeds, self.seen_text, self.background_text)
        return drop_candidates(candidate_map, embeds, drop)


def background_embedding(clip, prompts) -> Tensor:
    """[C]: the mean of the prompts' L2-normalised CLIP text embeddings, normalised."""
    return F.normalize(clip.prompt_embeddings(list(prompts)).mean(0), dim=0).cpu()


def training_candidates(cfg, clip, seen_text: Tensor):
    """The train split's pseudo-mask cache as training reads it: without the background
    candidates when `pseudo_masks.background_prompts` names any prompt."""
    from splitmatch.pseudo.cache import PseudoMaskCache

    cache = PseudoMaskCache.open(cfg, cfg.data.train_split)
    prompts = cfg.pseudo_masks.background_prompts
    if not prompts:
        return cache
    return WithoutBackground(cache, seen_text, background_embedding(clip, prompts))
