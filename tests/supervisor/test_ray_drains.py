"""What Ray says of its drains, read as the supervisor reads them (no ``import ray`` on its side): a real cluster of
three nodes (a head without CPUs, two workers), a job with an actor on one worker and a placement-group bundle on
the other. The whole path, an attempt preempted and relaunched: tests/supervisor/e2e/test_preemption.py."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from supervisor.mechanisms.ray_drain import DrainReason, drain_node, draining_nodes
from supervisor.mechanisms.ray_state import RayStateClient
from tests.conftest import connect_driver, start_test_cluster, stop_test_cluster

pytestmark = pytest.mark.ray
# The three-node cluster with a dashboard is about 30 s of the default suite's 10 minutes: its tests are slow. A
# drain on a real cluster stays in the default suite (test_node_sweep.py); the fake backend's tables cover every
# decision.
ON_THE_CLUSTER = pytest.mark.slow


@pytest.fixture(scope="module")
def job_on_two_workers() -> Iterator[dict]:
    """The cluster, its workers' ids (a: an actor there; b: a placement-group bundle and nothing running) and the
    job's id. The drains below end with the module's cluster."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    cluster = start_test_cluster(num_cpus=0, dashboard=True)
    try:
        cluster.add_node(num_cpus=2)
        cluster.add_node(num_cpus=2)
        connect_driver(cluster)
        try:
            workers = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU"))

            @ray.remote(num_cpus=1)
            class Busy:
                def ping(self) -> int:
                    return 1

            actor = Busy.options(scheduling_strategy=NodeAffinitySchedulingStrategy(workers[0], soft=False)).remote()
            ray.get(actor.ping.remote())
            group = placement_group([{"CPU": 1}], strategy="STRICT_PACK", _soft_target_node_id=workers[1])
            ray.get(group.ready())
            placed = ray.util.placement_group_table(group)["bundles_to_node_id"][0]
            yield {
                "cluster": cluster,
                "a": workers[0],
                "b": placed,
                "job_id": ray.get_runtime_context().get_job_id(),
            }
            ray.kill(actor)
            remove_placement_group(group)
        finally:
            ray.shutdown()
    finally:
        report = stop_test_cluster(cluster)
        assert not report.survivors


@ON_THE_CLUSTER
def test_the_jobs_nodes_an_idle_termination_refused_and_a_preemption_listed_with_its_deadline(
    job_on_two_workers,
) -> None:
    cluster, busy, reserved = job_on_two_workers["cluster"], job_on_two_workers["a"], job_on_two_workers["b"]
    state = RayStateClient(cluster.dashboard_url)
    assert state.nodes_holding(job_on_two_workers["job_id"]) == {busy, reserved}, "its actor's node and its bundle's"
    assert state.nodes_holding("ffffffff") == set(), "another job holds nothing"
    assert busy not in draining_nodes(cluster.address)

    idle = drain_node(cluster.address, busy, "idle?", reason=DrainReason.IDLE_TERMINATION)
    assert idle.accepted is False, "Ray refuses to idle-terminate a node where an actor runs"
    assert "no longer idle" in idle.message
    assert busy not in draining_nodes(cluster.address)

    deadline_ms = int((time.time() + 30) * 1000)
    preempted = drain_node(cluster.address, busy, "spot reclaim", deadline_ms=deadline_ms)
    assert (preempted.accepted, preempted.message) == (True, "")
    assert draining_nodes(cluster.address)[busy] == deadline_ms


@ON_THE_CLUSTER
def test_a_node_holding_only_a_reserved_bundle_is_not_idle_either(job_on_two_workers) -> None:
    cluster, reserved = job_on_two_workers["cluster"], job_on_two_workers["b"]
    idle = drain_node(cluster.address, reserved, "idle?", reason=DrainReason.IDLE_TERMINATION)
    assert idle.accepted is False, "a bundle's reserved CPU is in use: every drain of the job's node is a preemption"
    assert reserved not in draining_nodes(cluster.address)


def test_an_unreachable_gcs_raises_for_the_watch_to_ride_out() -> None:
    import grpc

    with pytest.raises(grpc.RpcError):
        draining_nodes("127.0.0.1:9", timeout_s=2)
