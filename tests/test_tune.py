"""`splitmatch tune` on a real Ray cluster and real MLflow: nested runs, a failing trial, and an
interrupted search resumed without re-running finished trials."""
import json
import os
import signal
import time

import pytest
import yaml
from mlflow.tracking import MlflowClient

from splitmatch.tracking import MlflowServer
from helpers import children, finish, search_config, splitmatch


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
def test_search_with_a_failing_trial_on_the_embedded_store(tmp_path, ray_cluster):
    config = search_config(tmp_path, {
        "model.num_candidate_queries": {"grid": [2]},
        "model.backbone_weights": {"grid": [None, str(tmp_path / "missing.pt")]}})
    out = finish(splitmatch("tune", str(config), address=ray_cluster))
    assert "2 trials, 1 failed" in out
    # The embedded store was written through a local server; read the SQLite file directly now.
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    (parent,), kids = children(client)
    assert len(kids) == 2 and {k.data.tags["mlflow.parentRunId"] for k in kids} == {parent.info.run_id}
    status = sorted(k.info.status for k in kids)
    assert status == ["FAILED", "FINISHED"]
    failed = next(k for k in kids if k.info.status == "FAILED")
    assert "missing.pt" in failed.data.tags["error"]
    good = next(k for k in kids if k.info.status == "FINISHED")
    assert {"hIoU", "select_hIoU"} <= set(good.data.metrics)
    assert good.data.params["model.num_candidate_queries"] == "2"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"search_summary.csv", "best_config.yaml", "search_space.yaml"} <= artifacts
    assert parent.data.metrics["best_test_hIoU"] == good.data.metrics["hIoU"]
    assert parent.data.metrics["best_select_hIoU"] == good.data.metrics["select_hIoU"]


@pytest.mark.slow
def test_interrupted_search_resumes_without_rerunning_finished_trials(tmp_path, ray_cluster):
    server = MlflowServer(tmp_path / "server").start()
    try:
        config = search_config(tmp_path, {"model.num_candidate_queries": {"grid": [0, 3]}})
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
