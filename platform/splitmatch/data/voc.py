"""PASCAL VOC 2012 with the SBD augmentation (the `SegmentationClassAug` layout).

Layout under `root`:
    JPEGImages/{id}.jpg
    SegmentationClassAug/{id}.png          raw VOC ids: 0 background, 1..20 classes, 255 border
    ImageSets/Segmentation/{split}.txt     one id per line; split "train_aug" or "val"

Background is not a class in the ZSS protocol (docs/method.md, "Setting"): raw 0 and 255 become
ignore, raw k in 1..20 becomes class k-1 in the order of `splits.VOC_CLASSES`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from splitmatch import splits
from splitmatch.data.dataset import SegmentationDataset, read_image, read_label, read_list_file
from splitmatch.data.transforms import TrainAugment


class VOC(SegmentationDataset):
    """VOC 2012 (+SBD) split `split` read from `root`; see the module docstring for the layout."""

    def __init__(self, root: str | Path, split: str, unseen_ids: Sequence[int], *, train: bool,
                 augment: TrainAugment | None = None, ignore_index: int = 255,
                 on_error: Literal["raise", "skip"] = "raise", seed: int = 0) -> None:
        raw_to_class = {0: ignore_index, 255: ignore_index}
        raw_to_class.update({k: k - 1 for k in range(1, len(splits.VOC_CLASSES) + 1)})
        super().__init__(splits.VOC_CLASSES, unseen_ids, raw_to_class, train=train,
                         augment=augment, ignore_index=ignore_index, on_error=on_error, seed=seed)
        self.root = Path(root)
        self.split = split
        self.ids = read_list_file(self.root / "ImageSets" / "Segmentation" / f"{split}.txt")

    def __len__(self) -> int:
        return len(self.ids)

    def path_of(self, index: int) -> str:
        return str(self.root / "JPEGImages" / f"{self.ids[index]}.jpg")

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray, str, str]:
        image_path = self.path_of(index)
        label_path = str(self.root / "SegmentationClassAug" / f"{self.ids[index]}.png")
        return read_image(image_path), read_label(label_path), image_path, label_path
