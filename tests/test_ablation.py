"""`splitmatch ablation`: the four rows of the paper's Table 2 on two development splits on a real
local Ray cluster, every row an MLflow run under one parent, the printed means (val) equal to the
runs' metrics, an interrupted run that goes on where it stopped, a rerun that keeps finished rows,
a rerun under another config refused by key, held-out splits refused where choices are made, and
`splitmatch diagnose` on the trained rows; Table 3 and the deviations table on a held-out split,
the row they share trained once."""
import json
import math
import shutil
import signal
import statistics
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from splitmatch.ablation import (DEVIATIONS, METRICS, PAPER_OVERRIDES, ROWS, TABLES,
                                 ablation_splits, chosen_rows, deviation_rows, parent_name,
                                 row_config, run_ablation, slug, twin_rows)
from splitmatch.config import ConfigError, config_from_dict, dump_config, flatten, load_config
from splitmatch.splits import DEV, HOLDOUT, draw_family
from splitmatch.tracking import default_tracking_uri
from helpers import cli_in_process, finish, splitmatch, tiny_config, write_config

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


@pytest.mark.slow
def test_ablation_rows_over_two_development_splits_under_one_parent(tmp_path, ray_cluster,
                                                                    tiny_pseudo_masks, capsys):
    config = write_config(tmp_path, "abl", max_iters=2, num_workers=1, checkpoint_every=2,
                          eval_every=2, log_every=1, num_visualizations=0)
    # dev0 is the standard split (seed 0 on the toy world): its pseudo masks are the session's
    # (the cache is keyed by content). A copy, since the command builds dev1's beside them.
    shutil.copytree(tiny_pseudo_masks, tmp_path / "cache")
    # Interrupted after two rows of the first split (driver killed), then run again: the two
    # finished rows are kept, the rest is trained.
    first = splitmatch("ablation", str(config), "--splits", "2", address=ray_cluster)
    measured = []  # "[dev0 (...), seed 0] baseline: val hIoU ..." as the first run printed them
    for line in first.stdout:
        if ": val hIoU" in line:
            measured.append(line.strip())
        if "] +SM: val hIoU" in line:
            first.kill()
            break
    first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL
    out = finish(splitmatch("ablation", str(config), "--splits", "2", address=ray_cluster),
                 timeout=600)
    assert out.count("already trained") == 2
    assert "training +SM+MFE (abl-ablation-dev0-s0-plus_SMplus_MFE)" in out
    # The kept rows' figures are the ones they were measured with, read back from their runs.
    assert len(measured) == 2 and all(line in out for line in measured), (measured, out[-3000:])
    # A development split's run line shows its val figures only: choices are made there.
    assert all("test hIoU" not in line for line in measured), measured
    lines = out.strip().splitlines()
    table = json.loads(lines[-1])  # the last line is the JSON summary: one entry per row
    assert list(table) == list(ROWS)
    for position, row in enumerate(ROWS):
        entry = table[row]
        assert {k: set(entry[k]) for k in METRICS} == {k: {"mean", "ci95"} for k in METRICS}
        deltas = {"delta_vs_baseline", "delta_vs_previous"} if position else set()
        assert set(entry) == {*METRICS, *deltas}
        for label in deltas:
            assert set(entry[label]["hIoU"]) == {"mean", "ci95", "shown"}
    assert "val figures; mean [95% interval] over the 2 (split, seed) pairs" in out
    assert "two-stage bootstrap over splits" in out and "row settings:" in out
    assert "  baseline: matching.mode=baseline, model.mfe.enabled=false; calibration 0.0" in out
    splits = draw_family("toyworld", DEV, 2)
    for split in splits:  # a table and a per-class report per split
        assert f"{split.describe()}, 1 seed(s), val split:" in out
    report_lines = [line for line in lines if line.startswith(("leaf ", "donut "))]
    assert report_lines and all(len(line.split()) == 2 + 3 + len(ROWS) for line in report_lines)

    client = MlflowClient(default_tracking_uri(tmp_path / "runs"))
    experiment = client.get_experiment_by_name("tests").experiment_id
    (parent,) = client.search_runs([experiment], "tags.`splitmatch.kind` = 'ablation'")
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["reported_split"] == "val" and parent.data.tags["family"] == DEV
    assert parent.data.tags["row_order"] == " | ".join(ROWS)
    children = client.search_runs([experiment],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 2 * len(ROWS)
    by_row = {row: [] for row in ROWS}
    for child in children:
        row = child.data.tags["row"]
        assert child.data.tags["split"] in ("dev0", "dev1")
        expected = "2" if row == "+SM+MFE+RQ" else "0"  # only the RQ row adds random queries
        assert child.data.params["inference.num_random_queries"] == expected, row
        by_row[row].append(child)
    assert {row: len(runs) for row, runs in by_row.items()} == {row: 2 for row in ROWS}
    for row, runs in by_row.items():
        unseen = {tuple(json.loads(r.data.params["data.unseen"])) for r in runs}
        assert unseen == {s.unseen for s in splits}, row  # each row ran on both splits
        for metric in METRICS:  # the reported figures are val's, read back from the runs
            values = [r.data.metrics[f"final_select_{metric}"] for r in runs]
            assert math.isclose(table[row][metric]["mean"], round(statistics.fmean(values), 2),
                                abs_tol=0.011), (row, metric)
            assert all(metric in r.data.metrics for r in runs)  # test's, beside it
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"ablation_table.txt", "ablation.json", "dev0_table.txt",
            "dev1_table.txt"} <= artifacts
    assert math.isclose(parent.data.metrics["SM_MFE/hIoU"], table["+SM+MFE"]["hIoU"]["mean"],
                        abs_tol=0.006)
    assert len(client.search_runs([experiment], "")) == 1 + 2 * len(ROWS)  # none twice

    # Another budget under the same name: the trained rows were made under another config, so
    # the command refuses by key instead of mixing two configs in one table. The refusals and
    # the diagnostics run in this process (cli_in_process): they start no Ray work, and what
    # they print is checked.
    code, refused = cli_in_process(capsys, "ablation", config, "--splits", "2", "--set",
                                   "train.max_iters=3")
    assert code == 2, refused[-3000:]
    assert "train.max_iters: 2 -> 3" in refused and "training baseline" not in refused
    # A config that names its own split runs on it alone; a held-out one is refused.
    held = draw_family("toyworld", HOLDOUT, 1)[0]
    code, refused = cli_in_process(capsys, "ablation", config,
                                   *[a for o in held.overrides() for a in ("--set", o)])
    assert code == 2 and "is a held-out split" in refused, refused[-3000:]

    # The diagnostics of dev1 read the trained rows and write their report.
    code, diag = cli_in_process(capsys, "diagnose", config, "--split", "dev1")
    assert code == 0, diag[-4000:]
    assert "won by seen / candidate / random queries" in diag and "candidate targets:" in diag
    report = json.loads((tmp_path / "runs" / "abl-ablation" / "diagnose-dev1-s0.json").read_text())
    assert report["unseen"] == list(splits[1].unseen) and report["split"] == "dev1"
    assert set(report["rows"]) == set(ROWS)
    for row in report["rows"].values():  # every labelled pixel is won by exactly one group
        confusion_pixels = sum(map(sum, row["confusion"]))
        assert sum(map(sum, row["ownership"])) == confusion_pixels > 0
    for row in ROWS[:3]:  # rows evaluated without random queries give them no pixel
        assert all(counts[2] == 0 for counts in report["rows"][row]["ownership"]), row
        # Scored as the run was (its calibration included), the diagnosis finds the row's val
        # figures; and how each group named its pixels accounts for every pixel it won.
        (child,) = [r for r in by_row[row] if r.data.tags["split"] == "dev1"]
        for metric in ("hIoU", "sIoU", "uIoU"):
            assert math.isclose(report["rows"][row]["metrics"][metric],
                                child.data.metrics[f"final_select_{metric}"], abs_tol=0.011), \
                (row, metric)
        assert [[sum(by_group) for by_group in by_class] for by_class in
                report["rows"][row]["naming"]] == report["rows"][row]["ownership"]
    assert "unseen pixels, by the group that won them" in diag and "before -> after" in diag
    cosines = report["rows"]["+SM"]["candidate_query_cosines"]
    assert len(cosines) == len(report["classes"]) and all(-1 <= c <= 1 for r in cosines for c in r)
    assert 0 <= report["candidates"]["background_pixel_share"] <= 1
    code, text = cli_in_process(capsys, "diagnose", config, "--split", "holdout0")
    assert code == 2 and "is a held-out split" in text, text[-3000:]


@pytest.mark.slow
def test_held_out_table_3_and_the_deviations_table(tmp_path, ray_cluster):
    """Table 3 (candidate embedding) and the deviations table on a held-out split at a tiny
    budget: every row is a run with its own setting under its table's own parent, the figures
    are test's, the JSON last line has one entry per row. The deviations table's preset is Table
    3's Cu model (both the config's full model): it is not trained again but takes Cu's figures,
    in a run of its own that names where they come from; its calibration row evaluates the
    preset's model again with calibration off."""
    data = tiny_config(tmp_path, "tab", max_iters=1, num_workers=1, checkpoint_every=1,
                       log_every=1, num_visualizations=0)
    # The preset's deviations, so that each deviation row differs from it.
    data["model"]["center_embeddings"] = True
    data["pseudo_masks"]["background_prompts"] = ["a photo of the background."]
    data["loss"]["normalization"] = "per_group"
    data["data"]["select_split"] = "val"
    data["inference"].update({"seen_score_calibration": "auto", "calibration_grid": [0.0, 0.1]})
    config = tmp_path / "tab.yaml"
    config.write_text(dump_config(config_from_dict(data)))
    client = MlflowClient(default_tracking_uri(tmp_path / "runs"))
    out = finish(splitmatch("ablation", str(config), "--table", "3", "--holdout", "1",
                            address=ray_cluster), timeout=600)
    summary = json.loads(out.strip().splitlines()[-1])
    assert set(summary) == {"Fu", "Fu+MLP", "Cu"}
    assert "test figures; mean [95% interval] over the 1 (split, seed) pairs" in out
    # What a user reads is the table: MLflow's and Ray's own INFO lines wait for --verbose.
    for notice in ("mlflow.store.db.utils", "logging.cc", "TrainingReport("):
        assert notice not in out, (notice, out[-3000:])
    experiment = client.get_experiment_by_name("tests").experiment_id
    held = draw_family("toyworld", HOLDOUT, 1)[0]

    def rows_of(table: str) -> dict:
        (parent,) = client.search_runs(
            [experiment], f"tags.mlflow.runName = 'tab-table{table}-holdout'")
        assert parent.data.tags["table"] == table and parent.info.status == "FINISHED"
        assert parent.data.tags["holdout"] == "--holdout 1"
        assert parent.data.tags["reported_split"] == "test"
        kids = client.search_runs([experiment],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        # Every row is the full model, tested with the config's random queries, on holdout0.
        assert {k.data.params["inference.num_random_queries"] for k in kids} == {"2"}
        assert {k.data.tags["split"] for k in kids} == {"holdout0"}
        for kid in kids:
            assert kid.data.metrics["seen_score_calibration"] in (0.0, 0.1)
        return {k.data.tags["row"]: k for k in kids}

    table3 = rows_of("3")
    assert {name: k.data.params["model.candidate_embedding"] for name, k in table3.items()} == {
        "Fu": "dense", "Fu+MLP": "dense_mlp", "Cu": "cls"}
    assert json.loads(table3["Cu"].data.params["data.unseen"]) == list(held.unseen)
    assert table3["Cu"].data.params["data.toyworld.seed"] == str(held.world_seed)
    assert table3["Cu"].data.tags["holdout_flag"] == "--holdout"
    assert table3["Cu"].data.tags["split_family"] == HOLDOUT

    out = finish(splitmatch("ablation", str(config), "--table", "paper", "--holdout", "1",
                            address=ray_cluster), timeout=900)
    rows = list(TABLES["paper"])
    assert "preset: the same model as tab-table3-holdout-holdout0-s0-Cu" in out
    assert "training preset (" not in out and "training paper (" in out
    summary = json.loads(out.strip().splitlines()[-1])
    assert list(summary) == rows  # the preset first: every delta_vs_baseline is against it
    assert summary["preset"]["hIoU"]["mean"] == round(table3["Cu"].data.metrics["hIoU"], 2)
    paper = rows_of("paper")
    assert set(paper) == set(rows)
    assert paper["preset"].data.tags["reuses"] == "tab-table3-holdout-holdout0-s0-Cu"
    assert paper["preset - calibration"].data.params["inference.seen_score_calibration"] == "0.0"
    assert paper["preset - calibration"].data.metrics["seen_score_calibration"] == 0.0
    settings = {k: paper["paper"].data.params[k] for k in (
        "loss.candidate_negatives", "pseudo_masks.cls_input", "model.center_embeddings",
        "loss.normalization", "inference.seen_score_calibration")}
    assert settings == {"loss.candidate_negatives": "all", "pseudo_masks.cls_input": "masked",
                        "model.center_embeddings": "False", "loss.normalization": "joint",
                        "inference.seen_score_calibration": "0.0"}
    assert "  preset - centring: model.center_embeddings=false; calibration auto" in out


def test_deviation_rows_switch_off_one_deviation_each(tmp_path):
    """Each deviation row is the preset with one deviation switched off; the paper row has all of
    them off; a deviation the config does not take is left out of the table."""
    base = load_config(EXPERIMENTS / "toyworld.yaml")
    preset = flatten(row_config(base, "preset", 0, "t"))
    for name, overrides in DEVIATIONS.items():
        row = flatten(row_config(base, f"preset - {name}", 0, "t"))
        changed = {k for k, v in row.items() if preset[k] != v} - {"name"}
        assert changed == {o.split("=")[0] for o in overrides}, name
    paper = flatten(row_config(base, "paper", 0, "t"))
    assert {k for k, v in paper.items() if preset[k] != v} - {"name"} == {
        o.split("=")[0] for o in PAPER_OVERRIDES}
    assert deviation_rows(base, log=lambda *_: None) == tuple(TABLES["paper"])
    said = []
    plain = config_from_dict(tiny_config(tmp_path, "x"))  # takes only the candidate negatives
    kept = deviation_rows(plain, log=said.append)
    assert kept == ("preset", "preset - candidate negatives", "preset - masked crop", "paper")
    assert len(said) == 4 and all("row left out" in line for line in said)


@pytest.mark.parametrize("table, key, values", [
    ("3", "model.candidate_embedding", {"Fu": "dense", "Fu+MLP": "dense_mlp", "Cu": "cls"}),
    ("4", "model.mfe.norm", {"no norm": "none", "BN": "bn", "GN": "gn"})])
def test_tables_rows_set_only_their_key(tmp_path, table, key, values):
    """Each row of Tables 3 and 4 is the full model (split matching, MFE, the config's random
    queries) with its own setting of the table's key and nothing else changed."""
    base = config_from_dict(tiny_config(tmp_path, "tab"))
    full = flatten(base)  # tiny_config is already split matching with MFE
    assert full["matching.mode"] == "split" and full["model.mfe.enabled"]
    settings = {}
    for row in TABLES[table]:
        cfg = flatten(row_config(base, row, seed=0, parent=f"tab-table{table}"))
        changed = {k for k, v in cfg.items() if full.get(k) != v}
        assert changed <= {key, "name", "tune.space"}, (row, changed)
        assert cfg["name"] == f"tab-table{table}-dev0-s0-" + slug(row)
        settings[row] = cfg[key]
    assert settings == values


def test_rows_picks_a_tables_rows_in_its_order_and_refuses_what_it_cannot_run():
    rows = tuple(TABLES["paper"])
    assert chosen_rows("paper", rows, "preset - per-group normalisation, preset") == (
        "preset", "preset - per-group normalisation")
    with pytest.raises(ConfigError, match=r"--rows: 'GN': table paper's rows are 'preset', "):
        chosen_rows("paper", rows, "preset,GN")
    # The calibration row evaluates the preset's model: it cannot run without it.
    with pytest.raises(ConfigError, match="'preset - calibration' evaluates the model of 'preset'"):
        chosen_rows("paper", rows, "preset - calibration")
    with pytest.raises(ConfigError, match="no row named"):
        chosen_rows("2", tuple(TABLES["2"]), " , ")


def test_holdout_from_reads_fresh_held_out_splits_under_a_parent_of_its_own(tmp_path):
    """A held-out split is read once: `--holdout 4 --holdout-from 4` takes holdout4-7, the same
    splits as the last four of `--holdout 8`, and records them under another parent."""
    base = config_from_dict(tiny_config(tmp_path, "tab"))
    family, fresh = ablation_splits(base, 0, 4, first=4)
    assert family == HOLDOUT and [s.label for s in fresh] == [f"holdout{i}" for i in range(4, 8)]
    assert fresh == draw_family("toyworld", HOLDOUT, 8)[4:]
    assert parent_name(base, "2", HOLDOUT) == "tab-ablation-holdout"
    assert parent_name(base, "2", HOLDOUT, 4) == "tab-ablation-holdout-from4"
    assert parent_name(base, "paper", DEV, 4) == "tab-tablepaper"
    with pytest.raises(ConfigError, match="--holdout-from skips held-out splits: it goes with --holdout"):
        run_ablation(base, splits=2, holdout_from=4)


def test_twins_are_found_among_the_rows_a_config_can_have(tmp_path):
    """The preset row's twins are the other tables' rows of the same config (Table 2's +SM+MFE,
    Table 3's Cu, Table 4's GN), also under a setting that some other rows cannot take: with a
    batch pool of Cu, Table 3's Fu rows cannot exist, and are no twins."""
    data = tiny_config(tmp_path, "tab")
    data["model"]["mfe"]["norm"] = "gn"
    data["loss"]["candidate_pool"] = "batch"
    base = config_from_dict(data)
    wanted = row_config(base, "preset", 0, parent_name(base, "paper", DEV))
    twins = twin_rows(base, "paper", wanted, 0, "dev0", DEV)
    assert sorted(t.name for t in twins) == ["tab-ablation-dev0-s0-plus_SMplus_MFE",
                                             "tab-table3-dev0-s0-Cu", "tab-table4-dev0-s0-GN"]
