"""The scripts of docs/results/ that read what the shipped commands printed."""
import json
import subprocess
import sys

from helpers import PROJECT_ROOT

RESULTS = PROJECT_ROOT / "docs" / "results"


def test_paired_logs_gives_the_ablations_own_paired_differences():
    """Two rows of one ablation's log, paired by the script, give the differences the ablation
    printed for them (its JSON last line): the same pairs, the same bootstrap."""
    for log, row, reference, figures in (
            ("toyworld-dev-table2.log", "+SM", "baseline", "val"),
            ("toyworld-holdout-tablepaper.log", "preset - candidate negatives", "preset", "test")):
        done = subprocess.run([sys.executable, RESULTS / "paired_logs.py", RESULTS / log,
                               RESULTS / log, "--row", row, "--reference-row", reference],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        out = json.loads(done.stdout.strip().splitlines()[-1])
        printed = json.loads((RESULTS / log).read_text().strip().splitlines()[-1])
        assert out["figures"] == figures
        # The run lines carry figures rounded to 0.01: the script's means may differ by that.
        for metric in ("hIoU", "sIoU", "uIoU"):
            ours, theirs = out["difference"][metric], printed[row]["delta_vs_baseline"][metric]
            assert ours["shown"] == theirs["shown"]
            assert all(abs(a - b) <= 0.02 for a, b in zip([ours["mean"], *ours["ci95"]],
                                                          [theirs["mean"], *theirs["ci95"]]))
            assert abs(out["variant"][metric]["mean"] - printed[row][metric]["mean"]) <= 0.02


def test_paired_logs_names_a_row_it_cannot_find(tmp_path):
    log = tmp_path / "empty.log"
    log.write_text("nothing here\n")
    done = subprocess.run([sys.executable, RESULTS / "paired_logs.py", log, log],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.strip() == f"{log}: no run line of row 'preset'"
