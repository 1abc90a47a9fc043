"""A stored config against a wanted one: the differences that could change a result."""
from __future__ import annotations

from splitmatch.config.history import flat_keys, stored_config_data
from splitmatch.config.loading import config_from_dict, flatten
from splitmatch.config.sections import Config


# Keys that say where or how a run is recorded, or how fast it goes, but cannot change what it
# computes: a reused run, checkpoint or row may differ in these and nothing else.
RESULT_NEUTRAL_KEYS = (
    "name", "tracking.", "storage.", "tune.", "train.log_every", "train.num_visualizations",
    "train.loader_workers", "train.max_failures", "train.storage_path", "eval.batch_size",
    "pseudo_masks.cache_dir", "pseudo_masks.batch_size", "pseudo_masks.num_actors",
    "pseudo_masks.cpus_per_actor", "pseudo_masks.gpus_per_actor", "toy_clip.cache_dir",
    "inference.max_image_side",  # read by predict only, never by training or eval
)


def config_differences(stored: Config | dict, wanted: Config | dict,
                       neutral: tuple[str, ...] = RESULT_NEUTRAL_KEYS) -> dict[str, tuple]:
    """{flattened key: (stored value, wanted value)} for every key that differs and could change
    a result (keys starting with an entry of `neutral`, or equal to one, are left out).

    A key missing from a stored dict is reported as ABSENT, not filled with today's default: the
    run was made before that setting existed, under whatever the code did then.
    """
    def flat(cfg) -> dict:
        if isinstance(cfg, Config):
            return flatten(cfg)
        cfg = stored_config_data(cfg, "<stored config>")
        full = flatten(config_from_dict(cfg, "<stored config>"))
        present = set(flat_keys(cfg))
        return {key: value if key in present else ABSENT for key, value in full.items()}

    old, new = flat(stored), flat(wanted)
    return {key: (old.get(key), new.get(key)) for key in sorted(set(old) | set(new))
            if old.get(key) != new.get(key)
            and not any(key == n or (n.endswith(".") and key.startswith(n)) for n in neutral)}


# How a stored config that predates a key shows that key in `config_differences`.
ABSENT = "(absent)"


def describe_differences(differences: dict[str, tuple], limit: int = 6) -> str:
    """"data.unseen: ['leaf'] -> ['zebra'], ..." for an error message."""
    items = [f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(differences.items())[:limit]]
    more = len(differences) - limit
    return "; ".join(items) + (f"; and {more} more" if more > 0 else "")
