"""`splitmatch pseudo`: the pseudo-mask kernel sharded over a Ray Data actor pool, cached on disk.

Each actor loads the frozen CLIP once, decodes its images itself (a corrupt image becomes a failure
row, not a failed block: Ray Data would otherwise drop or retry the whole block), runs the kernel
and writes its batch as one shard. Re-running skips every image already done in a usable shard, so
an interrupted run resumes where it stopped and ends with exactly one record per image; images
that failed are tried again on every run (a fixed file then succeeds). One run at a time per
cache key: a second waits for the first (a file lock), then reuses what it built.

Failed images follow `data.on_error`: "raise" ends the run with an error naming them once the
others are done (their shards are kept); "skip" leaves them out, up to
`pseudo_masks.max_failed_fraction` of the split.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from splitmatch import storage
from splitmatch.cluster import check_fits, init_ray
from splitmatch.config import Config, config_from_dict, to_dict
from splitmatch.data import build_dataset
from splitmatch.errors import RunFailed
from splitmatch.files import write_json_atomic
from splitmatch.progress import Progress
from splitmatch.pseudo.cache import (CacheDamaged, cache_dir, cache_inputs, cache_location,
                                     read_manifest, remove_temporaries, scan_shards,
                                     shard_file_record, write_shard)
from splitmatch.pseudo.kernel import quality_summary


class PseudoMaskActor:
    """Ray Data callable class: one frozen CLIP per actor, one shard per batch."""

    def __init__(self, config: dict, split: str, shard_dir: str, with_quality: bool,
                 remote_shards: str | None = None):
        from splitmatch.clip import build_clip
        from splitmatch.pseudo.kernel import build_kernel

        cfg = config_from_dict(config)
        # Ray sets CUDA_VISIBLE_DEVICES for actors that asked for a GPU, and hides GPUs otherwise.
        device = "cuda" if torch.cuda.is_available() else "cpu"
        torch.set_num_threads(max(1, int(cfg.pseudo_masks.cpus_per_actor)))
        self.clip = build_clip(cfg.clip, device=device)
        self.kernel = build_kernel(cfg.pseudo_masks, self.clip, cfg.data.ignore_index)
        self.train_set = build_dataset(cfg.data, split, train=True, augment=False)
        # The toy world knows where its unseen objects are: measure how well candidates find them.
        self.full_set = build_dataset(cfg.data, split, train=False) if with_quality else None
        self.shard_dir = Path(shard_dir)  # on this actor's node: a mirror when remote_shards
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        self.remote_shards = remote_shards
        import ray
        self.node = ray.get_runtime_context().get_node_id()  # which node made a shard

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from splitmatch.pseudo.kernel import candidate_quality

        indices = [int(i) for i in batch["index"]]
        samples, errors = {}, {}
        for index in indices:
            try:
                samples[index] = self.train_set.load(index)
            except Exception as exc:  # record and go on: one bad image must not stop the run
                errors[index] = f"{type(exc).__name__}: {exc}"
        good = [i for i in indices if i in samples]
        results = dict(zip(good, self.kernel([samples[i]["image"] for i in good],
                                             [samples[i]["label"] for i in good]))) if good else {}
        quality = {}
        if self.full_set is not None:
            for index in good:
                q = candidate_quality(results[index].candidate_map,
                                      self.full_set.load(index)["label"], self.train_set.unseen_ids)
                quality[index] = (q["segments"], q["best_iou_sum"], q["covered_pixels"],
                                  q["unseen_pixels"])
        maps = [results[i].candidate_map.numpy().ravel() for i in good]
        embeds = [results[i].embeds.numpy() for i in good]
        arrays = {
            "indices": np.array(indices, dtype=np.int64),
            "ok": np.array([i in results for i in indices]),
            "errors": np.array([errors.get(i, "") for i in indices], dtype=str),
            "paths": np.array([samples[i]["path"] if i in samples else self.train_set.path_of(i)
                               for i in indices], dtype=str),
            "map_shapes": np.array([tuple(results[i].candidate_map.shape) if i in results else (0, 0)
                                    for i in indices], dtype=np.int32).reshape(-1, 2),
            "map_data": np.concatenate(maps) if maps else np.zeros(0, np.uint8),
            "num_candidates": np.array([results[i].embeds.shape[0] if i in results else 0
                                        for i in indices], dtype=np.int32),
            "embeds": (np.concatenate(embeds) if embeds
                       else np.zeros((0, self.clip.embed_dim), np.float16)),
        }
        arrays["node"] = np.array(self.node)
        for k, name in enumerate(("q_segments", "q_best_iou_sum", "q_covered", "q_unseen")):
            arrays[name] = np.array([quality.get(i, (0, 0.0, 0, 0))[k] for i in indices],
                                    dtype=np.float64)
        shard = write_shard(self.shard_dir, arrays)
        if self.remote_shards is not None:  # shared at once: the driver may be on another node
            storage.push(self.shard_dir / shard, storage.join(self.remote_shards, shard))
        return {"index": arrays["indices"], "ok": arrays["ok"],
                "num_candidates": arrays["num_candidates"], "shard": np.array([shard] * len(indices))}


def _summarize(records: dict[int, dict], num_images: int, with_quality: bool) -> dict:
    ok = [r for r in records.values() if r["ok"]]
    counts = np.array([r["num_candidates"] for r in ok]) if ok else np.zeros(0)
    stats = {"images": num_images, "processed": len(records), "succeeded": len(ok),
             "failed": len(records) - len(ok),
             "candidates_per_image_mean": float(counts.mean()) if len(counts) else 0.0,
             "candidates_per_image_max": int(counts.max()) if len(counts) else 0}
    quality = None
    if with_quality:
        totals = np.array([r["quality"] for r in ok]).sum(0) if ok else np.zeros(4)
        quality = quality_summary(*totals.tolist())
    return {"stats": stats, "quality": quality}


class PseudoMaskFailures(RunFailed):
    """Images failed beyond what `data.on_error` allows; the manifest lists them."""


def run_pseudo(cfg: Config, split: str | None = None, log=print) -> dict:
    """Build (or finish) the pseudo-mask cache of `split`; returns the manifest, or raises
    PseudoMaskFailures (after writing it) when failed images exceed what the config allows."""
    import fcntl

    split = split or cfg.data.train_split
    root = cache_dir(cfg, split)
    root.mkdir(parents=True, exist_ok=True)
    # On object storage the lock only holds on this node: builders on two nodes would both
    # compute, and write the same shards and manifest (same inputs, same bytes).
    with open(root.with_name(root.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, even on a crash
        remote = cache_location(cfg, split) if storage.is_remote(cfg.pseudo_masks.cache_dir) else None
        return _build(cfg, split, root, remote, log)


def _build(cfg: Config, split: str, root: Path, remote: str | None, log) -> dict:
    import ray

    shard_dir = root / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(root / "key.json", cache_inputs(cfg, split))
    if remote is not None:
        storage.push(root / "key.json", storage.join(remote, "key.json"))
        storage.pull(storage.join(remote, "manifest.json"), root / "manifest.json", refresh=True)
        storage.pull_tree(storage.join(remote, "shards"), shard_dir)  # others' shards
    dataset = build_dataset(cfg.data, split, train=True, augment=False)
    num_images = len(dataset)
    with_quality = cfg.data.dataset == "toyworld"
    removed = remove_temporaries(shard_dir)
    try:
        recorded = (read_manifest(root) or {}).get("shards")
    except CacheDamaged as exc:
        log(f"{exc}: it is written anew")
        recorded = None
    done = scan_shards(shard_dir, recorded if isinstance(recorded, dict) else None, log)
    todo = [i for i in range(num_images) if i not in done or not done[i]["ok"]]
    retried = sum(1 for i in todo if i in done)
    log(f"pseudo masks for {cfg.data.dataset}/{split}: {num_images} images, "
        f"{num_images - len(todo)} cached, {len(todo)} to do"
        + (f" ({retried} that failed before)" if retried else "") + f" (cache {remote or root})"
        + (f"; removed {removed} partial shards" if removed else ""))
    seconds = 0.0
    if todo:
        init_ray(cfg.storage)
        p = cfg.pseudo_masks
        use_gpu = p.gpus_per_actor > 0 and ray.cluster_resources().get("GPU", 0) > 0
        # The actor pool would wait forever for actors that no node can hold.
        check_fits("pseudo-mask actor", p.num_actors,
                   {"CPU": p.cpus_per_actor, "GPU": p.gpus_per_actor if use_gpu else 0.0},
                   "pseudo_masks.num_actors / cpus_per_actor / gpus_per_actor")
        start = time.perf_counter()
        ds = ray.data.from_items([{"index": i} for i in todo])
        ds = ds.map_batches(
            PseudoMaskActor,
            fn_constructor_kwargs={"config": to_dict(cfg), "split": split,
                                   "shard_dir": str(shard_dir), "with_quality": with_quality,
                                   "remote_shards": remote and storage.join(remote, "shards")},
            batch_size=p.batch_size,
            # All actors from the start, but down to one: a pool that lost a node goes on with
            # the actors it has left.
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=p.num_actors,
                                               initial_size=p.num_actors),
            num_cpus=p.cpus_per_actor,
            num_gpus=p.gpus_per_actor if use_gpu else 0,
        )
        processed = 0
        with Progress(len(todo), "pseudo masks", "img") as bar:
            for batch in ds.iter_batches(batch_size=None):
                processed += len(batch["index"])
                bar.update(processed)
        seconds = time.perf_counter() - start
        log(f"processed {processed} images in {seconds:.1f} s on "
            f"{p.num_actors} {'GPU' if use_gpu else 'CPU'} actor(s)")
    if remote is not None:
        storage.pull_tree(storage.join(remote, "shards"), shard_dir)  # others' shards
    records = scan_shards(shard_dir, log=log)
    summary = _summarize(records, num_images, with_quality)
    failures = [{"index": i, "path": r["path"], "error": r["error"]}
                for i, r in sorted(records.items()) if not r["ok"]]
    allowed = 0 if cfg.data.on_error == "raise" else cfg.pseudo_masks.max_failed_fraction * num_images
    manifest = {
        "key": root.name, "split": split, "inputs": cache_inputs(cfg, split),
        "complete": all(i in records for i in range(num_images)) and len(failures) <= allowed,
        "shards": {name: shard_file_record(shard_dir / name)
                   for name in sorted({r["shard"] for r in records.values()})},
        "failures": failures, **summary,
        # Images per Ray node that computed them (a cluster shows every node at work).
        "nodes": {node: sum(r["node"] == node for r in records.values())
                  for node in sorted({r["node"] for r in records.values()})},
        "images_per_second": len(todo) / seconds if seconds else None,
    }
    write_json_atomic(root / "manifest.json", manifest)
    if remote is not None:  # last: a reader that finds the manifest finds every shard it lists
        storage.push(root / "manifest.json", storage.join(remote, "manifest.json"))
    stats = summary["stats"]
    log(f"images {stats['images']}  failures {stats['failed']}  candidates/image "
        f"{stats['candidates_per_image_mean']:.1f} (max {stats['candidates_per_image_max']})"
        + (f"  images/s {manifest['images_per_second']:.2f}" if manifest["images_per_second"] else ""))
    if summary["quality"]:
        q = summary["quality"]
        log(f"toy-world pseudo-mask quality on {q['unseen_segments']} hidden unseen segments: "
            f"best-match IoU {q['best_match_iou']:.3f}  coverage {q['coverage']:.3f}")
    for failure in failures[:10]:
        log(f"failed: image {failure['index']} {failure['path']}: {failure['error']}")
    if len(failures) > allowed:
        first = failures[0]
        limit = ("data.on_error is 'raise'" if cfg.data.on_error == "raise" else
                 f"more than pseudo_masks.max_failed_fraction={cfg.pseudo_masks.max_failed_fraction:g}")
        raise PseudoMaskFailures(
            f"{len(failures)} of {num_images} images failed ({limit}), e.g. {first['path']}: "
            f"{first['error']}; all are listed in {root / 'manifest.json'}; fix them and rerun "
            f"(failed images are retried), or set data.on_error=skip")
    return manifest
