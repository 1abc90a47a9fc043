"""Datasets for inductive ZSS: VOC, COCO-Stuff and the toy world, one sample format for all.

A sample is `{"image": uint8 [3, H, W] RGB, "label": int64 [H, W] (class ids, 255 ignore),
"index": int, "path": str}`; `build_dataset(cfg, split, train)` is the one entry point, and
`collate` batches samples (leaving out skipped ones). It lives here, beside every dataset it
builds, so that the base class in `dataset.py` knows none of them.
"""
from splitmatch import splits
from splitmatch.config import DataConfig
from splitmatch.data.coco_stuff import CocoStuff
from splitmatch.data.dataset import (DataError, Sample, SegmentationDataset, collate, read_image,
                                     read_label)
from splitmatch.data.toyworld import ToyWorld, export_toyworld, generate, render
from splitmatch.data.transforms import TrainAugment
from splitmatch.data.voc import VOC


def build_dataset(cfg: DataConfig, split: str, train: bool, seed: int = 0,
                  augment: bool = True, candidates=None) -> SegmentationDataset:
    """The dataset `cfg.dataset` for `split`; `train=True` masks unseen classes and augments.

    `seed` drives augmentation only (toy-world images come from `cfg.toyworld.seed`).
    `augment=False` keeps train-mode labels (unseen → ignore) at full size: what the pseudo-mask
    pipeline needs to know which pixels are unannotated. `candidates` (a `PseudoMaskCache` of this
    split) adds each image's unseen-candidate map and embeddings to its samples.
    """
    unseen = splits.unseen_ids(cfg.dataset, cfg.unseen)
    augment = (TrainAugment(cfg.crop_size, cfg.min_scale, cfg.max_scale, cfg.ignore_index)
               if train and augment else None)
    common = dict(unseen_ids=unseen, train=train, augment=augment, ignore_index=cfg.ignore_index,
                  on_error=cfg.on_error, seed=seed)
    if cfg.dataset == "voc":
        dataset: SegmentationDataset = VOC(cfg.root, split, **common)
    elif cfg.dataset == "coco_stuff":
        dataset = CocoStuff(cfg.root, split, **common)
    elif cfg.dataset == "toyworld":
        dataset = ToyWorld(cfg.toyworld, split, **common)
    else:
        raise ValueError(f"unknown dataset {cfg.dataset!r}")
    dataset.candidates = candidates
    return dataset


__all__ = [
    "DataError", "Sample", "SegmentationDataset", "build_dataset", "collate",
    "read_image", "read_label", "VOC", "CocoStuff", "ToyWorld", "export_toyworld", "generate",
    "render", "TrainAugment",
]
