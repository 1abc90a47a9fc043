"""From YAML (or plain data) to a validated `Config` and back: building typed sections,
`--set` overrides, packaged configs by name, absolute paths, dumping and flattening."""
from __future__ import annotations

import dataclasses
import math
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from splitmatch.config.credentials import redact, redact_text, take_credentials
from splitmatch.config.sections import Config, ConfigError
from splitmatch.config.history import retire_keys
from splitmatch.config.validation import check_positive, validate


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp` and return it in typed form."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {value!r}")
        return _build(tp, value, key, source)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{source}: '{key}' must not be null")
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _convert(value, non_none[0], key, source)
        for option in non_none:  # the first that takes the value, in the annotation's order
            try:
                return _convert(value, option, key, source)
            except ConfigError:
                pass
        raise ConfigError(f"{source}: '{key}' must be "
                          f"{' or '.join(map(_expected, non_none))}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(
                f"{source}: '{key}' must be one of {list(get_args(tp))}, got {value!r}")
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if origin is list:
        (item_tp,) = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}")
        return [_convert(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: '{key}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads 1e-4 (no dot, unsigned exponent) as text; people write it anyway.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: '{key}' must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{source}: '{key}' must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: '{key}' must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for '{key}'")


def _expected(tp: Any) -> str:
    """What an annotation accepts, in an error message's words ("a number", "'auto'")."""
    if get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in get_args(tp))
    return {float: "a number", int: "an integer", bool: "true or false",
            str: "a string"}.get(tp, f"a {getattr(tp, '__name__', tp)}")


def _build(cls: type, data: dict, prefix: str, source: str) -> Any:
    hints = get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(
                f"{source}: unknown key '{where}' (known keys here: {sorted(known)})")
    kwargs = {}
    for name in known:
        if name in data:
            where = f"{prefix}.{name}" if prefix else name
            kwargs[name] = _convert(data[name], hints[name], where, source)
    return cls(**kwargs)


SPACE_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")


def _validate_tune(cfg: Config, source: str) -> None:
    t = cfg.tune
    for key in ("num_samples", "grace_period", "reduction_factor", "max_concurrent_trials"):
        check_positive(getattr(t, key), f"tune.{key}", source)
    known = set(flatten(Config()))
    for key, spec in t.space.items():
        where = f"tune.space.{key}"
        if key not in known or key.startswith("tune."):
            raise ConfigError(f"{source}: '{where}' is not a config key that a trial can set")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SPACE_KINDS:
            raise ConfigError(f"{source}: '{where}' must be one of {{kind: values}} with kind in "
                              f"{list(SPACE_KINDS)}, got {spec!r}")
        kind, values = next(iter(spec.items()))
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{source}: '{where}.{kind}' must be a non-empty list")
        if kind in ("uniform", "loguniform", "randint") and len(values) != 2:
            raise ConfigError(f"{source}: '{where}.{kind}' must be [low, high]")
        if t.search == "grid" and kind != "grid":
            raise ConfigError(f"{source}: '{where}' uses '{kind}' but tune.search is grid")
        if kind in ("grid", "choice"):  # every value must make a valid config
            for value in values:
                try:
                    config_from_dict(apply_overrides(to_dict(cfg) | {"tune": {}},
                                                     [f"{key}={yaml_value(value)}"]), source)
                except ConfigError as exc:
                    raise ConfigError(f"{source}: '{where}' value {value!r} is invalid: {exc}") from exc


def yaml_value(value) -> str:
    """One value as compact one-line YAML, as a `--set key=VALUE` takes it ([4, 6] not a block)."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def config_from_dict(data: dict | None, source: str = "<dict>") -> Config:
    """Build and validate a `Config` from plain data (missing keys take their defaults)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    cfg = validate(_build(Config, data, "", source), source)
    _validate_tune(cfg, source)  # last: it builds a config for every value it searches
    return cfg


def apply_overrides(data: dict, overrides: list[str], source: str = "--set") -> dict:
    """Apply `key.sub=value` overrides (values parsed as YAML) to plain config data in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{source}: override {item!r} must look like key.sub=value")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: cannot parse the value of '{dotted}': {exc}") from exc
        node = data
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{source}: '{dotted}' goes through '{k}', which is not a section")
            node = child
        node[keys[-1]] = value
    return data


def config_file(argument: str | Path) -> Path:
    """The file a config argument names: a path, else one of the configs that ship with
    splitmatch by its name (`toyworld`, `toyworld.yaml`, `experiments/toyworld.yaml`)."""
    path = Path(argument)
    if path.exists():
        return path
    from splitmatch.examples import config_names, packaged_config
    packaged = packaged_config(path)
    if packaged is None:
        raise ConfigError(f"cannot read config file {path}: no such file, nor a packaged config "
                          f"of that name (packaged: {', '.join(config_names())})")
    return packaged


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML experiment file (or a packaged config by name), apply `--set` style
    overrides, validate."""
    path = config_file(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    source = str(path)
    if overrides:
        apply_overrides(data, overrides, source=f"{path} (--set)")
        source = f"{path} with --set {' '.join(redact_text(o) for o in overrides)}"
    # A run's own config.yaml may predate a merge of keys; read it as today's schema does.
    return take_credentials(config_from_dict(retire_keys(data, source), source))


def resolve_paths(cfg: Config) -> Config:
    """A copy with every local path made absolute, before anything is shipped to Ray workers or
    Tune trials (which run in other working directories)."""
    def absolute(path: str | None) -> str | None:
        if not path or "://" in path:  # unset, or a URI (s3://...): the same from everywhere
            return path
        return str(Path(path).expanduser().resolve())

    cfg = take_credentials(cfg)
    data = to_dict(cfg)
    data["data"]["root"] = absolute(cfg.data.root)
    data["train"]["storage_path"] = absolute(cfg.train.storage_path)
    data["pseudo_masks"]["cache_dir"] = absolute(cfg.pseudo_masks.cache_dir)
    data["toy_clip"]["cache_dir"] = absolute(cfg.toy_clip.cache_dir)
    if cfg.model.backbone_weights != "imagenet":
        data["model"]["backbone_weights"] = absolute(cfg.model.backbone_weights)
    data["clip"]["model_config_dir"] = absolute(cfg.clip.model_config_dir)
    if cfg.clip.pretrained and Path(cfg.clip.pretrained).expanduser().exists():
        data["clip"]["pretrained"] = absolute(cfg.clip.pretrained)
    if cfg.tracking.uri and cfg.tracking.uri.startswith("sqlite:///") and \
            not cfg.tracking.uri.startswith("sqlite:////"):
        data["tracking"]["uri"] = "sqlite:///" + absolute(cfg.tracking.uri[len("sqlite:///"):])
    return config_from_dict(data, "<resolved>")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (credentials in tracking.uri redacted); otherwise
    `config_from_dict(yaml.safe_load(dump_config(c))) == c`."""
    data = to_dict(cfg)
    data["tracking"]["uri"] = redact(data["tracking"]["uri"])
    return yaml.safe_dump(data, sort_keys=False)


def flatten(cfg: Config) -> dict[str, Any]:
    """`{"model.num_seen_queries": 100, ...}`: the form MLflow params and Tune spaces use
    (credentials in tracking.uri redacted)."""
    out: dict[str, Any] = {}

    def walk(node: dict, prefix: str) -> None:
        for k, v in node.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                walk(v, key + ".")
            else:
                out[key] = v

    walk(to_dict(cfg), "")
    out["tracking.uri"] = redact(out["tracking.uri"])
    return out
