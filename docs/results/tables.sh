#!/usr/bin/env bash
# The tables of docs/results/: Table 2's rows and the deviations table (the preset, each
# deviation switched off, the paper as written) over the first 4 toy-world splits of a family x
# seeds 0 and 1, at the demo's budget (ResNet-10, 500 iterations at 6e-4).
#   bash docs/results/tables.sh dev [2|paper ...]      development splits, val figures: choosing
#   bash docs/results/tables.sh holdout [2|paper ...]  held-out splits, test figures: reporting,
#                                                      once every choice is fixed; read once
#   (HOLDOUT_FROM=4: held-out splits 4-7 instead, a fresh read, into toyworld-holdout4-7-*)
# (default tables: both; resumable: rerun it). ROWS="row,row" runs only those rows of a table
# (`splitmatch ablation --rows`). Writes docs/results/toyworld-<family>-table<T>
# .{log,json,md}: the command's output, its JSON last line with the commit, the machine and the
# seeds beside it, and that table in markdown. CONFIG=experiments/toyworld_paper.yaml makes the
# same tables for the paper as written (files named after the config).
set -euo pipefail
cd "$(dirname "$0")/../.."
FAMILY=${1:?"which splits: dev (val, for choosing) or holdout (test, for reporting)"}
shift
case $FAMILY in
  dev) PICK=(--splits 4); REPORTED=val; SPLITS=dev0-dev3 ;;
  holdout) FROM=${HOLDOUT_FROM:-0}; PICK=(--holdout 4 --holdout-from "$FROM"); REPORTED=test
           SPLITS=holdout$FROM-holdout$((FROM + 3)); [ "$FROM" = 0 ] || FAMILY=holdout$FROM-$((FROM + 3)) ;;
  *) echo "tables.sh: unknown family '$FAMILY' (dev or holdout)" >&2; exit 2 ;;
esac
OUT=docs/results
STORE=${STORE:-runs/results}
CONFIG=${CONFIG:-experiments/toyworld.yaml}  # e.g. experiments/toyworld_paper.yaml
STEM=$(basename "$CONFIG" .yaml)
BUDGET=(--set model.backbone=resnet10 --set train.max_iters=500 --set optim.lr=6.0e-4
        --set train.checkpoint_every=500 --set train.eval_every=500
        --set "train.storage_path=$STORE" --set "pseudo_masks.cache_dir=$STORE/pseudo_cache")
for table in "${@:-2 paper}"; do
  for t in $table; do
    log="$OUT/$STEM-$FAMILY-table$t.log"
    splitmatch ablation "$CONFIG" --table "$t" "${PICK[@]}" --seeds 2 \
      ${ROWS:+--rows "$ROWS"} \
      "${BUDGET[@]}" 2>&1 | tee "$log.full"
    # The record without the progress displays' lines.
    grep -vE "^(training |evaluating |pseudo masks: )" "$log.full" > "$log" && rm "$log.full"
    python3 - "$log" "$OUT/$STEM-$FAMILY-table$t.json" "$t" "${PICK[*]}${ROWS:+ --rows '$ROWS'}" \
      $REPORTED $SPLITS "$CONFIG" <<'PY'
import json, platform, re, subprocess, sys
log, out, table, pick, reported, splits, config = sys.argv[1:]
rows = json.loads(open(log).read().strip().splitlines()[-1])
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
            if l.startswith("model name")), platform.processor())
meta = {"command": f"splitmatch ablation {config} --table {table} {pick} "
                   "--seeds 2 (demo budget: resnet10, 500 iterations, lr 6e-4)",
        "commit": subprocess.check_output(["git", "rev-parse", "HEAD"], text=True).strip(),
        "machine": f"{cpu}, {subprocess.check_output(['nproc'], text=True).strip()} cores",
        "seeds": [0, 1], "splits": splits, "reported": f"{reported} split", "rows": rows}
open(out, "w").write(json.dumps(meta, indent=1) + "\n")

def cell(entry, signed=False):
    if entry is None or entry["mean"] is None:
        return ""
    text = f"{entry['mean']:{'+' if signed else ''}.2f}"
    if entry["ci95"] is not None:
        text += f" [{entry['ci95'][0]:.2f}, {entry['ci95'][1]:.2f}]"
    return text + (" (not shown)" if entry.get("shown") is False else "")

family = "held-out" if reported == "test" else "development"
lines = [f"# Toy world, {family} splits: {'the deviations table' if table == 'paper' else 'Table ' + table}",
         "", f"`{meta['command']}`", "",
         f"Commit {meta['commit'][:10]}, {meta['machine']}; seeds 0 and 1 on {splits}; "
         f"{reported} figures (hIoU / sIoU / uIoU), mean [95% interval] over the 8 (split, seed) pairs; "
         "differences paired over the same pairs, two-stage bootstrap (splits, then seeds).", "",
         "| row | hIoU | sIoU | uIoU | hIoU vs first row | uIoU vs first row | hIoU vs row before |",
         "|---|---|---|---|---|---|---|"]
for row, entry in rows.items():
    base, prev = entry.get("delta_vs_baseline", {}), entry.get("delta_vs_previous", {})
    lines.append(f"| {row} | {cell(entry['hIoU'])} | {cell(entry['sIoU'])} | {cell(entry['uIoU'])} "
                 f"| {cell(base.get('hIoU'), True)} | {cell(base.get('uIoU'), True)} "
                 f"| {cell(prev.get('hIoU'), True)} |")
pattern = (r"^\[(\S+) \(.*?\), seed (\d+)\] (.+?): val hIoU (\S+)\s+sIoU (\S+)\s+uIoU (\S+);"
           r".*?calibration (\S+)$") if reported == "val" else (
           r"^\[(\S+) \(.*?\), seed (\d+)\] (.+?): val .*?; test hIoU (\S+)\s+sIoU (\S+)"
           r"\s+uIoU (\S+); calibration (\S+)$")
runs = re.findall(pattern, open(log).read(), flags=re.M)
lines += ["", f"Each (split, seed) run, {reported} hIoU / sIoU / uIoU (calibration chosen on val):", "",
          "| split | seed | " + " | ".join(rows) + " |", "|---|---|" + "---|" * len(rows)]
pairs = sorted({(split, seed) for split, seed, *_ in runs}, key=lambda p: (p[0], int(p[1])))
found = {(split, seed, row): f"{h} / {s} / {u} ({c})" for split, seed, row, h, s, u, c in runs}
for split, seed in pairs:
    lines.append(f"| {split} | {seed} | "
                 + " | ".join(found.get((split, seed, row), "") for row in rows) + " |")
settings = [l for l in open(log).read().split("row settings:\n", 1)[-1].splitlines()
            if l.startswith("  ")]
lines += ["", "Each row's settings and the calibration it was evaluated with:", "",
          *[f"- {l.strip()}" for l in settings]]
open(out[:-5] + ".md", "w").write("\n".join(lines) + "\n")
PY
  done
done
