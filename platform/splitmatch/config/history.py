"""The schema's history: keys retired, removed and added since runs were stored, and how a
stored config (a run's config.yaml, a checkpoint's) is read by today's schema."""
from __future__ import annotations

import yaml

from splitmatch.config.sections import Config, ConfigError, InferenceConfig


# Keys merged into another since runs were stored: {old: new}.
RETIRED_KEYS = {"matching.num_points": "loss.num_points"}


# Options removed since runs were stored: {key: the value that does what the code does now}.
REMOVED_KEYS = {"model.candidate_head": False}


# Keys added since runs were stored, with the value that does what the code did before them: a
# stored config without one is read with that value (other absent keys stay ABSENT).
ADDED_KEYS = {"loss.normalization": "joint", "pseudo_masks.background_prompts": [],
              "model.center_embeddings": False, "clip.sha256": None,
              # Read only under seen_score_calibration: auto, which came with it: any grid does
              # what a run with a number did, and today's default compares equal to a new run's.
              "inference.calibration_grid": InferenceConfig().calibration_grid,
              "inference.text_center": "seen", "loss.candidate_pool": "image",
              "loss.candidate_pool_max_cosine": 0.5, "train.ema_decay": 0.0,
              "loss.cosine_balance": "none"}


def retire_keys(data: dict, source: str) -> dict:
    """`data` without its retired keys (a copy): a merged key is dropped when it agrees with the
    key it was merged into, a removed option when it asks for what the code still does; either
    is refused otherwise, since the code can no longer compute what it asked for."""
    data = yaml.safe_load(yaml.safe_dump(data))  # a deep copy
    for old, new in RETIRED_KEYS.items():
        section, key = old.split(".")
        if key not in (data.get(section) or {}):
            continue
        value = data[section].pop(key)
        new_section, new_key = new.split(".")
        current = (data.get(new_section) or {}).get(new_key)
        if current is None:  # the new key at its default
            current = getattr(getattr(Config(), new_section), new_key)
        if value != current:
            raise ConfigError(f"{source}: '{old}' ({value}) differs from '{new}' ({current}), into "
                              f"which it has been merged; set '{new}' alone")
    for old, kept in REMOVED_KEYS.items():
        section, key = old.split(".")
        if key in (data.get(section) or {}) and data[section].pop(key) != kept:
            raise ConfigError(f"{source}: '{old}' was removed (only {kept!r} remains): this run "
                              f"cannot be reproduced or reused")
    return data


def stored_config_data(data: dict, source: str) -> dict:
    """A stored config (a run's config.yaml, a checkpoint's) as today's schema reads it: retired
    keys as `retire_keys`, and an added key that the run predates at the value of the code that
    ran it (`ADDED_KEYS`)."""
    data = retire_keys(data, source)
    for added, value in ADDED_KEYS.items():
        section, key = added.split(".")
        if isinstance(data.get(section), dict):
            data[section].setdefault(key, value)
    return data


def flat_keys(node: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in node.items():
        keys += flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return keys
