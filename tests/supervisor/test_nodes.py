"""The health of the nodes an attempt used, and which of them the next attempt must not land on: NVML read through
a stand-in of nvidia-ml-py's API, the judgement as pure functions, and the loop's decisions with the fake backend.
On real Ray nodes: tests/supervisor/e2e/test_node_health.py."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from supervisor.backends.base import NodesSeen
from supervisor.mechanisms.gpu_health import GpuReading, NodeReading, read_node
from supervisor.mechanisms.ray_state import NodeInfo
from supervisor.outcomes import ExitCode, ExitStatus
from supervisor.policy.nodes import (
    exclusions,
    failure_nodes,
    gpu_problems,
    judge_node,
    shortfall,
)
from supervisor.run.metrics import RunCollector
from supervisor.run.notify import message_for
from supervisor.run.report import write_report
from supervisor.run.status import read_status, render_status
from tests.supervisor.fakes import Attempt
from tests.supervisor.test_loop import WEIGHT_SYNC, success, supervise


class NVMLError(Exception):
    pass


class NotSupported(NVMLError):
    pass


def fake_nvml(*gpus: dict | None) -> SimpleNamespace:
    """nvidia-ml-py's calls the health check makes, over ``gpus`` (None: a device lost from the bus). A key left
    out of a GPU's dict is a query that GPU does not support."""

    def gpu(handle: int) -> dict:
        return gpus[handle]

    def query(key: str):
        def call(handle, *args):
            if key not in gpu(handle):
                raise NotSupported(key)
            return gpu(handle)[key]

        return call

    def handle_by_index(index: int) -> int:
        if gpus[index] is None:
            raise NVMLError("GPU is lost")
        return index

    return SimpleNamespace(
        NVMLError=NVMLError,
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: len(gpus),
        nvmlDeviceGetHandleByIndex=handle_by_index,
        nvmlDeviceGetUUID=query("uuid"),
        nvmlDeviceGetTotalEccErrors=query("ecc"),
        nvmlDeviceGetRetiredPagesPendingStatus=query("pending"),
        nvmlDeviceGetRemappedRows=query("remapped"),
        nvmlDeviceGetCurrentClocksEventReasons=query("reasons"),
    )


ECC_SINCE_LOAD = "GPU 0: 1 uncorrectable ECC error(s) since the driver loaded"
HEALTHY = {"uuid": "GPU-0", "ecc": 0, "pending": 0, "remapped": (0, 0, 0, 0), "reasons": 0x1}


def test_nvml_readings_of_each_fault_and_of_what_a_gpu_does_not_support() -> None:
    nvml = fake_nvml(
        HEALTHY,
        {**HEALTHY, "ecc": 2, "pending": 1},
        {**HEALTHY, "remapped": (3, 1, 1, 1), "reasons": 0x8 | 0x40},
        None,
        {"uuid": b"GPU-4"},  # a consumer card: no ECC, no retirement, no remapping, no reasons
    )
    reading = read_node(nvml)
    assert reading.skipped is None
    assert reading.compute_skipped == "no time left for it in the sweep"
    healthy, ecc, remap, lost, consumer = reading.gpus
    assert (healthy.ecc_uncorrected_volatile, healthy.retired_pages_pending, healthy.slowdown) == (0, False, ())
    assert (ecc.ecc_uncorrected_volatile, ecc.retired_pages_pending) == (2, True)
    assert (remap.remap_failure, remap.remap_pending) == (True, True)
    assert remap.slowdown == ("hardware slowdown", "hardware thermal slowdown")
    assert lost.unreachable == "GPU is lost"
    assert consumer == GpuReading(4, uuid="GPU-4")
    assert NodeReading.from_json(reading.to_json()) == reading, "it travels from the node as JSON"


def test_a_machine_without_nvml_is_skipped_and_says_why() -> None:
    def refuse() -> None:
        raise NVMLError("NVML Shared Library Not Found")

    reading = read_node(SimpleNamespace(NVMLError=NVMLError, nvmlInit=refuse))
    assert reading.skipped == "no NVIDIA driver here (NVML Shared Library Not Found)"
    assert judge_node("n", "h", reading, None).healthy


@pytest.mark.parametrize(
    ("gpu", "last", "problem"),
    [
        (GpuReading(0, ecc_uncorrected_volatile=0), None, None),
        (
            GpuReading(0, ecc_uncorrected_volatile=1),
            None,
            "GPU 0: 1 uncorrectable ECC error(s) since the driver loaded",
        ),
        (GpuReading(0, ecc_uncorrected_volatile=3), GpuReading(0, ecc_uncorrected_volatile=3), None),
        (
            GpuReading(0, ecc_uncorrected_volatile=5),
            GpuReading(0, ecc_uncorrected_volatile=3),
            "GPU 0: 2 uncorrectable ECC error(s) since the last look",
        ),
        (GpuReading(1, retired_pages_pending=True), None, "GPU 1: retired pages pending (a reset is due)"),
        (GpuReading(1, remap_failure=True), None, "GPU 1: row remapping failed"),
        (GpuReading(2, slowdown=("hardware power brake",)), None, "GPU 2: hardware power brake"),
        (GpuReading(3, unreachable="GPU is lost"), None, "GPU 3 unreachable through NVML (GPU is lost)"),
        (GpuReading(3, compute="a 256-square matmul did not finish in 30 s"), None, "GPU 3: compute check: a 256"),
        (GpuReading(4), None, None),
    ],
)
def test_what_makes_a_gpu_unhealthy(gpu: GpuReading, last: GpuReading | None, problem: str | None) -> None:
    found = gpu_problems(gpu, last)
    if problem is None:
        assert found == []
    else:
        (only,) = found
        assert only.startswith(problem)


NODE_A, NODE_B, HEAD = "a" * 56, "b" * 56, "c" * 56
CLUSTER = (
    NodeInfo(HEAD, "head", "10.0.0.1", is_head=True, resources={"CPU": 0.0}),
    NodeInfo(NODE_A, "host-a", "10.0.0.2", resources={"CPU": 8.0, "GPU": 8.0}),
    NodeInfo(NODE_B, "host-b", "10.0.0.3", resources={"CPU": 8.0, "GPU": 8.0}),
)
ECC = NodeReading(gpus=(GpuReading(0, ecc_uncorrected_volatile=1),))
FINE = NodeReading(gpus=(GpuReading(0, ecc_uncorrected_volatile=0),))


def test_failure_nodes_are_named_by_node_id_or_by_a_host_only_one_node_has() -> None:
    died = f"ray.exceptions.NodeDiedError: node {NODE_A} died unexpectedly; also {'d' * 56} (not of this cluster)"
    assert failure_nodes("anywhere", died, CLUSTER) == {NODE_A}
    assert failure_nodes("host-b", "RuntimeError: boom", CLUSTER) == {NODE_B}
    shared = (*CLUSTER, NodeInfo("e" * 56, "host-b"))
    assert failure_nodes("host-b", "RuntimeError: boom", shared) == set(), "two nodes on one host: neither is named"


def test_unhealthy_and_twice_failed_nodes_are_excluded_never_the_head_or_an_unused_or_dead_node() -> None:
    health = [judge_node(NODE_A, "host-a", ECC, None), judge_node(HEAD, "head", ECC, None)]
    (excluded,) = exclusions(health, [], used={NODE_A, HEAD}, nodes=CLUSTER)
    assert (excluded.node_id, excluded.reason) == (
        NODE_A,
        "GPU 0: 1 uncorrectable ECC error(s) since the driver loaded",
    )
    assert exclusions(health, [], used={HEAD}, nodes=CLUSTER) == [], "not a node the attempt did not use"
    assert exclusions(health, [], used={NODE_A}, nodes=CLUSTER, already={NODE_A}) == []
    dead = (CLUSTER[0], NodeInfo(NODE_A, "host-a", alive=False), CLUSTER[2])
    assert exclusions(health, [], used={NODE_A}, nodes=dead) == [], "a dead node takes nothing new already"

    healthy = [judge_node(NODE_B, "host-b", FINE, None)]
    (twice,) = exclusions(healthy, [{NODE_B}, {NODE_B}], used={NODE_B}, nodes=CLUSTER)
    assert twice.reason == "the place of the failure of the last two attempts"
    assert exclusions(healthy, [{NODE_A}, {NODE_B}], used={NODE_B}, nodes=CLUSTER) == []


def test_the_shortfall_counts_live_undrained_nodes_only() -> None:
    assert shortfall({"GPU": 16.0}, CLUSTER, excluded=()) == {}
    assert shortfall({"GPU": 16.0, "CPU": 2.0}, CLUSTER, excluded={NODE_A}) == {"GPU": 8.0}
    assert shortfall({"GPU": 8.0}, CLUSTER, excluded={NODE_A}) == {}


# --- the loop ---


def failed_on(reading: NodeReading, node: str = NODE_A) -> Attempt:
    seen = NodesSeen(readings=((node, "host-a", reading),), nodes=CLUSTER, demand={"GPU": 8.0})
    return Attempt(exit=ExitStatus(code=75), record=WEIGHT_SYNC, saves=(2,), nodes=seen)


def test_an_unhealthy_node_is_drained_before_the_relaunch(tmp_path: Path) -> None:
    run = supervise(tmp_path, [failed_on(ECC), success()])
    assert run.code is ExitCode.DONE
    ((drained, message),) = run.backend.drained
    assert drained == NODE_A
    assert "after attempt 1: GPU 0: 1 uncorrectable ECC error(s)" in message
    (health,) = run.events("node_health")
    assert (health["node_id"], health["healthy"]) == (NODE_A, False)
    (excluded,) = run.events("node_excluded")
    assert (excluded["node_id"], excluded["drained"]) == (NODE_A, True)
    kinds = run.kinds()
    assert kinds.index("teardown") < kinds.index("node_excluded") < kinds.index("backoff")


def test_the_key_turns_draining_off_and_the_health_is_still_reported(tmp_path: Path) -> None:
    run = supervise(tmp_path, [failed_on(ECC), success()], "nodes.exclude=false")
    assert run.code is ExitCode.DONE
    assert run.backend.drained == []
    assert [e["healthy"] for e in run.events("node_health")] == [False]


def test_when_the_nodes_left_cannot_hold_the_job_the_run_stops_with_exit_9(tmp_path: Path) -> None:
    big = failed_on(ECC)
    big.nodes = NodesSeen(readings=big.nodes.readings, nodes=CLUSTER, demand={"GPU": 16.0})
    run = supervise(tmp_path, [big, success()])
    assert run.code is ExitCode.NO_HEALTHY_CAPACITY
    assert len(run.backend.launched) == 1, "no relaunch waits at start-up for resources that are gone"
    (finished,) = run.events("run_finished")
    assert "it reserved GPU 16 (8 short)" in finished["reason"]
    assert f"Taken out: host-a/{NODE_A[:8]} (GPU 0: 1 uncorrectable ECC" in finished["reason"]


def test_a_node_ray_would_not_drain_is_said_and_the_run_goes_on(tmp_path: Path) -> None:
    run = supervise(tmp_path, [failed_on(ECC), success()], prepare_backend=lambda b: b.undrainable.add(NODE_A))
    (excluded,) = run.events("node_excluded")
    assert (excluded["drained"], excluded["message"]) == (False, "refused")
    assert run.code is ExitCode.DONE, "a drain Ray refused is no shortfall: the node still takes work"


def test_one_machine_with_an_unhealthy_gpu_stops_with_exit_9(tmp_path: Path) -> None:
    seen = NodesSeen(readings=(("local", "this-host", ECC),), single_machine=True)
    run = supervise(tmp_path, [Attempt(exit=ExitStatus(code=1), nodes=seen), success()])
    assert run.code is ExitCode.NO_HEALTHY_CAPACITY
    assert "this machine's hardware is unhealthy (GPU 0: 1 uncorrectable ECC" in run.events("run_finished")[0]["reason"]
    assert run.backend.drained == [], "the one machine is never drained"


def test_a_node_that_was_the_place_of_the_failure_twice_is_drained(tmp_path: Path) -> None:
    died = replace(WEIGHT_SYNC, message=f"node {NODE_B} died", global_step=None)
    seen = NodesSeen(readings=((NODE_B, "host-b", FINE),), nodes=CLUSTER, demand={"GPU": 8.0})
    attempts = [Attempt(exit=ExitStatus(code=1), record=died, saves=(2 * n,), nodes=seen) for n in (1, 2)]
    run = supervise(tmp_path, [*attempts, success()])
    assert run.code is ExitCode.DONE
    assert [node for node, _ in run.backend.drained] == [NODE_B], "after the second failure there, not the first"
    assert run.history().attempts[0].failure_nodes == [NODE_B]
    (excluded,) = run.events("node_excluded")
    assert excluded["attempt"] == 2


def test_an_older_binding_without_a_query_reads_it_as_unknown() -> None:
    nvml = fake_nvml({**HEALTHY, "ecc": 1})
    del nvml.nvmlDeviceGetRemappedRows, nvml.nvmlDeviceGetCurrentClocksEventReasons
    (gpu,) = read_node(nvml).gpus
    assert (gpu.ecc_uncorrected_volatile, gpu.remap_failure, gpu.slowdown) == (1, None, ())


def test_a_node_that_died_under_the_attempt_is_reported_and_not_drained(tmp_path: Path) -> None:
    gone = NodeInfo(NODE_B, "host-b", alive=False, state_message="Unexpected termination: health check failed")
    seen = NodesSeen(
        readings=((NODE_A, "host-a", FINE),),
        nodes=(CLUSTER[0], CLUSTER[1], gone),
        ran_on=frozenset({NODE_A, NODE_B}),
    )
    run = supervise(tmp_path, [Attempt(exit=ExitStatus(code=1), nodes=seen), success()])
    assert run.code is ExitCode.DONE
    health = {e["node_id"]: e for e in run.events("node_health")}
    assert health[NODE_A]["healthy"] is True
    assert health[NODE_B]["problems"] == ["dead in Ray: Unexpected termination: health check failed"]
    assert run.backend.drained == []


def test_status_metrics_and_alerts_show_the_unhealthy_and_the_drained_node(tmp_path: Path) -> None:
    run = supervise(tmp_path, [failed_on(ECC), success()])
    status = read_status(run.run_dir)
    name = f"host-a/{NODE_A[:8]}"
    assert status.unhealthy_nodes == {name: ECC_SINCE_LOAD}
    assert status.excluded_nodes == {name: ECC_SINCE_LOAD}
    text = render_status(status)
    assert f"node unhealthy: {name}: {ECC_SINCE_LOAD}" in text
    assert f"node excluded (drained in Ray): {name}: {ECC_SINCE_LOAD}" in text
    gauges = {m.name: m.samples[0].value for m in RunCollector(run.run_dir).collect() if m.type == "gauge"}
    assert (gauges["verl_supervisor_unhealthy_nodes"], gauges["verl_supervisor_excluded_nodes"]) == (1, 1)
    report, _ = write_report(run.run_dir, tmp_path / "report")
    assert f"- **Node excluded** (drained in Ray): {name}: {ECC_SINCE_LOAD}" in report.read_text()
    (excluded,) = run.events("node_excluded")
    alert = message_for(excluded, None)
    assert alert is not None
    assert alert.about == "node_excluded"
    assert f"node {name} drained (no attempt lands there again): {ECC_SINCE_LOAD}" in alert.text
