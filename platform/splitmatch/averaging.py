"""Weight averaging: an exponential moving average (EMA) of a model's weights over its training
steps, evaluated and kept in place of the last step's weights (`train.ema_decay`).

Why: at a short budget the weights a run ends on depend on the last few batches, and the naming
of rare unseen candidates moves with them from seed to seed; an average over the last ~1/(1-decay)
steps is a cheaper stand-in for training longer or ensembling. Pure torch, no Ray: every DDP rank
keeps its own copy, identical since DDP keeps the weights identical.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class WeightAverage:
    """The EMA of `model`'s state dict. Early updates use a smaller decay,
    min(decay, (1 + n) / (10 + n)) after n updates (TensorFlow's num_updates rule), so the
    average is not dominated by the initial weights in a short run. Integer buffers (BatchNorm's
    step counter) are copied, not averaged."""

    def __init__(self, model: nn.Module, decay: float, state: dict | None = None):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must lie in (0, 1), got {decay}")
        self.decay = decay
        if state is None:
            self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.updates = 0
        else:
            self.weights = {k: v.detach().clone().to(model.state_dict()[k].device)
                            for k, v in state["weights"].items()}
            self.updates = int(state["updates"])

    def current_decay(self) -> float:
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's present weights into the average (after an optimizer step)."""
        decay = self.current_decay()
        for key, value in model.state_dict().items():
            average = self.weights[key]
            if average.is_floating_point():
                average.mul_(decay).add_(value.detach(), alpha=1.0 - decay)
            else:
                average.copy_(value)
        self.updates += 1

    def state_dict(self) -> dict:
        """What a checkpoint keeps to resume the average: weights (on the CPU) and the count."""
        return {"weights": {k: v.detach().cpu().clone() for k, v in self.weights.items()},
                "updates": self.updates}



@contextmanager
def weights_loaded(model: nn.Module, weights: dict | None) -> Iterator[None]:
    """The model holds `weights` (a state dict) inside the block and its own again after it,
    however the block ends; None: the model as it is."""
    if weights is None:
        yield
        return
    own = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(weights)
    try:
        yield
    finally:
        model.load_state_dict(own)


def averaged(model: nn.Module, average: WeightAverage | None):
    """The model holding the average's weights inside the block (none kept: as it is)."""
    return weights_loaded(model, average.weights if average is not None else None)
