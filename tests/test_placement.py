"""Placement feasibility (ray_cluster.workers_that_fit): how many training workers a cluster's
nodes can ever hold, per placement strategy. Pure logic: no Ray."""

import pytest

from loraflow.ray_cluster import workers_that_fit

pytestmark = pytest.mark.unit  # pure logic: the fast tier (pytest -m unit)

TWO_NODES = [{"CPU": 8.0, "GPU": 2.0, "memory": 1e10}, {"CPU": 4.0, "GPU": 1.0}]


@pytest.mark.parametrize("bundle, strategy, workers", [
    ({"GPU": 1}, "PACK", 3), ({"GPU": 1}, "SPREAD", 3),
    ({"GPU": 1}, "STRICT_PACK", 2),  # all on one node: the one with 2 GPUs
    ({"GPU": 1}, "STRICT_SPREAD", 2),  # one a node
    ({"CPU": 3, "GPU": 1}, "PACK", 3), ({"CPU": 5, "GPU": 1}, "PACK", 1),  # the CPUs bind first
    ({"GPU": 0.5}, "PACK", 6),  # fractions of a GPU
    ({"TPU": 1}, "PACK", 0),  # a resource no node has
    ({"CPU": 0}, "PACK", 0),  # nothing asked for: no worker placed on it
])
def test_workers_that_fit_per_strategy(bundle, strategy, workers):
    assert workers_that_fit(TWO_NODES, bundle, strategy) == workers


def test_no_nodes_fit_nothing():
    assert [workers_that_fit([], {"CPU": 1}, s) for s in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")] == [0] * 4
