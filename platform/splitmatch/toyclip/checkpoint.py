"""The toy CLIP's checkpoint cache: keyed by what the weights are (a format version, the config,
the recipe), built once, published in one rename, and resolved for configs that say
`clip.pretrained: toy`."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import open_clip
import torch

from splitmatch import storage
from splitmatch.clip import build_clip
from splitmatch.config import ClipConfig, Config, ToyClipConfig
from splitmatch.files import (content_key, file_sha256, remove_stale, temporary_name,
                              write_atomic)
from splitmatch.toyclip.captions import (BACKGROUND_TEMPLATES, DEFAULT_RECIPE, SCENE_TEMPLATES,
                                         SINGLE_TEMPLATES, TEST_TEMPLATE, TEST_TEMPLATE_PROB,
                                         ToyClipRecipe)
from splitmatch.toyclip.compact import COMPACT_NAME, expand_state_dict, load_compact
from splitmatch.toyclip.quality import zero_shot_report
from splitmatch.toyclip.training import model_config_path, train_toy_clip

CHECKPOINT_NAME = "toy_clip.pt"
INFO_NAME = "toy_clip.json"
# Builds that come with the package, one folder per key: the toy config's toy CLIP, so that a
# first run loads pretrained weights as a user of real CLIP does instead of spending minutes
# pretraining, and every kind of CPU gets the same weights (each builds its own, some weaker).
# Used only for the key they were built under; any other key is pretrained as before. Shipped
# compact (`compact.py`: 4 MB instead of 29) and expanded into the cache when first used.
SHIPPED = Path(__file__).resolve().parent / "shipped"

# What the weights of a key are, beyond the config and recipe it names. Bump it when the toy
# world's drawing, the captions, the training loop or the shipped file's layout change, then
# rebuild and ship the toy config's weights (tests/toy_clip_golden.py says how). It stands in for
# hashes of those sources, which changed the key with every docstring, and for the torch and
# open_clip versions, which kept a `+cpu` build or another platform from the shipped weights: what
# a version would have guarded, tests/test_toyclip.py checks against golden files instead (the
# shipped weights' outputs on toy prompts and images, and a short training run's losses).
# 1: the keys hashed those sources and library versions (until issue 37).
TOY_CLIP_FORMAT = 2


def checkpoint_inputs(cfg: ToyClipConfig, recipe: ToyClipRecipe = DEFAULT_RECIPE) -> dict:
    """What the weights are: the format, the config (not where it is cached), the architecture,
    the recipe and caption templates."""
    toy = dataclasses.asdict(cfg)
    del toy["cache_dir"]
    return {
        "format": TOY_CLIP_FORMAT,
        "toy_clip": toy,
        "model_config": json.loads(model_config_path(cfg.model_name).read_text()),
        "recipe": dataclasses.asdict(recipe),
        "templates": {"single": SINGLE_TEMPLATES, "scene": SCENE_TEMPLATES,
                      "background": BACKGROUND_TEMPLATES,
                      "test": TEST_TEMPLATE, "test_prob": TEST_TEMPLATE_PROB},
    }


def checkpoint_key(cfg: ToyClipConfig, recipe: ToyClipRecipe = DEFAULT_RECIPE) -> str:
    return content_key(checkpoint_inputs(cfg, recipe))


def checkpoint_location(cfg: ToyClipConfig, recipe: ToyClipRecipe = DEFAULT_RECIPE) -> str:
    """The cache folder of `cfg`'s checkpoint: a local path, or a prefix on object storage."""
    return storage.join(cfg.cache_dir, checkpoint_key(cfg, recipe))


def checkpoint_dir(cfg: ToyClipConfig, recipe: ToyClipRecipe = DEFAULT_RECIPE) -> Path:
    """The local folder: the cache itself, or this node's mirror of the remote one."""
    return storage.local_path(checkpoint_location(cfg, recipe))


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
        _publish(staging, final, checkpoint_location(cfg, recipe), log)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"toy CLIP: trained in {train_seconds:.0f} s, zero-shot accuracy "
        f"{report['accuracy']:.3f}; saved {final / CHECKPOINT_NAME}")
    return final / CHECKPOINT_NAME


def _publish(staging: Path, final: Path, location: str, log: Callable[[str], None]) -> None:
    """Rename an assembled checkpoint folder into the cache in one step, and copy it to the
    cache's object storage when it has one."""
    try:
        os.rename(staging, final)
    except OSError:
        if not (final / INFO_NAME).is_file():
            raise
        # Someone published the same key meanwhile: same inputs, same weights; keep theirs.
        log(f"toy CLIP: {final} appeared meanwhile; keeping it")
    if storage.is_remote(location):  # the weights last: a reader that finds them finds the info
        storage.push(final / INFO_NAME, storage.join(location, INFO_NAME))
        storage.push(final / CHECKPOINT_NAME, storage.join(location, CHECKPOINT_NAME))


def _install_shipped(key: str, final: Path, location: str, log: Callable[[str], None]) -> bool:
    """Expand the package's build of `key` into the cache; False when the package has none."""
    shipped = SHIPPED / key
    if not (shipped / INFO_NAME).is_file():
        return False
    info = json.loads((shipped / INFO_NAME).read_text())
    if info["key"] != key:  # a misnamed folder must not pass for another config's weights
        raise ValueError(f"{shipped}: built under key {info['key']}, not {key}")
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = temporary_name(final)
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
        # The full state dict, so the cache holds what open_clip loads strictly, as for a build
        # made here; the same bytes on every machine with this torch (`stand_in_rows`).
        state = expand_state_dict(load_compact(shipped / COMPACT_NAME))
        write_atomic(staging / CHECKPOINT_NAME, lambda handle: torch.save(state, handle))
        shutil.copyfile(shipped / INFO_NAME, staging / INFO_NAME)
        _publish(staging, final, location, log)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"toy CLIP: the checkpoint of key {key} comes with splitmatch (pretrained "
        f"{info['inputs']['toy_clip']['steps']} steps in {info['train_seconds']:.0f} s); expanded "
        f"into the cache")
    return True


def toy_clip_checkpoint(cfg: ToyClipConfig, build: bool = True,
                        log: Callable[[str], None] = print,
                        recipe: ToyClipRecipe = DEFAULT_RECIPE, shipped: bool = True) -> Path:
    """The cached checkpoint for `cfg`: from the cache, else the package's build of its key
    (`shipped`), else pretrained first (once) if `build`."""
    folder = checkpoint_dir(cfg, recipe)
    location = checkpoint_location(cfg, recipe)
    if storage.is_remote(location) and storage.info(storage.join(location, CHECKPOINT_NAME)):
        for name in (INFO_NAME, CHECKPOINT_NAME):
            storage.pull(storage.join(location, name), folder / name)
    cached = (folder / CHECKPOINT_NAME).is_file() and (folder / INFO_NAME).is_file()
    if not cached and shipped:  # the key's hash is only wanted on a miss: every command comes here
        cached = _install_shipped(checkpoint_key(cfg, recipe), folder, location, log)
    if cached:
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


def with_toy_clip(cfg: Config, log: Callable[[str], None] = print) -> Config:
    """`clip.pretrained: toy` means "the toy CLIP of the `toy_clip` section": resolve it to the
    cached checkpoint (pretraining it once if needed), so every later step — pseudo masks,
    training, evaluation, on any worker — loads it like any other local checkpoint."""
    if cfg.clip.pretrained != "toy":
        return cfg
    from splitmatch.config import config_from_dict, to_dict

    local = toy_clip_checkpoint(cfg.toy_clip, build=True, log=log)
    checkpoint = str(local)
    if storage.is_remote(cfg.toy_clip.cache_dir):  # each node fetches it from there
        checkpoint = storage.join(checkpoint_location(cfg.toy_clip), CHECKPOINT_NAME)
    data = to_dict(cfg)
    # The key names the inputs, not the weights: another kind of CPU builds other weights under
    # it, so the weights' own hash goes into the config that runs and caches are checked against.
    data["clip"].update(model_name=cfg.toy_clip.model_name, pretrained=checkpoint,
                        sha256=file_sha256(local))
    return config_from_dict(data, "toy CLIP")


