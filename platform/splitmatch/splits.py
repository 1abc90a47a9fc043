"""Class lists and the standard seen/unseen splits (ZegCLIP / ZegFormer protocol, docs/method.md)."""
from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from splitmatch.errors import UserError

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


# ----------------------------------------------------------------------------- split families
# A split is an unseen class set and, on the toy world, the seed of its images. Two fixed,
# disjoint families: development splits, on which every choice is made (diagnose, tune,
# calibration grids, budgets; on their val split), and held-out splits, read only to report
# figures once the choices are fixed. Class sets and toy-world seeds are each assigned to one
# family by a hash, so no held-out split shares its classes or its images with any development
# split; each family is then drawn from its own seed stream.
DEV, HOLDOUT = "dev", "holdout"
FAMILIES = (DEV, HOLDOUT)
# Looked at before the families existed (the standard split and the five splits drawn from seed 0
# by the old `ablation --splits 6`, whose test figures chose settings), so development for good.
LEGACY_TOYWORLD_SPLITS: tuple[tuple[str, ...], ...] = (
    ("leaf", "starfish", "donut"), ("tomato", "zebra", "ice cube"),
    ("checkerboard", "donut", "grape"), ("checkerboard", "zebra", "donut"),
    ("leaf", "brick", "starfish"), ("lemon", "leaf", "checkerboard"),
)
# Toy-world seeds below this were used by hand (the issues' "another toy-world seed"): development.
FIRST_FREE_WORLD_SEED = 100
WORLD_SEED_RANGE = 2 ** 31


@dataclass(frozen=True)
class Split:
    """One split of a family: `index` within it, its unseen classes (label-id order) and, on the
    toy world, the seed of its images."""

    family: str
    index: int
    unseen: tuple[str, ...]
    world_seed: int | None = None

    @property
    def label(self) -> str:
        return f"{self.family}{self.index}"

    def overrides(self) -> list[str]:
        """`--set` overrides that put a config on this split."""
        names = ", ".join(f'"{n}"' for n in self.unseen)
        out = [f"data.unseen=[{names}]"]
        if self.world_seed is not None:
            out.append(f"data.toyworld.seed={self.world_seed}")
        return out

    def describe(self) -> str:
        seed = f", images of seed {self.world_seed}" if self.world_seed is not None else ""
        return f"{self.label} ({', '.join(self.unseen)}{seed})"


def _hash_bit(text: str) -> int:
    return hashlib.sha256(text.encode()).digest()[0] & 1


def class_set_family(dataset: str, unseen: Sequence[str] | None) -> str:
    """The family an unseen class set belongs to (None: the dataset's standard split)."""
    names = frozenset(default_unseen(dataset) if unseen is None else unseen)
    if names == frozenset(default_unseen(dataset)):
        return DEV
    if dataset == "toyworld" and names in {frozenset(s) for s in LEGACY_TOYWORLD_SPLITS}:
        return DEV
    ordered = ",".join(n for n in class_names(dataset) if n in names)
    return FAMILIES[_hash_bit(f"{dataset}:classes:{ordered}")]


def world_seed_family(seed: int) -> str:
    if 0 <= seed < FIRST_FREE_WORLD_SEED:
        return DEV
    return FAMILIES[_hash_bit(f"toyworld:seed:{seed}")]


def split_family(dataset: str, unseen: Sequence[str] | None, world_seed: int | None) -> str:
    """HOLDOUT when the class set or (toy world) the images belong to the held-out family."""
    families = {class_set_family(dataset, unseen)}
    if dataset == "toyworld" and world_seed is not None:
        families.add(world_seed_family(world_seed))
    return HOLDOUT if HOLDOUT in families else DEV


def draw_family(dataset: str, family: str, count: int) -> list[Split]:
    """The first `count` splits of `family`; the same list on every machine, and a longer list
    starts with a shorter one. Development split 0 is the standard split (seed 0 on the toy world)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown split family {family!r}; expected one of {FAMILIES}")
    names = class_names(dataset)
    size = len(default_unseen(dataset))
    toy = dataset == "toyworld"
    drawn: list[Split] = []
    taken: set[frozenset] = set()
    if family == DEV and count > 0:
        drawn.append(Split(DEV, 0, tuple(n for n in names if n in default_unseen(dataset)),
                           0 if toy else None))
        taken.add(frozenset(default_unseen(dataset)))
    available = math.comb(len(names), size)
    rng = random.Random(f"splitmatch/{dataset}/{family}")
    attempts = 0
    while len(drawn) < count:
        attempts += 1
        if attempts > 1000 * (count + 10):
            raise ValueError(f"{dataset} has too few {family} class sets of {size} for {count} "
                             f"splits ({available} sets in all)")
        chosen = frozenset(rng.sample(names, size))
        if chosen in taken or class_set_family(dataset, chosen) != family:
            continue
        world_seed = None
        if toy:
            world_seed = rng.randrange(FIRST_FREE_WORLD_SEED, WORLD_SEED_RANGE)
            if world_seed_family(world_seed) != family:
                continue
        taken.add(chosen)
        drawn.append(Split(family, len(drawn), tuple(n for n in names if n in chosen),
                           world_seed))
    return drawn


def family_split(dataset: str, label: str) -> Split:
    """The split named by `label` ("dev3", "holdout0")."""
    for family in FAMILIES:
        if label.startswith(family) and label[len(family):].isdigit():
            return draw_family(dataset, family, int(label[len(family):]) + 1)[-1]
    raise ValueError(f"split {label!r}: expected dev<N> or holdout<N>, e.g. dev1 or holdout0")


class HeldOutSplit(UserError):
    """A command that chooses was pointed at a held-out split without --holdout."""


def check_split_use(data, command: str, holdout: bool) -> str:
    """The family of the config's split (`data`: its `data` section); a held-out one is refused
    unless `holdout` (the command's --holdout flag) says the figures are for reporting."""
    world_seed = data.toyworld.seed if data.dataset == "toyworld" else None
    family = split_family(data.dataset, data.unseen, world_seed)
    if family == HOLDOUT and not holdout:
        what = ", ".join(data.unseen or default_unseen(data.dataset))
        seed = f", data.toyworld.seed {world_seed}" if world_seed is not None else ""
        raise HeldOutSplit(
            f"{command}: data.unseen [{what}]{seed} is a held-out split: held-out splits are read "
            f"only to report figures once every choice is made (on development splits' val); "
            f"pass --holdout to report on it (recorded on the MLflow run)")
    return family
