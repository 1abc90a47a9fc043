"""The toy CLIP's training data: captioned toy images drawn on the fly, a pure function of
(seed, step, slot in the batch), and the recipe that says how they are mixed.

A change here that alters the captions or images bumps `checkpoint.TOY_CLIP_FORMAT`, so the toy
CLIP is retrained rather than reused with weights made from other data (a golden training run in
tests/test_toyclip.py fails until then).
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from splitmatch import splits
from splitmatch.clip import TEMPLATES
from splitmatch.data import toyworld

CLASS_NAMES: tuple[str, ...] = splits.TOYWORLD_CLASSES

# Single-class prompts: ZegCLIP's 15 (which contain the VOC-style "a photo of a {}.") plus a few
# plain variants. The article is always "a", never "an": the test-time templates write
# "a photo of a ice cube." and a text tower trained from scratch should see that exact form.
SINGLE_TEMPLATES: tuple[str, ...] = tuple(dict.fromkeys(TEMPLATES["coco15"] + (
    "a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a photo of one {}.",
    "a close-up photo of a {}.",
)))
# Scene captions: "{}" receives the list "a brick, a grape and a zebra".
SCENE_TEMPLATES: tuple[str, ...] = (
    "a photo of {}.",
    "there is {} in the scene.",
    "a picture of {}.",
    "{}.",
    "this is a photo of {}.",
    "a scene with {}.",
    "an image showing {}.",
)
# Captions of object-free pictures: plain backgrounds, and backgrounds with regions blacked out
# the way `FrozenClip.masked_cls` blacks out everything outside a candidate. Real CLIP has seen
# walls, floors and dark corners and knows they are none of VOC's classes; without such pictures
# the toy CLIP maps a masked background to whichever class is nearest (tomato, zebra), and every
# background candidate then teaches candidate queries a seen class's embedding.
BACKGROUND_TEMPLATES: tuple[str, ...] = (
    "a photo of the background.",
    "an empty scene.",
    "a plain background.",
    "there is nothing in the scene.",
    "a photo of an empty background.",
)
BACKGROUND_SET = len(CLASS_NAMES)  # class-set column of object-free pictures (Jaccard targets)
# The prompt used at test time on the toy world (clip.templates: single) is drawn this often for
# single-class captions, so zero-shot classification uses the caption form seen most in training.
TEST_TEMPLATE = TEMPLATES["single"][0]
TEST_TEMPLATE_PROB = 0.25


@dataclass(frozen=True)
class ToyClipRecipe:
    """How the training data and schedule are made, beyond the `toy_clip:` config section.

    Part of the checkpoint key: changing any value gives a new checkpoint, never a stale one.
    """

    single_fraction: float = 0.5  # share of single-object images; the rest are scenes
    min_objects: int = 2  # objects drawn per scene
    max_objects: int = 4
    zoom_fraction: float = 0.3  # share of scenes that are crops of a 2x render
    # Share of single objects shown at 2x (a crop around them): larger views of the fine textures
    # (zebra stripes vs checkerboard squares) speed up telling the two black-and-white classes
    # apart, the last pair a short pretraining confuses.
    single_zoom_fraction: float = 0.5
    # Share of object-free pictures (BACKGROUND_TEMPLATES), and of those, the share with blacked-
    # out regions; likewise the share of single objects shown on black, as a masked candidate is.
    background_fraction: float = 0.1
    background_masked_fraction: float = 0.5
    single_masked_fraction: float = 0.2
    # A class counts as visible (and is named in the caption) from this share of the image's
    # pixels: a sliver behind another object is not what a caption would mention.
    min_visible_fraction: float = 0.01
    warmup_fraction: float = 0.05
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    max_logit_scale: float = 100.0  # CLIP's clamp of the learned temperature
    eval_images: int = 500  # held-out single-object images for the recorded accuracy
    log_every: int = 100


DEFAULT_RECIPE = ToyClipRecipe()

# Training samples are drawn from a seed stream of their own (held-out images from another).
TRAIN_STREAM = zlib.crc32(b"toy-clip/train")


# ----------------------------------------------------------------------------- captions


def visible_classes(label: np.ndarray, min_pixels: int = 1) -> list[int]:
    """Class ids with at least `min_pixels` pixels in `label` [H, W] (255 = background), sorted."""
    counts = np.bincount(label[label != toyworld.BACKGROUND].ravel(), minlength=len(CLASS_NAMES))
    return [int(c) for c in np.flatnonzero(counts >= max(1, min_pixels))]


def _listing(names: Sequence[str]) -> str:
    """["brick", "grape", "zebra"] -> "a brick, a grape and a zebra"."""
    items = [f"a {name}" for name in names]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def make_caption(class_ids: Sequence[int], rng: np.random.Generator) -> str:
    """A caption naming exactly the classes `class_ids`, in random order, from varied templates."""
    if len(class_ids) == 0:
        raise ValueError("a caption needs at least one class")
    names = [CLASS_NAMES[int(c)] for c in rng.permutation(np.asarray(class_ids))]
    if len(names) > 1:
        return SCENE_TEMPLATES[int(rng.integers(len(SCENE_TEMPLATES)))].format(_listing(names))
    if rng.random() < TEST_TEMPLATE_PROB:
        return TEST_TEMPLATE.format(names[0])
    # One class: single-class prompts take the bare name, scene templates the listing "a tomato".
    template_id = int(rng.integers(len(SINGLE_TEMPLATES) + len(SCENE_TEMPLATES)))
    if template_id < len(SINGLE_TEMPLATES):
        return SINGLE_TEMPLATES[template_id].format(names[0])
    return SCENE_TEMPLATES[template_id - len(SINGLE_TEMPLATES)].format(_listing(names))


def caption_words() -> list[str]:
    """Texts holding every word a training caption can contain: each template with each class,
    and a listing of several classes. Their tokens are the token-embedding rows the toy CLIP was
    trained on; `compact` ships only those."""
    scenes = [template.format(_listing(CLASS_NAMES[start:start + 3]))
              for template in SCENE_TEMPLATES for start in range(0, len(CLASS_NAMES), 3)]
    singles = [template.format(name) for template in SINGLE_TEMPLATES for name in CLASS_NAMES]
    return singles + scenes + list(BACKGROUND_TEMPLATES)


# ----------------------------------------------------------------------------- training data


def _zoom_crop(image: np.ndarray, label: np.ndarray, size: int, min_pixels: int,
               rng: np.random.Generator, on_object: bool) -> tuple[np.ndarray, np.ndarray]:
    """A size x size crop of a larger render that shows at least one class: anywhere, or around
    an object (`on_object`, with some jitter so the object is not always centred)."""
    limit = label.shape[0] - size
    y0, x0 = (int(v) for v in rng.integers(0, limit + 1, 2))
    if on_object or not visible_classes(label[y0:y0 + size, x0:x0 + size], min_pixels):
        # Around the largest object; also the way out when a random window caught only background.
        counts = np.bincount(label[label != toyworld.BACKGROUND].ravel())
        ys, xs = np.nonzero(label == int(counts.argmax()))
        jitter_y, jitter_x = rng.uniform(-size / 6, size / 6, 2)
        y0 = int(np.clip(ys.mean() - size / 2 + jitter_y, 0, limit))
        x0 = int(np.clip(xs.mean() - size / 2 + jitter_x, 0, limit))
    return image[y0:y0 + size, x0:x0 + size], label[y0:y0 + size, x0:x0 + size]


def _black_out(image: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The image with every pixel outside `keep` [H, W] set to 0, as masked CLS inputs are."""
    return np.where(keep[..., None], image, 0).astype(np.uint8)


def _random_blobs(size: int, rng: np.random.Generator) -> np.ndarray:
    """1-3 random ellipses covering part of a size x size picture → bool [H, W]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    blobs = np.zeros((size, size), dtype=bool)
    for _ in range(int(rng.integers(1, 4))):
        cy, cx = rng.uniform(0, size, 2)
        ry, rx = rng.uniform(0.15, 0.4, 2) * size
        blobs |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    return blobs


class CaptionedImage(NamedTuple):
    image: np.ndarray  # [S, S, 3] uint8 RGB
    label: np.ndarray  # [S, S] uint8 class ids, 255 background (only used to write the caption)
    classes: list[int]  # the classes the caption names: those visible in `label` (none: background)
    caption: str


def training_sample(seed: np.random.SeedSequence, image_size: int, recipe: ToyClipRecipe
                    ) -> CaptionedImage:
    """One captioned toy image, a pure function of `seed`."""
    rng = np.random.default_rng(seed)
    render_seed = int(rng.integers(2 ** 63))
    min_pixels = math.ceil(recipe.min_visible_fraction * image_size * image_size)
    if rng.random() < recipe.background_fraction:
        image, label = toyworld.render(render_seed, image_size, 0)
        if rng.random() < recipe.background_masked_fraction:
            image = _black_out(image, ~_random_blobs(image_size, rng))
        caption = BACKGROUND_TEMPLATES[int(rng.integers(len(BACKGROUND_TEMPLATES)))]
        return CaptionedImage(image, label, [], caption)
    single = rng.random() < recipe.single_fraction
    n_objects = 1 if single else int(rng.integers(recipe.min_objects, recipe.max_objects + 1))
    classes = [int(rng.integers(len(CLASS_NAMES)))] if single else None
    zoom = rng.random() < (recipe.single_zoom_fraction if single else recipe.zoom_fraction)
    if zoom:
        image, label = toyworld.render(render_seed, 2 * image_size, n_objects, classes)
        image, label = _zoom_crop(image, label, image_size, min_pixels, rng, on_object=single)
    else:
        image, label = toyworld.render(render_seed, image_size, n_objects, classes)
    # Objects are centred inside the image and the last one drawn is whole, so every image shows
    # a class above the threshold; a sliver peeking out from behind another is not mentioned.
    classes = visible_classes(label, min_pixels) or visible_classes(label)
    if single and rng.random() < recipe.single_masked_fraction:
        image = _black_out(image, label != toyworld.BACKGROUND)
    return CaptionedImage(image, label, classes, make_caption(classes, rng))


def training_batch(seed: int, step: int, batch_size: int, image_size: int,
                   recipe: ToyClipRecipe = DEFAULT_RECIPE) -> tuple[Tensor, list[str], Tensor]:
    """Batch `step`: images uint8 [B, 3, S, S], captions, class sets bool [B, 11] (the last
    column marks object-free pictures).

    Each slot has its own seed (seed, stream, step, slot), so a batch does not depend on what was
    drawn before it and training restarted at any step sees the same data.
    """
    images, captions = [], []
    class_sets = torch.zeros(batch_size, len(CLASS_NAMES) + 1, dtype=torch.bool)
    for slot in range(batch_size):
        sample_seed = np.random.SeedSequence([seed & 0xFFFF_FFFF, TRAIN_STREAM, step, slot])
        sample = training_sample(sample_seed, image_size, recipe)
        images.append(torch.from_numpy(np.ascontiguousarray(sample.image)).permute(2, 0, 1))
        captions.append(sample.caption)
        class_sets[slot, sample.classes or [BACKGROUND_SET]] = True
    return torch.stack(images), captions, class_sets

