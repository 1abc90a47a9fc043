"""MLflow tracking that a training run can rely on.

One `Tracker` per training run, used by rank 0 only. It finds or creates the run by a deterministic
key (so a resumed run, or a restarted worker group, keeps logging into the same MLflow run), logs
through an explicit `MlflowClient` (no global active-run state), and never lets the tracking server
stop the training: on the first failure it warns once, then appends every call it could not make to
a local JSONL file that `splitmatch sync-mlflow` replays later. After a resume it skips metric steps
the run already has, so no step is logged twice.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from splitmatch.config import ConfigError, redact
from splitmatch.errors import RunFailed
from splitmatch.network import free_port
from splitmatch.progress import verbose

# Fail fast against a dead server instead of MLflow's default of minutes of retries: training must
# not stall on tracking. A server that is down refuses at once; the timeout only bounds a request
# that was accepted, and one of those is a checkpoint uploaded through the server to its artifact
# store (S3): give it a minute. Set before mlflow reads them; users can still override.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
# Its per-file download bars would scroll through a command's output (results page, eval).
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
if not verbose():
    # "Creating initial MLflow database tables... / Updating database tables" whenever a
    # command first opens an embedded store: MLflow's INFO lines, like Ray's, wait for --verbose.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    # "Skip logging GPU metrics" on every CPU run, from the rank-0 worker into the driver's output.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)

RUN_KEY_TAG = "splitmatch.run_key"
# A run's records kept while its server is away, beside its checkpoints (`splitmatch sync-mlflow`).
OFFLINE_FILE = "mlflow_offline.jsonl"
# What MLflow records of an experiment's kind: model training, not GenAI (traces, judges,
# prompts). MLflow 3.17's UI opens every experiment as its sidebar's switch says (GenAI unless
# the browser chose otherwise, or the URL says workflowType=machine_learning: `runs_view_url`).
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
# A saved view of an experiment's runs table (MLflow's "Views" menu, an experiment tag as the UI
# writes it) with the figures a run is judged by: MLflow's default columns show no metric.
RUNS_VIEW = "splitmatch"
RUNS_VIEW_COLUMNS = ["attributes.`Source`", "attributes.`Models`", "attributes.`Dataset`",
                     "metrics.`select_hIoU`", "metrics.`hIoU`", "metrics.`sIoU`", "metrics.`uIoU`"]


def default_tracking_uri(storage_path: str | Path) -> str:
    """The embedded store: one SQLite file beside the runs, absolute (trials chdir elsewhere)."""
    if "://" in str(storage_path):
        # SQLite cannot live on object storage, and a local file would be one node's alone.
        raise ConfigError(f"train.storage_path is {storage_path}: runs there need an MLflow server "
                          f"all nodes reach: set tracking.uri (its artifacts can go to the same "
                          f"object store: mlflow server --artifacts-destination s3://...)")
    return f"sqlite:///{Path(storage_path).resolve() / 'mlflow.db'}"


def artifact_root(tracking_uri: str) -> str | None:
    """Artifacts of the embedded store live beside its database; a server decides for itself."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return None


def git_commit() -> str:
    """The commit of the source tree the package runs from ("unknown" outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def source_tags() -> dict[str, str]:
    """MLflow's own tags of where a run comes from (its Source and User columns, the commit on the
    run page), for the process that starts the run: the splitmatch command (its first word only:
    later ones may carry credentials) and the git commit of the code."""
    import getpass

    program, words = Path(sys.argv[0]).name, sys.argv[1:2]
    if program in ("splitmatch", "cli.py", "entrypoint.py") and words:  # entrypoint: a Ray Job
        name = f"splitmatch {words[0]}"
    elif program == "default_worker.py":  # only Tune trials start a run inside a Ray worker
        name = "splitmatch tune"
    else:
        name = program or "python"
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container's uid without a passwd entry
        user = "unknown"
    tags = {"mlflow.source.name": name, "mlflow.user": user,
            "mlflow.source.type": "JOB" if program == "entrypoint.py" else "LOCAL"}
    commit = git_commit()
    if commit != "unknown":  # outside a checkout (an installed package, a Ray Job's copy)
        tags["mlflow.source.git.commit"] = commit
    return tags


def _client(uri: str):
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=uri)


def experiment_id(client, experiment: str, artifact_location: str | None = None) -> str:
    """The id of `experiment`, created (with that artifact root) if it does not exist yet; marked
    as model training for MLflow's UI unless someone chose otherwise."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        try:
            return client.create_experiment(experiment, artifact_location=artifact_location,
                                            tags=_experiment_tags())
        except Exception:  # created concurrently by another process: look it up again
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                raise
    _tag_experiment(client, exp)
    return exp.experiment_id


def _experiment_tags() -> dict[str, str]:
    now = int(time.time() * 1000)
    view = {"name": "splitmatch: hIoU, sIoU, uIoU", "createdAt": now, "updatedAt": now,
            "state": json.dumps({"selectedColumns": RUNS_VIEW_COLUMNS})}
    return {EXPERIMENT_KIND_TAG: MODEL_TRAINING,
            f"mlflow.sharedViewState.{RUNS_VIEW}": json.dumps(view)}


def _tag_experiment(client, exp) -> None:
    """Give an experiment from before them its kind and runs view (not over a user's choice)."""
    for key, value in _experiment_tags().items():
        if key not in exp.tags:
            client.set_experiment_tag(exp.experiment_id, key, value)


def runs_view_url(server_url: str, experiment_id: str, view: str = RUNS_VIEW) -> str:
    """An experiment's runs in MLflow's model-training view, in its saved view `view`."""
    return (f"{server_url}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
            f"&viewStateShareKey={view}")


def runs_view_urls(server_url: str) -> dict[str, str]:
    """{experiment name: `runs_view_url`} of the store behind `server_url` (experiments from
    before the view get it first); MLflow's own empty Default experiment is left out."""
    client = _client(server_url)
    urls = {}
    for exp in client.search_experiments():
        if exp.experiment_id == "0" and not client.search_runs(["0"], max_results=1):
            continue
        _tag_experiment(client, exp)
        urls[exp.name] = runs_view_url(server_url, exp.experiment_id)
    return urls


def find_or_create_run(client, experiment: str, run_key: str, run_name: str,
                       parent_run_id: str | None = None, tags: dict | None = None,
                       artifact_location: str | None = None) -> tuple[str, bool]:
    """(run id, whether it already existed) for the run tagged `run_key` in `experiment`."""
    exp_id = experiment_id(client, experiment, artifact_location)
    found = _run_with_key(client, exp_id, run_key)
    if found is not None:
        return found.info.run_id, True
    all_tags = {RUN_KEY_TAG: run_key, **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    return run.info.run_id, False


def open_parent_run(client, uri: str, cfg, name: str, kind: str, tags: dict | None = None
                    ) -> tuple[str, bool]:
    """(run id, whether it existed) of the parent run `name` of a search or an ablation, keyed by
    its folder under `train.storage_path`, so that a rerun finds it instead of adding another."""
    from splitmatch import storage

    return find_or_create_run(
        client, cfg.tracking.experiment, storage.join(cfg.train.storage_path, name), name,
        tags={"splitmatch.kind": kind, "git_commit": git_commit(), "dataset": cfg.data.dataset,
              **source_tags(), **(tags or {})}, artifact_location=artifact_root(uri))


def _run_with_key(client, exp_id: str, run_key: str):
    found = client.search_runs([exp_id], filter_string=f"tags.`{RUN_KEY_TAG}` = {literal(run_key)}",
                               max_results=1)
    return found[0] if found else None


def literal(value: str) -> str:
    """`value` as a string literal of an MLflow search filter. MLflow's filter parser knows no
    escapes: a value with a single quote goes in double quotes, and one with both cannot be said."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"{value!r} holds both kinds of quote, which MLflow search filters cannot "
                     f"express: rename the path or run")


def find_run(uri: str, experiment: str, run_key: str):
    """The run tagged `run_key` in `experiment`, or None (also when the store cannot be read)."""
    try:
        client = _client(uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return None
        return _run_with_key(client, exp.experiment_id, run_key)
    except Exception:  # noqa: BLE001 - a store that is down has no run to report on
        return None


def mark_ended(uri: str, experiment: str, run_key: str, status: str, why: str) -> bool:
    """Close a run that its workers could not close (Ctrl-C, a failure, a driver killed with -9):
    `status` KILLED or FAILED, `why` in its tag splitmatch.status. Best effort, since the store
    may be what failed; returns whether a running run was marked."""
    run = find_run(uri, experiment, run_key)
    if run is None or run.info.status != "RUNNING":
        return False
    try:
        client = _client(uri)
        client.set_tag(run.info.run_id, "splitmatch.status", why)
        client.set_terminated(run.info.run_id, status=status)
    except Exception:  # noqa: BLE001 - the caller's own error says what went wrong
        return False
    return True


class Tracker:
    """Rank-0 MLflow logging for one training run; see the module docstring."""

    def __init__(self, uri: str, experiment: str, run_key: str, run_name: str,
                 offline_path: str | Path, parent_run_id: str | None = None, log=print):
        self.uri = uri
        self.experiment = experiment
        self.run_key = run_key
        self.run_name = run_name
        self.parent_run_id = parent_run_id
        self.offline_path = Path(offline_path)
        self.run_id: str | None = None
        self.offline = False
        self.log = log
        self._floor: dict[str, int] = {}  # metric → last step the run already has (after resume)
        self._client = None
        self._system: SystemMetrics | None = None
        # The system-metrics thread logs too: one call (or offline record) at a time.
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ failure handling

    def _go_offline(self, what: str, exc: Exception) -> None:
        if not self.offline:
            # The client's own error repeats the URL, credentials and all.
            userinfo = urlsplit(self.uri).netloc.rpartition("@")[0]
            error = str(exc).replace(f"{userinfo}@", "***@") if userinfo else str(exc)
            message = (f"MLflow at {redact(self.uri)} is unreachable ({type(exc).__name__}: "
                       f"{error}); training goes on and unsent records go to {self.offline_path} "
                       f"— replay them with `splitmatch sync-mlflow {self.offline_path}`")
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            self.log(f"warning: {message}")
        self.offline = True

    def _record(self, record: dict) -> None:
        self.offline_path.parent.mkdir(parents=True, exist_ok=True)
        header = {"uri": redact(self.uri), "experiment": self.experiment, "run_key": self.run_key,
                  "run_name": self.run_name, "parent_run_id": self.parent_run_id, "run_id": self.run_id}
        with open(self.offline_path, "a") as handle:
            handle.write(json.dumps({**header, **record}) + "\n")

    def _do(self, record: dict, call) -> None:
        with self._lock:
            if not self.offline:
                try:
                    call()
                    return
                except Exception as exc:  # the one place where "record and go on" is the requirement
                    self._go_offline(record["kind"], exc)
            self._record(record)

    # ------------------------------------------------------------------ API

    def open(self, params: dict[str, Any], tags: dict[str, str]) -> str | None:
        """Find (resume) or create the run and log params + tags; returns the run id or None."""
        def call():
            self._client = _client(self.uri)
            self.run_id, existed = find_or_create_run(
                self._client, self.experiment, self.run_key, self.run_name, self.parent_run_id,
                tags, artifact_root(self.uri))
            if existed:
                self._load_floor()
                self._client.update_run(self.run_id, status="RUNNING")
            else:
                self._log_params(params)
            self._client.set_tag(self.run_id, "splitmatch.status", "running")
        try:
            call()
        except Exception as exc:
            self._go_offline("open", exc)
            self._record({"kind": "open", "params": _stringify(params), "tags": tags})
        return self.run_id

    def _load_floor(self) -> None:
        run = self._client.get_run(self.run_id)
        for key in run.data.metrics:
            history = self._client.get_metric_history(self.run_id, key)
            if history:
                self._floor[key] = max(m.step for m in history)

    def _log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param
        items = [Param(k, v) for k, v in _stringify(params).items()]
        for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self._client.log_batch(self.run_id, params=items[start:start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        fresh = {k: float(v) for k, v in metrics.items() if step > self._floor.get(k, -1)}
        if not fresh:
            return
        timestamp = int(time.time() * 1000)

        def call():
            from mlflow.entities import Metric
            self._client.log_batch(self.run_id, metrics=[
                Metric(k, v, timestamp, step) for k, v in fresh.items()])
        self._do({"kind": "metrics", "step": step, "timestamp": timestamp, "values": fresh}, call)

    def log_inputs(self, datasets: list[dict]) -> None:
        """The run's datasets (MLflow's Dataset fields: name, digest, source_type, source, profile;
        plus context: training, validation, test), as MLflow's `log_input` would log them."""
        self._do({"kind": "inputs", "datasets": datasets},
                 lambda: self._client.log_inputs(self.run_id, _dataset_inputs(datasets)))

    def start_system_metrics(self) -> None:
        """CPU, memory, disk, network and GPU figures as MLflow's system/* metrics, until finish."""
        if self._system is None:
            first = max((step for key, step in self._floor.items() if key.startswith("system/")),
                        default=-1) + 1  # a resumed run's samples continue its own
            self._system = SystemMetrics(self, first)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path).resolve()
        self._do({"kind": "artifact", "path": str(path), "artifact_path": artifact_path},
                 lambda: self._client.log_artifact(self.run_id, str(path), artifact_path))

    def set_tags(self, tags: dict[str, str]) -> None:
        def call():
            for key, value in tags.items():
                self._client.set_tag(self.run_id, key, str(value))
        self._do({"kind": "tags", "tags": {k: str(v) for k, v in tags.items()}}, call)

    def finish(self, status: str = "FINISHED") -> None:
        if self._system is not None:
            self._system.stop()
            self._system = None

        def call():
            self._client.set_tag(self.run_id, "splitmatch.status", status.lower())
            self._client.set_terminated(self.run_id, status=status)
        self._do({"kind": "finish", "status": status}, call)


class SystemMetrics:
    """MLflow's system metrics, sampled by MLflow's own monitors (at its sampling interval,
    MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL, 10 s) on a thread of their own, but logged through
    the Tracker: MLflow's monitor thread sends to the server itself and stops for good at the
    first failure, so an outage would lose the rest of the run's figures instead of keeping
    them for `sync-mlflow`. They are rank 0's node's figures (GPU ones where NVML finds one)."""

    def __init__(self, tracker: Tracker, first_step: int):
        import psutil
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        # Only its monitors and their aggregation are used: it logs nothing unless started.
        self.monitor = SystemMetricsMonitor(tracker.run_id or "", tracking_uri=tracker.uri)
        self.tracker, self.step, self.samples = tracker, first_step, 0
        # The CPU figure is the use since the previous call (the first call says 0.0).
        psutil.cpu_percent()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="splitmatch-system-metrics",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(float(self.monitor.sampling_interval)):
            self._sample()
            if self.samples >= int(self.monitor.samples_before_logging):
                self._publish()

    def _sample(self) -> None:
        self.monitor.collect_metrics()
        self.samples += 1

    def _publish(self) -> None:
        figures = self.monitor.aggregate_metrics()
        for monitor in self.monitor.monitors:
            monitor.clear_metrics()
        self.samples = 0
        if figures:
            self.tracker.log_metrics({f"system/{k}": v for k, v in figures.items()}, self.step)
            self.step += 1

    def stop(self) -> None:
        """The time since the last sample is sampled and logged too: a run shorter than the
        interval gets one figure of each."""
        self._stop.set()
        self._thread.join()
        self._sample()
        self._publish()


def _dataset_inputs(datasets: list[dict]):
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    return [DatasetInput(Dataset(**{k: v for k, v in d.items() if k != "context"}),
                         [InputTag(MLFLOW_DATASET_CONTEXT, d["context"])]) for d in datasets]


def _stringify(params: dict[str, Any]) -> dict[str, str]:
    return {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v) for k, v in params.items()}


def replay(offline_path: str | Path, uri: str | None = None, log=print) -> dict:
    """`splitmatch sync-mlflow`: send the records of an offline file to MLflow, in order.

    The run is found by its key (or created, if it never reached the server); metric steps the run
    already has are skipped, so replaying twice is harmless. The file is renamed `*.synced` after.
    """
    offline_path = Path(offline_path)
    records = _offline_records(offline_path)
    if not records:
        return {"records": 0, "finished": False}
    first = records[0]
    # The file keeps no credentials: a redacted user:password@ comes back from MLflow's own
    # MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or pass --tracking-uri).
    uri = uri or first["uri"].replace("***@", "")
    client = _client(uri)
    run_id, existed = find_or_create_run(client, first["experiment"], first["run_key"],
                                         first["run_name"], first["parent_run_id"],
                                         artifact_location=artifact_root(uri))
    floor = _last_steps(client, run_id)
    counts = {"metrics": 0, "skipped_steps": 0, "artifacts": 0, "tags": 0}
    for record in records:
        _replay_record(client, run_id, existed, record, floor, counts)
    offline_path.rename(offline_path.with_name(offline_path.name + ".synced"))
    log(f"replayed {len(records)} records into run {run_id} at {redact(uri)}: {counts}")
    finished = any(r["kind"] == "finish" and r["status"] == "FINISHED" for r in records)
    return {"records": len(records), "run_id": run_id, "uri": uri, "finished": finished, **counts}


def _offline_records(offline_path: Path) -> list[dict]:
    if not offline_path.is_file():
        raise FileNotFoundError(f"no offline MLflow records at {offline_path}")
    return [json.loads(line) for line in offline_path.read_text().splitlines() if line.strip()]


def _last_steps(client, run_id: str) -> dict[str, int]:
    """Metric → the last step run `run_id` already has."""
    run = client.get_run(run_id)
    return {key: max(m.step for m in client.get_metric_history(run_id, key))
            for key in run.data.metrics}


def _replay_record(client, run_id: str, existed: bool, record: dict, floor: dict[str, int],
                   counts: dict[str, int]) -> None:
    """Send one offline record to the run, moving `floor` past the metric steps it logs and
    adding to `counts`."""
    from mlflow.entities import Metric, Param

    kind = record["kind"]
    if kind == "open":
        if not existed:
            params = [Param(k, v) for k, v in record["params"].items()]
            for start in range(0, len(params), 100):
                client.log_batch(run_id, params=params[start:start + 100])
        for key, value in record["tags"].items():
            client.set_tag(run_id, key, value)
    elif kind == "metrics":
        fresh = {k: v for k, v in record["values"].items() if record["step"] > floor.get(k, -1)}
        counts["skipped_steps"] += len(record["values"]) - len(fresh)
        if fresh:
            client.log_batch(run_id, metrics=[Metric(k, v, record["timestamp"], record["step"])
                                              for k, v in fresh.items()])
            counts["metrics"] += len(fresh)
            for k in fresh:
                floor[k] = record["step"]
    elif kind == "inputs":
        client.log_inputs(run_id, _dataset_inputs(record["datasets"]))
    elif kind == "artifact":
        client.log_artifact(run_id, record["path"], record["artifact_path"])
        counts["artifacts"] += 1
    elif kind == "tags":
        for key, value in record["tags"].items():
            client.set_tag(run_id, key, value)
        counts["tags"] += 1
    elif kind == "finish":
        client.set_tag(run_id, "splitmatch.status", record["status"].lower())
        client.set_terminated(run_id, status=record["status"])


class MlflowServer:
    """A local `mlflow server` over one SQLite file: the single writer that concurrent trials (or a
    test) log to over HTTP, since many processes writing one SQLite file fail with "database is
    locked". Binds to loopback unless told otherwise. Artifacts go to `store_dir/mlartifacts`, or
    to `artifacts` (e.g. s3://bucket/prefix: the server uploads them, with the endpoint and
    credentials of its environment)."""

    def __init__(self, store_dir: str | Path, host: str = "127.0.0.1", port: int | None = None,
                 artifacts: str | None = None, admin_password: str | None = None):
        self.store_dir = Path(store_dir).resolve()
        self.artifacts = artifacts or str(self.store_dir / "mlartifacts")
        self.host = host
        self.port = port or free_port(host)
        # With a password: MLflow's basic-auth app, user "admin" (its users in store_dir).
        self.admin_password = admin_password
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 300.0) -> "MlflowServer":
        """Start it and wait until it answers; RunFailed (one line, naming its log) when it
        exits or does not answer within `timeout` (its start imports MLflow's server, which
        takes minutes on a loaded small machine)."""
        import sys
        import urllib.request

        self.store_dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "mlflow", "server",
                   "--backend-store-uri", f"sqlite:///{self.store_dir / 'mlflow.db'}",
                   "--artifacts-destination", self.artifacts,
                   "--host", self.host, "--port", str(self.port), "--workers", "1"]
        env = None
        if self.admin_password:
            import secrets

            command += ["--app-name", "basic-auth"]
            env = {**os.environ, "MLFLOW_AUTH_ADMIN_PASSWORD": self.admin_password,
                   "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}
        log = open(self.store_dir / "mlflow_server.log", "ab")
        # Its own session, so stopping it also stops the web workers it forks. In store_dir: the
        # basic-auth app keeps its users in ./basic_auth.db.
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True, cwd=self.store_dir, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RunFailed(f"the local MLflow server for {self.store_dir} exited with "
                                f"{self.process.returncode}; its log: "
                                f"{self.store_dir / 'mlflow_server.log'}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.25)
        self.stop()
        raise RunFailed(f"the local MLflow server for {self.store_dir} did not answer at "
                        f"{self.url} within {timeout:.0f} s; its log: "
                        f"{self.store_dir / 'mlflow_server.log'}")

    def stop(self) -> None:
        import signal

        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None

    def __enter__(self) -> "MlflowServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
