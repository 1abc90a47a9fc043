"""The evaluation protocol's pure parts: development and held-out split families, the guard that
keeps choosing commands off held-out splits, and the intervals every table reports."""
import itertools
import math
import statistics

import numpy as np
import pytest

from splitmatch.config import Config, config_from_dict, to_dict
from splitmatch.splits import (DEV, HOLDOUT, LEGACY_TOYWORLD_SPLITS, TOYWORLD_CLASSES,
                               TOYWORLD_UNSEEN, HeldOutSplit, check_split_use, class_set_family,
                               draw_family, family_split, split_family, world_seed_family)
from splitmatch.stats import (estimate, format_estimate, paired_difference, rounded,
                              summarize_rows)
from helpers import cli, cli_in_process, write_config


def test_families_are_fixed_disjoint_and_extend():
    dev = draw_family("toyworld", DEV, 12)
    held = draw_family("toyworld", HOLDOUT, 12)
    # Development split 0 is the standard split and its images (seed 0).
    assert dev[0].unseen == tuple(n for n in TOYWORLD_CLASSES if n in TOYWORLD_UNSEEN)
    assert dev[0].world_seed == 0 and dev[0].label == "dev0"
    # No held-out split shares its class set or its images with a development split.
    assert not {frozenset(s.unseen) for s in dev} & {frozenset(s.unseen) for s in held}
    assert not {s.world_seed for s in dev} & {s.world_seed for s in held}
    for split in dev:
        assert split_family("toyworld", split.unseen, split.world_seed) == DEV
    for split in held:
        assert split_family("toyworld", split.unseen, split.world_seed) == HOLDOUT
        assert split.world_seed >= 100  # seeds used by hand before the families are dev
    # The same on every call; a longer list starts with a shorter one; labels name them.
    assert draw_family("toyworld", HOLDOUT, 4) == held[:4]
    assert family_split("toyworld", "holdout3") == held[3]
    assert family_split("toyworld", "dev5") == dev[5]
    with pytest.raises(ValueError, match="dev<N> or holdout<N>"):
        family_split("toyworld", "split2")
    # Every toy class set has one family; the ones looked at before are development.
    families = {c: class_set_family("toyworld", c)
                for c in itertools.combinations(TOYWORLD_CLASSES, 3)}
    assert 40 < sum(f == HOLDOUT for f in families.values()) < 80
    assert all(class_set_family("toyworld", s) == DEV for s in LEGACY_TOYWORLD_SPLITS)
    assert world_seed_family(0) == world_seed_family(99) == DEV
    # Real datasets: class sets only, the standard split development.
    voc = draw_family("voc", HOLDOUT, 3)
    assert all(s.world_seed is None and len(s.unseen) == 5 for s in voc)
    assert class_set_family("voc", None) == DEV


def test_choosing_commands_refuse_a_held_out_split_without_the_flag():
    held = draw_family("toyworld", HOLDOUT, 1)[0]
    data = to_dict(Config())
    data["data"].update({"dataset": "toyworld", "unseen": list(held.unseen)})
    data["data"]["toyworld"]["seed"] = held.world_seed
    cfg = config_from_dict(data)
    with pytest.raises(HeldOutSplit, match="tune: data.unseen .* is a held-out split.*--holdout"):
        check_split_use(cfg.data, "tune", holdout=False)
    assert check_split_use(cfg.data, "tune", holdout=True) == HOLDOUT
    # Held-out images under development classes are held-out too.
    data["data"]["unseen"] = None
    assert check_split_use(config_from_dict(data).data, "train", holdout=True) == HOLDOUT
    data["data"]["toyworld"]["seed"] = 0
    assert check_split_use(config_from_dict(data).data, "train", holdout=False) == DEV


def test_interval_is_the_two_stage_bootstrap_and_reproducible():
    values = {(split, seed): 50 + 5 * split + seed for split in range(4) for seed in range(2)}
    result = estimate(values)
    assert result["mean"] == pytest.approx(statistics.fmean(values.values()))
    lo, hi = result["ci95"]
    assert lo < result["mean"] < hi and result["n"] == 8
    assert estimate(values) == result  # fixed seed
    # A brute-force two-stage bootstrap agrees within Monte-Carlo error.
    rng = np.random.default_rng(1)
    groups = [np.array([values[(s, e)] for e in range(2)]) for s in range(4)]
    means = []
    for _ in range(4000):
        drawn = [groups[i][rng.integers(0, 2, 2)] for i in rng.integers(0, 4, 4)]
        means.append(np.concatenate(drawn).mean())
    ref_lo, ref_hi = np.percentile(means, [2.5, 97.5])
    assert abs(lo - ref_lo) < 0.6 and abs(hi - ref_hi) < 0.6
    # One run has no interval; NaN runs are left out.
    assert estimate({(0, 0): 3.0})["ci95"] is None
    assert estimate({(0, 0): 3.0, (0, 1): math.nan})["n"] == 1


def test_paired_differences_are_shown_only_when_the_interval_excludes_zero():
    base = {(s, e): 40.0 + 10 * s + 3 * e for s in range(3) for e in range(2)}
    better = {pair: v + 10 for pair, v in base.items()}
    noisy = {pair: v + (4 if (pair[0] + pair[1]) % 2 else -4) for pair, v in base.items()}
    gain = paired_difference(better, base)
    assert gain["mean"] == pytest.approx(10) and gain["ci95"] == [10, 10] and gain["shown"]
    wash = paired_difference(noisy, base)
    assert wash["ci95"][0] < 0 < wash["ci95"][1] and not wash["shown"]
    assert format_estimate(wash, signed=True).endswith("not shown")
    assert format_estimate(gain, signed=True) == "+10.00 [10.00, 10.00]"
    # Only the pairs both rows have are compared.
    assert paired_difference(better, {(0, 0): base[(0, 0)]})["n"] == 1

    rows = summarize_rows({"baseline": {p: {"hIoU": v} for p, v in base.items()},
                           "+SM": {p: {"hIoU": v} for p, v in better.items()},
                           "+MFE": {p: {"hIoU": v} for p, v in noisy.items()}}, ["hIoU"])
    assert "delta_vs_baseline" not in rows["baseline"]
    assert rows["+SM"]["delta_vs_baseline"]["hIoU"]["shown"]
    assert rows["+MFE"]["delta_vs_previous"]["hIoU"]["mean"] == pytest.approx(-10)
    assert not rows["+MFE"]["delta_vs_baseline"]["hIoU"]["shown"]
    assert rounded(rows["+SM"]["hIoU"]) == {"mean": round(rows["+SM"]["hIoU"]["mean"], 2),
                                            "ci95": [round(v, 2) for v in
                                                     rows["+SM"]["hIoU"]["ci95"]]}


@pytest.mark.integration
def test_commands_that_choose_refuse_a_held_out_split_in_one_line(tmp_path, capsys):
    """`train`, `tune` and `eval` on a held-out split without --holdout: one line naming the
    split and the flag, exit code 2, before any Ray or training starts; `splitmatch splits` lists
    the families with the overrides that select each split."""
    # The listing's output alone is checked: it runs in this process (cli_in_process). The
    # refusals stay commands of their own: that each prints one line is what a user's terminal
    # shows, import-time output and Python warnings included, which this process would not.
    code, listed = cli_in_process(capsys, "splits", "--family", "holdout", "-n", "2")
    held = draw_family("toyworld", HOLDOUT, 2)
    assert code == 0
    lines = listed.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["holdout0", "holdout1"]
    assert f"data.toyworld.seed={held[0].world_seed}" in lines[0]
    config = write_config(tmp_path, "held")
    overrides = [a for o in held[0].overrides() for a in ("--set", o)]
    for command in (["train", str(config)], ["tune", str(config)],
                    ["eval", str(config), "--checkpoint", str(tmp_path / "none.pt")]):
        done = cli(*command, *overrides)
        errors = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode == 2, done.stderr[-2000:]
        assert len(errors) == 1 and "is a held-out split" in errors[0], errors
        assert "--holdout" in errors[0] and f"data.toyworld.seed {held[0].world_seed}" in errors[0]
    assert not (tmp_path / "runs" / "held").exists()  # nothing was started
