"""The benchmark scripts' config modes, on the tiny model: what they time is the real work (the
pseudo-mask kernel on the config's own images, the training loop's own step), and their figures
are consistent. The figures themselves are for people, not asserted."""
import json
import math
import os

import pytest
import torch

from splitmatch.bench.paired import FINISH, START, run_paired
from splitmatch.bench.pseudo import run as bench_pseudo
from splitmatch.bench.train import run_in_process
from splitmatch.clip import build_clip
from splitmatch.config import load_config
from splitmatch.data import build_dataset
from splitmatch.errors import UserError
from splitmatch.pseudo.kernel import build_kernel
from splitmatch.targets import embedding_center
from splitmatch.engine import build_parts
from helpers import write_config


def test_pseudo_bench_times_the_configs_kernel_on_its_images(tmp_path, capsys):
    path = write_config(tmp_path, "bench")
    result = bench_pseudo(num_images=5, repeats=1, device="cpu", config=path)
    out = capsys.readouterr().out
    assert "clip=splitmatch-tiny-vit" in out and "images=5 batch=5" in out
    assert "scales=[4, 6]" in out and "dense_grid=(8, 8)" in out  # the config's, not the toy default's

    # The same candidates as the kernel built from the config finds on the same images.
    cfg = load_config(path)
    torch.manual_seed(0)
    kernel = build_kernel(cfg.pseudo_masks, build_clip(cfg.clip), cfg.data.ignore_index)
    data = build_dataset(cfg.data, cfg.data.train_split, train=True, augment=False)
    samples = [data.load(i) for i in range(5)]
    found = kernel([s["image"] for s in samples], [s["label"] for s in samples])
    assert result["candidates"] == sum(int(c.candidate_map.max()) for c in found) > 0
    assert result["images_per_s"] == pytest.approx(5 / result["kernel_s"])
    assert 0 < result["clip_s"] and result["inertia_rel_diff"] < 0.05


def test_pseudo_bench_names_a_split_too_small(tmp_path):
    with pytest.raises(UserError, match="--images 999: split 'train'"):
        bench_pseudo(num_images=999, repeats=1, device="cpu", config=write_config(tmp_path, "small"))


def check_one_workers_loop(path, overrides):
    lines = []
    result = run_in_process(iterations=6, config=path, overrides=overrides, device="cpu",
                            log=lines.append)
    assert result["batch"] == 2 and "one of 2 worker(s)" in lines[-1] and "batch=2" in lines[-1]
    assert result["iters_per_s"] > 0 and result["peak_gb"] > 0
    shares = [result[k] for k in ("data", "matcher", "optimizer")]
    assert all(0 < s < 1 for s in shares) and sum(shares) < 1


def test_in_process_train_bench_runs_one_workers_loop(tmp_path):
    # 4 images over the config's 2 workers: batches of 2, as one Ray Train worker would get.
    check_one_workers_loop(write_config(tmp_path, "bench", batch_size=4, num_workers=2),
                           ["matching.mode=baseline"])


def test_in_process_train_bench_reads_the_cached_pseudo_masks(tmp_path, tiny_pseudo_masks):
    # The session's cache of TINY's training split: built on Ray Data, read in process.
    path = write_config(tmp_path, "bench-split", tiny_pseudo_masks, batch_size=4, num_workers=2)
    check_one_workers_loop(path, ["matching.mode=split"])
    # Centred classes (model.center_embeddings) train through the same loop; the model keeps the
    # seen texts' mean as its centre (no unseen text in it) and the candidates are read centred.
    centered = ["matching.mode=split", "model.center_embeddings=true"]
    check_one_workers_loop(path, centered)
    parts = build_parts(load_config(path, centered), 0, 1, torch.device("cpu"))
    assert torch.allclose(parts.model.text_center, embedding_center(parts.classes.seen_text))
    assert not torch.allclose(parts.model.text_center, embedding_center(parts.classes.text))
    assert parts.candidates.center is not None


def test_in_process_train_bench_needs_the_pseudo_masks(tmp_path):
    path = write_config(tmp_path, "bench-missing")
    with pytest.raises(FileNotFoundError, match="splitmatch pseudo"):
        run_in_process(iterations=2, config=path, overrides=["matching.mode=split"], device="cpu",
                       log=lambda *_: None)


def test_paired_train_bench_times_the_same_run_in_process_and_on_ray_train(tmp_path, ray_cluster,
                                                                           tiny_pseudo_masks):
    # Both sides read the session's pseudo masks (TINY's training split; the bench only opens
    # a complete cache).
    path = write_config(tmp_path, "paired", tiny_pseudo_masks, batch_size=2, num_workers=1)
    lines = []
    result = run_paired(rounds=2, iterations=4, config=path, log=lines.append)
    rounds = [line.split(":")[0] for line in lines if line.startswith("round ")]
    assert rounds == ["round 1", "round 2"]
    ratio = [line for line in lines if line.startswith("ray_train_vs_in_process=")]
    assert len(ratio) == 1 and float(ratio[0].split("=")[1]) == pytest.approx(result["ratio"], abs=1e-3)
    summary = next(line for line in lines if line.startswith("paired bench:"))
    assert "batch 2 a worker" in summary
    # Both sides ran their steps with the config's thread count (train.cpus_per_worker).
    assert "torch threads in-process 1 / Ray Train 1" in summary
    # And at the same niceness: Ray adds 15 to its workers' by default.
    own = os.getpriority(os.PRIO_PROCESS, 0)
    assert f"niceness in-process {own} / Ray Train {own}" in summary
    assert len(result["rounds"]) == 2
    for figures in result["rounds"]:
        assert 0 < figures["in_process_step_s"] < math.inf and 0 < figures["ray_train_step_s"] < math.inf
    # Every phase of the start and of the finish was measured (Ray's own shutdown is not: this
    # process was connected to the test cluster before the bench, which leaves it up).
    assert list(result["start"]) == [name for name, _, _ in START]
    assert list(result["finish"]) == [name for name, _, _ in FINISH if name != "ray_shutdown"]
    for phases in (result["start"], result["finish"]):
        assert all(math.isfinite(s) for s in phases.values()) and sum(phases.values()) > 0
    assert any(line.startswith("ray_train_start_s=") for line in lines)
    assert any(line.startswith("ray_train_finish_s=") for line in lines)
    record = json.loads(lines[-1])  # the last line: the whole result, for docs/results/
    assert record["ratio"] == result["ratio"] and record["niceness"] == [own, own]
