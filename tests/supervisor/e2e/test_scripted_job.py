"""The restart loop end to end with a scripted job: real supervisor processes, real embedded Ray clusters.

Every decision of the loop is tested in-process in tests/supervisor/test_loop.py; the ones here need real
processes (signals, process groups, a supervisor killed outright) or are kept as end-to-end checks (slow)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.supervisor.e2e.conftest import (
    events_of,
    run_supervisor,
    start_supervisor,
    state_of,
    supervisor_env,
    wait_until,
)
from tests.supervisor.webhook import Webhook

pytestmark = pytest.mark.ray

SCRIPTED = "job=scripted"


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.close()


@pytest.mark.slow  # in-process: tests/supervisor/test_loop.py
def test_bad_configuration_exits_2_and_starts_nothing(runs) -> None:
    run_dir = runs.new()
    proc = run_supervisor(run_dir, SCRIPTED, "restart.max_restart=1")
    assert proc.returncode == 2
    assert "verl-supervisor: error: Could not override 'restart.max_restart'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not run_dir.exists()


@pytest.mark.slow  # in-process: tests/supervisor/test_loop.py
def test_restart_budget_exhausted_exits_4(runs) -> None:
    run_dir = runs.new()
    proc = run_supervisor(
        run_dir,
        SCRIPTED,
        "restart.max_restarts=2",
        "restart.max_failures_without_progress=10",
        job_args=("--fail-until", "99"),
    )
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert [e["attempt"] for e in events_of(run_dir, "attempt_started")] == [1, 2, 3]
    assert len(events_of(run_dir, "backoff")) == 2
    state = state_of(run_dir)
    assert (state["state"], state["outcome"], state["exit_code"]) == ("finished", "budget_exhausted", 4)
    assert "restart budget exhausted: 2 of 2 restarts used" in proc.stderr
    assert "attempt  started" in proc.stderr, "the attempts table is printed"


@pytest.mark.slow  # in-process: tests/supervisor/test_loop.py
def test_crash_loop_exits_5(runs) -> None:
    run_dir = runs.new()
    proc = run_supervisor(
        run_dir,
        SCRIPTED,
        "restart.max_restarts=9",
        "restart.max_failures_without_progress=2",
        job_args=("--fail-until", "99"),
    )
    assert proc.returncode == 5, proc.stderr[-2000:]
    assert len(events_of(run_dir, "attempt_started")) == 2
    assert "crash loop: 2 failed attempts in a row" in proc.stderr


@pytest.mark.slow  # in-process: tests/supervisor/test_loop.py
def test_non_retryable_failure_exits_3_without_restart(runs) -> None:
    run_dir = runs.new()
    proc = run_supervisor(run_dir, SCRIPTED, job_args=("--fail-until", "99", "--exit-code", "78"))
    assert proc.returncode == 3, proc.stderr[-2000:]
    exited = events_of(run_dir, "attempt_exited")
    assert [(e["exit_code"], e["rule"], e["action"]) for e in exited] == [(78, "configuration-error", "fail")]
    assert not events_of(run_dir, "backoff")


def test_teardown_sends_sigterm_to_the_jobs_process_group_first(runs) -> None:
    """A child of the driver that dropped the run's marker is found through the process group: it gets SIGTERM
    and its grace period, not a bare SIGKILL."""
    run_dir = runs.new()
    proc = run_supervisor(run_dir, SCRIPTED, job_args=("--fail-until", "2", "--unmarked-group-child-on", "1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (run_dir / "attempts" / "1" / "group-child").read_text() == "SIGTERM"
    teardown = events_of(run_dir, "teardown")[0]
    assert any(entry.startswith("python") for entry in teardown["terminated"]), teardown
    assert not teardown["killed"]


def test_sigterm_tears_everything_down_and_a_second_supervisor_is_refused(runs, webhook) -> None:
    """Also the operator's view of a live run: ``status``, the metrics endpoint and the webhook's last alert."""
    run_dir = runs.new()
    supervisor = start_supervisor(
        run_dir,
        SCRIPTED,
        "ray.dashboard=true",
        "metrics.port=0",
        f"notify.webhook_url={webhook.url}",
        job_args=("--run-forever-on", "1", "--ignore-sigterm", "--spawn-stubborn-child"),
    )
    ready = run_dir / "attempts" / "1" / "ready"
    wait_until(ready.exists, 120, "attempt 1 to run")
    driver = psutil.Process(int(ready.read_text()))

    second = run_supervisor(run_dir, SCRIPTED)
    assert second.returncode == 2
    assert "is in use by another supervisor" in second.stderr

    live = subprocess.run(
        [sys.executable, "-m", "supervisor", "status", str(run_dir), "--json"],
        capture_output=True,
        text=True,
        check=True,
        env=supervisor_env(),
    )
    status = json.loads(live.stdout)
    assert (status["state"], status["supervisor_alive"], status["supervisor_pid"]) == (
        "attempt_running",
        True,
        supervisor.pid,
    )
    assert status["in_flight"]["attempt"] == 1
    (serving,) = events_of(run_dir, "metrics_serving")
    with urllib.request.urlopen(serving["url"], timeout=10) as response:
        metrics = response.read().decode()
    assert f'verl_supervisor_attempt_running{{run_id="{status["run_id"]}"}} 1.0' in metrics
    assert f'verl_supervisor_state{{run_id="{status["run_id"]}",state="attempt_running"}} 1.0' in metrics

    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=120) == 143
    assert [body["about"] for body, _ in webhook.posts] == ["interrupted"]
    assert [(n["about"], n["delivered"]) for n in events_of(run_dir, "notification")] == [("interrupted", True)]
    assert not driver.is_running() or driver.status() == psutil.STATUS_ZOMBIE
    teardown = events_of(run_dir, "teardown")[-1]
    assert teardown["fenced"] is True
    assert len(teardown["killed"]) >= 2, "the driver and its stubborn child ignored SIGTERM and were SIGKILLed"
    assert events_of(run_dir, "signal_received")[0]["signal"] == "SIGTERM"
    state = state_of(run_dir)
    assert (state["state"], state["outcome"], state["exit_code"]) == ("stopped", "interrupted_sigterm", 143)
    assert events_of(run_dir, "cluster_stopped")


def test_supervisor_killed_outright_takes_the_job_with_it_and_a_new_one_continues_the_budget(runs) -> None:
    run_dir = runs.new()
    overrides = (SCRIPTED, "restart.max_restarts=3", "restart.max_failures_without_progress=9")
    job_args = ("--fail-until", "3", "--run-forever-on", "3")
    first = start_supervisor(run_dir, *overrides, job_args=job_args)
    ready = run_dir / "attempts" / "3" / "ready"
    wait_until(ready.exists, 180, "attempt 3 to run")
    driver_pid = int(ready.read_text())
    run_id = state_of(run_dir)["run_id"]

    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    wait_until(lambda: not psutil.pid_exists(driver_pid), 30, "the job to die with its supervisor")
    wait_until(lambda: not runs.leftovers(), 30, "the embedded cluster to die with its supervisor")

    again = run_supervisor(run_dir, *overrides, job_args=job_args)
    assert again.returncode == 0, again.stderr[-3000:]
    state = state_of(run_dir)
    assert state["run_id"] == run_id
    assert state["supervisor_starts"] == 2
    assert [a["number"] for a in state["attempts"]] == [1, 2, 3, 4]
    assert state["attempts"][2]["rule"] == "supervisor-restarted"
    assert state["attempts"][3]["action"] == "done"
    assert events_of(run_dir, "run_started")[-1]["restarts_used"] == 2, "attempt 4 is restart 3 of 3"
    # The killed supervisor could not move its cluster's temp dir out of /tmp; the second one did.
    clusters = [p for p in (run_dir / "ray").iterdir() if p.name.startswith("vsray-")]
    assert len(clusters) >= 2
    assert not [p for p in clusters if p.is_symlink()]


def test_finished_run_directory_is_not_reused(runs) -> None:
    """Also: the embedded cluster declares the GPUs and custom resources the configuration gives it (logical)."""
    run_dir = runs.new()
    first = run_supervisor(
        run_dir, SCRIPTED, "ray.num_gpus=2", "+ray.resources.rollout_slot=4", job_args=("--need-gpus", "2")
    )
    assert first.returncode == 0, first.stderr[-3000:]
    assert "reserved 2 GPUs" in (run_dir / "attempts" / "1" / "stdout.log").read_text()
    again = run_supervisor(run_dir, SCRIPTED)
    assert again.returncode == 2
    assert "holds a finished run (done, exit 0)" in again.stderr


def helper_pid(run_dir: Path, attempt: int) -> int:
    return int((run_dir / "attempts" / str(attempt) / "orphan.pid").read_text())


def test_a_helper_the_job_orphans_without_the_marker_is_ended_with_its_attempt(runs) -> None:
    """The helper has a fresh environment, a session of its own and no living parent: no marker and no process
    tree leads to it. It is the supervisor's orphan, and ends with the attempt that made it."""
    run_dir = runs.new()
    job_args = ("--fail-until", "2", "--orphan-helper-on", "1", "--orphan-helper-on", "2")
    proc = run_supervisor(run_dir, SCRIPTED, job_args=job_args)
    helpers = [helper_pid(run_dir, 1), helper_pid(run_dir, 2)]
    try:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert not [pid for pid in helpers if psutil.pid_exists(pid)], "no helper outlived the run"
        first, second = events_of(run_dir, "teardown")
        assert f"python[{helpers[0]}]" in first["terminated"] + first["killed"], first
        assert f"python[{helpers[1]}]" in second["terminated"] + second["killed"], second
        assert f"adopted python[{helpers[0]}]" in proc.stderr, "the adoption is said when it happens"
    finally:
        for pid in helpers:  # ours: the test's job started them
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()


def test_a_helper_the_job_orphaned_dies_with_a_supervisor_killed_outright(runs, tmp_path: Path) -> None:
    run_dir = runs.new()
    supervisor = start_supervisor(
        run_dir, SCRIPTED, job_args=("--orphan-helper-on", "1", "--until-file", str(tmp_path / "never"))
    )
    log = run_dir.parent / f"{run_dir.name}.supervisor.log"
    try:
        wait_until((run_dir / "attempts" / "1" / "orphan.pid").exists, 120, "the job to orphan its helper")
        helper = helper_pid(run_dir, 1)
        wait_until(lambda: f"adopted python[{helper}]" in log.read_text(), 30, "the supervisor to adopt it")
        assert psutil.Process(helper).ppid() == supervisor.pid, "re-parented to the supervisor, not to init"
        os.kill(supervisor.pid, signal.SIGKILL)
        supervisor.wait(timeout=30)
        wait_until(lambda: not psutil.pid_exists(helper), 30, "the reaper to end the helper with the run")
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
        with contextlib.suppress(psutil.Error, FileNotFoundError, ValueError):
            psutil.Process(helper_pid(run_dir, 1)).kill()
