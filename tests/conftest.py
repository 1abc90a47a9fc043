"""Test-wide settings and the one real Ray cluster the integration tests share.

The cluster is a real head node (`ray start --head`) with its dashboard / Job API, bound to
loopback, with token authentication on, as Ray 2.60 ships it. Tests connect to it as drivers, or
through its Job API.
"""
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import typing
from pathlib import Path

import pytest

# Fixtures that start real services: a test that uses one is an integration test.
INTEGRATION_FIXTURES = {"ray_head", "ray_cluster", "two_nodes", "shared_two_nodes", "s3"}


def pytest_collection_modifyitems(config, items):
    """Mark `integration` every test that uses a service fixture (tests that only start a
    subprocess or a server of their own carry the mark themselves)."""
    for item in items:
        if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)

# Ray binds a local cluster to the machine's routable address unless this is off; tests keep all
# their traffic on 127.0.0.1 (subprocesses inherit these).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
# The head node and its job drivers (`python jobs/entrypoint.py ...`) must run this interpreter,
# whose environment has the project's packages, even when the venv is not activated.
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
os.environ["RAY_AUTH_MODE"] = "token"  # client and cluster must agree: say it explicitly
# `ray start` never creates a token (only ray.init does): on a fresh machine the session brings
# its own, which the head node, the drivers and the Job API clients all read from here.
if "RAY_AUTH_TOKEN" not in os.environ:
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


def _ray(*args, env=None):
    ray_cli = Path(sys.executable).with_name("ray")
    return subprocess.run([str(ray_cli), *args], capture_output=True, text=True, timeout=180,
                          env=None if env is None else {**os.environ, **env})


def node_ports() -> list[str]:
    """`ray start` options giving a node ports of its own: with Ray's defaults, a second Ray on
    the machine (another test cluster, a user's local instance) takes the dashboard agent's port
    and this node never gets the agent that the Job API needs."""
    from splitmatch.network import free_port

    options = []
    for option in ("--node-manager-port", "--object-manager-port", "--metrics-export-port",
                   "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                   "--runtime-env-agent-port"):
        options += [option, str(free_port())]
    # Workers of nodes that share an address must not share a port range: the OS picks.
    return options + ["--min-worker-port", "0", "--max-worker-port", "0"]


def start_worker_node(gcs: str, num_cpus: int = 1):
    """`ray start --address=GCS`: one more node of that cluster on this machine, with its own temp
    dir and ports; returns (its markers, its temp dir). Stopping it is a node dying."""
    temp_dir = tempfile.mkdtemp(prefix="ray-w", dir="/tmp")
    # The variable that keeps local clusters on loopback (above) also forbids joining nodes;
    # this node names its address itself, so it may join.
    started = _ray("start", "--address", gcs, "--node-ip-address", "127.0.0.1",
                   "--num-cpus", str(num_cpus), *node_ports(), "--disable-usage-stats",
                   "--temp-dir", temp_dir, env={"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"})
    assert started.returncode == 0, started.stdout + started.stderr
    return (temp_dir,)


def start_head(num_cpus: int = 2):
    """`ray start --head` on loopback with its own temp dir and ports; returns (GCS address,
    dashboard URL, markers): every process of this cluster names one of the markers."""
    from splitmatch.network import free_port

    port, dashboard, client = free_port(), free_port(), free_port()
    # A temp dir of its own: every daemon's command line names it, so teardown stops this cluster
    # and nothing else. Short, because Ray's unix sockets live under it (108-byte path limit).
    temp_dir = tempfile.mkdtemp(prefix="ray-t", dir="/tmp")
    started = _ray("start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                   "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                   "--ray-client-server-port", str(client), "--num-cpus", str(num_cpus),
                   *node_ports(), "--disable-usage-stats", "--temp-dir", temp_dir)
    assert started.returncode == 0, started.stdout + started.stderr
    # The Ray client server is started detached from `ray start` and names no temp dir, but it
    # names the GCS address it serves.
    return f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}", (temp_dir, f"127.0.0.1:{port}")


def stop_head(markers) -> None:
    _stop_processes_under(markers)
    shutil.rmtree(markers[0], ignore_errors=True)


def cluster_processes(markers) -> list[str]:
    """Command lines of the running processes that name one of `markers`."""
    out = subprocess.run(["ps", "-ww", "-eo", "args="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if any(m in line for m in markers)]


def _stop_processes_under(markers, grace_s: float = 3.0) -> None:
    """Stop the Ray processes whose command line names one of `markers` (this cluster's temp dir
    and GCS address) and all their descendants (workers rename themselves). Not `ray stop`: that
    kills every Ray process on the machine, including clusters of other sessions or a user's
    running job. What has not exited `grace_s` after SIGTERM gets SIGKILL: a test cluster has
    nothing to save."""
    def table():  # (pid, parent pid, command line) of every process
        out = subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,args="], capture_output=True,
                             text=True).stdout
        fields = (line.split(None, 2) for line in out.splitlines())
        return [(int(f[0]), int(f[1]), f[2]) for f in fields if len(f) == 3]

    rows = table()
    doomed = {pid for pid, _, args in rows if any(m in args for m in markers)}
    while True:  # add descendants until nothing changes
        more = {pid for pid, ppid, _ in rows if ppid in doomed} - doomed
        if not more:
            break
        doomed |= more
    doomed.discard(os.getpid())
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in doomed:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while (doomed := doomed & {pid for pid, _, _ in table()}) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not doomed:
            return


@pytest.fixture(scope="session")
def ray_head():
    """(GCS address, dashboard URL) of a 2-CPU head node started for this test session."""
    gcs, dashboard, markers = start_head(num_cpus=2)
    yield gcs, dashboard
    stop_head(markers)


@pytest.fixture(scope="session")
def ray_cluster(ray_head):
    """This process connected to the session's head node as a driver; yields the GCS address."""
    import ray

    ray.init(address=ray_head[0], log_to_driver=False)
    yield ray_head[0]
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_pseudo_masks(ray_head, tmp_path_factory):
    """A pseudo-mask cache folder holding the complete cache of helpers.TINY's training split,
    built once for the session by `splitmatch pseudo` on the session's head node. Tests that train
    on TINY's data, CLIP and pseudo-mask settings but do not test building the cache pass it as
    `cache_dir` (each build costs Ray Data's start-up and the CLIP passes): the cache is keyed by
    those settings, so they find it complete and only read it. A test that changes them, or that
    damages or rebuilds a cache, keeps a cache of its own; the session's end checks that the
    folder holds only that cache, unchanged."""
    from helpers import finish, splitmatch, write_config
    from splitmatch.config import load_config
    from splitmatch.pseudo.cache import cache_dir, read_manifest

    root = tmp_path_factory.mktemp("tiny-pseudo-masks")
    config = write_config(root, "pseudo", cache_dir=root / "cache")
    finish(splitmatch("pseudo", str(config), address=ray_head[0]))
    cfg = load_config(config)
    cache = cache_dir(cfg, cfg.data.train_split)
    assert read_manifest(cache)["complete"]

    def contents():
        return sorted((str(p.relative_to(root)), p.read_bytes() if p.is_file() else b"")
                      for p in (root / "cache").rglob("*"))

    built = contents()
    yield root / "cache"
    assert contents() == built, "a test changed the session's pseudo-mask cache"


class FinishedRun(typing.NamedTuple):
    config: Path  # its YAML
    out: str  # what `splitmatch train` printed
    runs: Path  # train.storage_path: the run folder and the MLflow store
    run_dir: Path


@pytest.fixture(scope="session")
def finished_run(ray_head, tiny_pseudo_masks, tmp_path_factory):
    """helpers.TINY's 2-worker run "two" (6 iterations, weights chosen on "val", reported on
    "test"), trained once for the session for the tests that only read a finished run: its
    folder, its MLflow store and its results page. What would write beside it (a refused
    restart's traceback log, an MLflow server's log) works on a copy of `runs`."""
    import yaml

    from helpers import finish, splitmatch, write_config

    root = tmp_path_factory.mktemp("finished-run")
    config = write_config(root, "two", cache_dir=tiny_pseudo_masks)
    data = yaml.safe_load(config.read_text())
    data["data"]["select_split"] = "val"  # chosen on "val", reported on "test"
    config.write_text(yaml.safe_dump(data))
    out = finish(splitmatch("train", str(config), "--build-pseudo-masks", address=ray_head[0]))
    return FinishedRun(config, out, root / "runs", root / "runs" / "two")


class TwoNodeCluster:
    """A head node and a worker node, separate Ray node processes on this machine (Ray's own
    multi-node test helper, so that both stay on 127.0.0.1), each with its temp dir and ports.
    `kill_worker()` kills the worker node's processes; `add_worker()` brings one back."""

    def __init__(self, cpus_per_node: int = 1, node_env: tuple[dict, dict] | None = None):
        from ray.cluster_utils import Cluster

        from splitmatch.network import free_port

        from ray._common.utils import get_ray_address_file

        self.temp_dirs = [tempfile.mkdtemp(prefix="ray-m", dir="/tmp")]
        self.cpus = cpus_per_node
        # Environment of each node's processes (head, worker): what a node of a real cluster
        # would have of its own (credentials, a local disk).
        self.node_env = node_env or ({}, {})
        # Ray's helper records its address as the machine's "current cluster" (a file in the
        # default temp dir), where another Ray on this machine keeps its own: put that back, and
        # record ours in our temp dir, where this cluster's job supervisor looks for it.
        shared = Path(get_ray_address_file(None))
        before = shared.read_text() if shared.is_file() else None
        # On a fresh machine that default temp dir does not exist yet and the helper fails on it.
        self._made_dir = not shared.parent.exists()
        shared.parent.mkdir(parents=True, exist_ok=True)
        self._shared, self._before = shared, before
        for attempt in (1, 2):
            try:
                self.cluster = Cluster(initialize_head=True, connect=False, head_node_args={
                    "num_cpus": cpus_per_node, "temp_dir": self.temp_dirs[0],
                    "node_ip_address": "127.0.0.1", "include_dashboard": True,
                    "dashboard_host": "127.0.0.1", "dashboard_port": free_port(),
                    "ray_client_server_port": free_port(),
                    "env_vars": self.node_env[0] or None, **self._ports()})
                break
            except Exception:
                # Ray gives a head 30 s to register with its GCS; on a loaded 2-core machine that
                # is sometimes not enough. Not what the tests test: clean up and start once more.
                self._restore_current_cluster()
                _stop_processes_under((self.temp_dirs[0],))
                shutil.rmtree(self.temp_dirs[0], ignore_errors=True)
                if attempt == 2:
                    raise
                self.temp_dirs[0] = tempfile.mkdtemp(prefix="ray-m", dir="/tmp")
        self.address = self.cluster.address
        self._restore_current_cluster()
        Path(get_ray_address_file(self.temp_dirs[0])).write_text(self.address)
        self.dashboard = f"http://{self.cluster.head_node.webui_url}"
        self.worker = self.add_worker()

    def add_worker(self):
        self.temp_dirs.append(tempfile.mkdtemp(prefix="ray-m", dir="/tmp"))
        self.worker = self.cluster.add_node(num_cpus=self.cpus, temp_dir=self.temp_dirs[-1],
                                            node_ip_address="127.0.0.1",
                                            env_vars=self.node_env[1] or None, **self._ports())
        self.cluster.wait_for_nodes()
        return self.worker

    @staticmethod
    def _ports() -> dict:
        """The node's daemons on ports of their own (see node_ports)."""
        from splitmatch.network import free_port

        return {name: free_port() for name in (
            "metrics_export_port", "dashboard_agent_listen_port", "runtime_env_agent_port")}

    def kill_worker(self) -> list[int]:
        """SIGKILL every process of the worker node (no clean-up runs); returns their pids."""
        pids = [info.process.pid for infos in self.worker.all_processes.values()
                for info in infos if info.process is not None]
        self.cluster.remove_node(self.worker, allow_graceful=False)
        return pids

    def node_ids(self) -> tuple[str, str]:
        return self.cluster.head_node.node_id, self.worker.node_id

    def _restore_current_cluster(self) -> None:
        if self._before is None:
            self._shared.unlink(missing_ok=True)
            if self._made_dir:
                with contextlib.suppress(OSError):  # gone already, or another Ray uses it now
                    self._shared.parent.rmdir()
        else:
            self._shared.write_text(self._before)

    def stop(self) -> None:
        self.cluster.shutdown()
        self._restore_current_cluster()  # shutdown deletes that file, whoever wrote it
        _stop_processes_under((*self.temp_dirs, self.address))
        for folder in self.temp_dirs:
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def two_nodes():
    """A fresh two-node cluster (1 CPU each) for one test: tests kill its nodes."""
    nodes = TwoNodeCluster()
    yield nodes
    nodes.stop()


@pytest.fixture(scope="class")
def shared_two_nodes():
    """One two-node cluster (1 CPU each) for the tests of a class, which run in their order: each
    leaves it as it found it (both nodes up, nothing of its own running), and at most the last
    kills a node. Gone before the next class or test, so that two never run at once. A test
    that asserts on the cluster's whole state (every actor it ever had) takes `two_nodes`."""
    nodes = TwoNodeCluster()
    yield nodes
    nodes.stop()


class S3Server:
    """moto's S3-compatible server on loopback, a process of its own (its own session, stopped by
    its id), with one empty bucket. `env` is what a client needs besides the endpoint."""

    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}

    def __init__(self, log_dir: Path, bucket: str = "splitmatch"):
        import urllib.request

        from splitmatch.network import free_port

        port = free_port()
        self.endpoint, self.bucket = f"http://127.0.0.1:{port}", bucket
        self.process = subprocess.Popen(
            [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            stdout=open(log_dir / "moto.log", "wb"), stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(self.endpoint, timeout=2).close()
                break
            except OSError:
                assert self.process.poll() is None and time.time() < deadline, "moto did not start"
                time.sleep(0.2)
        self.client().create_bucket(Bucket=bucket)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, **{
            "aws_access_key_id": self.env["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": self.env["AWS_SECRET_ACCESS_KEY"],
            "region_name": self.env["AWS_DEFAULT_REGION"]})

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                         Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(timeout=20)


@pytest.fixture
def s3(tmp_path, monkeypatch):
    """An S3-compatible server for one test; this process (and the commands it starts) has its
    credentials, its endpoint and its own local mirror folder."""
    server = S3Server(tmp_path)
    for name, value in {**server.env, "AWS_ENDPOINT_URL": server.endpoint,
                        "MLFLOW_S3_ENDPOINT_URL": server.endpoint}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SPLITMATCH_MIRROR", str(tmp_path / "mirror-driver"))
    yield server
    server.stop()


def open_in_chromium(page: Path, out_dir: Path) -> dict:
    """Load a local HTML page in headless Chromium (Debian's package): its DOM after load, the
    console messages it logged, and a screenshot (numpy RGB)."""
    import numpy as np
    from PIL import Image

    chromium = shutil.which("chromium")
    assert chromium, "the browser check needs Chromium: apt-get install chromium"
    common = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
              "--v=0", "--virtual-time-budget=5000", f"--user-data-dir={out_dir / 'chromium'}"]
    dom = subprocess.run([*common, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120)
    shot = out_dir / "screenshot.png"
    subprocess.run([*common, f"--screenshot={shot}", "--window-size=1280,2000", page.as_uri()],
                   capture_output=True, text=True, timeout=120, check=True)
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    return {"dom": dom.stdout, "console": console,
            "screenshot": np.asarray(Image.open(shot).convert("RGB"))}
