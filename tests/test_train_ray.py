"""Training on a real local Ray cluster with real MLflow stores: a 2-worker run, a worker killed
mid-run, and a tracking server that goes away."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import open_in_chromium
from helpers import cli_in_process, finish, splitmatch, steps, the_run, write_config
from splitmatch.config import config_from_dict
from splitmatch.data import build_dataset
from splitmatch.splits import TOYWORLD_CLASSES
from splitmatch.tracking import MlflowServer, default_tracking_uri


def test_two_worker_run_is_tracked_and_checkpointed(tmp_path, capsys, finished_run, ray_cluster):
    config, out, runs, run_dir = finished_run  # the session's run "two", chosen on "val"
    assert "test split 'test': hIoU" in out and "weights chosen on 'val'" in out
    # Each evaluation is a progress display of its own, in images of the split that both ranks
    # share (off a terminal, its last line).
    lines = out.splitlines()
    # val: at iterations 3 and 6, then once more for the result weights' calibration.
    assert sum(line.startswith("evaluating val: 4/4 img (100%)") for line in lines) == 3, out
    assert sum(line.startswith("evaluating test: 4/4 img (100%)") for line in lines) == 1, out
    # One pid per rank (rank 0 also leaves its timeline there, which the paired bench reads).
    assert sorted(p.name for p in (run_dir / "workers").glob("*.pid")) == ["rank0.pid", "rank1.pid"]
    assert "loop_finished" in json.loads((run_dir / "workers" / "rank0.timeline.json").read_text())["marks"]
    client, run = the_run(default_tracking_uri(runs))
    metrics, params, tags = run.data.metrics, run.data.params, run.data.tags
    for key in ("hIoU", "sIoU", "uIoU", "mIoU", "loss", "lr", "loss_cls", "loss_cos", "loss_mfe_ce",
                "time/matcher_fraction"):
        assert key in metrics, key
    # Per-class IoU of every class the test split contains (absent classes are NaN: unlogged).
    test = build_dataset(config_from_dict(yaml.safe_load(config.read_text())).data, "test", train=False)
    present = set().union(*(set(test[i]["label"].unique().tolist()) for i in range(len(test)))) - {255}
    assert {f"IoU/{TOYWORLD_CLASSES[c]}" for c in present} == {k for k in metrics if k.startswith("IoU/")}
    assert steps(client, run, "loss") == [1, 2, 3, 4, 5, 6]
    # Selection looks at "val" at every evaluation; "test" is measured once, at the end.
    assert steps(client, run, "select_hIoU") == [3, 6] and steps(client, run, "hIoU") == [6]
    assert params["model.num_candidate_queries"] == "4" and params["train.num_workers"] == "2"
    assert tags["dataset"] == "toyworld" and len(tags["git_commit"]) == 40
    assert tags["pseudo_cache_key"] != "none" and run.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "predictions"} <= artifacts
    # The weights reach MLflow once, as the run's logged model, not also as an artifact.
    assert "checkpoints" not in artifacts
    best = max(m.value for m in client.get_metric_history(run.info.run_id, "select_hIoU"))
    assert float(tags["best_select_hIoU"]) == pytest.approx(best, abs=1e-4)  # what compare ranks on
    [model] = client.search_logged_models([run.info.experiment_id])
    assert model.source_run_id == run.info.run_id
    pictures = [a.path for a in client.list_artifacts(run.info.run_id, "predictions")]
    assert pictures == ["predictions/it0000006_test0.png"]
    checkpoints = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert checkpoints and all((c / "state.pt").exists() for c in checkpoints)
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["selected"] and final["hIoU"] == pytest.approx(metrics["hIoU"])

    # The run's results page: printed, next to the run, logged to MLflow, linked from compare,
    # and it renders in a real browser with no console errors and every image decoded.
    page = run_dir / "report.html"
    assert f"results page: {page}" in out
    assert "report.html" in {a.path for a in client.list_artifacts(run.info.run_id)}
    text = page.read_text()
    for section in ("Per-class IoU on the test split", "Training curves", "Predictions on test images",
                    "Pseudo masks of unseen candidates", "candidate 0: nearest class"):
        assert section in text, section
    assert "</td><td>unseen</td>" in text and "</td><td>seen</td>" in text
    browser = open_in_chromium(page, tmp_path)
    assert browser["console"] == [] and 'data-images-loaded="true"' in browser["dom"]
    assert browser["screenshot"].std() > 10  # not a blank page
    from splitmatch.dashboards.report import build_report

    report = build_report(default_tracking_uri(runs), tmp_path / "compare")
    assert f'href="{page.as_uri()}"' in Path(report["report"]).read_text()

    # A finished model evaluates on its own, with per-class IoU in a CSV.
    csv = tmp_path / "per_class.csv"
    code, out = cli_in_process(capsys, "eval", config, "--checkpoint", checkpoints[-1],
                               "--out", csv)
    assert code == 0, out[-4000:]
    rows = csv.read_text().splitlines()
    assert rows[0] == "class,split,IoU" and len(rows) == 11 and "leaf,unseen," in csv.read_text()
    # The test figures belong to the weights chosen on "val": evaluating best_model.pt alone
    # gives them again.
    code, out = cli_in_process(capsys, "eval", config, "--checkpoint", run_dir / "best_model.pt")
    assert code == 0, out[-4000:]
    assert f"hIoU {metrics['hIoU']:.2f}" in out, out[-2000:]
    # Starting the same run again without --resume is refused instead of silently resuming. On
    # a copy of its runs folder (run and MLflow store): the refusal leaves its traceback log in
    # the runs folder, and the session's run is only read.
    shutil.copytree(runs, tmp_path / "runs")
    data = yaml.safe_load(config.read_text())
    data["train"]["storage_path"] = str(tmp_path / "runs")
    config = tmp_path / config.name
    config.write_text(yaml.safe_dump(data))
    code, out = cli_in_process(capsys, "train", config)
    assert code == 2 and "--resume" in out


@pytest.mark.slow
def test_killed_worker_resumes_from_checkpoint(tmp_path, ray_cluster, tiny_pseudo_masks):
    config = write_config(tmp_path, "kill", tiny_pseudo_masks, max_iters=10, checkpoint_every=4,
                          eval_every=8, max_failures=2)
    proc = splitmatch("train", str(config), "--build-pseudo-masks", address=ray_cluster)
    run_dir = tmp_path / "runs" / "kill"
    deadline = time.time() + 300
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    # Wait until Ray Train has registered a checkpoint (not merely until rank 0 wrote one: a
    # checkpoint counts only once every rank has reported it).
    while time.time() < deadline and not (snapshot.exists() and "checkpoint_dir_name" in snapshot.read_text()):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    victim = int((run_dir / "workers" / "rank1.pid").read_text())
    os.kill(victim, signal.SIGKILL)  # a real worker death, not an exception
    finish(proc)
    assert int((run_dir / "workers" / "rank1.pid").read_text()) != victim  # a new worker group
    client, run = the_run(default_tracking_uri(tmp_path / "runs"))
    assert steps(client, run, "loss") == list(range(1, 11)), "a step was logged twice or lost"
    assert run.data.metrics["iteration"] == 10 and run.info.status == "FINISHED"
    assert int(run.data.tags["resumed_from_iteration"]) >= 4


@pytest.mark.slow
def test_tracking_server_outage_does_not_stop_training(tmp_path, ray_cluster, tiny_pseudo_masks):
    server = MlflowServer(tmp_path / "server").start()
    port = server.port
    try:
        config = write_config(tmp_path, "outage", tiny_pseudo_masks, max_iters=10, num_workers=1,
                              batch_size=2, checkpoint_every=5, eval_every=5)
        data = yaml.safe_load(config.read_text())
        # Credentials in the URI (the server does not check them) must not be shown or stored.
        data["tracking"]["uri"] = server.url.replace("http://", "http://alice:s3cret-pw@")
        config.write_text(yaml.safe_dump(data))
        proc = splitmatch("train", str(config), "--build-pseudo-masks", address=ray_cluster)
        client = MlflowClient(server.url)
        deadline = time.time() + 300
        logged = []
        while time.time() < deadline and len(logged) < 2:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            exp = client.get_experiment_by_name("tests")
            runs = client.search_runs([exp.experiment_id]) if exp else []
            logged = steps(client, runs[0], "loss") if runs else []
            time.sleep(0.2)
        server.stop()  # the server goes away mid-run
        out = finish(proc)
        assert "unreachable" in out and f"MLflow at {server.url} is unreachable" in out
        offline = tmp_path / "runs" / "outage" / "mlflow_offline.jsonl"
        assert offline.exists()
        for stored in (offline, tmp_path / "runs" / "outage" / "config.yaml"):
            assert "s3cret" not in stored.read_text() and "alice" not in stored.read_text(), stored
        assert "s3cret" not in out
        server = MlflowServer(tmp_path / "server", port=port).start()
        client = MlflowClient(server.url)
        run = client.search_runs([client.get_experiment_by_name("tests").experiment_id])[0]
        assert len(steps(client, run, "loss")) < 10
        finish(subprocess.Popen([sys.executable, "-m", "splitmatch.cli", "sync-mlflow",
                                 str(offline)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True))
        run = client.get_run(run.info.run_id)
        assert steps(client, run, "loss") == list(range(1, 11))
        assert run.data.params["tracking.uri"] == server.url  # the credentials went elsewhere
        # No selection split: the test split is evaluated once, at the end.
        assert steps(client, run, "hIoU") == [10] and run.info.status == "FINISHED"
        # What the run could not log at its end comes with the replay: its page, its datasets,
        # its system metrics and its model.
        assert "report.html" in {item.path for item in client.list_artifacts(run.info.run_id)}
        assert {d.dataset.name for d in run.inputs.dataset_inputs} == {"toyworld-train",
                                                                       "toyworld-test"}
        assert "system/cpu_utilization_percentage" in run.data.metrics
        [model] = client.search_logged_models([run.info.experiment_id])
        assert model.source_run_id == run.info.run_id and {"hIoU", "sIoU", "uIoU"} <= {
            m.key for m in model.metrics}
    finally:
        server.stop()


def test_more_cpus_than_the_cluster_has_is_refused_before_any_work(tmp_path, ray_cluster):
    config = write_config(tmp_path, "greedy", cpus_per_worker=2)  # 2 workers x 2 CPUs > 2
    proc = splitmatch("train", str(config), "--build-pseudo-masks", address=ray_cluster)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert ("train.num_workers / train.cpus_per_worker / train.use_gpu: 2 Ray Train workers of 2 CPU "
            "each are needed at once, but the 1 node(s) of the Ray cluster hold 1") in out, out[-2000:]
    assert not (tmp_path / "cache").exists() and not (tmp_path / "runs" / "greedy").exists()


def test_a_deterministic_error_in_a_worker_is_one_line_and_not_retried(tmp_path, ray_cluster,
                                                                      tiny_pseudo_masks):
    # Found inside the worker (the training split is only read there), with restarts allowed.
    config = write_config(tmp_path, "toobig", tiny_pseudo_masks, num_workers=1, batch_size=64,
                          max_failures=3)
    proc = splitmatch("train", str(config), "--build-pseudo-masks", address=ray_cluster)
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 2, out[-3000:]
    error_log = tmp_path / "runs" / "toobig" / "error.log"
    last = out.strip().splitlines()[-1]
    assert last.startswith("config error: 'train.batch_size' (64, over 1 workers) is more than the "
                           "16 images of split 'train': lower it with --set (rank 0; traceback in "
                           f"{error_log})"), last
    assert "[traceback: " in last  # the driver's side, in the runs folder's logs
    assert "restarting from the newest checkpoint" not in out  # the same input fails the same way
    text = error_log.read_text()
    # One failure recorded: the worker group was not started again.
    assert text.count("--- ") == 1 and "training failed" in text and "ConfigError" in text


@pytest.mark.slow
def test_a_run_folder_in_use_is_refused_whichever_starts_second(tmp_path, ray_cluster,
                                                                tiny_pseudo_masks):
    config = write_config(tmp_path, "twice", tiny_pseudo_masks, max_iters=4, num_workers=1,
                          batch_size=2, checkpoint_every=2, eval_every=4, num_visualizations=0)
    first = splitmatch("train", str(config), "--build-pseudo-masks", address=ray_cluster)
    time.sleep(1.0)  # a second apart: which one takes the folder is a race
    second = splitmatch("train", str(config), "--build-pseudo-masks", address=ray_cluster)
    run_dir = tmp_path / "runs" / "twice"
    deadline = time.time() + 240
    while not (run_dir / "config.yaml").exists() and time.time() < deadline:
        time.sleep(0.2)
    # Once the folder exists and its run goes on, a third start is refused as well.
    third = subprocess.run([sys.executable, "-m", "splitmatch.cli", "train", str(config)],
                           env=dict(os.environ, RAY_ADDRESS=ray_cluster), capture_output=True,
                           text=True, timeout=120)
    outcomes = []
    for proc in (first, second):
        out, _ = proc.communicate(timeout=400)
        outcomes.append((proc.returncode, out))
    (won, out_won), (lost, out_lost) = sorted(outcomes, key=lambda o: o[0])
    assert won == 0 and "test split 'test': hIoU" in out_won and "nan" not in out_won, out_won
    assert lost == 2, out_lost[-3000:]
    for code, err in ((lost, out_lost), (third.returncode, third.stderr)):
        line = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert code == 2 and len(line) == 1, err[-3000:]
        assert f"run 'twice' in {run_dir} is in use by pid " in line[0], line
        assert "choose another name (--set name=...)" in line[0]
    client, run = the_run(default_tracking_uri(tmp_path / "runs"))  # one MLflow run, finished
    assert run.info.status == "FINISHED" and steps(client, run, "loss") == [1, 2, 3, 4]
