"""Supervising on an existing multi-node cluster: ``ray.mode=address`` and ``ray.mode=jobs``.

The cluster has two nodes on this machine; the head has no CPUs, so every actor of the job runs on the second
node. A bystander job that has nothing to do with the run keeps running on the same cluster throughout.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ray.util.state import list_actors, list_jobs, list_nodes

from supervisor.mechanisms.ray_cluster import LocalRayCluster
from supervisor.mechanisms.ray_kill import kill_actors, remove_placement_groups
from supervisor.mechanisms.ray_state import RayStateClient
from tests.conftest import REPO_ROOT, start_test_cluster, stop_test_cluster
from tests.supervisor.e2e.conftest import (
    JOB_ARGS,
    events_of,
    final_of,
    run_supervisor,
    start_supervisor,
    state_of,
    supervisor_argv,
    wait_until,
)
from tests.supervisor.e2e.cuttable_proxy import CuttableProxy

pytestmark = pytest.mark.ray

MODES = ["address", "jobs"]
STALL_AT_5 = ("--stall-on", "1", "--stall-at", "5")
# A stall is seen within seconds (as in test_stalls.py).
STALL_WATCHDOG = (
    "watchdog.adaptive_floor_s=4",
    "watchdog.adaptive_min_steps=3",
    "watchdog.heartbeat_interval_s=0.5",
    "watchdog.tick_s=0.2",
)


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[LocalRayCluster]:
    cluster = start_test_cluster(num_cpus=0, dashboard=True)
    try:
        cluster.add_node(num_cpus=8, resources={"stray_ok": 1}, num_gpus=2)  # logical GPUs
        yield cluster
    finally:
        report = stop_test_cluster(cluster)
        assert not report.survivors
        assert not cluster.processes()


@pytest.fixture(scope="module")
def bystander(two_nodes: LocalRayCluster) -> Iterator[subprocess.Popen[str]]:
    """Someone else's job on the same cluster: a driver with an actor, which must outlive every test here."""
    code = (
        "import os, time, ray\n"
        "ray.init(address=os.environ['RAY_ADDRESS'], namespace='bystander', log_to_driver=False)\n"
        "@ray.remote(num_cpus=0)\n"
        "class Steady:\n"
        "    def ping(self): return 'pong'\n"
        "steady = Steady.options(name='steady').remote()\n"
        "print(ray.get(steady.ping.remote()), flush=True)\n"
        "time.sleep(3600)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        env={**os.environ, **two_nodes.env()},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "pong"
    yield proc
    proc.kill()
    proc.wait()


def steady_alive(two_nodes: LocalRayCluster) -> bool:
    actors = list_actors(address=two_nodes.dashboard_url, filters=[("class_name", "=", "Steady")])
    return [a.state for a in actors] == ["ALIVE"]


def worker_node_id(two_nodes: LocalRayCluster) -> str:
    (node,) = [n for n in list_nodes(address=two_nodes.dashboard_url) if not n.is_head_node and n.state == "ALIVE"]
    return node.node_id


def mode_overrides(mode: str, two_nodes: LocalRayCluster) -> tuple[str, ...]:
    if mode == "address":
        return ("ray.mode=address", f"ray.address={two_nodes.address}", f"ray.dashboard_url={two_nodes.dashboard_url}")
    return (
        "ray.mode=jobs",
        f"ray.address={two_nodes.dashboard_url}",
        f"ray.gcs_address={two_nodes.address}",
        f"ray.python={sys.executable}",
    )


def actors_of_job(two_nodes: LocalRayCluster, ray_job_id: str, class_name: str | None = None) -> list:
    filters = [("job_id", "=", ray_job_id)]
    if class_name:
        filters.append(("class_name", "=", class_name))
    return list_actors(address=two_nodes.dashboard_url, filters=filters)


@pytest.mark.parametrize(
    "mode",
    ["address", pytest.param("jobs", marks=pytest.mark.slow)],  # jobs mode: also the two tests below
)
def test_weight_sync_failure_on_an_existing_cluster_is_fenced_and_resumed(
    runs, reference, two_nodes, bystander, mode: str
) -> None:
    run_dir = runs.new()
    proc = run_supervisor(
        run_dir,
        *mode_overrides(mode, two_nodes),
        "restart.backoff_initial_s=0.2",
        "restart.backoff_jitter_s=0",
        job_args=JOB_ARGS,
        extra_env={"VERL_HOOKS_FAULTS": "naive:raise@3#1", **two_nodes.env()},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    exited = events_of(run_dir, "attempt_exited")
    assert [(e["exit_code"], e["rule"]) for e in exited] == [(75, "weight-sync-failure"), (0, "success")]
    # With ray.mode=jobs the driver is not told of a record file: the record came over the heartbeat channel.
    record = json.loads((run_dir / "attempts" / "1" / "error.json").read_text())
    assert (record["phase"], record["global_step"], record["attempt"]) == ("naive", 3, 1)
    assert "step 1:" in (run_dir / "attempts" / "1" / "stdout.log").read_text(), "the job's output was kept"

    first_teardown = events_of(run_dir, "teardown")[0]
    assert first_teardown["fenced"] is True
    assert first_teardown["actors_alive"] == 0
    job_actors = actors_of_job(two_nodes, first_teardown["ray_job_id"])
    assert job_actors, "the first attempt's job had actors"
    assert {a.state for a in job_actors} == {"DEAD"}
    assert {a.node_id for a in job_actors} == {worker_node_id(two_nodes)}, "they ran on the non-head node"
    swept = first_teardown["nodes"]
    assert f"/{worker_node_id(two_nodes)[:8]}: GPU skipped: no NVIDIA driver here" in swept, "a task swept it"

    assert final_of(run_dir)["weights_sha256"] == reference["final"]["weights_sha256"]
    assert bystander.poll() is None
    assert steady_alive(two_nodes), "an unrelated job on the same cluster kept running"
    assert not (run_dir / "ray").exists(), "the supervisor started no cluster of its own"


# The kill is the same primitive in both modes (the fence's AttemptView); jobs mode runs it with -m slow.
@pytest.mark.parametrize("mode", ["address", pytest.param("jobs", marks=pytest.mark.slow)])
def test_detached_actor_left_by_a_failed_attempt_is_killed_by_the_fence(runs, two_nodes, bystander, mode) -> None:
    run_dir = runs.new()
    proc = run_supervisor(
        run_dir,
        "job=scripted",
        *mode_overrides(mode, two_nodes),
        job_args=("--fail-until", "2", "--leave-detached-actor-on", "1"),
        extra_env=two_nodes.env(),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    teardown = events_of(run_dir, "teardown")[0]
    assert teardown["fenced"] is True
    (killed,) = teardown["actors_killed"]
    assert killed.startswith("Stubborn ")
    (stray,) = actors_of_job(two_nodes, teardown["ray_job_id"], "Stubborn")
    assert stray.node_id == worker_node_id(two_nodes), "it lived on the other node"
    assert stray.state == "DEAD", "the fence waited until it was dead before attempt 2"
    assert events_of(run_dir, "attempt_started")[1]["ts"] >= teardown["ts"]
    assert steady_alive(two_nodes)


@pytest.mark.slow  # the judgement is tests/supervisor/test_fence.py's, in milliseconds; this is the whole path
def test_an_actor_the_fence_may_not_kill_stops_the_run_before_a_second_attempt(runs, two_nodes, bystander) -> None:
    run_dir = runs.new()
    proc = run_supervisor(
        run_dir,
        "job=scripted",
        *mode_overrides("address", two_nodes),
        "teardown.kill_stray_actors=false",
        "teardown.fence_timeout_s=3",
        job_args=("--fail-until", "2", "--leave-detached-actor-on", "1"),
        extra_env=two_nodes.env(),
    )
    try:
        assert proc.returncode == 6, proc.stderr[-4000:]
        assert len(events_of(run_dir, "attempt_started")) == 1, "no attempt started next to the stray actor"
        (teardown,) = events_of(run_dir, "teardown")
        assert teardown["fenced"] is False
        assert teardown["actors_alive"] == 1
        (problem,) = teardown["problems"]
        assert "actor Stubborn" in problem
        assert "teardown.kill_stray_actors is off" in problem
        finished = events_of(run_dir, "run_finished")[-1]
        assert finished["exit_code"] == 6
        assert "Stubborn" in finished["reason"]
        assert "Stubborn" in proc.stderr, "the console says what is left"
    finally:
        # The stray actor is the test's to remove, so that it does not outlive the test.
        teardown_events = events_of(run_dir, "teardown")
        if teardown_events:
            job_id = teardown_events[0]["ray_job_id"]
            strays = [a.actor_id for a in actors_of_job(two_nodes, job_id, "Stubborn") if a.state != "DEAD"]
            kill_actors(two_nodes.address, strays)
            wait_until(
                lambda: {a.state for a in actors_of_job(two_nodes, job_id, "Stubborn")} == {"DEAD"},
                30,
                "the stray actor to be dead",
            )


# Removal by id is proven against a real cluster by tests/supervisor/test_ray_wire.py, the fence's judgement by
# tests/supervisor/test_fence.py; this whole run of the loop runs with -m slow.
@pytest.mark.slow
def test_detached_placement_group_left_by_a_failed_attempt_is_removed_before_the_next_one(
    runs, two_nodes, bystander
) -> None:
    """Attempt 1 leaves a detached placement group holding both GPUs of the cluster; attempt 2 needs them."""
    run_dir = runs.new()
    proc = run_supervisor(
        run_dir,
        "job=scripted",
        *mode_overrides("address", two_nodes),
        job_args=("--fail-until", "2", "--leave-detached-placement-group-on", "1", "--gpus", "2", "--need-gpus", "2"),
        extra_env=two_nodes.env(),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    teardown = events_of(run_dir, "teardown")[0]
    assert teardown["fenced"] is True
    assert teardown["placement_groups_removed"] == ["placement group leaked-by-attempt-1 (detached)"]
    assert teardown["placement_groups_alive"] == 0
    assert "reserved 2 GPUs" in (run_dir / "attempts" / "2" / "stdout.log").read_text()
    assert steady_alive(two_nodes)


@pytest.mark.slow  # as above: the judgement is tests/supervisor/test_fence.py's
def test_a_placement_group_the_fence_may_not_remove_stops_the_run(runs, two_nodes, bystander) -> None:
    run_dir = runs.new()
    proc = run_supervisor(
        run_dir,
        "job=scripted",
        *mode_overrides("address", two_nodes),
        "teardown.remove_stray_placement_groups=false",
        "teardown.fence_timeout_s=3",
        job_args=("--fail-until", "2", "--leave-detached-placement-group-on", "1", "--gpus", "2"),
        extra_env=two_nodes.env(),
    )
    try:
        assert proc.returncode == 6, proc.stderr[-4000:]
        assert len(events_of(run_dir, "attempt_started")) == 1, "no attempt started next to the leaked group"
        (teardown,) = events_of(run_dir, "teardown")
        assert (teardown["fenced"], teardown["placement_groups_alive"]) == (False, 1)
        (problem,) = teardown["problems"]
        assert "placement group leaked-by-attempt-1 (detached) CREATED" in problem
        assert "teardown.remove_stray_placement_groups is off" in problem
        assert "leaked-by-attempt-1" in proc.stderr, "the console says what is left"
    finally:
        # The leaked group is the test's to remove, so that it does not outlive the test.
        teardown_events = events_of(run_dir, "teardown")
        if teardown_events:
            state = RayStateClient(two_nodes.dashboard_url)
            left = state.live_placement_groups(teardown_events[0]["ray_job_id"])
            remove_placement_groups(two_nodes.address, [g.placement_group_id for g in left])
            wait_until(
                lambda: not state.live_placement_groups(teardown_events[0]["ray_job_id"]),
                30,
                "the leaked placement group to be removed",
            )


# The GCS's resources are read against a real cluster by tests/supervisor/test_ray_wire.py, the judgement is
# tests/supervisor/test_fence.py's: this whole run of the loop runs with -m slow.
@pytest.mark.slow
def test_gpus_not_free_again_after_the_attempt_stop_the_run_naming_who_holds_them(runs, two_nodes, bystander) -> None:
    """What the attempt's job id cannot find: a group of another Ray job that the attempt started still holds the
    GPUs. The fence compares the cluster's free GPUs with those before the attempt and relaunches nothing."""
    run_dir = runs.new()
    proc = run_supervisor(
        run_dir,
        "job=scripted",
        *mode_overrides("address", two_nodes),
        "teardown.fence_timeout_s=3",
        job_args=("--fail-until", "2", "--hold-gpus-in-another-job-on", "1", "--gpus", "2", "--ping-ray"),
        extra_env=two_nodes.env(),
    )
    state = RayStateClient(two_nodes.dashboard_url)
    try:
        assert proc.returncode == 6, proc.stderr[-4000:]
        assert len(events_of(run_dir, "attempt_started")) == 1
        (teardown,) = events_of(run_dir, "teardown")
        assert (teardown["fenced"], teardown["resources_held"]) == (False, {"GPU": 2})
        assert (teardown["actors_alive"], teardown["placement_groups_alive"]) == (0, 0), "none of the attempt's"
        (problem,) = teardown["problems"]
        assert "resources available before the attempt are still held: GPU 2" in problem
        assert "placement group held-by-another-job (detached) of job" in problem
    finally:
        held = [g.placement_group_id for g in state.live_placement_groups() if g.name == "held-by-another-job"]
        remove_placement_groups(two_nodes.address, held)
        wait_until(
            lambda: not [g for g in state.live_placement_groups() if g.name == "held-by-another-job"],
            30,
            "the other job's placement group to be removed",
        )


@pytest.mark.slow  # the stall and the local dumps: test_stalls.py; this adds the dashboard's py-spy on another node
def test_a_stall_collects_the_stacks_of_the_attempts_actors_on_the_other_node(runs, two_nodes, bystander) -> None:
    """Attempt 1 leaves an actor on the non-head node, then stalls: its stack is read there, through the dashboard
    (py-spy on that node), before the teardown; the driver's is read here, by signal."""
    run_dir = runs.new()
    proc = run_supervisor(
        run_dir,
        "job=scripted",
        *mode_overrides("address", two_nodes),
        *STALL_WATCHDOG,
        job_args=(*("--leave-detached-actor-on", "1", "--steps", "6", "--step-time", "0.2"), *STALL_AT_5),
        extra_env=two_nodes.env(),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (stall,) = events_of(run_dir, "stall_detected")
    assert stall["attempt"] == 1
    dumps = events_of(run_dir, "stacks_dumped")[0]["dumps"]
    worker = worker_node_id(two_nodes)[:12]
    (remote,) = [d for d in dumps if d["node"] == worker]
    assert (remote["name"], remote["status"]) == ("Stubborn", "dumped"), dumps
    assert Path(remote["file"]).parent == run_dir / "attempts" / "1" / "stacks" / worker
    assert "Thread" in Path(remote["file"]).read_text(), "py-spy's dump of the actor's threads"
    local = [d for d in dumps if d["node"] is None and d["status"] == "dumped"]
    assert any("wait_for_a_reply_that_never_comes" in Path(d["file"]).read_text() for d in local)
    assert steady_alive(two_nodes)


@pytest.mark.slow  # ray.mode=address itself runs above; this is the KubeRay example's submission around it
def test_supervisor_as_the_entrypoint_of_a_ray_job_runs_each_attempt_as_a_job_of_its_own(
    runs, two_nodes, bystander
) -> None:
    """The KubeRay example's set-up: the supervisor is a Jobs API submission's entrypoint, ray.mode=address
    with the cluster from the $RAY_ADDRESS the Jobs API gives it."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    run_dir = runs.new()
    argv = supervisor_argv(
        run_dir,
        "job=scripted",
        "ray.mode=address",
        f"ray.dashboard_url={two_nodes.dashboard_url}",
        job_args=("--fail-until", "2", "--leave-detached-actor-on", "1"),
    )
    client = JobSubmissionClient(two_nodes.dashboard_url)
    submission = client.submit_job(
        entrypoint=shlex.join(argv),
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT), "SUBMITTED_BY": "the-test"}},
        entrypoint_num_cpus=0,
    )
    final = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    wait_until(lambda: client.get_job_status(submission) in final, 300, "the submission to end")
    status = client.get_job_status(submission)
    assert status == JobStatus.SUCCEEDED, client.get_job_logs(submission)[-4000:]

    exited = events_of(run_dir, "attempt_exited")
    assert [e["exit_code"] for e in exited] == [1, 0]
    teardown = events_of(run_dir, "teardown")[0]
    assert teardown["fenced"] is True
    assert [a.split()[0] for a in teardown["actors_killed"]] == ["Stubborn"]
    (attempt_job,) = [j for j in list_jobs(address=two_nodes.dashboard_url) if j.job_id == teardown["ray_job_id"]]
    assert attempt_job.submission_id != submission, "the attempt did not claim the supervisor's submission"
    stdout = (run_dir / "attempts" / "1" / "stdout.log").read_text()
    assert "SUBMITTED_BY=the-test" in stdout, "but kept its runtime_env, which reached the job's actors"
    assert steady_alive(two_nodes)


def test_the_jobs_api_unreachable_while_the_job_trains_costs_the_run_nothing(runs, two_nodes, bystander) -> None:
    """The dashboard refuses connections for several times ``ray.api_timeout_s``, as a KubeRay head's does when
    it restarts, then accepts them and never answers, as a hung one does; then it is back. The job trains on,
    the supervisor asks again (a silent call is given up after ray.api_timeout_s, not waited for forever), the
    log tail connects again, and the run ends as if nothing had happened."""
    run_dir = runs.new()
    proxy = CuttableProxy("127.0.0.1", int(two_nodes.dashboard_url.rsplit(":", 1)[1]))
    go = run_dir.parent / f"{run_dir.name}.go"
    proc = start_supervisor(
        run_dir,
        "job=scripted",
        "ray.mode=jobs",
        f"ray.address={proxy.url}",
        f"ray.gcs_address={two_nodes.address}",
        f"ray.python={sys.executable}",
        "ray.api_timeout_s=1",
        job_args=("--until-file", str(go), "--steps", "2", "--step-time", "0.1"),
        extra_env=two_nodes.env(),
    )
    log = run_dir.parent / f"{run_dir.name}.supervisor.log"
    stdout = run_dir / "attempts" / "1" / "stdout.log"

    def outages(kind: str) -> int:
        return sum(f"does not answer ({kind}" in line for line in log.read_text().splitlines())

    try:
        wait_until(lambda: stdout.exists() and "attempt 1" in stdout.read_text(), 120, "the job's first line")
        proxy.cut()
        cut_at = time.monotonic()
        wait_until(lambda: outages("ConnectionError"), 30, "the supervisor to notice the refused connections")
        wait_until(lambda: time.monotonic() - cut_at > 4, 10, "an outage of four times ray.api_timeout_s")
        proxy.restore()
        wait_until(lambda: "answers again after" in log.read_text(), 30, "the supervisor to hear from the API again")
        proxy.hold()
        held_at = time.monotonic()
        wait_until(lambda: outages("TimeoutError"), 30, "the supervisor to give up on a call that never returns")
        wait_until(lambda: time.monotonic() - held_at > 4, 10, "a silence of four times ray.api_timeout_s")
        assert proc.poll() is None, log.read_text()[-4000:]
        proxy.restore()
        go.write_text("done looking")
        assert proc.wait(timeout=120) == 0, log.read_text()[-4000:]
    finally:
        go.write_text("done looking")
        proxy.restore()  # a supervisor still running needs the API to stop its submission
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=60)
        proxy.cut()
    exited = events_of(run_dir, "attempt_exited")
    assert [(e["exit_code"], e["rule"]) for e in exited] == [(0, "success")], "one attempt, which succeeded"
    assert log.read_text().count("answers again after") == 2, "each outage's end is logged, once"
    output = stdout.read_text()
    assert output.count("scripted job: attempt 1") == 1, "the tail connected again without copying twice"
    assert "scripted job: step 2" in output, "the attempt's log went on after the outage"
    assert state_of(run_dir)["outcome"] == "done"
