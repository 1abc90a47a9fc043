"""`splitmatch pseudo` on a real local Ray instance with the tiny CLIP: cache keys, resume after a
kill, failure recording, and what training reads back."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from splitmatch.config import config_from_dict, dump_config
from splitmatch.data import build_dataset
from splitmatch.pseudo.cache import (CacheDamaged, PseudoMaskCache, cache_dir, cache_key,
                                     read_manifest, scan_shards)
from splitmatch.pseudo.pipeline import PseudoMaskFailures, run_pseudo
from helpers import toy_config


def test_cache_key_tracks_what_changes_the_result(tmp_path):
    base = toy_config(tmp_path)
    key = cache_key(base, "train")
    assert cache_key(toy_config(tmp_path), "train") == key
    # Execution settings do not change the result, so they keep the key.
    same = toy_config(tmp_path, pseudo_masks={"batch_size": 2, "num_actors": 2})
    assert cache_key(same, "train") == key
    changed = [
        toy_config(tmp_path, pseudo_masks={"scales": [4, 5]}),
        toy_config(tmp_path, pseudo_masks={"merge_threshold": 0.5}),
        toy_config(tmp_path, pseudo_masks={"min_area": 9}),
        toy_config(tmp_path, data={"unseen": ["lemon"]}),
        toy_config(tmp_path, data={"toyworld": {"num_train": 12, "num_val": 4, "image_size": 64,
                                                "seed": 1}}),
        toy_config(tmp_path, clip={"model_name": "ViT-B-16"}),
    ]
    keys = {cache_key(c, "train") for c in changed} | {cache_key(base, "val")}
    assert key not in keys and len(keys) == len(changed) + 1
    weights = tmp_path / "clip.pt"
    weights.write_bytes(b"0" * 10)
    a = cache_key(toy_config(tmp_path, clip={"pretrained": str(weights)}), "train")
    weights.write_bytes(b"1" * 11)
    assert cache_key(toy_config(tmp_path, clip={"pretrained": str(weights)}), "train") != a


def test_missing_cache_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="splitmatch pseudo exp.yaml"):
        PseudoMaskCache.open(toy_config(tmp_path), "train", config_path="exp.yaml")


def test_a_missing_data_root_is_named_before_the_missing_cache(tmp_path):
    cfg = toy_config(tmp_path, data={"dataset": "voc", "root": str(tmp_path / "VOC2012")})
    with pytest.raises(FileNotFoundError) as missing:
        PseudoMaskCache.open(cfg, "train", config_path="exp.yaml --set seed=3")
    assert str(missing.value) == (
        f"data.root: no folder at {tmp_path / 'VOC2012'} (the voc images); point data.root at "
        f"them (--set data.root=PATH), then build the missing pseudo-mask cache with: "
        f"splitmatch pseudo exp.yaml --set seed=3")


def test_the_missing_cache_hint_repeats_the_users_overrides(tmp_path, ray_cluster, monkeypatch,
                                                             capsys):
    from splitmatch import cli
    from splitmatch.config import load_config
    from helpers import SHORT, write_config

    path = write_config(tmp_path, "hint", **SHORT)
    overrides = ["seed=3", "pseudo_masks.min_area=9", "pseudo_masks.scales=[4, 8]"]
    monkeypatch.chdir(tmp_path)
    code = cli.main(["train", str(path), *(a for o in overrides for a in ("--set", o))])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1, err
    # The command it suggests builds the cache of this config, overrides and all (min_area and
    # the scales change the cache's key), and is one a shell takes as printed.
    assert (f"build it with: splitmatch pseudo {path} --set seed=3 --set pseudo_masks.min_area=9 "
            f"--set 'pseudo_masks.scales=[4, 8]' [traceback: ") in err
    assert cache_key(load_config(path, overrides), "train") in err


@pytest.fixture(scope="module")
def toy_cache(ray_cluster, tmp_path_factory):
    """(folder, manifest): toy_config's 12-image cache, built once for this module's tests that
    start from a complete one (toy_config(folder) finds it). A test that damages it works on a
    copy; the build itself is asserted by test_pipeline_builds_a_complete_cache."""
    folder = tmp_path_factory.mktemp("toy-cache")
    return folder, run_pseudo(toy_config(folder), log=lambda *_: None)


def test_pipeline_builds_a_complete_cache(toy_cache, monkeypatch):
    folder, manifest = toy_cache
    cfg = toy_config(folder)
    assert manifest["complete"] and not manifest["failures"]
    assert manifest["stats"]["succeeded"] == 12 and manifest["stats"]["candidates_per_image_mean"] > 0
    assert 0 <= manifest["quality"]["best_match_iou"] <= 1 and 0 <= manifest["quality"]["coverage"] <= 1
    cache = PseudoMaskCache.open(cfg, "train")
    train = build_dataset(cfg.data, "train", train=True, augment=False)
    for i in range(12):
        cmap, embeds = cache.get(i)
        label = train[i]["label"]
        assert cmap.shape == label.shape and embeds.shape == (int(cmap.max()), 64)
        assert not ((cmap > 0) & (label != 255)).any(), "a candidate covers an annotated pixel"
    # A second run finds everything cached and does no work.
    again = run_pseudo(cfg, log=lambda *_: None)
    assert again["shards"] == manifest["shards"] and again["images_per_second"] is None

    # Training samples carry the candidates through the same random crop/flip as the label.
    augmented = build_dataset(cfg.data, "train", train=True, seed=3, candidates=cache)
    plain = build_dataset(cfg.data, "train", train=True, seed=3)
    for epoch in range(3):
        augmented.set_epoch(epoch), plain.set_epoch(epoch)
        for i in range(12):
            sample = augmented[i]
            assert torch.equal(sample["label"], plain[i]["label"])  # same draw, same label
            cmap = sample["candidate_map"]
            assert cmap.dtype == torch.uint8 and cmap.shape == sample["label"].shape
            assert not ((cmap > 0) & (sample["label"] != 255)).any()
            assert int(cmap.max()) <= sample["candidate_embeds"].shape[0]
    # With background prompts (same cache: the key ignores them), training reads each image
    # without the candidates whose Cu is nearer those prompts than to every seen class text.
    from splitmatch.clip import build_clip
    from splitmatch.pseudo.background import background_candidates, background_embedding
    from splitmatch.pseudo.training_candidates import TrainingCandidates, training_candidates
    from splitmatch.engine import build_class_space
    prompts = ["a photo of the background.", "an empty scene."]
    bg_cfg = toy_config(folder, pseudo_masks={"background_prompts": prompts})
    assert cache_key(bg_cfg, "train") == cache_key(cfg, "train")
    clip = build_clip(bg_cfg.clip)
    seen_text = build_class_space(bg_cfg, clip).seen_text
    bg_reads = training_candidates(bg_cfg, clip, seen_text)
    assert torch.equal(bg_reads.background_text, background_embedding(clip, prompts))
    assert bg_reads.center is None
    plain_reads = training_candidates(cfg, clip, seen_text)
    assert plain_reads.background_text is None and plain_reads.center is None
    assert all(torch.equal(plain_reads.get(i)[1], cache.get(i)[1]) for i in range(12))
    # With model.center_embeddings the same candidates are read less the mean of every kept Cu
    # (the cache and its key are unchanged: centring happens on read).
    center_cfg = toy_config(folder, pseudo_masks={"background_prompts": prompts},
                            model={"center_embeddings": True})
    assert cache_key(center_cfg, "train") == cache_key(cfg, "train")
    centered_reads = training_candidates(center_cfg, clip, seen_text)
    kept = [bg_reads.get(i) for i in cache.indices()]
    mean = torch.nn.functional.normalize(torch.cat([e for _, e in kept]).float(), dim=-1).mean(0)
    assert torch.allclose(centered_reads.center, mean, atol=1e-6)
    for i in cache.indices():
        cmap_c, embeds_c = centered_reads.get(i)
        assert torch.equal(cmap_c, kept[i][0])
        expected = torch.nn.functional.normalize(kept[i][1].float() - mean, dim=-1)
        assert torch.allclose(embeds_c, expected, atol=1e-6)
    # The tiny CLIP is random and its embeddings nearly parallel, so stand-ins make the split
    # sure: image 0's first candidate as "background", the candidate least like it as "seen".
    everything = torch.cat([cache.get(i)[1].float() for i in range(12)])
    background = everything[0]
    seen_like = everything[(everything @ background).argmin()][None]
    reads = TrainingCandidates(cache, seen_like, background)
    dropped = kept_total = 0
    for i in range(12):
        cmap, embeds = cache.get(i)
        drop = background_candidates(embeds, seen_like, background)
        kept_map, kept = reads.get(i)
        assert torch.equal(kept, embeds[~drop])
        kept_ids = (torch.nonzero(~drop)[:, 0] + 1).tolist()
        assert torch.equal(kept_map > 0, torch.isin(cmap.long(), torch.tensor(kept_ids)))
        dropped += int(drop.sum())
        kept_total += int((~drop).sum())
    assert dropped > 0 and kept_total > 0
    # Reads are remembered up to REMEMBER_BYTES (here two images' worth): a read again gives the
    # same values, as copies, and the images past the budget come from the cache as before.
    import splitmatch.pseudo.training_candidates as candidates_module
    first = [reads.get(i) for i in range(12)]
    monkeypatch.setattr(candidates_module, "REMEMBER_BYTES",
                        sum(t.nbytes for i in (0, 1) for t in first[i]))
    again = TrainingCandidates(cache, seen_like, background)
    for _ in range(2):
        for i in range(12):
            cmap, embeds = again.get(i)
            assert torch.equal(cmap, first[i][0]) and torch.equal(embeds, first[i][1])
            cmap.zero_(), embeds.zero_()
    assert sorted(again._remembered) == [0, 1]
    # ... and reach the loss: a training step has a cosine term on candidate queries.
    from torch.utils.data import DataLoader

    from splitmatch.criterion import build_criterion
    from splitmatch.data import collate
    from splitmatch.matcher import build_matcher
    from splitmatch.model import build_segmentor
    from splitmatch.engine import training_step
    small = config_from_dict({**yaml.safe_load(dump_config(cfg)), "model": {
        "backbone": "resnet18", "pixel_decoder": "fpn", "hidden_dim": 32, "mask_dim": 32,
        "num_heads": 2, "dim_feedforward": 64, "enc_layers": 0, "dec_layers": 1,
        "num_seen_queries": 6, "num_candidate_queries": 6, "mfe": {"num_groups": 8}},
        "loss": {"num_points": 128}})
    torch.manual_seed(0)
    classes = build_class_space(small, build_clip(small.clip))
    model = build_segmentor(small.model, classes.text.shape[1])
    criterion = build_criterion(small.loss, build_matcher(small.matching, small.loss, 6, 6),
                                small.data.ignore_index, num_seen_queries=6)
    batch = next(iter(DataLoader(augmented, batch_size=4, collate_fn=collate)))
    losses = training_step(model, criterion, batch, classes, True, torch.device("cpu"))
    assert losses["loss_cos"] > 0
    # Table 3's Fu + MLP candidates: the same batch trains, and the MLP gets gradients.
    dense = config_from_dict({**yaml.safe_load(dump_config(small)),
                              "model": {**yaml.safe_load(dump_config(small))["model"],
                                        "candidate_embedding": "dense_mlp"}})
    model = build_segmentor(dense.model, classes.text.shape[1])
    losses = training_step(model, criterion, batch, classes, True, torch.device("cpu"),
                           candidate_embedding="dense_mlp")
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_cos"] > 0
    sum(losses.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in model.candidate_mlp.parameters())


def write_voc(root: Path, corrupt: str) -> None:
    for sub in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    names = [f"img{i}" for i in range(5)]
    rng = np.random.default_rng(0)
    for name in names:
        label = np.zeros((48, 64), np.uint8)
        label[10:30, 10:30] = 5  # a seen object (bottle); the rest is background → ignore
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(
            root / "JPEGImages" / f"{name}.jpg")
        Image.fromarray(label).save(root / "SegmentationClassAug" / f"{name}.png")
    (root / "JPEGImages" / f"{corrupt}.jpg").write_bytes(b"this is not a jpeg")
    (root / "ImageSets/Segmentation/train_aug.txt").write_text("\n".join(names))


@pytest.mark.slow
def test_failed_images_follow_on_error_and_are_retried(tmp_path, ray_cluster):
    root = tmp_path / "VOC2012"
    write_voc(root, corrupt="img3")
    voc = {"dataset": "voc", "root": str(root), "train_split": "train_aug"}
    quiet = lambda *_: None  # noqa: E731
    # on_error "raise" (the default): the other images are done and kept, the run fails naming it.
    cfg = toy_config(tmp_path, data=voc)
    with pytest.raises(PseudoMaskFailures, match="1 of 5 images failed .data.on_error is 'raise'"
                                                 ".*img3.jpg"):
        run_pseudo(cfg, log=quiet)
    manifest = json.loads((cache_dir(cfg, "train_aug") / "manifest.json").read_text())
    assert not manifest["complete"] and manifest["stats"]["succeeded"] == 4
    with pytest.raises(FileNotFoundError, match="missing or incomplete"):
        PseudoMaskCache.open(cfg, "train_aug")
    # The command line says it in one line and exits 1.
    config_file = tmp_path / "voc.yaml"
    config_file.write_text(dump_config(cfg))
    cli = subprocess.run([sys.executable, "-m", "splitmatch.cli", "pseudo", str(config_file)],
                         env=dict(os.environ, RAY_ADDRESS=ray_cluster), capture_output=True,
                         text=True, timeout=300)
    assert cli.returncode == 1 and "Traceback" not in cli.stderr
    last = cli.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 1 of 5 images failed") and "img3.jpg" in last
    # Ray's own lines stay hidden without --verbose: Ray Data's plan and timing lines, the core
    # worker's C++ notices (its start line, actor-restart warnings).
    for notice in ("streaming_executor", "logging.cc", "core_worker.cc", "Progress bars"):
        assert notice not in cli.stdout + cli.stderr, (notice, cli.stderr[-3000:])

    # "skip": one failure in five is over the default limit of 1%, within a limit of 25%.
    with pytest.raises(PseudoMaskFailures, match="max_failed_fraction=0.01"):
        run_pseudo(toy_config(tmp_path, data={**voc, "on_error": "skip"}), log=quiet)
    lenient = toy_config(tmp_path, data={**voc, "on_error": "skip"},
                         pseudo_masks={"max_failed_fraction": 0.25})
    manifest = run_pseudo(lenient, log=quiet)
    assert manifest["complete"] and manifest["stats"]["succeeded"] == 4
    (failure,) = manifest["failures"]
    assert failure["index"] == 3 and "img3.jpg" in failure["error"] + failure["path"]
    cache = PseudoMaskCache.open(lenient, "train_aug")
    assert 3 not in cache and 2 in cache
    with pytest.raises(KeyError, match="image 3"):
        cache.get(3)
    assert manifest["quality"] is None  # only the toy world knows its hidden unseen objects

    # The file is fixed: the next run tries that image again (and only it), and it succeeds.
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(root / "JPEGImages" / "img3.jpg")
    logs = []
    manifest = run_pseudo(cfg, log=logs.append)
    assert "4 cached, 1 to do (1 that failed before)" in logs[0], logs[0]
    assert manifest["complete"] and not manifest["failures"] and 3 in PseudoMaskCache.open(cfg, "train_aug")


def test_damaged_cache_files_are_named_and_rebuilt(tmp_path, toy_cache):
    # The module's complete cache, copied: this test damages it.
    shutil.copytree(toy_cache[0] / "cache", tmp_path / "cache")
    cfg = toy_config(tmp_path)
    quiet = lambda *_: None  # noqa: E731
    manifest = toy_cache[1]
    root = cache_dir(cfg, "train")
    assert read_manifest(root)["shards"] == manifest["shards"]  # the copy is that cache
    name = sorted(manifest["shards"])[0]
    assert set(manifest["shards"][name]) == {"bytes", "sha256"}
    shard = root / "shards" / name
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # truncated, as by a full disk
    with pytest.raises(CacheDamaged, match=f"{name} is damaged .* bytes, the manifest recorded "
                                           f"{len(data)}.*rebuild it with: splitmatch pseudo"):
        PseudoMaskCache.open(cfg, "train")
    logs = []
    manifest = run_pseudo(cfg, log=logs.append)
    assert any(f"damaged pseudo-mask shard {shard}" in line for line in logs), logs
    assert manifest["complete"] and manifest["stats"]["processed"] == 12
    assert "8 cached, 4 to do" in logs[1]  # only the damaged shard's images were redone

    # The same size with other bytes: only the checksum sees it.
    name = sorted(manifest["shards"])[-1]
    shard = root / "shards" / name
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheDamaged, match="sha256 differs"):
        PseudoMaskCache.open(cfg, "train")
    # A damaged manifest is named too (not a bare JSONDecodeError); training with
    # --build-pseudo-masks rebuilds what is damaged, checking the unrecorded shards by loading.
    (root / "manifest.json").write_text('{"key": ')
    with pytest.raises(CacheDamaged, match="manifest.json is damaged"):
        PseudoMaskCache.open(cfg, "train")
    from splitmatch.train import open_pseudo_masks
    cache = open_pseudo_masks(cfg, build=True, log=quiet)
    assert all(i in cache for i in range(12))


def test_two_runs_on_one_cache_do_the_work_once(tmp_path, ray_cluster):
    cfg = toy_config(tmp_path)
    config_file = tmp_path / "pseudo.yaml"
    config_file.write_text(dump_config(cfg))
    env = dict(os.environ, RAY_ADDRESS=ray_cluster)
    runs = [subprocess.Popen([sys.executable, "-m", "splitmatch.cli", "pseudo", str(config_file)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for _ in range(2)]
    outputs = [run.communicate(timeout=400)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    # One of them computed the 12 images; the other waited for the lock and found them cached.
    assert sorted("12 cached, 0 to do" in out for out in outputs) == [False, True], outputs
    assert sum("processed 12 images" in out for out in outputs) == 1


def test_killed_run_resumes_with_one_record_per_image(tmp_path, ray_cluster):
    cfg = toy_config(tmp_path, data={"toyworld": {"num_train": 40, "num_val": 4, "image_size": 64}},
                     pseudo_masks={"batch_size": 2})
    config_file = tmp_path / "pseudo.yaml"
    config_file.write_text(dump_config(cfg))
    shard_dir = cache_dir(cfg, "train") / "shards"
    env = dict(os.environ, RAY_ADDRESS=ray_cluster, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "splitmatch.cli", "pseudo", str(config_file)],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and len(list(shard_dir.glob("shard-*.npz"))) < 3:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # a real crash: no clean-up code runs
    proc.wait()
    before = {p.name: p.stat().st_mtime_ns for p in shard_dir.glob("shard-*.npz")}
    assert 3 <= len(before) and len(scan_shards(shard_dir)) < 40
    assert not (shard_dir.parent / "manifest.json").exists()

    manifest = run_pseudo(cfg, log=lambda *_: None)
    assert manifest["complete"]
    records = []
    for name in manifest["shards"]:
        with np.load(shard_dir / name) as shard:
            records += shard["indices"].tolist()
    assert sorted(records) == list(range(40)), "every image exactly once"
    for name, mtime in before.items():  # finished shards were kept, not recomputed
        assert (shard_dir / name).stat().st_mtime_ns == mtime
    assert json.loads((shard_dir.parent / "manifest.json").read_text())["stats"]["processed"] == 40
