"""The MLflow layer against a real SQLite store: run lookup by key, no duplicate steps, offline
records and their replay."""
import json
import time
import warnings

import pytest
from mlflow.tracking import MlflowClient

from splitmatch.config import redact
from splitmatch.tracking import (EXPERIMENT_KIND_TAG, MODEL_TRAINING, RUNS_VIEW, Tracker,
                                 default_tracking_uri, experiment_id, find_run, literal, replay,
                                 source_tags)

# One split of a run as Tracker.log_inputs takes it (train_loop.py's `_datasets` makes them).
DATASET = {"name": "toyworld-train", "digest": "7d7f86e8683815b3", "context": "training",
           "source_type": "code", "source": '{"name": "toyworld", "split": "train"}',
           "profile": '{"images": 16}'}


def steps(client, run_id, key):
    return [m.step for m in client.get_metric_history(run_id, key)]


def test_tracker_resumes_the_same_run_without_duplicate_steps(tmp_path):
    uri = default_tracking_uri(tmp_path)
    first = Tracker(uri, "exp", "runs/a", "a", tmp_path / "offline.jsonl")
    run_id = first.open({"model.num_seen_queries": 8, "pseudo_masks.scales": [4, 6]}, {"dataset": "toyworld"})
    for step in (1, 2, 3):
        first.log_metrics({"loss": 10.0 - step}, step)
    # A restarted rank 0 replays steps 2..5 after resuming from the checkpoint at step 1.
    second = Tracker(uri, "exp", "runs/a", "a", tmp_path / "offline.jsonl")
    assert second.open({}, {}) == run_id
    for step in (2, 3, 4, 5):
        second.log_metrics({"loss": 20.0 + step}, step)
    second.finish()
    client = MlflowClient(uri)
    assert steps(client, run_id, "loss") == [1, 2, 3, 4, 5]
    run = client.get_run(run_id)
    assert run.data.params["pseudo_masks.scales"] == "[4, 6]" and run.info.status == "FINISHED"
    other = Tracker(uri, "exp", "runs/b", "b", tmp_path / "o2.jsonl")
    assert other.open({}, {}) != run_id
    assert not (tmp_path / "offline.jsonl").exists()


def test_unreachable_server_goes_offline_and_replays(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
    offline = tmp_path / "run" / "mlflow_offline.jsonl"
    # Nothing listens on port 9 of loopback: every call fails at once.
    tracker = Tracker("http://127.0.0.1:9", "exp", "runs/c", "c", offline, log=lambda *_: None)
    with pytest.warns(RuntimeWarning, match="unreachable"):
        assert tracker.open({"seed": 3}, {"dataset": "toyworld"}) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: later failures are silent
        for step in (1, 2):
            tracker.log_metrics({"loss": 5.0 / step, "hIoU": 10.0 * step}, step)
        tracker.log_inputs([DATASET])
        tracker.start_system_metrics()
        time.sleep(0.5)  # a few samples at the interval set above
        artifact = tmp_path / "config.yaml"
        artifact.write_text("seed: 3\n")
        tracker.log_artifact(artifact)
        tracker.finish()
    records = [json.loads(line) for line in offline.read_text().splitlines()]
    system = [r for r in records if r["kind"] == "metrics" and "system/cpu_utilization_percentage" in r["values"]]
    assert [r["step"] for r in system] == list(range(len(system))) and len(system) >= 2
    assert [r["kind"] for r in records if r not in system] == [
        "open", "metrics", "metrics", "inputs", "artifact", "finish"]

    uri = default_tracking_uri(tmp_path / "store")
    copy = offline.with_name("copy.jsonl")
    copy.write_text(offline.read_text())
    summary = replay(offline, uri=uri, log=lambda *_: None)
    assert summary["metrics"] == 4 + sum(len(r["values"]) for r in system)
    assert summary["artifacts"] == 1
    assert not offline.exists() and offline.with_name(offline.name + ".synced").exists()
    again = replay(copy, uri=uri, log=lambda *_: None)  # replaying twice adds nothing
    assert again["run_id"] == summary["run_id"] and again["metrics"] == 0
    client = MlflowClient(uri)
    run = client.get_run(summary["run_id"])
    assert steps(client, run.info.run_id, "loss") == [1, 2]
    assert run.data.params["seed"] == "3" and run.data.tags["dataset"] == "toyworld"
    assert run.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["config.yaml"]
    # The datasets and the system metrics come with the replay, once.
    [logged] = run.inputs.dataset_inputs
    assert logged.dataset.digest == DATASET["digest"] and logged.dataset.name == DATASET["name"]
    assert [(t.key, t.value) for t in logged.tags] == [("mlflow.data.context", "training")]
    assert steps(client, run.info.run_id, "system/system_memory_usage_megabytes") == list(range(len(system)))


def test_system_metrics_sample_the_machine_and_continue_on_resume(tmp_path, monkeypatch):
    import psutil

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    uri = default_tracking_uri(tmp_path)
    first = Tracker(uri, "exp", "runs/s", "s", tmp_path / "offline.jsonl")
    run_id = first.open({}, {})
    first.start_system_metrics()
    client = MlflowClient(uri)
    # Work the system metrics must see, until three samples are logged: counted, not timed, since
    # a loaded machine runs the sampling thread late.
    deadline = time.time() + 60
    while (len(client.get_metric_history(run_id, "system/cpu_utilization_percentage")) < 3
           and time.time() < deadline):
        busy = time.time() + 0.2
        while time.time() < busy:
            sum(i * i for i in range(10000))
    first.finish()
    history = client.get_metric_history(run_id, "system/cpu_utilization_percentage")
    assert [m.step for m in history] == list(range(len(history))) and len(history) >= 3
    assert max(m.value for m in history) > 100 / psutil.cpu_count() / 2  # one busy core, roughly
    memory = client.get_metric_history(run_id, "system/system_memory_usage_megabytes")
    assert 0 < memory[-1].value < psutil.virtual_memory().total / 1e6
    again = Tracker(uri, "exp", "runs/s", "s", tmp_path / "offline.jsonl")
    assert again.open({}, {}) == run_id
    again.start_system_metrics()
    again.finish()  # one sample at least, after the first tracker's
    after = steps(client, run_id, "system/cpu_utilization_percentage")
    assert after[:len(history)] == list(range(len(history))) and after[-1] == len(after) - 1
    assert not (tmp_path / "offline.jsonl").exists()


def test_experiments_are_marked_model_training_with_a_runs_view_of_the_figures(tmp_path):
    client = MlflowClient(default_tracking_uri(tmp_path))
    view = f"mlflow.sharedViewState.{RUNS_VIEW}"
    made = client.get_experiment(experiment_id(client, "new"))
    assert made.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING
    state = json.loads(json.loads(made.tags[view])["state"])  # a saved view as MLflow's UI writes
    assert {"metrics.`hIoU`", "metrics.`sIoU`", "metrics.`uIoU`", "attributes.`Models`",
            "attributes.`Dataset`"} <= set(state["selectedColumns"])
    # An experiment from before the tags gets them, except where someone chose otherwise.
    old = client.create_experiment("old", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    assert experiment_id(client, "old") == old
    tags = client.get_experiment(old).tags
    assert tags[EXPERIMENT_KIND_TAG] == "genai_development" and view in tags


def test_source_tags_name_the_command_not_its_arguments(monkeypatch):
    monkeypatch.setattr("sys.argv", ["/venv/bin/splitmatch", "train", "--set",
                                     "tracking.uri=http://alice:pw@host"])
    tags = source_tags()
    assert tags["mlflow.source.name"] == "splitmatch train" and tags["mlflow.source.type"] == "LOCAL"
    assert len(tags["mlflow.source.git.commit"]) == 40 and "pw" not in json.dumps(tags)
    monkeypatch.setattr("sys.argv", ["/app/jobs/entrypoint.py", "tune", "experiments/x.yaml"])
    assert source_tags()["mlflow.source.name"] == "splitmatch tune"
    assert source_tags()["mlflow.source.type"] == "JOB"


def test_replay_of_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.jsonl"):
        replay(tmp_path / "nothing.jsonl")


def test_run_keys_with_quotes_are_found_not_duplicated(tmp_path):
    # A storage path with a quote once made every MLflow query fail (the run went offline).
    folder = tmp_path / "it's \"here\""
    uri = default_tracking_uri(tmp_path)
    for key in (f"{tmp_path}/it's runs/a", f'{tmp_path}/say "hi"/a'):
        first = Tracker(uri, "exp", key, "a", tmp_path / "o.jsonl")
        run_id = first.open({}, {})
        assert Tracker(uri, "exp", key, "a", tmp_path / "o.jsonl").open({}, {}) == run_id
        assert not first.offline and not (tmp_path / "o.jsonl").exists()
        assert find_run(uri, "exp", key).info.run_id == run_id
    with pytest.raises(ValueError, match="both kinds of quote"):
        literal(str(folder))


def test_credentials_are_redacted():
    assert redact("http://alice:pw@host:5000/mlflow") == "http://***@host:5000/mlflow"
    assert redact("https://host/?token=abc&page=2") == "https://host/?token=***&page=2"
    assert redact("https://host/?X-Amz-Signature=abc") == "https://host/?X-Amz-Signature=***"
    for plain in ("sqlite:////tmp/a b/mlflow.db", "http://127.0.0.1:5000", "databricks", None):
        assert redact(plain) == plain  # nothing to hide: unchanged, to the byte


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range():
    import socket

    from splitmatch.network import ephemeral_ports_start, free_port

    # A node takes a dozen ports at once: none may repeat (the OS's port 0 once gave a Ray head
    # the same port for its GCS and its node manager).
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    low = ephemeral_ports_start()
    if low > 21000:
        assert all(20000 <= port < low for port in ports)
    for port in ports[:5]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


@pytest.mark.integration
def test_a_local_server_that_cannot_start_is_one_line_naming_its_log(tmp_path):
    import socket

    from splitmatch.errors import RunFailed
    from splitmatch.tracking import MlflowServer

    with socket.socket() as taken:  # its port is held by someone else
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = MlflowServer(tmp_path, port=taken.getsockname()[1])
        with pytest.raises(RunFailed) as failed:
            server.start()
    message = str(failed.value)
    assert "\n" not in message and f"its log: {tmp_path / 'mlflow_server.log'}" in message
    assert server.process.poll() is not None  # nothing of it is left running


def test_a_run_mlflow_never_saw_is_told_how_to_get_its_page_and_model(tmp_path):
    # The server was away when the run ended: `sync-mlflow` replays its records, then logs its
    # results page and model (test_train_ray checks that); the run's own last lines say so.
    from helpers import tiny_config
    from splitmatch.config import config_from_dict
    from splitmatch.publish import publish_results

    cfg = config_from_dict(tiny_config(tmp_path, "away"))
    uri = default_tracking_uri(tmp_path / "runs")
    lines = []
    assert publish_results(cfg, log=lines.append) is None
    assert lines == [f"no results page: MLflow at {uri} has no run of away"]
    offline = tmp_path / "runs" / "away" / "mlflow_offline.jsonl"
    offline.parent.mkdir(parents=True)
    offline.write_text("")
    lines = []
    assert publish_results(cfg, log=lines.append) is None
    assert lines == [f"no results page or MLflow model yet: MLflow at {uri} has no run of away; "
                     f"`splitmatch sync-mlflow {offline}` logs them with the run's records"]
