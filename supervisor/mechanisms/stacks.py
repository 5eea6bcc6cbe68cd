"""Capture what a stalled attempt was doing before it is torn down, within a few seconds.

Each job process launched through verl_hooks writes the Python stacks of all its threads to
``attempts/<n>/stacks/<host>-<pid>.txt`` on SIGUSR1 (``verl_hooks.heartbeat.enable_stack_dumps``). Only
processes that handle SIGUSR1 are signalled (its default action would kill the others), and stopped ones
(SIGSTOP) cannot answer: they are listed as such.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import psutil


@dataclass(frozen=True)
class StackDump:
    pid: int
    name: str
    status: str
    """``dumped``, ``stopped`` (SIGSTOP: cannot answer), ``no handler`` or ``no answer``."""
    file: str | None = None


def handles_sigusr1(pid: int) -> bool:
    """Whether the process has a handler for SIGUSR1 (the SigCgt mask in /proc/<pid>/status)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) & (1 << (signal.SIGUSR1 - 1)))
    except (OSError, ValueError):
        return False
    return False


def dump_stacks(processes: list[psutil.Process], stacks_dir: Path, timeout_s: float) -> list[StackDump]:
    host = socket.gethostname()
    results: dict[int, StackDump] = {}
    waiting: dict[int, tuple[str, Path]] = {}
    for process in processes:
        try:
            name, state = process.name(), process.status()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if state == psutil.STATUS_STOPPED:
            results[process.pid] = StackDump(process.pid, name, "stopped")
        elif not handles_sigusr1(process.pid):
            results[process.pid] = StackDump(process.pid, name, "no handler")
        else:
            target = stacks_dir / f"{host}-{process.pid}.txt"
            try:
                os.kill(process.pid, signal.SIGUSR1)
                waiting[process.pid] = (name, target)
            except ProcessLookupError:
                continue
    deadline = time.monotonic() + timeout_s
    while waiting and time.monotonic() < deadline:
        for pid, (name, target) in list(waiting.items()):
            if target.exists() and target.stat().st_size > 0:
                results[pid] = StackDump(pid, name, "dumped", str(target))
                del waiting[pid]
        if waiting:
            time.sleep(0.05)
    for pid, (name, _) in waiting.items():
        results[pid] = StackDump(pid, name, "no answer")
    return sorted(results.values(), key=lambda d: d.pid)
