"""Checks of a built `Config` whose errors name the key and the file it came from: ranges,
combinations, and what the dataset and its splits allow."""
from __future__ import annotations

import re

from splitmatch import splits
from splitmatch.config.sections import Config, ConfigError


def check_positive(value: float, key: str, source: str, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = "non-negative" if allow_zero else "positive"
        raise ConfigError(f"{source}: '{key}' must be {bound}, got {value}")


MIN_IMAGE_SIDE = 32  # inference.max_image_side below this leaves no backbone feature map


RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


def validate(cfg: Config, source: str = "<config>") -> Config:
    """Reject impossible values; return `cfg` unchanged when everything is fine."""
    if not RUN_NAME.fullmatch(cfg.name):
        # The name becomes a folder under train.storage_path: a path in it would put checkpoints
        # and best_model.pt somewhere else.
        raise ConfigError(f"{source}: 'name' must be a plain name (letters, digits, '.', '_', "
                          f"'-'; no path), got {cfg.name!r}")
    for check in (_validate_model, _validate_data, _validate_pseudo_masks, _validate_inference,
                  _validate_losses, _validate_training):
        check(cfg, source)
    return cfg


def _validate_model(cfg: Config, source: str) -> None:
    m = cfg.model
    for key in ("hidden_dim", "mask_dim", "num_heads", "dim_feedforward", "dec_layers"):
        check_positive(getattr(m, key), f"model.{key}", source)
    check_positive(m.enc_layers, "model.enc_layers", source, allow_zero=True)
    if m.candidate_embedding != "cls" and not m.mfe.enabled:
        raise ConfigError(f"{source}: 'model.candidate_embedding' {m.candidate_embedding!r} is "
                          f"made from the MFE features Fu: it needs model.mfe.enabled")
    check_positive(m.num_seen_queries, "model.num_seen_queries", source)
    check_positive(m.num_candidate_queries, "model.num_candidate_queries", source, allow_zero=True)
    if m.hidden_dim % m.num_heads:
        raise ConfigError(f"{source}: 'model.hidden_dim' ({m.hidden_dim}) must be divisible by "
                          f"'model.num_heads' ({m.num_heads})")
    if m.mfe.norm == "gn" and m.hidden_dim % m.mfe.num_groups:
        raise ConfigError(f"{source}: 'model.mfe.num_groups' ({m.mfe.num_groups}) must divide "
                          f"'model.hidden_dim' ({m.hidden_dim})")


def _validate_data(cfg: Config, source: str) -> None:
    d = cfg.data
    names = splits.class_names(d.dataset)
    if d.unseen is not None:
        missing = [n for n in d.unseen if n not in names]
        if missing:
            raise ConfigError(f"{source}: 'data.unseen' names {missing}, which are not classes of "
                              f"dataset '{d.dataset}'")
        if len(set(d.unseen)) == len(names):
            raise ConfigError(f"{source}: 'data.unseen' leaves no seen class")
    check_positive(d.crop_size, "data.crop_size", source)
    check_positive(d.min_scale, "data.min_scale", source)
    if d.max_scale < d.min_scale:
        raise ConfigError(f"{source}: 'data.max_scale' must be >= 'data.min_scale'")
    if not 0 <= d.ignore_index <= 255:
        raise ConfigError(f"{source}: 'data.ignore_index' must be in 0..255")
    t = d.toyworld
    check_positive(t.num_train, "data.toyworld.num_train", source)
    check_positive(t.num_val, "data.toyworld.num_val", source)
    check_positive(t.num_test, "data.toyworld.num_test", source)
    if d.select_split is not None and d.select_split in (d.test_split, d.train_split):
        raise ConfigError(f"{source}: 'data.select_split' is {d.select_split!r}, which is also the "
                          f"{'test' if d.select_split == d.test_split else 'training'} split: "
                          f"selecting on it would bias the reported figures")
    check_positive(t.image_size, "data.toyworld.image_size", source)
    check_positive(t.min_objects, "data.toyworld.min_objects", source)
    if t.max_objects < t.min_objects:
        raise ConfigError(f"{source}: 'data.toyworld.max_objects' must be >= 'min_objects'")


def _validate_pseudo_masks(cfg: Config, source: str) -> None:
    tc = cfg.toy_clip
    for key in ("steps", "batch_size", "lr", "image_size"):
        check_positive(getattr(tc, key), f"toy_clip.{key}", source)
    p = cfg.pseudo_masks
    if not p.scales:
        raise ConfigError(f"{source}: 'pseudo_masks.scales' must not be empty")
    for i, s in enumerate(p.scales):
        check_positive(s, f"pseudo_masks.scales[{i}]", source)
    if not -1.0 <= p.merge_threshold <= 1.0:
        raise ConfigError(f"{source}: 'pseudo_masks.merge_threshold' is a cosine similarity "
                          f"and must lie in [-1, 1], got {p.merge_threshold}")
    check_positive(p.min_area, "pseudo_masks.min_area", source, allow_zero=True)
    check_positive(p.kmeans_iters, "pseudo_masks.kmeans_iters", source)
    check_positive(p.kmeans_tol, "pseudo_masks.kmeans_tol", source, allow_zero=True)
    if p.image_size is not None:
        check_positive(p.image_size, "pseudo_masks.image_size", source)
    check_positive(p.batch_size, "pseudo_masks.batch_size", source)
    check_positive(p.num_actors, "pseudo_masks.num_actors", source)
    check_positive(p.cpus_per_actor, "pseudo_masks.cpus_per_actor", source, allow_zero=True)
    check_positive(p.gpus_per_actor, "pseudo_masks.gpus_per_actor", source, allow_zero=True)


def _validate_inference(cfg: Config, source: str) -> None:
    inf = cfg.inference
    check_positive(inf.crop_size, "inference.crop_size", source)
    check_positive(inf.stride, "inference.stride", source)
    if inf.stride > inf.crop_size:
        # Pixels between windows would get no score at all.
        raise ConfigError(f"{source}: 'inference.stride' ({inf.stride}) must not exceed "
                          f"'inference.crop_size' ({inf.crop_size})")
    if inf.short_side is not None:
        check_positive(inf.short_side, "inference.short_side", source)
    if inf.max_image_side is not None and inf.max_image_side < MIN_IMAGE_SIDE:
        raise ConfigError(f"{source}: 'inference.max_image_side' must be at least "
                          f"{MIN_IMAGE_SIDE} (the backbone's coarsest stride), or null for no "
                          f"limit; got {inf.max_image_side}")
    _validate_calibration(cfg, source)
    check_positive(inf.num_random_queries, "inference.num_random_queries", source,
                   allow_zero=True)
    check_positive(cfg.eval.batch_size, "eval.batch_size", source)


def _validate_losses(cfg: Config, source: str) -> None:
    m = cfg.model
    for key in ("cost_class", "cost_mask", "cost_dice"):
        check_positive(getattr(cfg.matching, key), f"matching.{key}", source, allow_zero=True)
    lo = cfg.loss
    for key in ("class_weight", "iou_weight", "dice_weight", "cos_weight", "mfe_weight",
                "focal_gamma"):
        check_positive(getattr(lo, key), f"loss.{key}", source, allow_zero=True)
    if not 0 <= lo.focal_alpha <= 1:
        raise ConfigError(f"{source}: 'loss.focal_alpha' must lie in [0, 1]")
    check_positive(lo.num_points, "loss.num_points", source)
    if lo.oversample_ratio < 1:
        raise ConfigError(f"{source}: 'loss.oversample_ratio' must be >= 1")
    if not 0 <= lo.importance_sample_ratio <= 1:
        raise ConfigError(f"{source}: 'loss.importance_sample_ratio' must lie in [0, 1]")
    if not -1.0 <= lo.candidate_pool_max_cosine <= 1.0:
        raise ConfigError(f"{source}: 'loss.candidate_pool_max_cosine' must lie in [-1, 1]")
    if lo.candidate_pool == "batch" and m.candidate_embedding != "cls":
        raise ConfigError(f"{source}: 'loss.candidate_pool' batch pools CLIP's Cu: it needs "
                          f"model.candidate_embedding cls, not {m.candidate_embedding!r}")


def _validate_training(cfg: Config, source: str) -> None:
    o = cfg.optim
    check_positive(o.lr, "optim.lr", source)
    check_positive(o.weight_decay, "optim.weight_decay", source, allow_zero=True)
    check_positive(o.backbone_lr_mult, "optim.backbone_lr_mult", source, allow_zero=True)
    check_positive(o.warmup_iters, "optim.warmup_iters", source, allow_zero=True)
    check_positive(o.grad_clip, "optim.grad_clip", source, allow_zero=True)
    tr = cfg.train
    for key in ("max_iters", "batch_size", "num_workers", "cpus_per_worker", "checkpoint_every",
                "eval_every", "log_every"):
        check_positive(getattr(tr, key), f"train.{key}", source)
    check_positive(tr.loader_workers, "train.loader_workers", source, allow_zero=True)
    check_positive(tr.max_failures, "train.max_failures", source, allow_zero=True)
    check_positive(tr.num_visualizations, "train.num_visualizations", source, allow_zero=True)
    if not 0.0 <= tr.ema_decay < 1.0:
        raise ConfigError(f"{source}: 'train.ema_decay' must lie in [0, 1), got {tr.ema_decay}")
    if tr.ema_decay > 0 and cfg.data.select_split is None:
        raise ConfigError(f"{source}: 'train.ema_decay' ({tr.ema_decay}) keeps averaged weights "
                          f"that the selection split chooses, but 'data.select_split' is not "
                          f"set: set it (e.g. val) or set train.ema_decay to 0")
    if tr.batch_size % tr.num_workers:
        raise ConfigError(f"{source}: 'train.batch_size' ({tr.batch_size}) must be divisible by "
                          f"'train.num_workers' ({tr.num_workers}): it is the global batch")


def _validate_calibration(cfg: Config, source: str) -> None:
    grid = cfg.inference.calibration_grid
    if not grid:
        raise ConfigError(f"{source}: 'inference.calibration_grid' must not be empty")
    for i, value in enumerate(grid):
        # A probability is at most 1: subtracting 1 or more leaves no seen class any chance.
        if not 0 <= value < 1:
            raise ConfigError(f"{source}: 'inference.calibration_grid[{i}]' must lie in [0, 1), "
                              f"got {value}")
    if len(set(grid)) != len(grid):
        raise ConfigError(f"{source}: 'inference.calibration_grid' repeats a value: {grid}")
    if cfg.inference.seen_score_calibration == "auto" and cfg.data.select_split is None:
        raise ConfigError(f"{source}: 'inference.seen_score_calibration' is auto, which chooses "
                          f"on the selection split, but 'data.select_split' is not set: set it "
                          f"(e.g. val) or give the calibration a number")
