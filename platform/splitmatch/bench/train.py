"""`splitmatch bench train [--config CONFIG]`: iterations/s of a config on Ray Train (the toy
config by default, with 1 and 2 workers), peak memory per worker, and where a step's time goes
(data loading, matching, optimizer step). On a GPU the run uses bf16 autocast when `train.amp`
is set, as training does; its data and pseudo masks must be where the config says.

`--in-process` times one worker of the configured run (its batch is `train.batch_size /
train.num_workers`) with the training loop's own step, in this process and without Ray Train:
for a machine where Ray cannot be installed, or to time a step without Ray's start-up.
`--paired` (bench/paired.py) runs both, alternating, and prints what Ray Train adds."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from splitmatch.config import Config, config_from_dict, load_config, to_dict
from splitmatch.demo import DEMO_CONFIG

TOY_CONFIG = DEMO_CONFIG  # the toy world of the demo


def run(iterations: int = 40, workers: tuple[int, ...] = (1, 2), config: Path = TOY_CONFIG,
        overrides: list[str] | None = None, log=print) -> dict:
    from splitmatch.toyclip import with_toy_clip
    from splitmatch.train import launch

    base = with_toy_clip(load_config(config, overrides), log=log)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in workers:
            data = to_dict(base)
            data["name"] = f"bench_{n}w"
            # One CPU per worker on CPU, so 1 and 2 workers both fit a 2-core machine.
            cpus = data["train"]["cpus_per_worker"] if data["train"]["use_gpu"] else 1
            data["train"].update(max_iters=iterations, num_workers=n, cpus_per_worker=cpus,
                                 log_every=iterations // 2,
                                 eval_every=iterations, checkpoint_every=iterations,
                                 storage_path=str(Path(tmp) / "runs"), num_visualizations=0)
            data["tracking"] = {"uri": None, "experiment": "bench"}
            cfg = config_from_dict(data, "bench")
            result = launch(cfg, build_pseudo_masks=True, log=lambda *_: None)
            if result.error is not None:
                raise RuntimeError(f"benchmark run with {n} workers failed: {result.error}")
            m = result.metrics  # the second half of the run: warm-up excluded
            results[n] = {"iters_per_s": 1.0 / m["time/step_s"], "peak_gb": m["memory/peak_gb"],
                          "data": m["time/data_fraction"], "matcher": m["time/matcher_fraction"],
                          "optimizer": m["time/optimizer_fraction"]}
            log(f"workers={n} global_batch={cfg.train.batch_size} iters_per_s={results[n]['iters_per_s']:.2f} "
                f"images_per_s={results[n]['iters_per_s'] * cfg.train.batch_size:.1f} "
                f"peak_memory_gb={m['memory/peak_gb']:.2f}{' (GPU)' if cfg.train.use_gpu else ' (RSS)'} "
                f"data_fraction={m['time/data_fraction']:.3f} "
                f"matcher_fraction={m['time/matcher_fraction']:.3f} "
                f"optimizer_fraction={m['time/optimizer_fraction']:.3f}")
    last = results[workers[-1]]["iters_per_s"]
    log(f"iters_per_s={last:.2f}")
    return results


def run_in_process(iterations: int = 40, config: Path = TOY_CONFIG,
                   overrides: list[str] | None = None, device: str | None = None,
                   log=print) -> dict:
    from splitmatch.toyclip import with_toy_clip

    cfg = with_toy_clip(load_config(config, overrides), log=log)
    device_t = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    result = time_in_process(cfg, iterations, device_t)
    amp = cfg.train.amp and device_t.type == "cuda"
    log(f"in-process, one of {cfg.train.num_workers} worker(s): device={device_t} "
        f"batch={result['batch']} amp={'bf16' if amp else 'off'} crop={cfg.data.crop_size} "
        f"iters_per_s={result['iters_per_s']:.2f} "
        f"images_per_s={result['iters_per_s'] * result['batch']:.1f} "
        f"peak_memory_gb={result['peak_gb']:.2f}{' (GPU)' if device_t.type == 'cuda' else ' (RSS)'} "
        f"data_fraction={result['data']:.3f} matcher_fraction={result['matcher']:.3f} "
        f"optimizer_fraction={result['optimizer']:.3f}")
    return result


def time_in_process(cfg: Config, iterations: int, device: torch.device) -> dict:
    """Rank 0 of the configured run for `iterations` steps in this process, with the training
    loop's own parts, step and thread count; the figures are of the second half (the first is
    warm-up). `iters_per_s` and the shares are the StepTimer's (the steps alone), `step_s` the
    wall clock per iteration (`engine.Timeline`, as the paired bench reads the Ray Train loop)."""
    from splitmatch.engine import (StepTimer, Timeline, build_optimizer, build_parts,
                                   optimization_step, peak_memory_gb, training_batches)

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(max(1, cfg.train.cpus_per_worker))  # as train_loop_per_worker does
    parts = build_parts(cfg, 0, cfg.train.num_workers, device)
    model = parts.model.to(device)
    optimizer = build_optimizer(model, cfg.optim)
    amp = cfg.train.amp and device.type == "cuda"
    timer = StepTimer(parts.matcher, device)
    timeline = Timeline(0, iterations)
    model.train()
    for iteration, (_, batch) in enumerate(training_batches(parts, 0, iterations, timer), 1):
        optimization_step(model, optimizer, parts, cfg, batch, iteration - 1, device, amp, timer)
        timeline.iteration_done(iteration)
        if iteration == iterations // 2:  # the first half is warm-up
            timer.reset()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
    figures = timer.report()
    return {"iters_per_s": 1.0 / figures["time/step_s"], "peak_gb": peak_memory_gb(device),
            "data": figures["time/data_fraction"], "matcher": figures["time/matcher_fraction"],
            "optimizer": figures["time/optimizer_fraction"],
            "batch": cfg.train.batch_size // cfg.train.num_workers,
            "step_s": timeline.second_half_step_s(), "torch_threads": torch.get_num_threads(),
            "niceness": os.getpriority(os.PRIO_PROCESS, 0),
            "interop_threads": torch.get_num_interop_threads()}
