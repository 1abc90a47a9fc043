"""The test clusters stop every process they start (the Ray client server included, which names
no temp dir), and nothing else."""
import subprocess
import sys
import time

import pytest

from conftest import cluster_processes, start_head, stop_head

pytestmark = pytest.mark.integration


def test_a_stopped_head_leaves_no_process_behind():
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    gcs, _, markers = start_head(num_cpus=1)
    try:
        running = cluster_processes(markers)
        assert any("gcs_server" in line for line in running)
        assert any("ray.util.client.server" in line for line in running), running
    finally:
        stop_head(markers)
    deadline = time.time() + 20
    while cluster_processes(markers) and time.time() < deadline:
        time.sleep(0.2)
    assert cluster_processes(markers) == []
    assert bystander.poll() is None  # another process of this machine is left alone
    bystander.kill()
