"""A relaunch never lands on hardware that failed: on a real three-node Ray cluster (a head without CPUs, two
workers), the fence's probe reads each worker's GPUs through a stand-in of nvidia-ml-py (this machine has no
NVIDIA driver), the node that reports an uncorrectable ECC error while the first attempt runs there is drained in
Ray, and the relaunch runs on the other one.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from ray.util.state import list_actors, list_nodes

from supervisor.mechanisms.ray_cluster import LocalRayCluster
from tests.conftest import start_test_cluster, stop_test_cluster
from tests.supervisor.e2e.conftest import (
    FAST,
    JOB_ARGS,
    events_of,
    final_of,
    start_supervisor,
    wait_until,
)

pytestmark = pytest.mark.ray

# One GPU per node. Each query reads $FAKE_NVML_DIR/<node id>.json when there is one (the test writes it for a
# node that goes bad); a node without a file is healthy.
FAKE_PYNVML = '''
"""A stand-in for nvidia-ml-py on a CPU test node: one GPU, its health read from a file named by the node."""
import json, os

class NVMLError(Exception):
    pass

def _faults():
    import ray
    path = os.path.join(os.environ["FAKE_NVML_DIR"], ray.get_runtime_context().get_node_id() + ".json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)

def nvmlInit(): pass
def nvmlShutdown(): pass
def nvmlDeviceGetCount(): return 1
def nvmlDeviceGetHandleByIndex(index): return index
def nvmlDeviceGetUUID(handle): return "GPU-fake-0"
def nvmlDeviceGetGraphicsRunningProcesses(handle): return []
def nvmlDeviceGetComputeRunningProcesses(handle): return []
def nvmlDeviceGetTotalEccErrors(handle, error_type, counter_type): return _faults().get("ecc", 0)
def nvmlDeviceGetRetiredPagesPendingStatus(handle): return 0
def nvmlDeviceGetRemappedRows(handle): return (0, 0, 0, 0)
def nvmlDeviceGetCurrentClocksEventReasons(handle): return 0
'''


@pytest.fixture(scope="module")
def fake_nvml_dir() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="fake-nvml-"))
    (folder / "pynvml.py").write_text(FAKE_PYNVML)
    yield folder
    shutil.rmtree(folder)


@pytest.fixture
def three_nodes(fake_nvml_dir: Path) -> Iterator[LocalRayCluster]:
    """Per test: a drained node leaves the cluster."""
    extra_env = {"PYTHONPATH": str(fake_nvml_dir), "FAKE_NVML_DIR": str(fake_nvml_dir)}
    cluster = start_test_cluster(num_cpus=0, dashboard=True, extra_env=extra_env)
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=4)
        yield cluster
    finally:
        report = stop_test_cluster(cluster)
        assert not report.survivors
        assert not cluster.processes()


def alive_actor_nodes(cluster: LocalRayCluster) -> set[str]:
    return {a.node_id for a in list_actors(address=cluster.dashboard_url, filters=[("state", "=", "ALIVE")])}


# Slow, both: the judgement and the loop's drain are tests/supervisor/test_nodes.py's, the drain on Ray
# tests/supervisor/test_node_sweep.py's; these are the whole path, three raylets and two attempts each.
@pytest.mark.slow
def test_a_node_whose_gpu_reports_an_ecc_error_is_drained_and_the_relaunch_runs_elsewhere(
    runs, reference, three_nodes: LocalRayCluster, fake_nvml_dir: Path
) -> None:
    run_dir = runs.new()
    overrides = (
        "ray.mode=address",
        f"ray.address={three_nodes.address}",
        f"ray.dashboard_url={three_nodes.dashboard_url}",
        *FAST,
    )
    # Saves at 2, 4, 6; the sync of step 5 fails on attempt 1, slowly enough to see where it runs first.
    supervisor = start_supervisor(
        run_dir,
        *overrides,
        job_args=(*JOB_ARGS, "trainer.extra_step_time_s=1.0"),
        extra_env={**three_nodes.env(), "VERL_HOOKS_FAULTS": "naive:raise@5#1"},
    )
    first_nodes = wait_until(lambda: alive_actor_nodes(three_nodes), 180, "attempt 1's actors")
    bad = sorted(first_nodes)[0]
    (fake_nvml_dir / f"{bad}.json").write_text(json.dumps({"ecc": 1}))
    assert supervisor.wait(timeout=240) == 0, (run_dir.parent / f"{run_dir.name}.supervisor.log").read_text()[-4000:]

    exited = events_of(run_dir, "attempt_exited")
    assert [(e["exit_code"], e["global_step"]) for e in exited] == [(75, 5), (0, None)]
    health = {e["node_id"]: e for e in events_of(run_dir, "node_health")}
    assert health[bad]["healthy"] is False
    assert health[bad]["problems"] == ["GPU 0: 1 uncorrectable ECC error(s) since the driver loaded"]
    assert all(e["healthy"] for node, e in health.items() if node != bad), "only the bad node is judged unhealthy"
    (excluded,) = events_of(run_dir, "node_excluded")
    assert (excluded["node_id"], excluded["drained"], excluded["attempt"]) == (bad, True, 1)

    # Ray's own state carries the reason: the drained node, once idle, left the cluster with it.
    (node,) = [n for n in list_nodes(address=three_nodes.dashboard_url, detail=True) if n.node_id == bad]
    assert node.state == "DEAD"
    assert "uncorrectable ECC error" in node.state_message
    assert "verl-supervisor run" in node.state_message

    second_job = events_of(run_dir, "teardown")[1]["ray_job_id"]
    second = list_actors(address=three_nodes.dashboard_url, filters=[("job_id", "=", second_job)])
    assert second, "attempt 2 had actors"
    assert bad not in {a.node_id for a in second}, "the relaunch ran on the other node"
    assert final_of(run_dir)["weights_sha256"] == reference["final"]["weights_sha256"]


def raylet_of(cluster: LocalRayCluster, node_id: str) -> psutil.Process:
    (raylet,) = [p for p in cluster.processes() if f"--node_id={node_id}" in " ".join(p.cmdline())]
    return raylet


@pytest.mark.slow
def test_a_node_whose_raylet_died_during_an_attempt_is_reported_and_not_used_by_the_next(
    runs, reference, three_nodes: LocalRayCluster
) -> None:
    run_dir = runs.new()
    supervisor = start_supervisor(
        run_dir,
        "ray.mode=address",
        f"ray.address={three_nodes.address}",
        f"ray.dashboard_url={three_nodes.dashboard_url}",
        *FAST,
        job_args=(*JOB_ARGS, "trainer.extra_step_time_s=1.0"),
        extra_env=three_nodes.env(),
    )
    tracker = run_dir / "checkpoints" / "latest_checkpointed_iteration.txt"
    wait_until(lambda: tracker.exists(), 180, "a first checkpoint")
    lost = sorted(alive_actor_nodes(three_nodes))[0]
    raylet_of(three_nodes, lost).kill()
    assert supervisor.wait(timeout=240) == 0, (run_dir.parent / f"{run_dir.name}.supervisor.log").read_text()[-4000:]

    first, second = events_of(run_dir, "attempt_exited")
    assert first["action"] == "restart"
    assert second["exit_code"] == 0
    dead = [e for e in events_of(run_dir, "node_health") if e["node_id"] == lost]
    assert [(e["attempt"], e["healthy"]) for e in dead] == [(1, False)]
    assert dead[0]["problems"][0].startswith("dead in Ray: ")
    assert events_of(run_dir, "node_excluded") == [], "a dead node takes nothing new: nothing to drain"
    assert events_of(run_dir, "preemption_notice") == [], "killed outright: no notice, the run resumes from its save"
    second_job = events_of(run_dir, "teardown")[1]["ray_job_id"]
    second_nodes = {
        a.node_id for a in list_actors(address=three_nodes.dashboard_url, filters=[("job_id", "=", second_job)])
    }
    assert second_nodes, "attempt 2 had actors"
    assert lost not in second_nodes
    assert final_of(run_dir)["weights_sha256"] == reference["final"]["weights_sha256"]
