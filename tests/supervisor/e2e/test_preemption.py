"""A worker node preempted with notice: on a real three-node Ray cluster (a head without CPUs, two workers), the
node running the job is drained in Ray with reason PREEMPTION and a 30 s deadline, as the autoscaler, KubeRay or a
spot-termination handler does, then killed at the deadline. The job saves the step it is at, the attempt ends as a
stop, and the relaunch resumes from that step on the other worker, to the fault-free run's weights.

Without a notice (the node killed outright) the run resumes from its last periodic save, as before:
tests/supervisor/e2e/test_node_health.py, ``test_a_node_whose_raylet_died_during_an_attempt_...``. The decisions
and every other case (no deadline, a deadline too short, several nodes, a notice during a save, a node the attempt
does not use, the wait for a replacement): tests/supervisor/test_preemption.py; Ray's side of the drains:
tests/supervisor/test_ray_drains.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from ray.util.state import list_actors

from supervisor.mechanisms.ray_cluster import LocalRayCluster
from supervisor.mechanisms.ray_drain import drain_node
from supervisor.run.rundir import RunDirectory
from tests.conftest import start_test_cluster, stop_test_cluster
from tests.supervisor.e2e.conftest import FAST, JOB_ARGS, events_of, final_of, start_supervisor, wait_until

pytestmark = pytest.mark.ray

DEADLINE_S = 30.0


@pytest.fixture
def three_nodes() -> Iterator[LocalRayCluster]:
    cluster = start_test_cluster(num_cpus=0, dashboard=True)
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=4)
        yield cluster
    finally:
        report = stop_test_cluster(cluster)
        assert not report.survivors
        assert not cluster.processes()


def synced_steps(run_dir: Path, attempt: int) -> list[int]:
    path = run_dir / "attempts" / str(attempt) / "heartbeats.jsonl"
    if not path.exists():
        return []
    beats = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [b["step"] for b in beats if b.get("kind") == "sync_end"]


def job_nodes(cluster: LocalRayCluster, ray_job_id: str | None = None) -> set[str]:
    filters = [("state", "=", "ALIVE")] + ([("job_id", "=", ray_job_id)] if ray_job_id else [])
    return {a.node_id for a in list_actors(address=cluster.dashboard_url, filters=filters)}


def raylets_of(cluster: LocalRayCluster, node_id: str) -> list[psutil.Process]:
    return [p for p in cluster.processes() if f"--node_id={node_id}" in " ".join(p.cmdline())]


@pytest.mark.slow
def test_a_preempted_worker_saves_the_step_and_the_relaunch_resumes_from_it_on_the_other_worker(
    runs, reference, three_nodes: LocalRayCluster
) -> None:
    run_dir = runs.new()
    supervisor = start_supervisor(
        run_dir,
        "ray.mode=address",
        f"ray.address={three_nodes.address}",
        f"ray.dashboard_url={three_nodes.dashboard_url}",
        "preemption.poll_s=1",
        *FAST,
        job_args=(*JOB_ARGS, "trainer.extra_step_time_s=1.0"),
        extra_env=three_nodes.env(),
    )
    log = run_dir.parent / f"{run_dir.name}.supervisor.log"
    # Past the periodic save of step 2, so that a save at the notice is one the run would otherwise lose.
    wait_until(lambda: any(step >= 3 for step in synced_steps(run_dir, 1)), 180, "attempt 1's sync of step 3")
    preempted = sorted(job_nodes(three_nodes))[0]
    deadline = time.time() + DEADLINE_S
    drained = drain_node(three_nodes.address, preempted, "spot instance reclaimed", deadline_ms=int(deadline * 1000))
    assert drained.accepted, drained.message

    wait_until(lambda: time.time() >= deadline, DEADLINE_S + 5, "the drain's deadline")
    # The node goes at its deadline, as the cloud takes it: unless Ray let it go already, once the attempt's
    # teardown left it idle (a drained node leaves the cluster as soon as nothing runs there).
    for raylet in raylets_of(three_nodes, preempted):
        raylet.kill()
    assert supervisor.wait(timeout=240) == 0, log.read_text()[-4000:]

    (notice,) = events_of(run_dir, "preemption_notice")
    assert notice["attempt"] == 1
    assert preempted in [n["node_id"] for n in notice["nodes"]]
    assert notice["response"] == "save"
    assert 20 <= notice["deadline_in_s"] <= DEADLINE_S
    (saved,) = events_of(run_dir, "preemption_save")
    assert saved["exited"], saved
    checkpoint = saved["emergency_checkpoint"]
    assert (checkpoint["status"], checkpoint["trigger"]) == ("saved", "stop_request")
    assert checkpoint["step"] >= 3, "the step the job was at after the notice, not the periodic save of step 2"
    assert saved["waited_s"] < DEADLINE_S - 10, "saved within the deadline less the margin"

    assert [e for e in events_of(run_dir, "node_health") if e["node_id"] == preempted and not e["healthy"]] == [], (
        "a node preempted with notice left as announced: not reported unhealthy"
    )
    assert "relaunch after a preemption" in log.read_text()
    first, second = events_of(run_dir, "attempt_exited")
    assert (first["rule"], first["action"]) == ("preempted", "restart")
    assert second["exit_code"] == 0
    started = events_of(run_dir, "attempt_started")
    assert started[1]["resume_step"] == checkpoint["step"]
    history = RunDirectory(run_dir).load_history()
    assert history is not None
    assert history.restarts_used == 0, "a preemption is not a restart the budget counts"

    second_job = events_of(run_dir, "teardown")[1]["ray_job_id"]
    second_nodes = {
        a.node_id for a in list_actors(address=three_nodes.dashboard_url, filters=[("job_id", "=", second_job)])
    }
    assert second_nodes, "attempt 2 had actors"
    assert preempted not in second_nodes, "the relaunch ran on the worker that remained"
    assert final_of(run_dir)["weights_sha256"] == reference["final"]["weights_sha256"]
