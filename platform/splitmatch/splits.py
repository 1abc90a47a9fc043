"""Class lists and the standard seen/unseen splits (ZegCLIP / ZegFormer protocol, docs/method.md)."""
from __future__ import annotations

import math
import random
from collections.abc import Sequence

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)
VOC_UNSEEN: tuple[str, ...] = ("pottedplant", "sheep", "sofa", "train", "tvmonitor")

# COCO-Stuff 164k train ids 0..170: 80 things then 91 stuff classes.
COCO_STUFF_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage",
    "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter",
    "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble",
    "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower", "fog", "food-other",
    "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill", "house", "leaves",
    "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper",
    "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield", "railing",
    "railroad", "river", "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf",
    "sky-other", "skyscraper", "snow", "solid-other", "stairs", "stone", "straw",
    "structural-other", "table", "tent", "textile-other", "towel", "tree", "vegetable",
    "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile",
    "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
)
COCO_STUFF_UNSEEN: tuple[str, ...] = (
    "frisbee", "skateboard", "cardboard", "carrot", "scissors", "suitcase", "giraffe", "cow",
    "road", "wall-concrete", "tree", "grass", "river", "clouds", "playingfield",
)

# The toy world's classes: each differs from the others in colour, texture and shape (see
# data/toyworld.py for how each is drawn), so a small CLIP trained on toy captions can tell them apart.
TOYWORLD_CLASSES: tuple[str, ...] = (
    "tomato", "lemon", "leaf", "brick", "checkerboard", "starfish", "zebra", "donut", "grape",
    "ice cube",
)
TOYWORLD_UNSEEN: tuple[str, ...] = ("leaf", "starfish", "donut")

DATASETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "voc": (VOC_CLASSES, VOC_UNSEEN),
    "coco_stuff": (COCO_STUFF_CLASSES, COCO_STUFF_UNSEEN),
    "toyworld": (TOYWORLD_CLASSES, TOYWORLD_UNSEEN),
}


def class_names(dataset: str) -> tuple[str, ...]:
    """All class names of `dataset` in label-id order."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(DATASETS)}")
    return DATASETS[dataset][0]


def default_unseen(dataset: str) -> tuple[str, ...]:
    class_names(dataset)  # validates the name
    return DATASETS[dataset][1]


def unseen_ids(dataset: str, unseen: list[str] | tuple[str, ...] | None = None) -> list[int]:
    """Label ids of the unseen classes (the standard split when `unseen` is None), sorted."""
    names = class_names(dataset)
    chosen = default_unseen(dataset) if unseen is None else unseen
    missing = [n for n in chosen if n not in names]
    if missing:
        raise ValueError(f"unseen classes {missing} are not classes of {dataset!r}")
    return sorted(names.index(n) for n in chosen)


def seen_ids(dataset: str, unseen: list[str] | tuple[str, ...] | None = None) -> list[int]:
    bad = set(unseen_ids(dataset, unseen))
    return [i for i in range(len(class_names(dataset))) if i not in bad]


def draw_unseen_splits(dataset: str, count: int, seed: int = 0,
                       first: Sequence[str] | None = None) -> list[tuple[str, ...]]:
    """`count` distinct unseen-class splits of `dataset`: `first` (default: the standard split),
    then splits of the same size drawn reproducibly from `seed` (names in label-id order).

    A method's gain must hold on splits nobody tuned it on: settings are chosen on the standard
    split, and the drawn ones test whether they carry over.
    """
    names = class_names(dataset)
    standard = tuple(n for n in names if n in (default_unseen(dataset) if first is None else first))
    size = len(standard)
    total = math.comb(len(names), size)
    if not 1 <= count <= total:
        raise ValueError(f"{dataset} has {total} distinct splits of {size} unseen classes; "
                         f"asked for {count}")
    rng = random.Random(seed)
    drawn, seen = [standard], {frozenset(standard)}
    while len(drawn) < count:
        pick = frozenset(rng.sample(range(len(names)), size))
        chosen = frozenset(names[i] for i in pick)
        if chosen not in seen:
            seen.add(chosen)
            drawn.append(tuple(n for n in names if n in chosen))
    return drawn
