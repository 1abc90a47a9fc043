"""The train split's pseudo-mask cache as training reads it.

The cache keeps every candidate with its raw CLIP Cu, so that one cache serves every training
config; what a config changes is applied on read: the background candidates are left out
(`pseudo_masks.background_prompts`) and Cu is centred (`model.center_embeddings`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from splitmatch.pseudo.background import background_candidates, background_embedding, drop_candidates
from splitmatch.targets import centered, embedding_center

# Training reads every image's candidates once an epoch, and the cache keeps them compressed in
# shards of which only a few stay open: reopening shards and leaving out the same background
# candidates again was most of a toy-world step's data time (docs/performance.md). What was read
# is remembered, up to this many bytes (all of the toy world; a COCO-sized split remembers its
# first images and reads the rest from the cache as before).
REMEMBER_BYTES = 256 * 2**20


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
        self._remembered: dict[int, tuple[Tensor, Tensor]] = {}
        self._remembered_bytes = 0

    def __contains__(self, index: int) -> bool:
        return index in self.cache

    def get(self, index: int) -> tuple[Tensor, Tensor]:
        if index in self._remembered:  # copies: a caller may change what it gets
            return tuple(t.clone() for t in self._remembered[index])
        candidate_map, embeds = self.cache.get(index)
        if self.background_text is not None:
            drop = background_candidates(embeds, self.seen_text, self.background_text)
            candidate_map, embeds = drop_candidates(candidate_map, embeds, drop)
        if self.center is not None:
            embeds = centered(embeds, self.center)
        size = candidate_map.nbytes + embeds.nbytes
        if self._remembered_bytes + size <= REMEMBER_BYTES:
            self._remembered[index] = (candidate_map.clone(), embeds.clone())
            self._remembered_bytes += size
        return candidate_map, embeds


def candidate_center(uncentered: TrainingCandidates) -> Tensor:
    """[C]: the mean L2-normalised Cu of every candidate that `uncentered` reads. Images only: no
    label of any kind is involved, so no unseen class either."""
    embeds = [uncentered.get(i)[1] for i in uncentered.cache.indices()]
    return embedding_center(torch.cat(embeds))


def training_candidates(cfg, clip, seen_text: Tensor) -> TrainingCandidates:
    """The train split's candidates for this config; `seen_text` [Ns, C] are the seen classes'
    raw CLIP text embeddings."""
    from splitmatch.pseudo.cache import PseudoMaskCache

    cache = PseudoMaskCache.open(cfg, cfg.data.train_split)
    prompts = cfg.pseudo_masks.background_prompts
    background = background_embedding(clip, prompts) if prompts else None
    uncentered = TrainingCandidates(cache, seen_text, background)
    if not cfg.model.center_embeddings:
        return uncentered
    return TrainingCandidates(cache, seen_text, background, candidate_center(uncentered))
