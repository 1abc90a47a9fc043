#!/usr/bin/env bash
# The toy CLIP the toy config uses, as `splitmatch toy-clip` reports it: where it is (the build
# that ships with the package, or one pretrained here), its zero-shot accuracy on held-out
# single-object images, and its pseudo masks on training images with the config's settings.
#   bash docs/results/toy_clip.sh [CONFIG] [extra --set overrides ...]
# Writes docs/results/toyworld-toy-clip.{log,json}, the JSON with commit and machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
CONFIG=${1:-experiments/toyworld.yaml}
shift || true
log=docs/results/toyworld-toy-clip.log
splitmatch toy-clip "$CONFIG" "$@" > "$log" 2>&1
python3 - "$log" docs/results/toyworld-toy-clip.json "$CONFIG $*" <<'PY'
import json, platform, subprocess, sys
log, out, args = sys.argv[1:]
summary = json.loads(open(log).read().strip().splitlines()[-1])
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
            if l.startswith("model name")), platform.processor())
summary.update(command=f"splitmatch toy-clip {args.strip()}",
               commit=subprocess.check_output(["git", "rev-parse", "HEAD"], text=True).strip(),
               machine=f"{cpu}, {subprocess.check_output(['nproc'], text=True).strip()} cores")
open(out, "w").write(json.dumps(summary, indent=1) + "\n")
print(json.dumps(summary))
PY
