"""Zero-shot segmentation metrics: per-class IoU, sIoU, uIoU and their harmonic mean hIoU."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


class ZSSEvaluator:
    """Accumulates one confusion matrix over a whole split (ZegCLIP / ZegFormer protocol).

    `update(pred, target)` takes LongTensors [B, H, W] of global class ids; target pixels equal to
    `ignore_index` are skipped. `compute()` returns percentages:
        mIoU, sIoU (mean over seen classes), uIoU (mean over unseen classes),
        hIoU = 2·sIoU·uIoU / (sIoU + uIoU), and per_class {name: IoU or nan}.
    A class absent from both the predictions and the ground truth of the whole split has an
    undefined IoU (0/0): it is reported as nan and excluded from every mean (nan-mean), as in the
    public implementations. If every class of a group is absent, that group's mean is nan, and so is hIoU.
    """

    def __init__(self, class_names: Sequence[str], unseen: Sequence[str], ignore_index: int = 255):
        self.class_names = tuple(class_names)
        missing = [n for n in unseen if n not in self.class_names]
        if missing:
            raise ValueError(f"unseen classes {missing} are not among the evaluator's classes")
        self.unseen_ids = [self.class_names.index(n) for n in unseen]
        self.seen_ids = [i for i in range(len(self.class_names)) if i not in set(self.unseen_ids)]
        self.ignore_index = ignore_index
        self.num_classes = len(self.class_names)
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch: rows of the confusion matrix are ground truth, columns predictions."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        pred = pred.detach().reshape(-1).long().cpu()
        target = target.detach().reshape(-1).long().cpu()
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        bad = (target < 0) | (target >= self.num_classes)
        if bad.any():
            raise ValueError(f"target holds class ids {sorted(set(target[bad].tolist()))[:10]} outside "
                             f"0..{self.num_classes - 1} (and not ignore {self.ignore_index})")
        if ((pred < 0) | (pred >= self.num_classes)).any():
            raise ValueError(f"prediction holds class ids outside 0..{self.num_classes - 1}")
        self.confusion += torch.bincount(target * self.num_classes + pred,
                                         minlength=self.num_classes ** 2).view(self.num_classes, -1)

    def iou_per_class(self) -> Tensor:
        conf = self.confusion.double()
        intersection = conf.diag()
        union = conf.sum(0) + conf.sum(1) - intersection
        return torch.where(union > 0, intersection / union.clamp(min=1), torch.full_like(union, math.nan))

    def compute(self) -> dict:
        iou = self.iou_per_class() * 100

        def nanmean(ids: list[int]) -> float:
            values = iou[ids] if ids else iou.new_empty(0)
            values = values[~values.isnan()]
            return values.mean().item() if values.numel() else math.nan

        s_iou, u_iou = nanmean(self.seen_ids), nanmean(self.unseen_ids)
        if math.isnan(s_iou) or math.isnan(u_iou):
            h_iou = math.nan
        else:
            h_iou = 2 * s_iou * u_iou / (s_iou + u_iou) if s_iou + u_iou > 0 else 0.0
        return {
            "mIoU": nanmean(list(range(self.num_classes))),
            "sIoU": s_iou,
            "uIoU": u_iou,
            "hIoU": h_iou,
            "per_class": {name: iou[i].item() for i, name in enumerate(self.class_names)},
        }
