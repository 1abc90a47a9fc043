"""Re-score finished ablation rows of development splits under inference-only variants, paired:
each row's checkpoint evaluated on its split's **val** as the row was (seen-score calibration
chosen on val from the config's grid) and again with the variant's overrides; the difference per
(split, seed) and its two-stage bootstrap interval (`splitmatch.stats`). Only development splits
are read: the rows of `ablation --holdout` (folders named `-ablation-holdout-`) never match.

    python docs/results/inference_variants.py STORE [--set KEY=VALUE ...] [--rows +SM +SM+MFE+RQ]

STORE holds the rows of `splitmatch ablation CONFIG --splits K` (its train.storage_path). Prints
one line per run and, last, the JSON of the figures and differences.
"""
import argparse
import json
import re
import sys
from pathlib import Path

from splitmatch.checkpoint_evaluation import evaluate_checkpoint
from splitmatch.checkpoints import result_checkpoint
from splitmatch.config import load_config
from splitmatch.stats import paired_difference, rounded

ROW_FOLDERS = {"+SM": "plus_SM", "+SM+MFE": "plus_SMplus_MFE", "+SM+MFE+RQ": "plus_SMplus_MFE"}
METRICS = ("hIoU", "sIoU", "uIoU")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--rows", nargs="+", default=["+SM", "+SM+MFE+RQ"])
    parser.add_argument("--random-queries", type=int, default=8,
                        help="inference.num_random_queries of the +SM+MFE+RQ row")
    args = parser.parse_args()
    out = {"variant": args.overrides, "split": "val", "rows": {}}
    for row in args.rows:
        pattern = re.compile(rf".*-ablation-(dev\d+)-s(\d+)-{re.escape(ROW_FOLDERS[row])}$")
        base, variant = {}, {}
        for run_dir in sorted(args.store.iterdir()):
            found = pattern.match(run_dir.name)
            if not found or not (run_dir / "config.yaml").is_file():
                continue
            try:
                checkpoint = result_checkpoint(run_dir)
            except Exception:  # noqa: BLE001 - a row still training
                continue
            pair = (found.group(1), int(found.group(2)))
            extra = [f"inference.num_random_queries={args.random_queries}"] if row.endswith("RQ") \
                else ["inference.num_random_queries=0"]
            for figures, overrides in ((base, extra), (variant, extra + args.overrides)):
                cfg = load_config(run_dir / "config.yaml", overrides)
                result = evaluate_checkpoint(cfg, checkpoint, log=lambda *_: None)
                figures[pair] = {m: result["select"][m] for m in METRICS}
            print(f"{row} {pair[0]} s{pair[1]}: " + "  ".join(
                f"{m} {base[pair][m]:.2f} -> {variant[pair][m]:.2f}" for m in METRICS), flush=True)
        out["rows"][row] = {
            "pairs": {f"{s}-s{seed}": {"base": base[(s, seed)], "variant": variant[(s, seed)]}
                      for s, seed in base},
            "difference": {m: rounded(paired_difference(
                {p: v[m] for p, v in variant.items()}, {p: v[m] for p, v in base.items()}))
                for m in METRICS}}
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
