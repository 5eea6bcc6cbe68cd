"""Stalls end to end: a job that stops sending progress heartbeats is detected, dumped, torn down, restarted.

The scripted job sends exactly the heartbeats the weight-sync guard and the launcher send for a verl job.
Detection bounds are asserted from the event timestamps with generous slack; real latency is the benchmark's.
"""

from __future__ import annotations

import signal
from pathlib import Path

import psutil
import pytest

from tests.supervisor.e2e.conftest import events_of, run_supervisor, start_supervisor, state_of, wait_until

pytestmark = pytest.mark.ray

WATCHDOG = (
    "job=scripted",
    "watchdog.startup_timeout_s=60",
    "watchdog.step_timeout_s=60",
    "watchdog.adaptive_floor_s=4",
    "watchdog.adaptive_multiple=5",
    "watchdog.adaptive_min_steps=3",
    "watchdog.driver_timeout_s=5",
    "watchdog.heartbeat_interval_s=0.5",
    "watchdog.tick_s=0.2",
)


def test_stalled_job_is_detected_dumped_and_restarted(runs) -> None:
    run_dir = runs.new()
    proc = run_supervisor(
        run_dir, *WATCHDOG, job_args=("--steps", "6", "--step-time", "0.2", "--stall-on", "1", "--stall-at", "5")
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    stall = events_of(run_dir, "stall_detected")
    assert len(stall) == 1
    assert (stall[0]["attempt"], stall[0]["stall_kind"], stall[0]["last_step"]) == (1, "job_stall", 4)
    assert stall[0]["limit_s"] == 4.0, "5 x 0.2 s steps is below the floor"
    assert stall[0]["silent_s"] < stall[0]["limit_s"] + 5.0, "detected within the limit plus generous slack"

    dumps = events_of(run_dir, "stacks_dumped")[0]["dumps"]
    dumped = [d for d in dumps if d["status"] == "dumped"]
    assert dumped, dumps
    assert "wait_for_a_reply_that_never_comes" in Path(dumped[0]["file"]).read_text()

    exited = events_of(run_dir, "attempt_exited")
    assert [(e["attempt"], e["rule"]) for e in exited] == [(1, "stalled"), (2, "success")]
    assert state_of(run_dir)["attempts"][0]["error_type"] == "supervisor.watchdog.job_stall"


@pytest.mark.slow  # the watchdog's limits are tested as pure functions in tests/supervisor/test_watchdog.py
def test_slow_but_progressing_job_is_not_killed(runs) -> None:
    run_dir = runs.new()
    proc = run_supervisor(
        run_dir,
        *WATCHDOG,
        job_args=("--steps", "8", "--step-time", "0.2", "--slow-after", "4", "--slow-step-time", "3.0"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not events_of(run_dir, "stall_detected")
    assert len(events_of(run_dir, "attempt_started")) == 1


@pytest.mark.slow  # in-process: tests/supervisor/test_loop.py and test_watchdog.py
def test_frozen_driver_is_detected_and_replaced(runs) -> None:
    run_dir = runs.new()
    supervisor = start_supervisor(
        run_dir, *WATCHDOG, job_args=("--steps", "400", "--step-time", "0.2", "--stall-on", "99")
    )
    ready = run_dir / "attempts" / "1" / "ready"
    wait_until(ready.exists, 120, "attempt 1 to run")
    wait_until(lambda: (run_dir / "attempts" / "1" / "heartbeats.jsonl").exists(), 60, "the first heartbeats")
    driver = psutil.Process(int(ready.read_text()))
    driver.send_signal(signal.SIGSTOP)
    wait_until(lambda: (run_dir / "attempts" / "2" / "ready").exists(), 120, "attempt 2 to start")
    stall = events_of(run_dir, "stall_detected")[0]
    assert stall["stall_kind"] == "driver_frozen"
    assert stall["silent_s"] < 5.0 + 5.0
    statuses = {d["status"] for d in events_of(run_dir, "stacks_dumped")[0]["dumps"]}
    assert "stopped" in statuses, "a SIGSTOPped process cannot dump its stack and is reported as such"
    assert not driver.is_running() or driver.status() == psutil.STATUS_ZOMBIE
    supervisor.send_signal(signal.SIGINT)
    assert supervisor.wait(timeout=120) == 130
