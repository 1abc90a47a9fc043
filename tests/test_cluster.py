"""Whether work fits on a cluster's nodes is decided per node, before anything starts; what a
local instance listens on."""
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import stop_head
from helpers import SHORT, write_config
from splitmatch.cluster import _starts_local_instance, check_fits, how_many_fit
from splitmatch.config import ConfigError

TWO_SMALL = [{"CPU": 1.0, "memory": 1e9}, {"CPU": 1.0, "GPU": 1.0}]


def test_items_are_placed_on_single_nodes():
    assert how_many_fit(TWO_SMALL, {"CPU": 1.0}) == 2
    assert how_many_fit(TWO_SMALL, {"CPU": 2.0}) == 0  # 2 CPUs in total, but on no one node
    assert how_many_fit(TWO_SMALL, {"CPU": 1.0, "GPU": 1.0}) == 1
    assert how_many_fit([{"CPU": 16.0, "GPU": 8.0}], {"CPU": 2.0, "GPU": 1.0}) == 8
    assert how_many_fit([{"CPU": 3.0}], {"CPU": 0.5, "GPU": 0.0}) == 6


def test_work_that_no_node_can_hold_is_named_by_key():
    with pytest.raises(ConfigError, match=r"train.cpus_per_worker: one Ray Train worker needs 2 CPU, "
                                          r"more than any of the 2 node\(s\)"):
        check_fits("Ray Train worker", 2, {"CPU": 2.0}, "train.cpus_per_worker", nodes=TWO_SMALL)
    with pytest.raises(ConfigError, match=r"3 Ray Train workers of 1 CPU, 1 GPU each are needed "
                                          r"at once, but the 2 node\(s\) of the Ray cluster hold 1"):
        check_fits("Ray Train worker", 3, {"CPU": 1.0, "GPU": 1.0}, "train.num_workers",
                   nodes=TWO_SMALL)
    check_fits("Ray Train worker", 2, {"CPU": 1.0, "GPU": 0.0}, "train.num_workers", nodes=TWO_SMALL)


def test_only_a_cluster_to_join_keeps_rays_own_settings(tmp_path, monkeypatch):
    """init_ray moves to 127.0.0.1 only an instance that it starts: not one in RAY_ADDRESS, nor
    the one that `ray start` recorded on this machine (where ray.init joins it by itself)."""
    from ray._common.utils import get_ray_address_file

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # where Ray looks for that record
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert _starts_local_instance()
    monkeypatch.setenv("RAY_ADDRESS", "192.0.2.7:6379")
    assert not _starts_local_instance()
    monkeypatch.delenv("RAY_ADDRESS")
    record = Path(get_ray_address_file(None))
    record.parent.mkdir(parents=True)
    record.write_text("192.0.2.7:6379")
    assert not _starts_local_instance()


# What ss prints for an address of the loopback interface (IPv4, IPv4-mapped IPv6, IPv6).
LOOPBACK = {"127.0.0.1", "[::ffff:127.0.0.1]", "[::1]"}


@pytest.mark.integration
@pytest.mark.slow
def test_a_local_instance_listens_on_127_0_0_1_only(tmp_path):
    """Every TCP port that a local `splitmatch train` opens, from Ray's daemons to the training's
    process group, is on the loopback interface (Ray's default: every interface)."""
    config = write_config(tmp_path, "ports", **SHORT)
    # The test session keeps its own clusters on loopback with these; here that is the command's
    # job. RAY_TMPDIR: a local instance of its own, not a `ray start` cluster of this machine.
    env = {key: value for key, value in os.environ.items()
           if key not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "GLOO_SOCKET_IFNAME", "RAY_ADDRESS")}
    env["RAY_TMPDIR"] = temp_dir = tempfile.mkdtemp(prefix="ray-p", dir="/tmp")  # short: sockets
    log = tmp_path / "train.log"
    # The baseline needs no pseudo masks: Ray starts the training at once.
    proc = subprocess.Popen([sys.executable, "-m", "splitmatch.cli", "train", str(config),
                             "--set", "matching.mode=baseline"], env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    listening = {}  # address -> (pid, process name), for the sockets of the command's processes
    try:
        deadline = time.monotonic() + 300
        # Until the training worker listens with its gRPC server, the process group's store and
        # gloo: by then every kind of process of the run has started (the rest of the run opens
        # more of the same kinds).
        while not _process_group_up(listening):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            ours = _descendants(proc.pid)
            for line in subprocess.run(["ss", "-ltnpH"], capture_output=True,
                                       text=True).stdout.splitlines():
                for name, pid in re.findall(r'\("([^"]*)",pid=(\d+),', line):
                    if int(pid) in ours:
                        listening[line.split()[3]] = (int(pid), name)
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait()
        stop_head((temp_dir,))  # the rest of its Ray: every daemon names its temp dir
    assert proc.pid in {pid for pid, _ in listening.values()}, listening  # the driver
    names = {name for _, name in listening.values()}
    assert {"gcs_server", "raylet", "ray::DashboardA", "ray::RuntimeEnv"} <= names, listening
    assert sorted(f"{address} {name} (pid {pid})" for address, (pid, name) in listening.items()
                  if address.rsplit(":", 1)[0] not in LOOPBACK) == []


def _process_group_up(listening: dict) -> bool:
    workers = [pid for pid, name in listening.values() if name == "ray::RayTrainWo"]
    return any(workers.count(pid) >= 3 for pid in workers)


def _descendants(root: int) -> set[int]:
    """`root` and every process under it."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout
    rows = [line.split() for line in out.splitlines()]
    found = {root}
    while more := {int(pid) for pid, ppid in rows if int(ppid) in found} - found:
        found |= more
    return found
