"""Choosing among a run's evaluations on val against keeping its last weights, scored honestly on
development splits (issue 35, the demo's spread): val is cut in two halves. Half A is the
development split's val (images 0-63 of the toy world's val), on which the run chose its
best_model.pt (train.eval_every below max_iters) and on which both policies choose their
seen-score calibration; half B is images 64-127 of the same val, which no choice looked at and
on which both are scored. The toy world draws image i of a split from (seed, split, i) alone, so
A's images are the first 64 of the 128.

    python docs/results/checkpoint_selection.py STORE [--rows-folder plus_SMplus_MFE]

STORE holds the rows of `splitmatch ablation CONFIG --splits K --seeds S --rows
+SM+MFE,+SM+MFE+RQ` run with `--set train.eval_every=E` (E < max_iters, checkpoint_every =
max_iters): per run, the last weights are the final checkpoint's, the chosen ones best_model.pt.
Prints one line per run and, last, the JSON of the figures, the paired differences (chosen −
last) with their two-stage bootstrap intervals, and each policy's standard deviation over the
runs.
"""
import argparse
import dataclasses
import json
import re
import statistics
import sys
from pathlib import Path

import torch
from torch.utils.data import Subset

from splitmatch.calibration import calibrate, evaluate_calibrations
from splitmatch.checkpoints import load_state, newest_checkpoint
from splitmatch.clip import build_clip
from splitmatch.config import load_config
from splitmatch.data import build_dataset
from splitmatch.engine import build_class_space
from splitmatch.model import build_segmentor
from splitmatch.stats import paired_difference, rounded

METRICS = ("hIoU", "sIoU", "uIoU")


def score(cfg, weights: dict, clip, classes, half_a, half_b) -> dict:
    """Calibrated on half A (auto, the config's grid), scored on half B at that value."""
    model = build_segmentor(cfg.model, embed_dim=classes.text.shape[1])
    model.load_state_dict(weights)
    device = torch.device("cpu")
    chosen = calibrate(model, half_a, f"val[0:{len(half_a)}]", classes, cfg.inference, device)
    on_b = evaluate_calibrations(model, half_b, classes, cfg.inference, [chosen.value], device)
    return {"calibration": chosen.value, **{m: float(on_b[chosen.value][m]) for m in METRICS},
            **{f"A_{m}": float(chosen.select[m]) for m in METRICS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", type=Path)
    parser.add_argument("--rows-folder", default="plus_SMplus_MFE")
    parser.add_argument("--random-queries", type=int, default=8)
    args = parser.parse_args()
    pattern = re.compile(rf".*-ablation-(dev\d+)-s(\d+)-{re.escape(args.rows_folder)}$")
    runs = {}
    for run_dir in sorted(args.store.iterdir()):
        found = pattern.match(run_dir.name)
        if not found or not (run_dir / "best_model.pt").is_file():
            continue
        cfg = load_config(run_dir / "config.yaml",
                          [f"inference.num_random_queries={args.random_queries}"])
        assert cfg.train.eval_every < cfg.train.max_iters, f"{run_dir}: chose on one evaluation"
        newest = newest_checkpoint(run_dir)
        if newest is None or newest[1] < cfg.train.max_iters:
            continue  # still training
        size = cfg.data.toyworld.num_val
        twice = dataclasses.replace(cfg.data, toyworld=dataclasses.replace(
            cfg.data.toyworld, num_val=2 * size))
        half_a = build_dataset(cfg.data, "val", train=False)
        half_b = Subset(build_dataset(twice, "val", train=False), range(size, 2 * size))
        clip = build_clip(cfg.clip, device=torch.device("cpu"))
        classes = build_class_space(cfg, clip)
        last_state = load_state(newest[0])
        pair = f"{found.group(1)}-s{found.group(2)}"
        chosen = load_state(run_dir / "best_model.pt")["model"]
        figures = {"same_weights": all(torch.equal(last_state["model"][k], chosen[k])
                                       for k in chosen)}
        # Each policy's random queries are drawn from the run's seed: the same ones for both.
        torch.manual_seed(cfg.seed)
        figures["last"] = score(cfg, last_state["model"], clip, classes, half_a, half_b)
        torch.manual_seed(cfg.seed)
        figures["chosen"] = (dict(figures["last"]) if figures["same_weights"] else
                             score(cfg, chosen, clip, classes, half_a, half_b))
        runs[pair] = figures
        print(f"{pair}: " + "  ".join(
            f"{m} {figures['last'][m]:.2f} -> {figures['chosen'][m]:.2f}" for m in METRICS)
            + ("  (chose the last)" if figures["same_weights"] else ""), flush=True)
    key = lambda p: (p.split("-s")[0], int(p.split("-s")[1]))  # noqa: E731
    out = {"split": "val halves: choose on images 0-63, score on 64-127", "runs": runs,
           "difference": {m: rounded(paired_difference(
               {key(p): f["chosen"][m] for p, f in runs.items()},
               {key(p): f["last"][m] for p, f in runs.items()})) for m in METRICS},
           "std": {policy: {m: round(statistics.stdev(f[policy][m] for f in runs.values()), 2)
                            if len(runs) > 1 else None
                            for m in METRICS} for policy in ("last", "chosen")}}
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
