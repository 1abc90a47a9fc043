"""`splitmatch ablation`: the four rows of the paper's Table 2 on two unseen splits on a real local
Ray cluster, every row an MLflow run under one parent, the printed means equal to the runs'
metrics, an interrupted run that goes on where it stopped, a rerun that keeps finished rows, a
rerun under another config refused by key, and `splitmatch diagnose` on the trained rows; Tables
3 and 4, the row they share trained once."""
import json
import math
import signal
import statistics

import pytest
from mlflow.tracking import MlflowClient

from splitmatch.ablation import ROWS, TABLES, row_config
from splitmatch.config import config_from_dict, flatten
from splitmatch.splits import draw_unseen_splits
from splitmatch.tracking import default_tracking_uri
from helpers import finish, splitmatch, tiny_config, write_config


@pytest.mark.slow
def test_ablation_rows_over_two_splits_under_one_parent(tmp_path, ray_cluster):
    config = write_config(tmp_path, "abl", max_iters=2, num_workers=1, checkpoint_every=2,
                          eval_every=2, log_every=1, num_visualizations=0)
    # Interrupted after two rows of the first split (driver killed), then run again: the two
    # finished rows are kept, the rest is trained.
    first = splitmatch("ablation", str(config), "--splits", "2", address=ray_cluster)
    measured = []  # "[split 0 (...), seed 0] baseline: hIoU ..." as the first run printed them
    for line in first.stdout:
        if ": hIoU" in line:
            measured.append(line.strip())
        if "] +SM: hIoU" in line:
            first.kill()
            break
    first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL
    out = finish(splitmatch("ablation", str(config), "--splits", "2", address=ray_cluster),
                 timeout=600)
    assert out.count("already trained") == 2 and "training +SM+MFE (abl-ablation-u0-s0" in out
    # The kept rows' figures are the ones they were measured with, read back from their runs.
    assert len(measured) == 2 and all(line in out for line in measured), (measured, out[-3000:])
    lines = out.strip().splitlines()
    table = json.loads(lines[-1])  # the last line is the JSON summary
    assert list(table) == list(ROWS)
    assert all(set(table[row]) == {"hIoU", "sIoU", "uIoU"} for row in ROWS)
    for row in ROWS:  # the pooled table: one line per row, mean ± std over the two splits
        assert any(line.startswith(row + " ") and line.count("±") == 3 for line in lines), row
    splits = draw_unseen_splits("toyworld", 2)
    for index, unseen in enumerate(splits):  # a table and a per-class report per split
        assert f"split {index} ({', '.join(unseen)}), 1 seed(s):" in out
    report_lines = [line for line in lines if line.startswith(("leaf ", "zebra "))]
    assert report_lines and all(len(line.split()) == 2 + 3 + len(ROWS) for line in report_lines)

    client = MlflowClient(default_tracking_uri(tmp_path / "runs"))
    experiment = client.get_experiment_by_name("tests").experiment_id
    (parent,) = client.search_runs([experiment], "tags.`splitmatch.kind` = 'ablation'")
    assert parent.info.status == "FINISHED"
    children = client.search_runs([experiment],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 2 * len(ROWS)
    by_row = {row: [] for row in ROWS}
    for child in children:
        name = child.info.run_name
        if name.endswith("plus_RQ"):
            assert child.data.params["inference.num_random_queries"] == "2"
            by_row["+SM+MFE+RQ"].append(child)
            continue
        params = child.data.params
        row = ("baseline" if params["matching.mode"] == "baseline" else
               "+SM+MFE" if params["model.mfe.enabled"] == "True" else "+SM")
        assert params["inference.num_random_queries"] == "0"  # only the RQ row adds them
        by_row[row].append(child)
    assert {row: len(runs) for row, runs in by_row.items()} == {row: 2 for row in ROWS}
    for row, runs in by_row.items():
        unseen = {tuple(json.loads(r.data.params["data.unseen"])) for r in runs}
        assert unseen == set(splits), row  # each row ran on both splits
        for metric in ("hIoU", "sIoU", "uIoU"):
            values = [r.data.metrics[metric] for r in runs]
            assert math.isclose(table[row][metric], round(statistics.fmean(values), 2),
                                abs_tol=0.011), (row, metric)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"ablation_table.txt", "ablation.json", "split0_table.txt",
            "split1_table.txt"} <= artifacts
    assert math.isclose(parent.data.metrics["SM_MFE/hIoU"], table["+SM+MFE"]["hIoU"],
                        abs_tol=0.006)

    assert len(client.search_runs([experiment], "")) == 1 + 2 * len(ROWS)  # none twice

    # Another budget and split under the same name: the trained rows were made under another
    # config, so the command refuses by key instead of mixing two configs in one table.
    other = splitmatch("ablation", str(config), "--splits", "2", "--set", "train.max_iters=3",
                       "--set", "data.unseen=[zebra, grape]", address=ray_cluster)
    refused, _ = other.communicate(timeout=300)
    assert other.returncode == 2, refused[-3000:]
    assert "data.unseen: ['leaf', 'starfish', 'donut'] -> ['zebra', 'grape']" in refused
    assert "train.max_iters: 2 -> 3" in refused and "training baseline" not in refused

    # The diagnostics of split 1 read the trained rows and write their report.
    diag = finish(splitmatch("diagnose", str(config), "--split", "1", address=ray_cluster),
                  timeout=300)
    assert "won by seen / candidate / random queries" in diag and "candidate targets:" in diag
    report = json.loads((tmp_path / "runs" / "abl-ablation" / "diagnose-u1-s0.json").read_text())
    assert report["unseen"] == list(splits[1])
    assert set(report["rows"]) == set(ROWS)
    for row in report["rows"].values():  # every labelled pixel is won by exactly one group
        confusion_pixels = sum(map(sum, row["confusion"]))
        assert sum(map(sum, row["ownership"])) == confusion_pixels > 0
    for row in ROWS[:3]:  # rows evaluated without random queries give them no pixel
        assert all(counts[2] == 0 for counts in report["rows"][row]["ownership"]), row
    assert 0 <= report["candidates"]["background_pixel_share"] <= 1


@pytest.mark.slow
def test_tables_3_and_4_train_their_rows_under_their_own_parents(tmp_path, ray_cluster):
    """Tables 3 (candidate embedding) and 4 (MFE norm) at a tiny budget: every row is a run
    with its own setting under its table's own parent, and the JSON last line has one entry per
    row. Table 4's GN row is Table 3's Cu model (both the full model): it is not trained again
    but takes Cu's figures, in a run of its own that names where they come from."""
    config = write_config(tmp_path, "tab", max_iters=1, num_workers=1, checkpoint_every=1,
                          log_every=1, num_visualizations=0)
    client = MlflowClient(default_tracking_uri(tmp_path / "runs"))
    out = finish(splitmatch("ablation", str(config), "--table", "3", address=ray_cluster),
                 timeout=600)
    summary = json.loads(out.strip().splitlines()[-1])
    assert set(summary) == {"Fu", "Fu+MLP", "Cu"}
    # What a user reads is the table: MLflow's and Ray's own INFO lines wait for --verbose.
    for notice in ("mlflow.store.db.utils", "logging.cc", "TrainingReport("):
        assert notice not in out, (notice, out[-3000:])
    experiment = client.get_experiment_by_name("tests").experiment_id

    def rows_of(table: int) -> dict:
        (parent,) = client.search_runs([experiment], f"tags.mlflow.runName = 'tab-table{table}'")
        assert parent.data.tags["table"] == str(table) and parent.info.status == "FINISHED"
        kids = client.search_runs([experiment],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        # Every row is the full model, tested with the config's random queries.
        assert {k.data.params["inference.num_random_queries"] for k in kids} == {"2"}
        assert {k.data.params["model.mfe.enabled"] for k in kids} == {"True"}
        return {k.info.run_name.rsplit("-", 1)[1]: k for k in kids}

    table3 = rows_of(3)
    assert {name: k.data.params["model.candidate_embedding"] for name, k in table3.items()} == {
        "Fu": "dense", "Fuplus_MLP": "dense_mlp", "Cu": "cls"}

    out = finish(splitmatch("ablation", str(config), "--table", "4", address=ray_cluster),
                 timeout=600)
    assert "training no norm" in out and "training BN" in out and "training GN" not in out
    assert "GN: the same model as tab-table3-u0-s0-Cu" in out
    summary4 = json.loads(out.strip().splitlines()[-1])
    assert summary4["GN"] == summary["Cu"] and set(summary4) == {"no norm", "BN", "GN"}
    table4 = rows_of(4)
    assert {name: k.data.params["model.mfe.norm"] for name, k in table4.items()} == {
        "no_norm": "none", "BN": "bn", "GN": "gn"}
    assert table4["GN"].data.tags["reuses"] == "tab-table3-u0-s0-Cu"
    assert "reuses" not in table4["BN"].data.tags
    for metric in ("hIoU", "sIoU", "uIoU", "mIoU"):
        assert table4["GN"].data.metrics[metric] == table3["Cu"].data.metrics[metric]
    assert not (tmp_path / "runs" / "tab-table4-u0-s0-GN" / "final_metrics.json").exists()


@pytest.mark.parametrize("table, key, values", [
    (3, "model.candidate_embedding", {"Fu": "dense", "Fu+MLP": "dense_mlp", "Cu": "cls"}),
    (4, "model.mfe.norm", {"no norm": "none", "BN": "bn", "GN": "gn"})])
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
        assert cfg["name"] == f"tab-table{table}-u0-s0-" + row.replace("+", "plus_").replace(
            " ", "_")
        settings[row] = cfg[key]
    assert settings == values
