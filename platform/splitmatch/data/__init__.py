"""Datasets for inductive ZSS: VOC, COCO-Stuff and the toy world, one sample format for all.

A sample is `{"image": uint8 [3, H, W] RGB, "label": int64 [H, W] (class ids, 255 ignore),
"index": int, "path": str}`; `build_dataset(cfg, split, train)` is the one entry point, and
`collate` batches samples (leaving out skipped ones).
"""
from splitmatch.data.coco_stuff import CocoStuff
from splitmatch.data.dataset import (DataError, Sample, SegmentationDataset, build_dataset,
                                     collate, read_image, read_label)
from splitmatch.data.toyworld import ToyWorld, export_toyworld, generate, render
from splitmatch.data.transforms import TrainAugment
from splitmatch.data.voc import VOC

__all__ = [
    "DataError", "Sample", "SegmentationDataset", "build_dataset", "collate",
    "read_image", "read_label", "VOC", "CocoStuff", "ToyWorld", "export_toyworld", "generate",
    "render", "TrainAugment",
]
