"""COCO-Stuff 164k with 171 train ids (the `*_labelTrainIds.png` layout).

Layout under `root`:
    images/{split}/{name}.jpg
    annotations/{split}/{name}_labelTrainIds.png    values 0..170 (classes), 255 ignore
with split "train2017" or "val2017". The sample list is the sorted listing of the annotation
files: a sample is only usable with its label, and sorting makes indices stable across machines.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from splitmatch import splits
from splitmatch.data.dataset import DataError, SegmentationDataset, read_image, read_label
from splitmatch.data.transforms import TrainAugment

LABEL_SUFFIX = "_labelTrainIds.png"


class CocoStuff(SegmentationDataset):
    """COCO-Stuff 164k split `split` read from `root`; see the module docstring for the layout."""

    def __init__(self, root: str | Path, split: str, unseen_ids: Sequence[int], *, train: bool,
                 augment: TrainAugment | None = None, ignore_index: int = 255,
                 on_error: Literal["raise", "skip"] = "raise", seed: int = 0) -> None:
        raw_to_class = {k: k for k in range(len(splits.COCO_STUFF_CLASSES))}
        raw_to_class[255] = ignore_index
        super().__init__(splits.COCO_STUFF_CLASSES, unseen_ids, raw_to_class, train=train,
                         augment=augment, ignore_index=ignore_index, on_error=on_error, seed=seed)
        self.root = Path(root)
        self.split = split
        annotation_dir = self.root / "annotations" / split
        if not annotation_dir.is_dir():
            raise DataError(f"{annotation_dir}: annotation folder of split '{split}' not found")
        self.names = sorted(p.name[:-len(LABEL_SUFFIX)]
                            for p in annotation_dir.glob(f"*{LABEL_SUFFIX}"))

    def __len__(self) -> int:
        return len(self.names)

    def path_of(self, index: int) -> str:
        return str(self.root / "images" / self.split / f"{self.names[index]}.jpg")

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray, str, str]:
        image_path = self.path_of(index)
        label_name = f"{self.names[index]}{LABEL_SUFFIX}"
        label_path = str(self.root / "annotations" / self.split / label_name)
        return read_image(image_path), read_label(label_path), image_path, label_path
