"""The pseudo-mask cache: content-addressed folders of atomically written NPZ shards + a manifest.

Layout of `{pseudo_masks.cache_dir}/{key}/`:
    key.json            what the key was computed from (dataset split, CLIP, pseudo-mask settings)
    shards/*.npz        one per kernel batch, written to a temporary name then renamed, so a crash
                        never leaves a half shard that looks complete
    manifest.json       written at the end of a run: shards (with size and sha256), failures,
                        statistics, quality
The key is a hash of everything that changes the result, so a config change gives a new folder and
never a stale cache. On object storage (`s3://`), each node works in a local mirror of the folder
(`splitmatch.storage`): actors push each shard as they finish it, the manifest is pushed last.
Shards are plain arrays (`allow_pickle=False` on read): nothing executable.
A shard whose size or checksum differs from the manifest, or that does not load, is damaged: the
reader refuses it by name, and `splitmatch pseudo` deletes it and recomputes its images.
"""
from __future__ import annotations

import hashlib
import json
import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from splitmatch import storage
from splitmatch.clip import PACKAGE_MODEL_CONFIGS
from splitmatch.config import ClipConfig, Config
from splitmatch import splits
from splitmatch.errors import UserError
from splitmatch.files import content_key, file_sha256, remove_stale, write_atomic
from splitmatch.pseudo.kernel import KERNEL_VERSION

SHARD_FIELDS = ("indices", "ok", "errors", "paths", "map_shapes", "map_data", "num_candidates",
                "embeds", "q_segments", "q_best_iou_sum", "q_covered", "q_unseen")


def _clip_identity(clip: ClipConfig) -> dict:
    """What makes two CLIP models the same: name, weights file identity, model-config contents."""
    identity: dict = {"model_name": clip.model_name, "force_quick_gelu": clip.force_quick_gelu}
    if clip.sha256 is not None:  # the contents themselves (checked when the CLIP is built)
        identity["pretrained"] = {"sha256": clip.sha256}
    elif clip.pretrained and storage.is_remote(clip.pretrained):
        # The same object for every node (a local copy's mtime would differ between nodes).
        identity["pretrained"] = {"uri": clip.pretrained, **(storage.info(clip.pretrained) or {})}
    elif clip.pretrained and Path(clip.pretrained).is_file():
        # Size + mtime, not a content hash: hashing a 600 MB checkpoint on every start is wasteful,
        # and replacing weights in place changes the mtime.
        stat = Path(clip.pretrained).stat()
        identity["pretrained"] = {"path": str(Path(clip.pretrained).resolve()), "size": stat.st_size,
                                  "mtime_ns": stat.st_mtime_ns}
    else:
        identity["pretrained"] = clip.pretrained
    for folder in filter(None, [clip.model_config_dir, str(PACKAGE_MODEL_CONFIGS)]):
        candidate = Path(folder) / f"{clip.model_name}.json"
        if candidate.is_file():
            identity["model_config_sha256"] = file_sha256(candidate)
            break
    return identity


def cache_inputs(cfg: Config, split: str) -> dict:
    """Everything the cached result depends on (and nothing it does not, e.g. batch size)."""
    data = cfg.data
    unseen = sorted(data.unseen) if data.unseen is not None else sorted(splits.default_unseen(data.dataset))
    dataset: dict = {"name": data.dataset, "split": split, "unseen": unseen,
                     "ignore_index": data.ignore_index}
    if data.dataset == "toyworld":
        dataset["toyworld"] = vars(data.toyworld).copy()
    else:
        dataset["root"] = str(Path(data.root).resolve())
    p = cfg.pseudo_masks
    pseudo = {"scales": list(p.scales), "merge_threshold": p.merge_threshold, "min_area": p.min_area,
              "min_area_per": p.min_area_per, "cls_input": p.cls_input,
              "kmeans_iters": p.kmeans_iters, "kmeans_tol": p.kmeans_tol, "image_size": p.image_size}
    return {"kernel_version": KERNEL_VERSION, "dataset": dataset, "clip": _clip_identity(cfg.clip),
            "pseudo_masks": pseudo}


def cache_key(cfg: Config, split: str) -> str:
    return content_key(cache_inputs(cfg, split))


def cache_location(cfg: Config, split: str) -> str:
    """Where the cache of (cfg, split) lives: a folder, or a prefix on object storage."""
    return storage.join(cfg.pseudo_masks.cache_dir, cache_key(cfg, split))


def cache_dir(cfg: Config, split: str) -> Path:
    """The local folder read and written: the cache itself, or this node's mirror of it."""
    return storage.local_path(cache_location(cfg, split))


def pull_cache(location: str, root: Path) -> None:
    """Bring a remote cache's manifest, and the shards it lists that the mirror `root` lacks
    intact, down to `root`."""
    storage.pull(storage.join(location, "manifest.json"), root / "manifest.json", refresh=True)
    try:
        manifest = read_manifest(root)
    except CacheDamaged:
        return
    shards = (manifest or {}).get("shards") or {}
    for name, record in (shards.items() if isinstance(shards, dict) else []):
        if check_shard(root / "shards" / name, record) is not None:
            storage.pull(storage.join(location, "shards", name), root / "shards" / name,
                         refresh=True)


def write_shard(shard_dir: Path, arrays: dict[str, np.ndarray]) -> str:
    """Write one shard atomically; the name depends only on its image indices, so a retried batch
    replaces its own shard instead of adding a duplicate."""
    indices = arrays["indices"]
    digest = hashlib.sha1(np.ascontiguousarray(indices, dtype=np.int64).tobytes()).hexdigest()[:10]
    name = f"shard-{int(indices.min()):08d}-{digest}.npz"
    write_atomic(shard_dir / name, lambda handle: np.savez_compressed(handle, **arrays))
    return name


class CacheDamaged(UserError, FileNotFoundError):
    """A cache file that cannot be trusted; it counts as missing (`--build-pseudo-masks` and
    `splitmatch pseudo` rebuild it)."""


def shard_file_record(path: Path) -> dict:
    """What the manifest records of a shard to check it later: its size and sha256."""
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def check_shard(path: Path, expected: dict | None) -> str | None:
    """Why the shard at `path` cannot be used (None if it can): missing, another size or checksum
    than the manifest recorded, or arrays that do not load (zip CRCs catch what has no record)."""
    if not path.is_file():
        return "missing"
    if expected is not None:
        if path.stat().st_size != expected["bytes"]:
            return f"{path.stat().st_size} bytes, the manifest recorded {expected['bytes']}"
        if file_sha256(path) != expected["sha256"]:
            return "its sha256 differs from the manifest's"
        return None
    try:
        with np.load(path, allow_pickle=False) as shard:
            for name in SHARD_FIELDS:
                shard[name]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        return f"unreadable ({type(exc).__name__}: {exc})"
    return None


def read_manifest(root: Path) -> dict | None:
    """The manifest of a cache folder; None if there is none, CacheDamaged if it does not parse."""
    path = Path(root) / "manifest.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CacheDamaged(f"{path} is damaged ({exc})") from exc


def scan_shards(shard_dir: Path, recorded: dict | None = None, log=print) -> dict[int, dict]:
    """One record per image index found in usable shards: a successful record wins over a
    failed one (an image that failed and was redone), else the first shard by name.

    `recorded` maps shard names to the manifest's size/sha256 records, where there are any.
    Damaged shards are deleted (and named): their images count as not done.
    """
    records: dict[int, dict] = {}
    for path in sorted(shard_dir.glob("shard-*.npz")):
        problem = check_shard(path, (recorded or {}).get(path.name))
        if problem is not None:
            log(f"damaged pseudo-mask shard {path}: {problem}; deleted, its images are redone")
            path.unlink()
            continue
        with np.load(path, allow_pickle=False) as shard:
            indices, ok = shard["indices"], shard["ok"]
            errors, paths, counts = shard["errors"], shard["paths"], shard["num_candidates"]
            quality = [shard[k] for k in ("q_segments", "q_best_iou_sum", "q_covered", "q_unseen")]
            node = str(shard["node"]) if "node" in shard.files else ""  # older shards: unknown
        for pos, index in enumerate(indices.tolist()):
            if index in records and (records[index]["ok"] or not ok[pos]):
                continue
            records[index] = {"shard": path.name, "pos": pos, "ok": bool(ok[pos]),
                              "error": str(errors[pos]), "path": str(paths[pos]),
                              "num_candidates": int(counts[pos]), "node": node,
                              "quality": [float(q[pos]) for q in quality]}
    return records


def remove_temporaries(shard_dir: Path) -> int:
    """Delete half-written shards left by a crash (they never carry a final name)."""
    return remove_stale(shard_dir, ".shard-*.tmp")


class PseudoMaskCache:
    """Read side: candidate map + Cu of an image index, from a complete cache folder."""

    def __init__(self, root: Path, max_open_shards: int = 4):
        self.root = Path(root)
        manifest = read_manifest(self.root)
        if manifest is None:
            raise FileNotFoundError(f"no pseudo-mask manifest at {self.root / 'manifest.json'}")
        self.manifest = manifest
        self._where: dict[int, tuple[str, int, int, int]] = {}
        self._open: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()
        self.max_open_shards = max_open_shards
        shards = manifest["shards"]
        if isinstance(shards, list):  # a manifest from before shards had records: loads are checked
            shards = dict.fromkeys(shards)
        for name, record in shards.items():
            problem = check_shard(self.root / "shards" / name, record)
            if problem is not None:
                raise CacheDamaged(f"pseudo-mask shard {self.root / 'shards' / name} is damaged "
                                   f"({problem})")
            with np.load(self.root / "shards" / name, allow_pickle=False) as shard:
                shapes, counts, ok = shard["map_shapes"], shard["num_candidates"], shard["ok"]
                indices = shard["indices"]
            map_offset, embed_offset = 0, 0
            for pos, index in enumerate(indices.tolist()):
                if ok[pos] and index not in self._where:
                    self._where[index] = (name, map_offset, embed_offset, pos)
                if ok[pos]:
                    map_offset += int(shapes[pos].prod())
                    embed_offset += int(counts[pos])

    @classmethod
    def open(cls, cfg: Config, split: str, config_path: str = "CONFIG") -> "PseudoMaskCache":
        """The complete cache for (cfg, split), or an error saying which command builds it.

        `config_path`: the config argument as the user gave it, their --set overrides included
        (quoted for a shell), so that the command suggested builds the cache of this config."""
        root = cache_dir(cfg, split)
        if storage.is_remote(cfg.pseudo_masks.cache_dir):
            pull_cache(cache_location(cfg, split), root)
        rebuild = f"build it with: splitmatch pseudo {config_path}"
        try:
            manifest = read_manifest(root)
            if manifest is None or not manifest.get("complete"):
                data_root = cfg.data.root
                if cfg.data.dataset != "toyworld" and "://" not in data_root and \
                        not Path(data_root).expanduser().is_dir():
                    # Building the cache first would only fail on the images: name the cause.
                    raise FileNotFoundError(
                        f"data.root: no folder at {Path(data_root).expanduser().resolve()} (the "
                        f"{cfg.data.dataset} images); point data.root at them (--set "
                        f"data.root=PATH), then build the missing pseudo-mask cache with: "
                        f"splitmatch pseudo {config_path}")
                raise FileNotFoundError(f"pseudo-mask cache {root.name} for split '{split}' is "
                                        f"missing or incomplete at {root}; {rebuild}")
            return cls(root)
        except CacheDamaged as exc:
            raise CacheDamaged(f"{exc}; re{rebuild}") from exc

    def __contains__(self, index: int) -> bool:
        return index in self._where

    def indices(self) -> list[int]:
        """The image indices that have pseudo masks, in order."""
        return sorted(self._where)

    def _shard(self, name: str) -> dict[str, np.ndarray]:
        if name in self._open:
            self._open.move_to_end(name)
            return self._open[name]
        with np.load(self.root / "shards" / name, allow_pickle=False) as shard:
            arrays = {k: shard[k] for k in ("map_shapes", "map_data", "num_candidates", "embeds")}
        self._open[name] = arrays
        if len(self._open) > self.max_open_shards:
            self._open.popitem(last=False)
        return arrays

    def get(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(candidate map [H, W] uint8, Cu [U, C] float16) of image `index`."""
        if index not in self._where:
            raise KeyError(f"image {index} has no pseudo masks in {self.root} (failed or absent; "
                           f"see the manifest's failures)")
        name, map_offset, embed_offset, pos = self._where[index]
        shard = self._shard(name)
        height, width = shard["map_shapes"][pos].tolist()
        count = int(shard["num_candidates"][pos])
        cmap = shard["map_data"][map_offset:map_offset + height * width].reshape(height, width)
        embeds = shard["embeds"][embed_offset:embed_offset + count]
        return torch.from_numpy(cmap.copy()), torch.from_numpy(embeds.copy())
