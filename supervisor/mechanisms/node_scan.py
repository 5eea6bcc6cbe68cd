"""What an attempt left on one node: the processes that carry its marker, and which of the attempt's processes
still hold memory on the node's NVIDIA GPUs. It runs on that node, as a Ray task pinned there (``node_probe``).

On a real cluster the attempt's ranks run on other machines, and so do the processes they start that are no Ray
actor: verl 0.9.1's vLLM server starts its engine workers with ``distributed_executor_backend="mp"``
(verl/workers/rollout/vllm_rollout/vllm_async_server.py:329), as children of the actor's process, and they are
the ones that hold the GPU's memory. The state API does not know them; only something running on their machine
can read their environment (the marker, inherited through the job's runtime_env) or ask NVML about them.

This module, ``marked`` and ``gpu_memory`` depend on nothing else of the supervisor: ``node_probe`` ships them by
value with the task, so the cluster's nodes need nothing of the supervisor installed.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict, dataclass, field

import psutil

from supervisor.mechanisms.gpu_health import NodeReading, read_node
from supervisor.mechanisms.gpu_memory import GpuHolder, GpuMemoryCheck, gpu_memory_holders
from supervisor.mechanisms.marked import find_marked_processes


@dataclass(frozen=True)
class NodeScan:
    """One node's answer."""

    node_id: str
    hostname: str
    terminated: list[tuple[int, str]] = field(default_factory=list)
    """(pid, name) of the attempt's processes found alive there, and ended (SIGTERM, then SIGKILL)."""
    survivors: list[tuple[int, str]] = field(default_factory=list)
    """(pid, name) of those still alive after SIGKILL (a process in uninterruptible sleep)."""
    gpu: GpuMemoryCheck = field(default_factory=GpuMemoryCheck)
    health: NodeReading = field(default_factory=NodeReading)
    """What the node's GPUs read (``gpu_health``), for the judgement of whether the next attempt may use it."""

    @property
    def clean(self) -> bool:
        return not self.survivors and not self.gpu.holders

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping) -> NodeScan:
        gpu = data.get("gpu") or {}
        holders = [GpuHolder(**holder) for holder in gpu.get("holders", [])]
        return cls(
            node_id=data["node_id"],
            hostname=data["hostname"],
            terminated=[tuple(p) for p in data.get("terminated", [])],
            survivors=[tuple(p) for p in data.get("survivors", [])],
            gpu=GpuMemoryCheck(skipped=gpu.get("skipped"), devices=gpu.get("devices", 0), holders=holders),
            health=NodeReading.from_json(data.get("health")),
        )


def scan_node(
    node_id: str,
    markers: Mapping[str, str],
    known_pids: Collection[int] = (),
    grace_s: float = 2.0,
    compute_timeout_s: float = 0.0,
) -> NodeScan:
    """End the processes here that carry every one of ``markers``, then ask NVML whether any of them, or of
    ``known_pids`` (the attempt's actors here, and what earlier scans ended), still holds GPU memory: a process
    the kernel has not finished tearing down holds it after it is gone from the process table."""
    found = find_marked_processes(markers)
    names = {p.pid: _name(p) for p in found}  # before they are gone
    # Not terminate_processes: this runs on other nodes, pickled by value without the rest of the supervisor,
    # and its processes are not its children, so a zombie (which only its parent can reap) must count as gone.
    _send(found, psutil.Process.terminate)
    alive = _wait_gone(found, grace_s)
    _send(alive, psutil.Process.kill)
    survivors = _wait_gone(alive, grace_s)
    gpu = gpu_memory_holders({*known_pids, *(p.pid for p in found)})
    try:
        health = read_node(compute_timeout_s=compute_timeout_s)
    except Exception as exc:  # noqa: BLE001 - a health read that fails must not cost the sweep its answer
        health = NodeReading(skipped=f"the GPUs' health could not be read: {type(exc).__name__}: {exc}")
    return NodeScan(
        node_id=node_id,
        hostname=socket.gethostname(),
        terminated=[(p.pid, names[p.pid]) for p in found],
        survivors=[(p.pid, names[p.pid]) for p in survivors],
        gpu=gpu,
        health=health,
    )


def _send(processes: list[psutil.Process], signal_one: Callable[[psutil.Process], None]) -> None:
    for process in processes:
        try:
            signal_one(process)
        except psutil.NoSuchProcess:
            pass


def _wait_gone(processes: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Those still running after ``timeout_s``. A zombie counts as gone: it holds nothing but its table entry,
    and its parent (not ours to signal) reaps it."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [p for p in processes if _running(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


def _running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _name(process: psutil.Process) -> str:
    try:
        return process.name()
    except psutil.Error:
        return "?"
