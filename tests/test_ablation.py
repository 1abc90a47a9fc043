"""`splitmatch ablation`: the four rows of the paper's Table 2 over two seeds on a real local Ray
cluster, every row an MLflow run under one parent, the printed means equal to the runs' metrics."""
import json
import math
import statistics

from mlflow.tracking import MlflowClient

from splitmatch.ablation import ROWS
from splitmatch.tracking import default_tracking_uri
from test_train_ray import finish, splitmatch, write_config


def test_ablation_rows_over_two_seeds_under_one_parent(tmp_path, ray_cluster):
    config = write_config(tmp_path, "abl", max_iters=2, num_workers=1, checkpoint_every=2,
                          eval_every=2, log_every=1, num_visualizations=0)
    out = finish(splitmatch("ablation", str(config), "--seeds", "2", address=ray_cluster),
                 timeout=600)
    lines = out.strip().splitlines()
    table = json.loads(lines[-1])  # the last line is the JSON summary
    assert list(table) == list(ROWS)
    assert all(set(table[row]) == {"hIoU", "sIoU", "uIoU"} for row in ROWS)
    for row in ROWS:  # the human table: one line per row, mean ± std over the seeds
        assert any(line.startswith(row + " ") and line.count("±") == 3 for line in lines), row

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
        assert len({r.data.params.get("seed", r.info.run_name) for r in runs}) == 2, row
        for metric in ("hIoU", "sIoU", "uIoU"):
            values = [r.data.metrics[metric] for r in runs]
            assert math.isclose(table[row][metric], round(statistics.fmean(values), 2),
                                abs_tol=0.011), (row, metric)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"ablation_table.txt", "ablation.json"} <= artifacts
    assert math.isclose(parent.data.metrics["SM_MFE/hIoU"], table["+SM+MFE"]["hIoU"],
                        abs_tol=0.006)

    # Run again: every row is already trained, so nothing retrains and no run is added; the
    # trained rows' figures come back from their saved final models.
    again = finish(splitmatch("ablation", str(config), "--seeds", "2", address=ray_cluster),
                   timeout=300)
    assert again.count("already trained") == 6 and "training baseline" not in again
    rerun = json.loads(again.strip().splitlines()[-1])
    for row in ROWS[:3]:
        assert rerun[row] == table[row], row
    assert len(client.search_runs([experiment], "")) == 1 + 2 * len(ROWS)
