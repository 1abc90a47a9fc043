"""`splitmatch bench train --paired`: what Ray Train adds to a training step and to a run's start
and finish, on one config and seed, measured in pairs.

Each round runs the config's rank 0 in this process (`bench.train.time_in_process`, no Ray) and
then the whole run on Ray Train (`train.launch`, as `splitmatch train` does), alternately, so
that both sides of a pair share the machine's hour. Both train the same config and seed: the
same batch per worker, the same torch thread count (`train.cpus_per_worker`), the same data
loader and pseudo-mask cache; each side's figure is the wall clock per iteration over the second
half of its iterations (`engine.Timeline`). The medians over the rounds give the line
`ray_train_vs_in_process=<ratio>`. With more than one worker the Ray Train side also pays for
DDP's all-reduce and for its workers sharing the machine.

Ray Train's start-up and finish come from the marks `launch` and rank 0 record (the launcher:
Ray up, fit started and returned; the controller callback: controller started; rank 0: loop
entered, set up, first / middle / last iteration, loop finished). A round starts
and shuts down a local Ray instance of its own, as a command does, unless this process was
already connected to one (then Ray's own start and shutdown are not in the figures).
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from splitmatch.bench.train import TOY_CONFIG, time_in_process
from splitmatch.config import Config, config_from_dict, load_config, to_dict

# (phase, from mark, to mark): command start to the first iteration's end, then the last
# iteration's end to Ray shut down.
START = (("ray_up", "command_started", "ray_up"),
         ("launch_checks", "ray_up", "fit_started"),
         ("controller", "fit_started", "controller_started"),
         # the worker processes, their process group, the loop's module imported (torch,
         # open_clip) and called
         ("worker_group", "controller_started", "loop_entered"),
         # CLIP's text embeddings, the training candidates, the model, the data
         ("loop_set_up", "loop_entered", "parts_built"),
         ("mlflow_open", "parts_built", "set_up"),
         ("first_iteration", "set_up", "first_iteration"))
FINISH = (("test_and_mlflow", "last_iteration", "loop_finished"),
          ("worker_group_exit", "loop_finished", "fit_returned"),
          ("ray_shutdown", "fit_returned", "ray_down"))


def run_paired(rounds: int = 3, iterations: int = 40, config: Path = TOY_CONFIG,
               overrides: list[str] | None = None, log=print) -> dict:
    import ray

    from splitmatch.toyclip import with_toy_clip

    if iterations < 4:
        raise ValueError("the paired bench needs at least 4 iterations (it times the second half)")
    own_ray = not ray.is_initialized()
    base = with_toy_clip(load_config(config, overrides), log=log)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _bench_config(base, iterations, Path(tmp))
        _pseudo_masks_ready(cfg, own_ray, log)
        pairs = []
        for number in range(1, rounds + 1):
            local = time_in_process(cfg, iterations, torch.device("cpu"))
            remote = _time_on_ray_train(cfg, f"paired_{number}", own_ray)
            pairs.append((local, remote))
            log(f"round {number}: in_process_step_s={local['step_s']:.3f} "
                f"ray_train_step_s={remote['step_s']:.3f} "
                f"(ratio {remote['step_s'] / local['step_s']:.3f}); Ray Train start "
                f"{_total(remote['start']):.1f} s, finish {_total(remote['finish']):.1f} s")
    result = _summary(pairs)
    local, remote = pairs[0]
    log(f"paired bench: {rounds} round(s) of {iterations} iterations (the second half timed), "
        f"in-process then Ray Train; one of {cfg.train.num_workers} worker(s), batch "
        f"{local['batch']} a worker; torch threads in-process {local['torch_threads']} / Ray "
        f"Train {remote['torch_threads']} (interop {local['interop_threads']} / "
        f"{remote['interop_threads']}, the Ray worker's OMP_NUM_THREADS "
        f"{remote['omp_num_threads']}); niceness in-process {local['niceness']} / Ray Train "
        f"{remote['niceness']}")
    log(f"in_process_step_s={result['in_process_step_s']:.3f} "
        f"ray_train_step_s={result['ray_train_step_s']:.3f} (medians)")
    log(f"ray_train_vs_in_process={result['ratio']:.3f}")
    for part in ("start", "finish"):
        phases = result[part]
        log(f"ray_train_{part}_s={_total(phases):.2f}: "
            + " ".join(f"{name}={seconds:.2f}" for name, seconds in phases.items()))
    # The whole result as the last line, for the records in docs/results/.
    log(json.dumps({**result, "rounds_run": rounds, "iterations": iterations,
                    "torch_threads": [local["torch_threads"], remote["torch_threads"]],
                    "niceness": [local["niceness"], remote["niceness"]]}))
    return result


def _bench_config(base: Config, iterations: int, tmp: Path) -> Config:
    """The config both sides train: `iterations` steps, a report halfway and at the end, the
    test evaluation at the end and no selection split (its calibration grid would be most of a
    short run's finish; the calibration is fixed at 0), no pictures, runs and MLflow in `tmp`."""
    data = to_dict(base)
    data["data"]["select_split"] = None
    if data["inference"]["seen_score_calibration"] == "auto":
        data["inference"]["seen_score_calibration"] = 0.0
    data["train"].update(max_iters=iterations, log_every=iterations // 2, eval_every=iterations,
                         checkpoint_every=iterations, num_visualizations=0,
                         storage_path=str(tmp / "runs"))
    data["tracking"] = {"uri": None, "experiment": "bench"}
    return config_from_dict(data, "bench")


def _pseudo_masks_ready(cfg: Config, own_ray: bool, log) -> None:
    """Both sides read the same pseudo-mask cache: built on Ray Data first if it is missing."""
    import ray

    from splitmatch.cluster import init_ray
    from splitmatch.train import open_pseudo_masks

    try:
        open_pseudo_masks(cfg)
    except FileNotFoundError:
        init_ray(cfg.storage)
        open_pseudo_masks(cfg, build=True, log=log)
        if own_ray:
            ray.shutdown()


def _time_on_ray_train(cfg: Config, name: str, own_ray: bool) -> dict:
    """The run on Ray Train as `splitmatch train` launches it; its step and its phases."""
    import ray

    from splitmatch.train import launch

    data = to_dict(cfg)
    data["name"] = name
    timeline = {"command_started": time.time()}
    result = launch(config_from_dict(data, "bench"), log=lambda *_: None, timeline=timeline)
    if result.error is not None:
        raise RuntimeError(f"the paired bench's Ray Train run {name} failed: {result.error}")
    if own_ray:
        ray.shutdown()
        timeline["ray_down"] = time.time()
    rank0 = timeline["rank0"]
    step_s = ((timeline["last_iteration"] - timeline["middle_iteration"])
              / (rank0["last"] - rank0["middle"]))
    return {"step_s": step_s, **{k: rank0[k] for k in ("torch_threads", "interop_threads",
                                                       "omp_num_threads", "niceness")},
            "start": _phases(timeline, START), "finish": _phases(timeline, FINISH)}


def _phases(timeline: dict, phases) -> dict[str, float]:
    """Seconds of each phase whose two marks the run has (Ray's shutdown only when this bench
    started Ray)."""
    return {name: timeline[end] - timeline[begin] for name, begin, end in phases
            if begin in timeline and end in timeline}


def _total(phases: dict[str, float]) -> float:
    return sum(phases.values())


def _summary(pairs: list[tuple[dict, dict]]) -> dict:
    local = statistics.median(p[0]["step_s"] for p in pairs)
    remote = statistics.median(p[1]["step_s"] for p in pairs)
    phase_medians = {}
    for part in ("start", "finish"):
        names = pairs[0][1][part]
        phase_medians[part] = {name: statistics.median(p[1][part][name] for p in pairs)
                               for name in names}
    return {"in_process_step_s": local, "ray_train_step_s": remote, "ratio": remote / local,
            "rounds": [{"in_process_step_s": a["step_s"], "ray_train_step_s": b["step_s"],
                        "start": b["start"], "finish": b["finish"]} for a, b in pairs],
            **phase_medians}
