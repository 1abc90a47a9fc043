#!/usr/bin/env bash
# The demo over seeds: `splitmatch demo --set seed=N` for N in SEEDS (default 0-4), one after the
# other, each in a store of its own (so each pays what a fresh clone pays after the install:
# pseudo masks, training, test), then the figures, their mean and standard deviation, and the
# time of each command.
#   bash docs/results/demo_seeds.sh [extra --set overrides ...]
# Writes docs/results/toyworld-demo-seeds.{log,json}. The demo reports the standard split's test
# figures: run it once the choices are fixed (on development splits' val), and read it once.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=docs/results
STORE=${STORE:-runs/demo-seeds}
SEEDS=${SEEDS:-0 1 2 3 4}
log=$OUT/toyworld-demo-seeds.log
: > "$log"
for seed in $SEEDS; do
  start=$(date +%s)
  splitmatch demo --set seed="$seed" --set name="demo-s$seed" \
    --set "train.storage_path=$STORE/s$seed" --set "pseudo_masks.cache_dir=$STORE/s$seed/pseudo_cache" \
    "$@" 2>&1 | grep -vE "^(training |evaluating |pseudo masks: )" | sed "s/^/[seed $seed] /" >> "$log"
  echo "[seed $seed] command took $(( $(date +%s) - start )) s" >> "$log"
done
python3 - "$log" "$OUT/toyworld-demo-seeds.json" "$*" <<'PY'
import json, platform, re, statistics, subprocess, sys
log, out, extra = sys.argv[1:]
text = open(log).read()
runs = {}
for seed, h, s, u in re.findall(r"^\[seed (\d+)\] hIoU (\S+)\s+sIoU (\S+)\s+uIoU (\S+)\s+\(mIoU", text, re.M):
    runs[int(seed)] = {"hIoU": float(h), "sIoU": float(s), "uIoU": float(u)}
for seed, took in re.findall(r"^\[seed (\d+)\] command took (\d+) s", text, re.M):
    runs.setdefault(int(seed), {})["seconds"] = int(took)
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
            if l.startswith("model name")), platform.processor())
figures = [r["hIoU"] for r in runs.values() if "hIoU" in r]
meta = {"command": "splitmatch demo --set seed=N" + (f" {extra}" if extra else ""),
        "commit": subprocess.check_output(["git", "rev-parse", "HEAD"], text=True).strip(),
        "machine": f"{cpu}, {subprocess.check_output(['nproc'], text=True).strip()} cores",
        "reported": "test split of the standard split", "runs": runs,
        "hIoU_mean": round(statistics.mean(figures), 2) if figures else None,
        "hIoU_std": round(statistics.stdev(figures), 2) if len(figures) > 1 else None}
open(out, "w").write(json.dumps(meta, indent=1) + "\n")
print(json.dumps(meta))
PY
