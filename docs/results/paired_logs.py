"""Paired differences between two `splitmatch ablation` outputs over the (split, seed) pairs both
ran: a setting tried with `--set` (the variant's log) against the config as it is (the reference's
log), each row's figures as its run line printed them ("[dev0 (...), seed 0] preset: val hIoU ..").

    python docs/results/paired_logs.py VARIANT.log REFERENCE.log [--row preset] [--reference-row ROW]
        [--splits dev4 dev5 ...]

The figures compared are what the ablation reports: val on development splits, test on held-out
ones. Prints one line per pair and, last, the JSON of the estimates and
the paired differences (two-stage bootstrap over splits, then seeds: `splitmatch.stats`).
"""
import argparse
import json
import re
from pathlib import Path

from splitmatch.stats import INTERVAL, estimate, format_estimate, paired_difference, rounded

METRICS = ("hIoU", "sIoU", "uIoU")
RUN_LINE = re.compile(r"^\[(\S+) \(.*?\), seed (\d+)\] (.+?): (val .*)$", re.M)
FIGURES = re.compile(r"(val|test) hIoU (\S+)\s+sIoU (\S+)\s+uIoU ([^;\s]+)")


def run_figures(log: Path, row: str) -> tuple[str, dict]:
    """(the split the figures are of, {(split, seed): {metric: value}}) of `row`'s run lines."""
    found, split_names = {}, set()
    for split, seed, name, rest in RUN_LINE.findall(log.read_text()):
        if name == row:  # a development split's val figures, a held-out one's test figures
            figures_of, *values = next(f for f in FIGURES.findall(rest)
                                       if f[0] == ("test" if split.startswith("holdout") else "val"))
            found[(split, int(seed))] = dict(zip(METRICS, map(float, values)))
            split_names.add(figures_of)
    if not found:
        raise SystemExit(f"{log}: no run line of row '{row}'")
    return ",".join(sorted(split_names)), found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant", type=Path)
    parser.add_argument("reference", type=Path)
    parser.add_argument("--row", default="preset", help="the variant log's row")
    parser.add_argument("--reference-row", default=None, help="the reference's (default: --row)")
    parser.add_argument("--splits", nargs="+", default=None,
                        help="only these splits' pairs (e.g. the fresh ones of a replication)")
    args = parser.parse_args()
    read_on, variant = run_figures(args.variant, args.row)
    reference_on, reference = run_figures(args.reference, args.reference_row or args.row)
    if read_on != reference_on:
        raise SystemExit(f"the logs report different splits ({read_on} against {reference_on})")
    pairs = sorted(p for p in set(variant) & set(reference)
                   if args.splits is None or p[0] in args.splits)
    for pair in pairs:
        print(f"{pair[0]} s{pair[1]}: " + "  ".join(
            f"{m} {reference[pair][m]:.2f} -> {variant[pair][m]:.2f}" for m in METRICS))
    out = {"figures": read_on, "pairs": len(pairs), "interval": INTERVAL,
           "variant": {m: rounded(estimate({p: variant[p][m] for p in pairs})) for m in METRICS},
           "reference": {m: rounded(estimate({p: reference[p][m] for p in pairs}))
                         for m in METRICS},
           "difference": {m: rounded(paired_difference({p: variant[p][m] for p in pairs},
                                                       {p: reference[p][m] for p in pairs}))
                          for m in METRICS}}
    for m in METRICS:
        print(f"{m}: {format_estimate(out['variant'][m])} against "
              f"{format_estimate(out['reference'][m])}, difference "
              f"{format_estimate(out['difference'][m], signed=True)}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
