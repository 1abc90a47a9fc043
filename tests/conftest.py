"""Test-wide settings: single-machine Ray clusters stay on loopback, and one real Ray per session."""
import os

import pytest

# Ray binds a local cluster to the machine's routable address unless this is off; tests keep all
# their traffic on 127.0.0.1 (subprocesses inherit it).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray instance (2 CPUs) shared by the tests that need one; yields its address."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
