"""The train split's pseudo-mask cache as training reads it.

The cache keeps every candidate with its raw CLIP Cu, so that one cache serves every training
config; what a config changes is applied on read: the background candidates are left out
(`pseudo_masks.background_prompts`) and Cu is centred (`model.center_embeddings`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from splitmatch.pseudo.background import background_candidates, background_embedding, drop_candidates
from splitmatch.targets import centred, embedding_center


class TrainingCandidates:
    """`get(index)` -> (candidate map [H, W], Cu [U', C]) as training uses them.

    background_text [C]: leave out the candidates nearer it than to every seen text [Ns, C].
    center [C]: Cu less it, L2-normalised (the mean of the kept Cu over the cache, see
    `candidate_center`).
    """

    def __init__(self, cache, seen_text: Tensor, background_text: Tensor | None = None,
                 center: Tensor | None = None) -> None:
        self.cache, self.seen_text = cache, seen_text
        self.background_text, self.center = background_text, center
        self.root = cache.root

    def __contains__(self, index: int) -> bool:
        return index in self.cache

    def get(self, index: int) -> tuple[Tensor, Tensor]:
        candidate_map, embeds = self.cache.get(index)
        if self.background_text is not None:
            drop = background_candidates(embeds, self.seen_text, self.background_text)
            candidate_map, embeds = drop_candidates(candidate_map, embeds, drop)
        if self.center is not None:
            embeds = centred(embeds, self.center)
        return candidate_map, embeds


def candidate_center(candidates: TrainingCandidates) -> Tensor:
    """[C]: the mean L2-normalised Cu of every candidate training reads (uncentred). Images only:
    no label of any kind is involved, so no unseen class either."""
    uncentred = TrainingCandidates(candidates.cache, candidates.seen_text,
                                   candidates.background_text)
    embeds = [uncentred.get(i)[1] for i in candidates.cache.indices()]
    return embedding_center(torch.cat(embeds))


def training_candidates(cfg, clip, seen_text: Tensor) -> TrainingCandidates:
    """The train split's candidates for this config; `seen_text` [Ns, C] are the seen classes'
    raw CLIP text embeddings."""
    from splitmatch.pseudo.cache import PseudoMaskCache

    cache = PseudoMaskCache.open(cfg, cfg.data.train_split)
    prompts = cfg.pseudo_masks.background_prompts
    background = background_embedding(clip, prompts) if prompts else None
    candidates = TrainingCandidates(cache, seen_text, background)
    if cfg.model.center_embeddings:
        candidates.center = candidate_center(candidates)
    return candidates
