"""The toy CLIP as the package ships it: its open_clip state dict without the token-embedding rows
that no toy caption reads, expanded back to a full state dict when it is installed in the cache.

The text tower's token embedding is 49,408 x 128 (25 MB in fp32, 86% of the model), sized for
CLIP's whole BPE vocabulary, of which the toy captions use 44 rows. A row is read only by a prompt
holding its token, and no other tensor spans the vocabulary (no tied output projection: the text
tower pools the end-of-text token and projects it into the joint space), so shipping those rows
exactly and rebuilding the others changes no output of a prompt made of toy words.

The rebuilt rows stand in for the random init that the unread rows kept through training (weight
decay only scaled them): noise of the same standard deviation. A prompt with other words (a user's
`predict --classes cat,dog`) then still gets a distinct, meaningless embedding for each word, as
before (zeros would make all such words alike), though not the same one as before.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from splitmatch.toyclip.captions import caption_words

COMPACT_NAME = "toy_clip.compact.pt"
EMBEDDING = "token_embedding.weight"
STAND_IN_SEED = 0


def toy_vocabulary(tokenizer) -> Tensor:
    """[R] sorted token ids of every word a toy caption can hold, with the start, end and padding
    tokens (padding is read, though causal attention keeps it from the pooled end-of-text)."""
    return torch.unique(tokenizer(caption_words()))


def stand_in_rows(vocab_size: int, width: int, std: float) -> Tensor:
    """[V, D] float32 noise of standard deviation `std`, the same bits on every machine.

    Uniform from PCG64's raw output (numpy keeps bit generators' streams stable), made float with
    exact operations only: 24 random bits are an exact float32, the power-of-two scale and the
    shift by 1 are exact, and the last product is one IEEE rounding. torch.randn would not do:
    its CPU kernel has vectorised variants that need not round alike on every CPU, and the
    expanded file's sha256 pins runs (`clip.sha256`), so it must come out the same everywhere.
    """
    raw = np.random.PCG64(STAND_IN_SEED).random_raw(vocab_size * width)
    unit = (raw >> np.uint64(40)).astype(np.float32) * np.float32(2.0 ** -23) - np.float32(1.0)
    scale = np.float32(std * math.sqrt(3.0))  # uniform on [-a, a) has standard deviation a/sqrt(3)
    return torch.from_numpy((unit * scale).reshape(vocab_size, width))


def compact_state_dict(state: dict[str, Tensor], rows: Tensor) -> dict:
    """The shipped form of an open_clip state dict: every tensor but the token embedding, whose
    rows `rows` are kept; the other rows' standard deviation is kept for their stand-ins."""
    embedding = state[EMBEDDING]                                     # [V, D]
    unread = torch.ones(embedding.shape[0], dtype=torch.bool)
    unread[rows] = False
    return {
        "names": list(state),  # the order torch.save writes them in: the expansion's bytes
        "state": {name: tensor.clone() for name, tensor in state.items() if name != EMBEDDING},
        "token_rows": rows.clone(),
        "token_embedding_rows": embedding[rows].clone(),            # [R, D]
        "vocab_size": embedding.shape[0],
        "stand_in_std": float(embedding[unread].std()),
    }


def expand_state_dict(compact: dict) -> dict[str, Tensor]:
    """The full open_clip state dict of a compact one, the unread rows rebuilt as stand-ins."""
    rows = compact["token_embedding_rows"]
    embedding = stand_in_rows(compact["vocab_size"], rows.shape[1], compact["stand_in_std"])
    embedding[compact["token_rows"]] = rows
    return {name: embedding if name == EMBEDDING else compact["state"][name]
            for name in compact["names"]}


def load_compact(path: str | Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)
