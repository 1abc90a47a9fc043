"""The toy world written in the benchmarks' own on-disk layouts, at their real image sizes, so the
paper configs can be rehearsed end to end (loaders, pseudo masks, training, sliding-window
evaluation) where the real data cannot be downloaded. The VOC and COCO-Stuff loaders read these
folders unchanged.

Toy classes become benchmark classes of the same role: the toy world's standard unseen classes
(leaf, starfish, donut) become unseen classes of the benchmark's standard split, the others seen
classes; toy background is VOC background (raw 0) and COCO-Stuff "unlabelled" (255).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from splitmatch.config import ToyWorldConfig
from splitmatch import splits
from splitmatch.data.toyworld import generate

# (width, height) of a typical image of each benchmark.
SIZES = {"voc": (500, 375), "coco_stuff": (640, 480)}


def _class_map(dataset: str) -> np.ndarray:
    """Toy label (0..9, 255) -> the benchmark's raw label value."""
    names, unseen = splits.DATASETS[dataset]
    toy_unseen = set(splits.default_unseen("toyworld"))
    seen_ids = [i for i, n in enumerate(names) if n not in unseen]
    unseen_ids = [names.index(n) for n in unseen]
    lut = np.full(256, 255 if dataset == "coco_stuff" else 0, dtype=np.uint8)
    for toy_id, toy_name in enumerate(splits.TOYWORLD_CLASSES):
        target = unseen_ids.pop(0) if toy_name in toy_unseen else seen_ids.pop(0)
        # VOC files hold 1..20 for its classes (0 is background); COCO-Stuff train ids 0..170.
        lut[toy_id] = target + 1 if dataset == "voc" else target
    return lut


def _image(toy: ToyWorldConfig, split: str, index: int, size: tuple[int, int]
           ) -> tuple[np.ndarray, np.ndarray]:
    width, height = size
    image, label = generate(ToyWorldConfig(**{**vars(toy), "image_size": max(size)}), split, index)
    return image[:height, :width], label[:height, :width]


def export_layout(dataset: str, root: str | Path, counts: dict[str, int],
                  toy: ToyWorldConfig | None = None) -> Path:
    """Write `counts[split]` toy images per split under `root` in `dataset`'s layout ("voc":
    splits train_aug / val; "coco_stuff": train2017 / val2017); return `root`."""
    toy = toy or ToyWorldConfig()
    root = Path(root)
    lut = _class_map(dataset)
    for split, count in counts.items():
        ids = [f"{split}_{index:06d}" for index in range(count)]
        for index, name in enumerate(ids):
            image, label = _image(toy, split, index, SIZES[dataset])
            raw = lut[label]
            if dataset == "voc":
                image_path = root / "JPEGImages" / f"{name}.jpg"
                label_path = root / "SegmentationClassAug" / f"{name}.png"
            else:
                image_path = root / "images" / split / f"{name}.jpg"
                label_path = root / "annotations" / split / f"{name}_labelTrainIds.png"
            image_path.parent.mkdir(parents=True, exist_ok=True)
            label_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(image_path, quality=95)
            Image.fromarray(raw).save(label_path)
        if dataset == "voc":
            lists = root / "ImageSets" / "Segmentation"
            lists.mkdir(parents=True, exist_ok=True)
            (lists / f"{split}.txt").write_text("".join(f"{name}\n" for name in ids))
    return root
