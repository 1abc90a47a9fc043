"""Whether work fits on a cluster's nodes is decided per node, before anything starts."""
import pytest

from splitmatch.cluster import check_fits, how_many_fit
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
