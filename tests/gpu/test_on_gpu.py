"""Checks that need an NVIDIA GPU: what NVML says of real processes holding device memory, the fence and the node
sweep ending them, and a standby driver holding none. Skipped where NVML finds no GPU (CI, the CPU machine).

They need only torch, psutil and nvidia-ml-py (no Ray, no verl), so that they run on a bare GPU machine:

    python -m pytest tests/gpu --noconftest -o addopts="" -v -s
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from supervisor.backends.fence import AttemptView, fence, fence_rules
from supervisor.config import TeardownConfig
from supervisor.mechanisms.gpu_memory import gpu_memory_holders
from supervisor.mechanisms.marked import find_marked_processes
from supervisor.mechanisms.node_scan import scan_node

HERE = Path(__file__).parent
REPO = HERE.parent.parent


def _gpus() -> int:
    check = gpu_memory_holders(())
    return 0 if check.skipped else check.devices


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(_gpus() == 0, reason="no NVIDIA GPU that NVML can read"),
    pytest.mark.timeout(120),
]


@dataclass
class Holder:
    process: subprocess.Popen
    pids: dict[str, int]
    """role (parent, child) to pid"""


@pytest.fixture
def holders() -> Iterator[list[Holder]]:
    """Holders the test starts; every process they started is killed at the end, pass or fail."""
    started: list[Holder] = []
    yield started
    for holder in started:
        for pid in holder.pids.values():
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass
        holder.process.kill()
        holder.process.wait()


def start_holder(started: list[Holder], env: dict[str, str], megabytes: int, child: bool = False) -> Holder:
    """A process (and with ``child``, its spawned child) holding ``megabytes`` each on GPU 0, once they say so."""
    command = [sys.executable, str(HERE / "holder.py"), str(megabytes), *(["--child"] if child else [])]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    holder = Holder(process, {})
    started.append(holder)
    expected = {"parent", "child"} if child else {"parent"}
    while set(holder.pids) != expected:
        line = process.stdout.readline()
        if not line:
            raise AssertionError(f"the holder exited with {process.wait()} before it held GPU memory")
        _, role, pid = line.split()
        holder.pids[role] = int(pid)
    return holder


def attempt_env() -> tuple[dict[str, str], dict[str, str]]:
    marker = {"VSUP_GPU_TEST_ATTEMPT": uuid.uuid4().hex}
    return {**os.environ, **marker}, marker


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_nvml_names_each_process_that_holds_memory(holders: list[Holder]) -> None:
    env, _ = attempt_env()
    holder = start_holder(holders, env, 256, child=True)

    check = gpu_memory_holders(holder.pids.values())

    print("\nNVML:", check.summary())
    assert {h.pid for h in check.holders} == set(holder.pids.values())
    assert all(h.used_mb is None or h.used_mb >= 256 for h in check.holders)


def test_the_node_scan_ends_the_attempts_gpu_holders_and_spares_another_process(holders: list[Holder]) -> None:
    env, marker = attempt_env()
    attempt = start_holder(holders, env, 512, child=True)
    bystander = start_holder(holders, dict(os.environ), 256).pids["parent"]
    ours = set(attempt.pids.values())

    scans = [scan_node("this-node", marker, known_pids=ours)]
    deadline = time.monotonic() + 30
    while not scans[-1].clean and time.monotonic() < deadline:  # the sweep asks again until clean, likewise
        scans.append(scan_node("this-node", marker, known_pids=ours))

    print(f"\nfirst scan: ended {scans[0].terminated}, GPU {scans[0].gpu.summary()}; clean after {len(scans)} scans")
    assert ours <= {pid for pid, _ in scans[0].terminated}
    assert scans[-1].clean, scans[-1]
    assert not any(running(pid) for pid in ours)
    assert running(bystander)
    assert [h.pid for h in gpu_memory_holders([bystander]).holders] == [bystander]


def test_the_fence_waits_until_the_attempts_gpu_memory_is_free(holders: list[Holder]) -> None:
    env, marker = attempt_env()
    attempt = start_holder(holders, env, 512, child=True)
    view = AttemptView(leftovers=lambda: find_marked_processes(marker), attempt_pids=list(attempt.pids.values()))

    started = time.monotonic()
    result = fence(view, fence_rules(TeardownConfig(grace_s=2.0, fence_timeout_s=30.0), view))

    print(f"\nfence: {time.monotonic() - started:.2f} s, GPU {result.gpu_memory}")
    assert result.problems == ()
    assert set(attempt.pids.values()) <= {p.pid for p in result.terminated + result.killed}
    assert result.gpu_memory == f"free on {_gpus()} GPUs"


def test_the_fence_reports_an_attempt_process_that_still_holds_gpu_memory(holders: list[Holder]) -> None:
    # Not marked, so the fence cannot end it: what a process stuck in the kernel looks like to it.
    stuck = start_holder(holders, dict(os.environ), 256).pids["parent"]
    view = AttemptView(leftovers=list, attempt_pids=[stuck])
    result = fence(view, fence_rules(TeardownConfig(grace_s=1.0, fence_timeout_s=2.0), view))

    assert len(result.problems) == 1
    assert "still hold GPU memory" in result.problems[0]
    assert f"pid {stuck} on GPU 0" in result.problems[0]


def test_a_standby_driver_holds_no_gpu_memory(holders: list[Holder]) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    standby = subprocess.Popen(
        [sys.executable, "-m", "verl_hooks.standby", "tests.gpu.gpu_job"],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    try:
        ready = standby.stderr.readline()
        assert "verl_hooks.standby: ready" in ready, ready
        # It did what verl's import does: the CUDA driver is loaded into it...
        mapped = {Path(m.path).name for m in psutil.Process(standby.pid).memory_maps()}
        assert any(name.startswith("libcuda.so") for name in mapped)
        # ...and it holds nothing on the device.
        check = gpu_memory_holders([standby.pid])
        print(f"\n{ready.strip()}; NVML: {check.summary()}")
        assert check.skipped is None
        assert check.holders == []
        # The same imports and one tensor on the device do show up: the check above can fail.
        control = subprocess.Popen(
            [sys.executable, "-c", "import runpy; runpy.run_module('tests.gpu.gpu_job', run_name='__main__'); input()"],
            stdin=subprocess.PIPE,
            env=env,
            cwd=REPO,
        )
        holders.append(Holder(control, {"parent": control.pid}))
        deadline = time.monotonic() + 60
        while not gpu_memory_holders([control.pid]).holders:
            assert control.poll() is None, "the control exited before it held GPU memory"
            assert time.monotonic() < deadline, "the control never held GPU memory"
            time.sleep(0.1)
        standby.stdin.close()  # discarded: it exits by itself
        assert standby.wait(timeout=30) == 0
    finally:
        if standby.poll() is None:
            standby.kill()
        standby.wait()


def test_a_healthy_gpu_reads_healthy_and_its_compute_check_runs() -> None:
    """The node health check on real GPUs: NVML's counters read (or unknown where the card has none), and the
    matmul checked in a child process that sees every device."""
    from supervisor.mechanisms.gpu_health import read_node
    from supervisor.policy.nodes import judge_node

    started = time.monotonic()
    reading = read_node(compute_timeout_s=60)
    took = time.monotonic() - started
    verdict = judge_node("this-node", "here", reading, None)
    print(f"\nhealth read in {took:.1f} s: {reading}\nverdict: {verdict}")
    assert reading.skipped is None
    assert len(reading.gpus) == _gpus()
    assert reading.compute_skipped is None, "torch sees the GPUs: the matmul ran"
    assert all(gpu.compute is None for gpu in reading.gpus)
    assert verdict.healthy, verdict.problems
