"""Evaluating a model on a split, and choosing the test-time seen-score calibration on the
selection split (`inference.seen_score_calibration: auto`).

ZegCLIP's inductive calibration subtracts a constant from the seen classes' probabilities against
the bias towards the classes seen in training. Which constant suits a model depends on the
model, so `auto` picks, per run, the value of `inference.calibration_grid` with the best hIoU on
the selection split: one forward pass per image, scored at every value of the grid. That uses
val's unseen labels, as model selection does in generalised zero-shot segmentation; the test
split is never looked at.

Pure torch (DDP-aware through torch.distributed): no Ray, no MLflow.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Subset

from splitmatch.config import InferenceConfig
from splitmatch.data import collate
from splitmatch.evaluation import ZSSEvaluator

AUTO = "auto"
METRIC_KEYS = ("hIoU", "sIoU", "uIoU", "mIoU")


@torch.no_grad()
def evaluate_calibrations(model: nn.Module, dataset, classes, inference: InferenceConfig,
                          calibrations: Sequence[float], device: torch.device,
                          batch_size: int = 1, rank: int = 0, world_size: int = 1,
                          progress: Callable[[int, int], None] | None = None
                          ) -> dict[float, dict]:
    """{value: ZSS metrics over the full split with seen_score_calibration = value} for every
    value of `calibrations`, from one forward pass per image (`Segmentor.predict_calibrated`).

    `classes` is an engine.ClassSpace (names, unseen, seen_ids, text, ignore_index); images are
    classified against the text embeddings of all classes. Each rank predicts every
    world_size-th image (no padding, so no image counts twice) and the confusion matrices are
    summed across ranks before the IoUs are computed. `progress(done, total)` hears of the
    split's images after every batch, counted from this rank's share (the ranks go at one pace).
    """
    values = [float(v) for v in calibrations]
    model.eval()
    evaluators = [ZSSEvaluator(classes.names, classes.unseen, classes.ignore_index)
                  for _ in values]
    text = classes.text.to(device)
    shard = Subset(dataset, range(rank, len(dataset), world_size))
    done = 0
    if progress is not None:
        progress(0, len(dataset))
    for batch in DataLoader(shard, batch_size=batch_size, collate_fn=collate):
        preds = model.predict_calibrated(batch["image"].to(device), text, inference,
                                         classes.seen_ids, values)
        for evaluator, pred in zip(evaluators, preds):
            evaluator.update(pred.cpu(), batch["label"])
        done += len(batch["image"]) + len(batch.get("skipped", ()))
        if progress is not None:
            progress(len(dataset) if done == len(shard) else min(done * world_size, len(dataset)),
                     len(dataset))
    if world_size > 1:
        confusion = torch.stack([e.confusion for e in evaluators]).to(device)  # [V, N, N]
        dist.all_reduce(confusion)
        for evaluator, summed in zip(evaluators, confusion.cpu()):
            evaluator.confusion = summed
    model.train()
    return {value: evaluator.compute() for value, evaluator in zip(values, evaluators)}


def evaluate(model: nn.Module, dataset, classes, inference: InferenceConfig,
             device: torch.device, batch_size: int = 1, rank: int = 0, world_size: int = 1,
             progress: Callable[[int, int], None] | None = None) -> dict:
    """ZSS metrics over the full split at `inference`'s own (numeric) calibration; see
    `evaluate_calibrations`."""
    value = fixed_value(inference)
    return evaluate_calibrations(model, dataset, classes, inference, [value], device, batch_size,
                                 rank, world_size, progress)[value]


def choose_calibration(per_value: dict[float, dict]) -> float:
    """The value whose metrics have the highest hIoU; ties go to the smaller value (the least
    correction that does as well), and with no hIoU at all (all NaN) calibration is off (0.0)."""
    best = None
    for value in sorted(per_value):
        hiou = per_value[value]["hIoU"]
        if not math.isnan(hiou) and (best is None or hiou > per_value[best]["hIoU"]):
            best = value
    return 0.0 if best is None else float(best)


def fixed_value(inference: InferenceConfig) -> float:
    """`inference`'s calibration, which must be a number (not auto)."""
    if inference.seen_score_calibration == AUTO:
        raise ValueError("inference.seen_score_calibration is auto: choose a value with "
                         "calibration.calibrate first")
    return float(inference.seen_score_calibration)


def fixed_at(inference: InferenceConfig, value: float) -> InferenceConfig:
    """`inference` with the calibration fixed at `value`."""
    return dataclasses.replace(inference, seen_score_calibration=float(value))


@dataclass
class Calibration:
    """The calibration a model is tested with, and what the selection split said about it."""

    value: float
    how: str  # "auto: 0.05 chosen on val from [0, 0.05, ...]" or "fixed: 0.1"
    # Selection-split metrics per value evaluated: the grid under auto, the fixed value
    # otherwise; empty without a selection split.
    per_value: dict[float, dict]
    auto: bool = False

    @property
    def select(self) -> dict | None:
        """The selection split's metrics at `value` (None without a selection split)."""
        return self.per_value.get(self.value)


def calibrate(model: nn.Module, select_set, select_split: str | None, classes,
              inference: InferenceConfig, device: torch.device, batch_size: int = 1,
              rank: int = 0, world_size: int = 1,
              progress: Callable[[int, int], None] | None = None) -> Calibration:
    """The calibration to test `model` with: under auto the grid's best on the selection split
    (`choose_calibration`), else the fixed value, evaluated on the selection split when there is
    one (for its figures). Every rank must call it (the confusion matrices are all-reduced)."""
    auto = inference.seen_score_calibration == AUTO
    if select_set is None:
        if auto:
            raise ValueError("inference.seen_score_calibration: auto needs a selection split")
        return Calibration(fixed_value(inference), f"fixed: {fixed_value(inference):g}", {})
    values = inference.calibration_grid if auto else [fixed_value(inference)]
    per_value = evaluate_calibrations(model, select_set, classes, inference, values, device,
                                      batch_size, rank, world_size, progress)
    if not auto:
        return Calibration(values[0], f"fixed: {values[0]:g}", per_value)
    value = choose_calibration(per_value)
    if value not in per_value:  # no hIoU anywhere (all NaN), and 0 (off) is not on the grid
        per_value.update(evaluate_calibrations(model, select_set, classes, inference, [value],
                                               device, batch_size, rank, world_size, progress))
    return Calibration(value, f"auto: {value:g} chosen on {select_split} from "
                              f"[{', '.join(f'{v:g}' for v in values)}]", per_value, auto=True)


def calibration_metrics(calibration: Calibration, prefix: str, grid: bool = False
                        ) -> dict[str, float]:
    """The figures a finished model's record carries about its calibration: the value used
    (`seen_score_calibration`), with a selection split its metrics there at that value
    (`<prefix>hIoU`, ...), and with `grid` under auto the hIoU there at every value of the grid
    (`calibration/<value>/select_hIoU`, names MLflow takes)."""
    figures = {"seen_score_calibration": calibration.value}
    if calibration.select is not None:
        figures.update({f"{prefix}{k}": calibration.select[k] for k in METRIC_KEYS})
    if grid and calibration.auto:
        figures.update({f"calibration/{value:g}/select_hIoU": metrics["hIoU"]
                        for value, metrics in calibration.per_value.items()})
    return figures
