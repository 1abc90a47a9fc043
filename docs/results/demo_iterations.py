"""800 against 500 iterations at the demo's budget on development splits' val (issue 35): the
paired difference of the +SM+MFE+RQ row's val figures per (split, seed), its two-stage bootstrap
interval, and each arm's standard deviation over the runs.

    python docs/results/demo_iterations.py ABLATION_LOG_800 CHECKPOINT_SELECTION_JSON

ABLATION_LOG_800 is the output of the 800-iteration ablation (its lines
"[devK (...), seed S] +SM+MFE+RQ: val hIoU h  sIoU s  uIoU u"); the 500 arm is the "last" policy's
half-A figures in toyworld-dev-checkpoint-selection.json (the final weights on the whole val, as
a run scores itself). Prints one line per pair and, last, the JSON.
"""
import json
import statistics
import sys
from pathlib import Path

from paired_logs import METRICS, run_figures  # this folder's reader of ablation outputs
from splitmatch.stats import paired_difference, rounded


def main() -> None:
    log, selection = sys.argv[1:3]
    _, long = run_figures(Path(log), "+SM+MFE+RQ")
    short = {}
    for pair, runs in json.load(open(selection))["runs"].items():
        split, seed = pair.split("-s")
        short[(split, int(seed))] = {m: runs["last"][f"A_{m}"] for m in METRICS}
    pairs = sorted(set(long) & set(short))
    for pair in pairs:
        print(f"{pair[0]}-s{pair[1]}: " + "  ".join(
            f"{m} {short[pair][m]:.2f} -> {long[pair][m]:.2f}" for m in METRICS))
    out = {"pairs": {f"{s}-s{seed}": {"500": short[(s, seed)], "800": long[(s, seed)]}
                     for s, seed in pairs},
           "difference": {m: rounded(paired_difference({p: long[p][m] for p in pairs},
                                                       {p: short[p][m] for p in pairs}))
                          for m in METRICS},
           "mean": {arm: {m: round(statistics.mean(f[p][m] for p in pairs), 2) for m in METRICS}
                    for arm, f in (("500", short), ("800", long))},
           "std": {arm: {m: round(statistics.stdev(f[p][m] for p in pairs), 2) for m in METRICS}
                   for arm, f in (("500", short), ("800", long))}}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
