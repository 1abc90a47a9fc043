#!/usr/bin/env bash
# What Ray Train adds to a training step of the demo (the toy preset with ResNet-10) and to a
# short run's start and finish, before and after a change (issue 39): `splitmatch bench train
# --paired` run from a worktree of BEFORE (a git ref) and from this checkout, alternating, so
# that both share the machine's hour. Writes docs/results/ray-share.{log,json}: the benches'
# output, and their figures with the commits, the machine and the settings.
#   bash docs/results/ray_share.sh BEFORE [ROUNDS] [ITERATIONS] [REPEATS]
set -euo pipefail
cd "$(dirname "$0")/../.."
BEFORE=${1:?"the git ref to compare with (e.g. the commit before the change)"}
ROUNDS=${2:-2}; ITERATIONS=${3:-40}; REPEATS=${4:-2}
OUT=docs/results
WT=$(mktemp -d /tmp/ray-share-XXXX)
git worktree add -q --detach "$WT" "$BEFORE"
trap 'git worktree remove --force "$WT"' EXIT
: > "$OUT/ray-share.log"
for repeat in $(seq 1 "$REPEATS"); do
  for side in before after; do
    root=$PWD; [ $side = before ] && root=$WT
    echo "== repeat $repeat, $side: $(git -C "$root" rev-parse --short HEAD) ($(date -u +%H:%M:%S) UTC)" | tee -a "$OUT/ray-share.log"
    (cd "$root" && PYTHONPATH="$root/platform" splitmatch bench train --paired --rounds "$ROUNDS" \
      --iterations "$ITERATIONS" --set model.backbone=resnet10) 2>&1 | tee -a "$OUT/ray-share.log"
  done
done
python3 - "$OUT/ray-share.log" "$OUT/ray-share.json" "$ROUNDS" "$ITERATIONS" "$BEFORE" <<'PY'
import json, platform, re, subprocess, sys
log, out, rounds, iterations, before = sys.argv[1:]
runs, side = [], None
for line in open(log):
    if line.startswith("== repeat"):
        side = {"side": line.split(", ")[1].split(":")[0], "commit": line.split(": ")[1].split()[0]}
        runs.append(side)
    elif re.match(r"^(in_process_step_s|ray_train_vs_in_process|ray_train_start_s|ray_train_finish_s)=", line):
        head, _, rest = line.partition(": ")
        figures = dict(kv.split("=") for kv in (head.split() + rest.split()) if "=" in kv)
        side.update({k: float(v) for k, v in figures.items()})
    elif line.startswith("paired bench:"):
        side["settings"] = line.strip()
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
            if l.startswith("model name")), platform.processor())
meta = {"command": f"splitmatch bench train --paired --rounds {rounds} --iterations {iterations} "
                   "--set model.backbone=resnet10",
        "commit": subprocess.check_output(["git", "rev-parse", "HEAD"], text=True).strip(),
        "before": subprocess.check_output(["git", "rev-parse", before], text=True).strip(),
        "machine": f"{cpu}, {subprocess.check_output(['nproc'], text=True).strip()} cores",
        "config": "the toy preset (experiments/toyworld.yaml) with ResNet-10, as the demo; seed 0",
        "runs": runs}
open(out, "w").write(json.dumps(meta, indent=1) + "\n")
for run in runs:
    print(f"{run['side']} ({run['commit']}): ratio {run.get('ray_train_vs_in_process')} "
          f"(in-process {run.get('in_process_step_s')} s, Ray Train {run.get('ray_train_step_s')} s); "
          f"start {run.get('ray_train_start_s')} s, finish {run.get('ray_train_finish_s')} s")
PY
