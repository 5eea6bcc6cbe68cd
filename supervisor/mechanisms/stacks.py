"""Capture what a stalled attempt was doing before it is torn down, within a few seconds.

On this machine, each job process launched through verl_hooks writes the Python stacks of all its threads to
``attempts/<n>/stacks/<host>-<pid>.txt`` on SIGUSR1 (``verl_hooks.heartbeat.enable_stack_dumps``). Only
processes that handle SIGUSR1 are signalled (its default action would kill the others), and stopped ones
(SIGSTOP) cannot answer: they are listed as such. On every node, the attempt's Ray actors are read through
the dashboard, which runs py-spy on their node (``attempts/<n>/stacks/<node id>/<pid>.txt``): the stuck rank of
a multi-node job is usually on another machine.
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
    node: str | None = None
    """The Ray node it runs on, for stacks read through the dashboard (None: read here, by signal)."""


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


def dump_remote_stacks(state, job_id: str | None, stacks_dir: Path, timeout_s: float) -> list[StackDump]:
    """The stacks of every live actor of ``job_id``, on every node, through the dashboard (py-spy on that node),
    written to ``stacks_dir/<node id>/<pid>.txt``; all of them within ``timeout_s``."""
    from concurrent.futures import ThreadPoolExecutor, wait

    if state is None or job_id is None:
        return []
    try:
        actors = [a for a in state.live_actors(job_id) if a.pid and a.node_id]
    except Exception as exc:  # noqa: BLE001 - no remote stacks, the local ones still count
        return [StackDump(0, "actors", f"no answer: {type(exc).__name__}")]

    def fetch(actor) -> StackDump:
        node = actor.node_id[:12]
        try:
            text = state.worker_stack(actor.node_id, actor.pid, timeout_s)
        except Exception as exc:  # noqa: BLE001 - one worker's failure is a line of the report
            return StackDump(actor.pid, actor.class_name, f"no answer: {_why(exc)}", node=node)
        target = stacks_dir / node / f"{actor.pid}.txt"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        return StackDump(actor.pid, actor.class_name, "dumped", str(target), node=node)

    pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="remote-stacks")
    futures = {pool.submit(fetch, actor): actor for actor in actors}
    done, late = wait(futures, timeout=timeout_s)
    pool.shutdown(wait=False, cancel_futures=True)
    dumps = [future.result() for future in done]
    dumps += [StackDump(futures[f].pid, futures[f].class_name, "no answer", node=futures[f].node_id[:12]) for f in late]
    return sorted(dumps, key=lambda d: (d.node or "", d.pid))


def _why(exc: Exception) -> str:
    """An HTTP error's status and the first line of its body (the dashboard says what went wrong there)."""
    import urllib.error

    if isinstance(exc, urllib.error.HTTPError):
        body = exc.read().decode(errors="replace").strip().splitlines()
        return f"HTTP {exc.code}" + (f": {body[0][:200]}" if body else "")
    return type(exc).__name__
