"""The reaper: when the supervisor dies outright, the processes carrying the run's marker die at once; after an
orderly end, nothing is touched. Real processes, found by their marker, never by name."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid

import psutil
import pytest

from supervisor.mechanisms.marked import find_marked_processes
from supervisor.mechanisms.reaper import start_reaper

MARKER_KEY = "VERL_SUPERVISOR_RUN_ID"


def sleepers(run_id: str, count: int = 2) -> list[subprocess.Popen[bytes]]:
    env = {**os.environ, MARKER_KEY: run_id}
    code = "import time; time.sleep(120)"
    # Popen returns once the child has exec'd: the marker is in its environment from then on.
    return [subprocess.Popen([sys.executable, "-c", code], env=env) for _ in range(count)]


@pytest.fixture
def run_id():
    marker = f"reaper-test-{uuid.uuid4().hex}"
    yield marker
    for process in find_marked_processes({MARKER_KEY: marker}):
        process.kill()


def test_a_supervisor_that_dies_takes_the_runs_processes_with_it(run_id: str) -> None:
    procs = sleepers(run_id)
    bystander = sleepers(f"{run_id}-someone-else", count=1)[0]
    reaper = start_reaper({MARKER_KEY: run_id})
    os.close(reaper._write_fd)  # what the kernel does when the supervisor dies, however it dies
    reaper._write_fd = None
    for proc in procs:
        proc.wait(timeout=10)
        assert proc.returncode == -9
    assert reaper._process.wait(timeout=10) == 0
    assert bystander.poll() is None, "only processes with the run's marker"
    bystander.kill()
    bystander.wait()


def test_children_without_the_marker_die_with_their_marked_parent(run_id: str) -> None:
    """Ray's agents, children of the raylet, show an empty environment (their title rewrite clobbers it): found
    as descendants, not by marker. Once their raylet and GCS are dead they would wait forever."""
    spawn_unmarked = (
        "import subprocess, sys, time;"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], env={});"
        "print(child.pid, flush=True); time.sleep(120)"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", spawn_unmarked], env={**os.environ, MARKER_KEY: run_id}, stdout=subprocess.PIPE
    )
    assert parent.stdout is not None
    child = psutil.Process(int(parent.stdout.readline()))
    assert MARKER_KEY not in child.environ()
    reaper = start_reaper({MARKER_KEY: run_id})
    try:
        os.close(reaper._write_fd)
        reaper._write_fd = None
        assert parent.wait(timeout=10) == -9
        child.wait(timeout=10)
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    finally:
        with contextlib.suppress(psutil.Error):
            child.kill()


def test_adopted_processes_die_with_the_supervisor_and_a_reused_pid_is_not_taken_for_one(run_id: str) -> None:
    """An orphaned agent of a dead raylet carries no readable marker and is nobody's descendant: the supervisor
    announces it while alive. A process with the same pid but another start time is someone else's."""
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], env={})
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], env={})
    reaper = start_reaper({MARKER_KEY: run_id})
    try:
        reaper.adopt([psutil.Process(orphan.pid)])
        impostor = psutil.Process(stranger.pid)
        created = impostor.create_time()
        os.write(reaper._write_fd, f"adopt {stranger.pid} {created - 5.0!r}\n".encode())  # the pid, reused
        os.close(reaper._write_fd)
        reaper._write_fd = None
        assert orphan.wait(timeout=10) == -9
        assert reaper._process.wait(timeout=10) == 0
        assert stranger.poll() is None, "a pid with another start time is not the adopted process"
    finally:
        for proc in (orphan, stranger):
            proc.kill()
            proc.wait()


def test_an_orderly_end_disarms_the_reaper(run_id: str) -> None:
    procs = sleepers(run_id, count=1)
    reaper = start_reaper({MARKER_KEY: run_id})
    reaper.disarm()
    assert reaper._process.returncode == 0
    assert procs[0].poll() is None, "an orderly end touches nothing"
    procs[0].kill()
    procs[0].wait()


def test_the_reaper_carries_no_marker(run_id: str) -> None:
    os.environ[MARKER_KEY] = run_id
    try:
        reaper = start_reaper({MARKER_KEY: run_id})
    finally:
        del os.environ[MARKER_KEY]
    try:
        assert MARKER_KEY not in psutil.Process(reaper.pid).environ()
    finally:
        reaper.disarm()
