"""`splitmatch tune` on a real Ray cluster and real MLflow: nested runs, a failing trial, a trial
ASHA stops early, an interrupted search resumed without re-running finished trials, and the search's
best trial being `compare`'s first row."""
import json
import math
import os
import re
import signal
import time

import pandas as pd
import pytest
import yaml
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from splitmatch.config import config_from_dict
from splitmatch.dashboards.report import build_report
from splitmatch.tracking import MlflowServer, artifact_root, default_tracking_uri
from splitmatch.tune import _summarize
from helpers import children, finish, search_config, splitmatch, tiny_config


def trial_states(search_dir):
    """Trial statuses in the newest Tune experiment-state file (empty while none is written)."""
    files = sorted(search_dir.glob("experiment_state-*.json"))
    if not files:
        return []
    try:
        data = json.loads(files[-1].read_text())
    except json.JSONDecodeError:  # caught mid-write
        return []
    return [json.loads(t[0] if isinstance(t, list) else t)["status"] for t in data["trial_data"]]


@pytest.mark.slow
def test_search_with_a_failing_trial_and_one_stopped_early(tmp_path, ray_cluster,
                                                           tiny_pseudo_masks):
    # ASHA's one rung is at iteration 1 (max_iters 2). The eval_every=2 trial has not evaluated
    # there yet, so it reports select_hIoU -1, below the eval_every=1 trial's figure (0 or more,
    # run first: one trial at a time): ASHA stops it, for real, after one iteration.
    config = search_config(tmp_path, {
        "model.num_candidate_queries": {"grid": [2]},
        "model.backbone_weights": {"grid": [None, str(tmp_path / "missing.pt")]},
        "train.eval_every": {"grid": [1, 2]}}, tiny_pseudo_masks, scheduler="asha",
        grace_period=1)
    out = finish(splitmatch("tune", str(config), address=ray_cluster))
    assert "4 trials, 2 failed, 1 stopped early" in out
    # A search reads like a training run: one display counted in trials, no Tune tables, no
    # TensorBoard hint, no links to the server that stopped with the command; then where to look.
    assert "search search: 4/4 trials (100%)" in out and "stopped early 1" in out, out[-3000:]
    for noise in ("Trial status", "tensorboard", "View run", "View experiment", "+----",
                  "Configuration for experiment", "View detailed results", "== Status =="):
        assert noise not in out, noise
    assert f"splitmatch compare --parent " in out and "splitmatch ui --storage-path" in out
    assert len(out.splitlines()) < 40, len(out.splitlines())
    # The embedded store was written through a local server; read the SQLite file directly now.
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    client = MlflowClient(uri)
    (parent,), kids = children(client)
    # The opening line names the store, not that server's address, which stops with the command.
    assert f"MLflow parent run {parent.info.run_id} at {uri}\n" in out, out[:1000]
    assert "http://" not in out, out
    assert len(kids) == 4
    assert {k.data.tags["mlflow.parentRunId"] for k in kids} == {parent.info.run_id}
    by_status = {}
    for kid in kids:
        by_status.setdefault(kid.info.status, []).append(kid)
    # The finished trial was closed by its own rank 0 (a STOP at its last report would have
    # left it RUNNING); the stopped one is closed by the search, saying so.
    assert sorted(by_status) == ["FAILED", "FINISHED", "KILLED"] and len(by_status["FAILED"]) == 2
    assert all("missing.pt" in k.data.tags["error"] for k in by_status["FAILED"])
    (good,), (stopped,) = by_status["FINISHED"], by_status["KILLED"]
    assert {"hIoU", "select_hIoU"} <= set(good.data.metrics)
    assert good.data.params["model.num_candidate_queries"] == "2"
    assert good.data.params["train.eval_every"] == "1"
    # How an ASHA-stopped trial looks in MLflow: one iteration, no evaluation, no test figures.
    assert stopped.data.params["train.eval_every"] == "2"
    assert stopped.data.metrics["iteration"] == 1 and "hIoU" not in stopped.data.metrics
    assert "best_select_hIoU" not in stopped.data.tags
    assert (stopped.data.tags["splitmatch.status"], stopped.data.tags["stopped_by"]) == (
        "stopped_early", "ASHA")
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"search_summary.csv", "best_config.yaml", "search_space.yaml"} <= artifacts
    # The chosen trial, and only it, is published: its results page and its MLflow model.
    models = client.search_logged_models([parent.info.experiment_id])
    assert [m.source_run_id for m in models] == [good.info.run_id]
    assert f"MLflow model: models:/{models[0].model_id}" in out
    assert (tmp_path / "runs" / good.info.run_name / "report.html").is_file()
    parent = client.get_run(parent.info.run_id)
    assert parent.data.metrics["best_test_hIoU"] == good.data.metrics["hIoU"]
    assert parent.data.metrics["best_select_hIoU"] == pytest.approx(
        float(good.data.tags["best_select_hIoU"]), abs=1e-4)

    # `compare` ranks as the search did, and names what became of every trial.
    report = build_report(uri, tmp_path / "compare", parent_run_id=parent.info.run_id)
    table = report["table"]
    assert table["run_name"].iloc[0] == good.info.run_name == parent.data.tags["best_run_name"]
    assert re.search(rf"best {good.info.run_name} \{{.*\}}: best hIoU", out)
    states = dict(zip(table["run_name"], table["state"]))
    assert states[good.info.run_name] == "finished"
    assert states[stopped.info.run_name] == "stopped early at iteration 1 (ASHA)"
    assert all(states[k.info.run_name].startswith("failed: ") and "missing.pt" in
               states[k.info.run_name] for k in by_status["FAILED"])
    summary = pd.read_csv(tmp_path / "runs" / "search" / "search_summary.csv")
    # Only the finished trial has a selection figure; the others follow it, in either's order.
    assert summary["select_hIoU"].notna().sum() == table["select_hIoU"].notna().sum() == 1
    assert summary["run_name"][0] == good.info.run_name
    assert sorted(summary["state"][1:])[-1] == "stopped early at iteration 1 (ASHA)"
    failed = summary[summary["state"].str.startswith("failed: ")]
    assert len(failed) == 2 and all("missing.pt" in error for error in failed["error"])


@pytest.mark.slow
def test_interrupted_search_resumes_without_rerunning_finished_trials(tmp_path, ray_cluster,
                                                                      tiny_pseudo_masks):
    server = MlflowServer(tmp_path / "server").start()
    try:
        config = search_config(tmp_path, {"model.num_candidate_queries": {"grid": [0, 3]}},
                               tiny_pseudo_masks)
        data = yaml.safe_load(config.read_text())
        data["tracking"]["uri"] = server.url
        config.write_text(yaml.safe_dump(data))
        env = {"TUNE_GLOBAL_CHECKPOINT_S": "1"}
        proc = splitmatch("tune", str(config), address=ray_cluster, start_new_session=True,
                          env_extra=env)
        client = MlflowClient(server.url)
        deadline = time.time() + 400
        # Interrupt once Tune itself has recorded a finished trial in its experiment state.
        while time.time() < deadline and "TERMINATED" not in trial_states(tmp_path / "runs" / "search"):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)  # the search driver dies mid-search
        proc.wait()
        _, kids = children(client)
        finished = {k.info.run_id: k.info.end_time for k in kids if k.info.status == "FINISHED"}
        assert len(finished) == 1
        out = finish(splitmatch("tune", str(config), "--resume", address=ray_cluster,
                                env_extra=env))
        assert "2 trials" in out
        _, kids = children(client)
        assert len(kids) == 2 and all(k.info.status == "FINISHED" for k in kids)
        for run_id, end_time in finished.items():  # the finished trial was not run again
            assert client.get_run(run_id).info.end_time == end_time
        for kid in kids:
            history = [m.step for m in client.get_metric_history(kid.info.run_id, "loss")]
            assert history == [1, 2]
    finally:
        server.stop()


def tune_result(trial_id, params, select_history, last=None, error=None):
    """A Tune trial's result as `Tuner.fit` returns it: its last report's metrics (Tune adds the
    trial id and config) and every report's (each carries the latest evaluation's select_hIoU)."""
    from ray.tune import Result

    metrics = {"trial_id": trial_id, "config": params}
    frame = None
    if error is None:
        metrics.update(last or {}, select_hIoU=select_history[-1], iteration=len(select_history))
        frame = pd.DataFrame({"select_hIoU": select_history,
                              "iteration": range(1, len(select_history) + 1)})
    return Result(metrics=metrics, checkpoint=None, error=error,
                  path=f"/tmp/run_trial_{trial_id}_0", metrics_dataframe=frame)


def test_the_search_summary_and_compare_name_the_same_best_trial(tmp_path):
    """The reviewer's case, without Ray: the Ku=0 trial's best select_hIoU (2.91, early) beats the
    Ku=8 trial's (2.04, its last), whose test hIoU is higher; choosing on the last report picked
    Ku=8, the page (on the best) Ku=0. Both now rank on the best."""
    uri = default_tracking_uri(tmp_path / "runs")
    client = MlflowClient(uri)
    experiment = client.create_experiment("search", artifact_location=artifact_root(uri))
    parent = client.create_run(experiment, run_name="toy",
                               tags={"splitmatch.kind": "search"}).info.run_id
    data = tiny_config(tmp_path, "toy", "search", max_iters=2)
    data["data"]["select_split"] = "val"
    data["tune"] = {"scheduler": "asha", "space": {"model.num_candidate_queries": {"grid": [0, 8]}}}
    cfg = config_from_dict(data)

    def trial(trial_id, history, test=None, status="FINISHED", tags=None):
        """The trial's MLflow child run as train_loop.py leaves it (NaN evaluations are not logged;
        the tag and the test figure only when rank 0 closed the run)."""
        run = client.create_run(experiment, run_name=f"toy-run_trial_{trial_id}",
                                tags={"mlflow.parentRunId": parent, **(tags or {})}).info.run_id
        metrics = [Metric("select_hIoU", v, 0, i + 1) for i, v in enumerate(history) if v >= 0]
        metrics.append(Metric("iteration", len(history), 0, len(history)))
        if test is not None:
            metrics.append(Metric("hIoU", test, 0, len(history)))
            client.set_tag(run, "best_select_hIoU", f"{max(history):.4f}")
        client.log_batch(run, metrics=metrics)
        if status != "RUNNING":
            client.set_terminated(run, status)

    results = []
    for trial_id, queries, history, test in (("ku0_00000", 0, [2.91, 1.20], 5.0),
                                             ("ku8_00001", 8, [1.00, 2.04], 9.0)):
        trial(trial_id, history, test)
        results.append(tune_result(trial_id, {"model.num_candidate_queries": queries}, history,
                                   {"hIoU": test}))
    # ASHA stopped this one after one iteration (its rank 0 never closed the MLflow run), and
    # another failed.
    trial("stop_00002", [0.5], status="RUNNING")
    results.append(tune_result("stop_00002", {"model.num_candidate_queries": 8}, [0.5]))
    trial("fail_00003", [], status="FAILED", tags={"error": "RuntimeError: no weights"})
    results.append(tune_result("fail_00003", {"model.num_candidate_queries": 0}, [],
                               error=RuntimeError("trial toy failed: no weights")))

    summary = _summarize(results, cfg, client, parent, str(tmp_path / "runs" / "toy"))
    assert summary["best_run_name"] == "toy-run_trial_ku0_00000"
    assert summary["best_params"] == {"model.num_candidate_queries": 0}
    assert summary["best_select_hIoU"] == 2.91 and summary["best_hIoU"] == 5.0
    assert (summary["trials"], summary["errors"], summary["stopped_early"]) == (4, 1, 1)
    assert [r["state"] for r in summary["rows"]] == [
        "finished", "finished", "stopped early at iteration 1 (ASHA)",
        "failed: trial toy failed: no weights"]
    stopped = client.search_runs([experiment],
                                 "attributes.run_name = 'toy-run_trial_stop_00002'")[0]
    assert stopped.info.status == "KILLED"
    assert stopped.data.tags["splitmatch.status"] == "stopped_early"

    report = build_report(uri, tmp_path / "compare", parent_run_id=parent)
    table = report["table"]
    assert list(table["run_name"]) == [r["run_name"] for r in summary["rows"]]
    assert list(table["select_hIoU"].iloc[:3]) == [r["select_hIoU"] for r in summary["rows"][:3]]
    assert math.isnan(table["select_hIoU"].iloc[3])
    assert table["state"].iloc[2] == "stopped early at iteration 1 (ASHA)"
    assert table["state"].iloc[3] == "failed: RuntimeError: no weights"
    assert f"best {summary['best_run_name']}: best hIoU 2.91" in report["message"]
