"""The toy CLIP: a small open_clip model the project pretrains itself, on toy-world captions.

The platform cannot download real CLIP weights, so the toy world gets an honest stand-in. Real CLIP
was pretrained on web image-text pairs before anyone chose a seen/unseen split; likewise this model
is trained contrastively on toy-world images whose captions name *all* ten toy classes, seen and
unseen alike. Split Matching then uses it exactly as it uses ViT-B/16: frozen, built by open_clip's
factory from `model_configs/splitmatch-toy-vit.json`, weights loaded with `pretrained=PATH`
(`build_clip`). No segmentation label is used here beyond "which classes are visible", which is
what a caption says.

Training data are drawn on the fly, a pure function of (seed, step, slot in the batch):
- single-object images with single-class prompts (the ZegCLIP templates among them), so that
  zero-shot classification with "a photo of a {}." works; some show the object at twice its
  usual size, so fine textures are seen up close;
- scenes of 2-4 objects whose captions list the visible classes ("there is a brick, a grape and
  a zebra in the scene."), so that patch features, not only the CLS token, carry the classes;
  some scenes are zoomed-in crops of a twice-as-large render, so objects are also seen at the
  scale they have when dense features are computed at twice the CLIP input size;
- object-free pictures captioned as background ("an empty scene."), some with regions blacked
  out, and some single objects shown on black: the inputs of the masked-CLS pass look like these,
  and real CLIP, unlike a model that has only ever seen the ten classes, knows that a plain wall
  is none of them.
Two images of one batch often share a class (ten classes, 64 images): plain InfoNCE would push
them apart as negatives. The targets are therefore soft: image i's target over captions is
proportional to the Jaccard overlap of their class sets (identical sets count as full positives).

The checkpoint is cached at `{cache_dir}/{key}/` (a local folder, or a prefix on object storage
that each node mirrors, see `splitmatch.storage`) (`toy_clip.pt`: an open_clip state dict,
`toy_clip.json`: what it was trained from and how well it classifies), the key a hash of
everything that changes the weights. The folder is assembled under a temporary name and renamed
into place, so an interrupted pretraining never leaves a folder that looks complete.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import open_clip
import torch
from torch import Tensor, nn

from splitmatch import storage
from splitmatch.files import content_key, remove_stale, temporary_name, write_atomic
from splitmatch.progress import Progress, verbose
from splitmatch.clip import (PACKAGE_MODEL_CONFIGS, TEMPLATES, FrozenClip, build_clip, normalise,
                             register_config_dir)
from splitmatch.config import (
    ClipConfig,
    Config,
    ConfigError,
    PseudoMaskConfig,
    ToyClipConfig,
)
from splitmatch import splits
from splitmatch.data import toyworld

CLASS_NAMES: tuple[str, ...] = splits.TOYWORLD_CLASSES
CHECKPOINT_NAME = "toy_clip.pt"
INFO_NAME = "toy_clip.json"

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

# Seed streams: training samples and held-out evaluation images are drawn from different ones.
TRAIN_STREAM = zlib.crc32(b"toy-clip/train")
EVAL_STREAM = zlib.crc32(b"toy-clip/zero-shot")


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


# ----------------------------------------------------------------------------- loss


def jaccard_targets(class_sets: Tensor) -> Tensor:
    """Row-stochastic contrastive targets [B, B] from class sets [B, K]: Jaccard overlap, normalised.

    With all sets distinct this is the identity, i.e. the standard CLIP loss; images and captions
    that name the same classes are positives of each other instead of false negatives, and a scene
    partly matching a caption gets partial credit. J is symmetric, so one matrix serves both
    directions.
    """
    sets = class_sets.float()
    inter = sets @ sets.T                                               # [B, B]
    union = sets.sum(1, keepdim=True) + sets.sum(1)[None] - inter
    jaccard = inter / union.clamp_min(1.0)
    return jaccard / jaccard.sum(1, keepdim=True)


def contrastive_loss(image_embeds: Tensor, text_embeds: Tensor, logit_scale: Tensor,
                     targets: Tensor) -> Tensor:
    """Symmetric InfoNCE with soft targets; embeddings [B, C] L2-normalised, targets [B, B]."""
    logits = logit_scale * image_embeds @ text_embeds.T                # [B, B] image x caption
    image_to_text = -(targets * logits.log_softmax(dim=1)).sum(1).mean()
    text_to_image = -(targets * logits.T.log_softmax(dim=1)).sum(1).mean()
    return (image_to_text + text_to_image) / 2


# ----------------------------------------------------------------------------- zero-shot


def zero_shot_images(num_images: int, seed: int, image_size: int) -> tuple[Tensor, Tensor]:
    """Held-out single-object images uint8 [N, 3, S, S] and their class ids [N], classes balanced.

    Drawn from a seed stream of their own (training samples come from another one), so these are
    not training images.
    """
    images, targets = [], []
    for index in range(num_images):
        class_id = index % len(CLASS_NAMES)
        render_seed = np.random.SeedSequence([seed & 0xFFFF_FFFF, EVAL_STREAM, index])
        image, _ = toyworld.render(int(render_seed.generate_state(1)[0]), image_size, 1, [class_id])
        images.append(torch.from_numpy(image).permute(2, 0, 1))
        targets.append(class_id)
    return torch.stack(images), torch.tensor(targets)


def zero_shot_report(clip: FrozenClip, num_images: int = 500, seed: int = 0,
                     image_size: int = 64) -> dict:
    """Zero-shot classification of held-out single-object images against all ten class names
    ("a photo of a {}.", TEMPLATES["single"]): overall and per-class accuracy, confusion matrix."""
    images, targets = zero_shot_images(num_images, seed, image_size)
    text = clip.text_embeddings(CLASS_NAMES, TEMPLATES["single"])      # [10, C]
    predictions = (clip.encode_images(images) @ text.T).argmax(1).cpu()  # [N]
    correct = predictions == targets
    per_class = {name: float(correct[targets == c].float().mean())
                 for c, name in enumerate(CLASS_NAMES) if bool((targets == c).any())}
    n = len(CLASS_NAMES)
    confusion = torch.bincount(targets * n + predictions, minlength=n * n).view(n, n)
    return {"accuracy": float(correct.float().mean()), "per_class": per_class,
            "confusion": confusion.tolist(),  # rows: true class, columns: predicted
            "num_images": num_images, "seed": seed, "image_size": image_size,
            "templates": "single"}


def zero_shot_accuracy(clip: FrozenClip, num_images: int, seed: int, image_size: int) -> float:
    """Overall zero-shot accuracy on held-out single-object toy images (see `zero_shot_report`)."""
    return zero_shot_report(clip, num_images, seed, image_size)["accuracy"]


# ----------------------------------------------------------------------------- model + cache key


def model_config_path(model_name: str) -> Path:
    """The package model config of the toy CLIP; the toy CLIP is always a package config, so its
    architecture travels with the code and is part of the cache key."""
    path = PACKAGE_MODEL_CONFIGS / f"{model_name}.json"
    if not path.is_file():
        raise ConfigError(f"'toy_clip.model_name' = {model_name!r}: no model config {path}")
    return path


def checkpoint_inputs(cfg: ToyClipConfig, recipe: ToyClipRecipe = DEFAULT_RECIPE) -> dict:
    """Everything the weights depend on: config (not where it is cached), architecture, data."""
    toy = dataclasses.asdict(cfg)
    del toy["cache_dir"]
    return {
        "toy_clip": toy,
        "model_config": json.loads(model_config_path(cfg.model_name).read_text()),
        "recipe": dataclasses.asdict(recipe),
        "templates": {"single": SINGLE_TEMPLATES, "scene": SCENE_TEMPLATES,
                      "background": BACKGROUND_TEMPLATES,
                      "test": TEST_TEMPLATE, "test_prob": TEST_TEMPLATE_PROB},
        # The toy world and this training code have no versions: their sources stand in for
        # them, so a change to how images are drawn or how the model is fitted retrains rather
        # than reusing weights made another way. The libraries count too (kernels, init, RNG).
        "toyworld_sha256": hashlib.sha256(Path(toyworld.__file__).read_bytes()).hexdigest(),
        "training_code_sha256": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
        "torch": torch.__version__, "open_clip": open_clip.__version__,
    }


def checkpoint_key(cfg: ToyClipConfig, recipe: ToyClipRecipe = DEFAULT_RECIPE) -> str:
    return content_key(checkpoint_inputs(cfg, recipe))


def checkpoint_location(cfg: ToyClipConfig, recipe: ToyClipRecipe = DEFAULT_RECIPE) -> str:
    """The cache folder of `cfg`'s checkpoint: a local path, or a prefix on object storage."""
    return storage.join(cfg.cache_dir, checkpoint_key(cfg, recipe))


def checkpoint_dir(cfg: ToyClipConfig, recipe: ToyClipRecipe = DEFAULT_RECIPE) -> Path:
    """The local folder: the cache itself, or this node's mirror of the remote one."""
    return storage.local_path(checkpoint_location(cfg, recipe))


def create_model(model_name: str) -> nn.Module:
    """A randomly initialised open_clip model from the package config (draws from torch's RNG)."""
    model_config_path(model_name)
    register_config_dir(PACKAGE_MODEL_CONFIGS)
    return open_clip.create_model(model_name, pretrained=None)


def _learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup to `peak`, then cosine decay to 0 at the last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * peak * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------- training


def train_toy_clip(cfg: ToyClipConfig, recipe: ToyClipRecipe = DEFAULT_RECIPE,
                   log: Callable[[str], None] = print, device: str | torch.device = "cpu"
                   ) -> tuple[nn.Module, list[dict]]:
    """Contrastive pretraining on toy captions; returns the trained model (eval mode, on the CPU)
    and a log. Weights are reproducible for a given device and thread count."""
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model_name).to(device)
    model.train()
    tokenizer = open_clip.get_tokenizer(cfg.model_name)
    preprocess_cfg = open_clip.get_model_preprocess_cfg(model)
    mean = torch.tensor(preprocess_cfg["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(preprocess_cfg["std"], device=device).view(1, 3, 1, 1)
    input_size = tuple(model.visual.image_size)
    # CLIP's recipe: no weight decay on gains, biases and the temperature (all 0-/1-d tensors).
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": recipe.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    # Fused AdamW: one kernel over all tensors (~4 ms a step on 2 cores instead of ~17 ms with
    # the per-tensor loop), most of it for the 49408-row token embedding.
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6, fused=True)
    warmup = max(1, round(recipe.warmup_fraction * cfg.steps))
    max_log_scale = math.log(recipe.max_logit_scale)
    history: list[dict] = []
    start = time.perf_counter()
    running = 0.0
    bar = Progress(cfg.steps, "toy CLIP pretraining", "step")
    for step in range(cfg.steps):
        lr = _learning_rate(step, cfg.steps, cfg.lr, warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images, captions, class_sets = training_batch(cfg.seed, step, cfg.batch_size,
                                                      cfg.image_size, recipe)
        image_embeds = model.encode_image(normalise(images.to(device), mean, std, input_size),
                                          normalize=True)                   # [B, C]
        text_embeds = model.encode_text(tokenizer(captions).to(device), normalize=True)  # [B, C]
        class_sets = class_sets.to(device)
        loss = contrastive_loss(image_embeds, text_embeds, model.logit_scale.exp(),
                                jaccard_targets(class_sets))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0.0, max_log_scale)
        running += float(loss.detach())
        if (step + 1) % recipe.log_every == 0 or step + 1 == cfg.steps:
            count = (step % recipe.log_every) + 1
            entry = {"step": step + 1, "loss": running / count, "lr": lr,
                     "logit_scale": float(model.logit_scale.detach().exp()),
                     "seconds": time.perf_counter() - start}
            history.append(entry)
            bar.update(step + 1, loss=entry["loss"])
            if verbose():
                log(f"toy CLIP step {entry['step']}/{cfg.steps}  loss {entry['loss']:.4f}  "
                    f"lr {lr:.2e}  logit scale {entry['logit_scale']:.1f}  {entry['seconds']:.0f} s")
            running = 0.0
        else:
            bar.update(step + 1)
    bar.close()
    model.eval()
    return model.cpu(), history


def pretrain_toy_clip(cfg: ToyClipConfig, log: Callable[[str], None] = print,
                      recipe: ToyClipRecipe = DEFAULT_RECIPE) -> Path:
    """Train the toy CLIP, check it loads through `build_clip`, measure zero-shot accuracy, and
    publish `{cache_dir}/{key}/` in one rename; returns the checkpoint path."""
    key = checkpoint_key(cfg, recipe)
    final = checkpoint_dir(cfg, recipe)
    final.parent.mkdir(parents=True, exist_ok=True)
    removed = remove_stale(final.parent, f".{key}.*.tmp")
    if removed:
        log(f"toy CLIP: removed {removed} unfinished build(s) of {key}")
    log(f"toy CLIP: pretraining {cfg.model_name} for {cfg.steps} steps of {cfg.batch_size} "
        f"(key {key})")
    start = time.perf_counter()
    model, history = train_toy_clip(cfg, recipe, log)
    train_seconds = time.perf_counter() - start

    staging = temporary_name(final)  # the folder is assembled here, then renamed in one step
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        write_atomic(staging / CHECKPOINT_NAME, lambda handle: torch.save(model.state_dict(), handle))
        # Measured through the loading path every user takes, so a checkpoint that open_clip
        # cannot load strictly never gets published.
        clip = build_clip(ClipConfig(model_name=cfg.model_name,
                                     pretrained=str(staging / CHECKPOINT_NAME)))
        report = zero_shot_report(clip, recipe.eval_images, cfg.seed, cfg.image_size)
        info = {"key": key, "inputs": checkpoint_inputs(cfg, recipe), "zero_shot": report,
                "train_seconds": train_seconds, "history": history,
                "torch": torch.__version__, "open_clip": open_clip.__version__,
                "threads": torch.get_num_threads()}
        (staging / INFO_NAME).write_text(json.dumps(info, indent=2))
        try:
            os.rename(staging, final)
        except OSError:
            if not (final / INFO_NAME).is_file():
                raise
            # Someone published the same key meanwhile: same inputs, same weights; keep theirs.
            log(f"toy CLIP: {final} appeared while training; keeping it")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    location = checkpoint_location(cfg, recipe)
    if storage.is_remote(location):  # the weights last: a reader that finds them finds the info
        storage.push(final / INFO_NAME, storage.join(location, INFO_NAME))
        storage.push(final / CHECKPOINT_NAME, storage.join(location, CHECKPOINT_NAME))
    log(f"toy CLIP: trained in {train_seconds:.0f} s, zero-shot accuracy "
        f"{report['accuracy']:.3f}; saved {final / CHECKPOINT_NAME}")
    return final / CHECKPOINT_NAME


def toy_clip_checkpoint(cfg: ToyClipConfig, build: bool = True,
                        log: Callable[[str], None] = print,
                        recipe: ToyClipRecipe = DEFAULT_RECIPE) -> Path:
    """The cached checkpoint for `cfg`, pretraining it first (once) if absent and `build`."""
    folder = checkpoint_dir(cfg, recipe)
    location = checkpoint_location(cfg, recipe)
    if storage.is_remote(location) and storage.info(storage.join(location, CHECKPOINT_NAME)):
        for name in (INFO_NAME, CHECKPOINT_NAME):
            storage.pull(storage.join(location, name), folder / name)
    if (folder / CHECKPOINT_NAME).is_file() and (folder / INFO_NAME).is_file():
        accuracy = json.loads((folder / INFO_NAME).read_text())["zero_shot"]["accuracy"]
        log(f"toy CLIP: using cached checkpoint {folder / CHECKPOINT_NAME} (zero-shot accuracy "
            f"{accuracy:.3f})")
        return folder / CHECKPOINT_NAME
    if not build:
        raise FileNotFoundError(f"no toy CLIP checkpoint at {folder} (key "
                                f"{folder.name}); build it with: splitmatch toy-clip CONFIG")
    return pretrain_toy_clip(cfg, log, recipe)


def checkpoint_info(checkpoint: Path) -> dict:
    """The JSON written next to a checkpoint: inputs, zero-shot report, training log."""
    return json.loads((Path(checkpoint).parent / INFO_NAME).read_text())


# ----------------------------------------------------------------------------- pseudo masks


def pseudo_mask_quality(clip: FrozenClip, pseudo_cfg: PseudoMaskConfig, data_cfg,
                        num_images: int, split: str = "train") -> dict:
    """How well pseudo masks from `clip` find the hidden unseen objects of toy-world images.

    Runs the pipeline's kernel on training-mode labels (unseen pixels are ignore) and scores the
    candidates against the full labels: mean best-match IoU per hidden unseen segment and pixel
    coverage of unseen objects (`candidate_quality`), candidates per image, and how often the
    best-matching candidate's embedding Cu names the segment's class zero-shot ("a photo of a
    {}." over all classes), which is what Split Matching then relies on.
    """
    from splitmatch.data import build_dataset
    from splitmatch.pseudo.kernel import build_kernel, candidate_quality, quality_summary

    train_set = build_dataset(data_cfg, split, train=True, augment=False)
    full_set = build_dataset(data_cfg, split, train=False)
    kernel = build_kernel(pseudo_cfg, clip, data_cfg.ignore_index)
    text = clip.text_embeddings(train_set.class_names, TEMPLATES["single"]).cpu()  # [K, C]
    num_images = min(num_images, len(train_set))
    segments, best_iou_sum, covered, unseen, candidates, named = 0, 0.0, 0, 0, 0, 0
    for start in range(0, num_images, pseudo_cfg.batch_size):
        indices = range(start, min(start + pseudo_cfg.batch_size, num_images))
        samples = [train_set.load(i) for i in indices]
        results = kernel([s["image"] for s in samples], [s["label"] for s in samples])
        for index, result in zip(indices, results):
            q = candidate_quality(result.candidate_map, full_set.load(index)["label"],
                                  train_set.unseen_ids)
            segments += q["segments"]
            best_iou_sum += q["best_iou_sum"]
            covered += q["covered_pixels"]
            unseen += q["unseen_pixels"]
            candidates += result.embeds.shape[0]
            predicted = (result.embeds.float() @ text.float().T).argmax(1)  # [U]
            named += sum(int(predicted[i]) == u for u, i in q["best_match"])
    return {"images": num_images, **quality_summary(segments, best_iou_sum, covered, unseen),
            "candidates_per_image": candidates / num_images if num_images else 0.0,
            "candidate_class_accuracy": named / segments if segments else float("nan")}


# ----------------------------------------------------------------------------- command


def main_toy_clip(cfg: Config, log: Callable[[str], None] = print, quality_images: int = 64,
                  recipe: ToyClipRecipe = DEFAULT_RECIPE) -> dict:
    """`splitmatch toy-clip CONFIG`: build or reuse the toy CLIP, print where it is and how good.

    On the toy world it also scores pseudo masks made with the config's `pseudo_masks` settings.
    """
    start = time.perf_counter()
    checkpoint = toy_clip_checkpoint(cfg.toy_clip, build=True, log=log, recipe=recipe)
    info = checkpoint_info(checkpoint)
    report = info["zero_shot"]
    log(f"checkpoint: {checkpoint}")
    log(f"use it with: clip.pretrained: toy (or clip.model_name={cfg.toy_clip.model_name} "
        f"clip.pretrained={checkpoint})")
    log(f"zero-shot accuracy (held-out single-object images, {report['num_images']}, "
        f"'{TEST_TEMPLATE}'): {report['accuracy']:.3f}")
    unseen = set(cfg.data.unseen or splits.default_unseen("toyworld"))
    for name, accuracy in report["per_class"].items():
        log(f"  {name:<13} {accuracy:.3f}" + ("  (unseen in segmentation)" if name in unseen else ""))
    log(f"pretraining took {info['train_seconds']:.0f} s")
    summary = {"checkpoint": str(checkpoint), "zero_shot": report,
               "train_seconds": info["train_seconds"]}
    if cfg.data.dataset == "toyworld" and quality_images > 0:
        clip = build_clip(ClipConfig(model_name=cfg.toy_clip.model_name,
                                     pretrained=str(checkpoint)))
        quality = pseudo_mask_quality(clip, cfg.pseudo_masks, cfg.data, quality_images)
        log(f"pseudo masks with this config ({quality['images']} train images, "
            f"{quality['unseen_segments']} hidden unseen segments): best-match IoU "
            f"{quality['best_match_iou']:.3f}  coverage {quality['coverage']:.3f}  "
            f"candidates/image {quality['candidates_per_image']:.1f}  best candidate named "
            f"right {quality['candidate_class_accuracy']:.3f}")
        summary["pseudo_mask_quality"] = quality
    log(f"done in {time.perf_counter() - start:.0f} s")
    return summary


def with_toy_clip(cfg: Config, log: Callable[[str], None] = print) -> Config:
    """`clip.pretrained: toy` means "the toy CLIP of the `toy_clip` section": resolve it to the
    cached checkpoint (pretraining it once if needed), so every later step — pseudo masks,
    training, evaluation, on any worker — loads it like any other local checkpoint."""
    if cfg.clip.pretrained != "toy":
        return cfg
    from splitmatch.config import config_from_dict, to_dict

    checkpoint = str(toy_clip_checkpoint(cfg.toy_clip, build=True, log=log))
    if storage.is_remote(cfg.toy_clip.cache_dir):  # each node fetches it from there
        checkpoint = storage.join(checkpoint_location(cfg.toy_clip), CHECKPOINT_NAME)
    data = to_dict(cfg)
    data["clip"].update(model_name=cfg.toy_clip.model_name, pretrained=checkpoint)
    return config_from_dict(data, "toy CLIP")


__all__ = [
    "DEFAULT_RECIPE",
    "ToyClipRecipe",
    "checkpoint_dir",
    "checkpoint_info",
    "checkpoint_inputs",
    "checkpoint_key",
    "checkpoint_location",
    "contrastive_loss",
    "create_model",
    "jaccard_targets",
    "main_toy_clip",
    "make_caption",
    "pretrain_toy_clip",
    "pseudo_mask_quality",
    "toy_clip_checkpoint",
    "train_toy_clip",
    "training_batch",
    "training_sample",
    "visible_classes",
    "with_toy_clip",
    "zero_shot_accuracy",
    "zero_shot_images",
    "zero_shot_report",
]
