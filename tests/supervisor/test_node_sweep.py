"""The fence's sweep of an attempt's nodes (cluster modes): a Ray task pinned to each node ends the attempt's
marked processes there and reads NVML.

The mechanism runs against a real two-node cluster. This machine has no NVIDIA driver, so the cluster's workers
import a fake ``pynvml`` (first on their PYTHONPATH, as the real nvidia-ml-py would be found) that reports the
device processes a file names; the test changes the file as a dying process would release its memory.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import psutil
import pytest

from supervisor.backends.base import Stopped, TeardownResult
from supervisor.backends.fence import AttemptView, fence, fence_rules
from supervisor.config import TeardownConfig
from supervisor.mechanisms import node_probe
from supervisor.mechanisms.gpu_memory import GpuHolder, GpuMemoryCheck
from supervisor.mechanisms.node_probe import NodeSweep, probe_env, sweep_nodes
from supervisor.mechanisms.node_scan import NodeScan
from supervisor.mechanisms.processes import wait_for
from supervisor.mechanisms.ray_cluster import LocalRayCluster
from supervisor.mechanisms.ray_drain import drain_node
from tests.conftest import start_test_cluster, stop_test_cluster
from verl_hooks.contract import ENV_ATTEMPT, ENV_RUN_ID

FAKE_PYNVML = '''
"""A stand-in for nvidia-ml-py: one device, whose processes are read from $FAKE_NVML_FILE at every call."""
import json, os
from types import SimpleNamespace

class NVMLError(Exception):
    pass

def nvmlInit(): pass
def nvmlShutdown(): pass
def nvmlDeviceGetCount(): return 1
def nvmlDeviceGetHandleByIndex(index): return index
def nvmlDeviceGetGraphicsRunningProcesses(handle): return []
def nvmlDeviceGetComputeRunningProcesses(handle):
    with open(os.environ["FAKE_NVML_FILE"]) as f:
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in json.load(f)]
'''


@pytest.fixture(scope="module")
def fake_nvml_file() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="fake-nvml-"))
    (folder / "pynvml.py").write_text(FAKE_PYNVML)
    devices = folder / "processes.json"
    devices.write_text("[]")
    yield devices
    shutil.rmtree(folder)


@pytest.fixture(scope="module")
def two_nodes(fake_nvml_file: Path) -> Iterator[LocalRayCluster]:
    # The fake comes first on the workers' path, as the real nvidia-ml-py would be found.
    extra_env = {"PYTHONPATH": str(fake_nvml_file.parent), "FAKE_NVML_FILE": str(fake_nvml_file)}
    cluster = start_test_cluster(num_cpus=0, dashboard=True, extra_env=extra_env)
    try:
        cluster.add_node(num_cpus=2, num_gpus=1)  # the sweep asks for no CPU: the head (0 CPUs) is swept too
        yield cluster
    finally:
        report = stop_test_cluster(cluster)
        assert not report.survivors
        assert not cluster.processes()


def node_ids(cluster: LocalRayCluster) -> dict[bool, str]:
    from ray.util.state import list_nodes

    return {n.is_head_node: n.node_id for n in list_nodes(address=cluster.dashboard_url) if n.state == "ALIVE"}


def start_marked(markers: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """A process of the attempt that ignores SIGTERM (a rank stuck in a collective)."""
    code = (
        "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); time.sleep(600)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, **markers}, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"1"
    return proc


@pytest.mark.ray
def test_a_task_on_the_node_ends_the_attempts_processes_and_waits_for_their_gpu_memory(
    two_nodes: LocalRayCluster, fake_nvml_file: Path
) -> None:
    markers = {ENV_RUN_ID: uuid.uuid4().hex, ENV_ATTEMPT: "1"}
    other_attempt = start_marked({**markers, ENV_ATTEMPT: "2"})
    stuck = start_marked(markers)
    dead_actor_pid = 4_000_000  # gone from the process table, its memory not yet released
    try:
        fake_nvml_file.write_text(json.dumps([[stuck.pid, 2 << 30], [dead_actor_pid, 1 << 30], [other_attempt.pid, 1]]))
        worker = node_ids(two_nodes)[False]
        env = probe_env({**os.environ, ENV_RUN_ID: "must not reach the probe"}, two_nodes.env())

        sweep = sweep_nodes(two_nodes.address, env, {worker: [dead_actor_pid]}, markers, timeout_s=60, grace_s=1.0)

        assert sweep.unanswered == {}
        (scan,) = sweep.scans
        assert scan.node_id == worker, "the task ran on the node it was pinned to"
        assert scan.terminated == [(stuck.pid, "python")]
        assert scan.survivors == []
        assert stuck.wait(timeout=10) == -signal.SIGKILL, "SIGTERM was ignored: it took SIGKILL"
        assert {h.pid for h in scan.gpu.holders} == {stuck.pid, dead_actor_pid}, "another attempt's is not ours"
        assert not sweep.clean
        assert f"GPU held: pid {stuck.pid} on GPU 0, 2048 MB" in sweep.summary()
        # The same task read the GPU's health; this stand-in answers none of its queries (an older binding).
        assert scan.health.skipped is None
        assert [gpu.index for gpu in scan.health.gpus] == [0]
        assert scan.health.compute_skipped == "no CUDA device visible to torch", "the check ran, on a CPU node"

        fake_nvml_file.write_text(json.dumps([[other_attempt.pid, 1]]))  # the driver released the memory
        again = sweep_nodes(
            two_nodes.address, env, {worker: [dead_actor_pid, stuck.pid]}, markers, timeout_s=60, grace_s=2.0
        )
        assert again.clean, again.summary()
        assert again.scans[0].gpu == GpuMemoryCheck(devices=1)
        assert other_attempt.poll() is None, "a process of another attempt was not touched"
    finally:
        fake_nvml_file.write_text("[]")
        for proc in (stuck, other_attempt):
            proc.kill()
            proc.wait()


@pytest.mark.ray
def test_a_drained_node_takes_no_new_work_and_leaves_with_the_reason_in_rays_state(two_nodes: LocalRayCluster) -> None:
    """The drain the loop asks for after an unhealthy reading (the whole path: e2e/test_node_health.py)."""
    from ray.util.state import list_nodes

    before = {n.node_id for n in list_nodes(address=two_nodes.dashboard_url)}
    two_nodes.add_node(num_cpus=1, resources={"doomed": 1})
    (doomed,) = [n.node_id for n in list_nodes(address=two_nodes.dashboard_url) if n.node_id not in before]
    outcome = drain_node(two_nodes.address, doomed, "verl-supervisor run r, after attempt 1: GPU 0: 1 ECC error")
    assert (outcome.accepted, outcome.message) == (True, "")

    def state() -> tuple[str, str]:
        (node,) = [n for n in list_nodes(address=two_nodes.dashboard_url, detail=True) if n.node_id == doomed]
        return node.state, node.state_message or ""

    assert wait_for(lambda: state()[0] == "DEAD", 30), state()
    assert state()[1] == "Terminated due to preemption: verl-supervisor run r, after attempt 1: GPU 0: 1 ECC error"
    unreachable = drain_node("127.0.0.1:9", doomed, "no GCS there", timeout_s=2)
    assert unreachable.accepted is False
    assert unreachable.message.startswith("UNAVAILABLE"), unreachable.message


@pytest.mark.ray
def test_a_node_that_cannot_run_the_task_is_reported_unanswered(two_nodes: LocalRayCluster) -> None:
    gone = "ab" * 28  # a node id the cluster never had: the task is unschedulable there
    sweep = sweep_nodes(
        two_nodes.address, probe_env(os.environ, two_nodes.env()), {gone: []}, {"K": "v"}, 20, grace_s=2.0
    )
    assert list(sweep.unanswered) == [gone]
    assert not sweep.clean
    assert f"node {gone[:8]}: no answer (" in sweep.summary()


@pytest.mark.ray
def test_no_cluster_no_answer_and_no_probe_process_left(monkeypatch: pytest.MonkeyPatch) -> None:
    # A probe that cannot connect is killed at its limit: 1 s past the sweep's 5 here, not the product's 15.
    monkeypatch.setattr(node_probe, "PROBE_OVERHEAD_S", 1.0)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    sweep = sweep_nodes("127.0.0.1:9", dict(os.environ), {"n1": []}, {"K": "v"}, timeout_s=5, grace_s=2.0)
    assert list(sweep.unanswered) == ["n1"]
    assert "the probe failed" in sweep.unanswered["n1"] or "took over" in sweep.unanswered["n1"]
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before


class FakeState:
    def __init__(self, nodes: dict[str, list[int]]) -> None:
        self.nodes = nodes

    def live_actors(self, job_id=None) -> list:
        return []

    def live_placement_groups(self, job_id=None) -> list:
        return []

    def attempt_nodes(self, job_id) -> dict[str, list[int]]:
        return self.nodes


def scan(node: str, *, survivors=(), holders=()) -> NodeScan:
    return NodeScan(
        node,
        "host",
        survivors=list(survivors),
        gpu=GpuMemoryCheck(devices=1, holders=[GpuHolder(0, *h) for h in holders]),
    )


def fence_sweeping(answers: list[NodeSweep], timeout_s: float) -> tuple[TeardownResult, list]:
    asked: list = []

    def sweep(known, limit_s):
        asked.append(dict(known))
        return answers[min(len(asked) - 1, len(answers) - 1)]

    view = AttemptView(
        leftovers=list,
        ray_job_id="job1",
        state=FakeState({"n1": [11], "n2": []}),  # type: ignore[arg-type]
        gpu_check=lambda pids: GpuMemoryCheck(skipped="no NVIDIA driver here"),
        sweeper=sweep,
    )
    fenced = fence(view, fence_rules(TeardownConfig(fence_timeout_s=timeout_s), view))
    return TeardownResult.of(Stopped(), fenced, 0.0), asked


def test_the_fence_sweeps_again_until_no_node_holds_anything_and_remembers_what_it_ended() -> None:
    first = NodeSweep(
        scans=[
            NodeScan(
                "n1",
                "host",
                terminated=[(12, "VllmWorker")],
                gpu=GpuMemoryCheck(devices=1, holders=[GpuHolder(0, 12, 512.0)]),
            )
        ]
    )
    result, asked = fence_sweeping([first, NodeSweep(scans=[scan("n1")])], timeout_s=30)
    assert result.problems == ()
    assert asked == [{"n1": [11], "n2": []}, {"n1": [11, 12], "n2": []}], "the ended pid is asked of NVML again"
    assert result.nodes == "node host/n1: GPU free on 1 GPUs"
    assert result.fenced is True


def test_a_node_still_holding_at_the_deadline_stops_the_relaunch_naming_node_and_process() -> None:
    held = NodeSweep(scans=[scan("n1", survivors=[(12, "VllmWorker")], holders=[(12, 512.0)])], unanswered={"n2": "x"})
    result, _ = fence_sweeping([held], timeout_s=0.2)
    (problem,) = result.problems
    assert problem.startswith("after 0.2 s, the sweep of the attempt's nodes found: node host/n1: GPU held: pid 12")
    assert "still alive VllmWorker[12]" in problem
    assert "node n2: no answer (x)" in problem
    assert result.fenced is False


def test_one_machine_is_not_swept() -> None:
    view = AttemptView(leftovers=list)
    result = fence(view, fence_rules(TeardownConfig(fence_timeout_s=5), view))
    assert result.nodes is None
    assert result.problems == ()
