"""The interface the supervisor's loop drives; it does not know which backend is behind it.

Backends carry out; they decide nothing. What they did comes back as values: a ``TeardownResult`` from
``teardown``, events (``ClusterStarted``, ``ClusterStopped``) from ``prepare`` and ``close``, which the loop
writes to the run's log.
"""

from __future__ import annotations

import logging
import socket
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

from supervisor.backends.fence import AttemptView, FenceResult, fence, fence_rules
from supervisor.clock import Clock
from supervisor.config import TeardownConfig
from supervisor.mechanisms.gpu_health import NodeReading, read_node
from supervisor.mechanisms.node_probe import COMPUTE_CHECK_MAX_S
from supervisor.mechanisms.processes import ProcessInfo
from supervisor.mechanisms.ray_drain import DrainOutcome
from supervisor.mechanisms.ray_state import NodeInfo, RayStateClient
from supervisor.mechanisms.stacks import StackDump
from supervisor.outcomes import ExitStatus
from supervisor.run.events import Event

logger = logging.getLogger(__name__)


class Waker(Protocol):
    """What else ends a backend's wait: a file descriptor that becomes readable (the heartbeat server's, when an
    error record arrives)."""

    def fileno(self) -> int: ...


@dataclass(frozen=True)
class LaunchSpec:
    attempt: int
    argv: list[str]
    env: dict[str, str]
    """The supervisor's variables and the job's own; the backend adds what its Ray mode needs."""
    cwd: str | None
    log_dir: Path
    error_file: Path
    log_limit_bytes: int | None = None
    """Each of the attempt's logs is kept under this (``supervisor.mechanisms.bounded_log``); None: unbounded."""


@dataclass(frozen=True)
class RunningJob:
    """One attempt's driver, as the loop knows it; what a backend keeps of it beyond this is its own."""

    attempt: int
    started_at: float
    pid: int | None = None
    warm: bool = False
    """Its driver was a standby started ahead (``JobBackend.start_standby``)."""
    resources_before: dict[str, float] | None = None
    """The cluster's GPUs and custom resources available when the attempt was launched (None: unknown); the
    fence waits for them to be available again."""


@dataclass(frozen=True)
class Stopped:
    """What stopping an attempt's driver did, before the fence."""

    terminated: tuple[ProcessInfo, ...] = ()
    killed: tuple[ProcessInfo, ...] = ()
    unkilled: tuple[ProcessInfo, ...] = ()
    """Still there after SIGKILL: the fence finds them again if they carry the marker, and asks NVML of them."""
    problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class TeardownResult(FenceResult):
    """What tearing an attempt down did (stopping its driver, then the fence), and whether the fence holds."""

    duration_s: float = 0.0

    @classmethod
    def of(cls, stopped: Stopped, fenced: FenceResult, duration_s: float) -> TeardownResult:
        """Every field of the fence's result, with what stopping the driver did first."""
        values = {f.name: getattr(fenced, f.name) for f in fields(FenceResult)}
        values.update(
            terminated=stopped.terminated + fenced.terminated,
            killed=stopped.killed + fenced.killed,
            problems=stopped.problems + fenced.problems,
        )
        return cls(**values, duration_s=duration_s)

    def event_fields(self) -> dict[str, Any]:
        """Every field as the teardown event writes it (processes as ``name[pid]``): the event takes them as
        they are, so a field added to the fence's result reaches the event without another copy by hand."""
        values = {}
        for f in fields(self):
            if not f.metadata.get("event", True):
                continue
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = [f"{v.name}[{v.pid}]" if isinstance(v, ProcessInfo) else v for v in value]
            values[f.name] = value
        values["fenced"] = self.fenced
        return values

    @property
    def fenced(self) -> bool:
        """Nothing of the attempt is left: the next attempt may start."""
        left = self.survivors or self.actors_alive or self.placement_groups_alive or self.resources_held
        return not left and not self.problems


@dataclass(frozen=True)
class NodesSeen:
    """What the loop judges the nodes by after a failed attempt (``supervisor/policy/nodes.py``)."""

    readings: tuple[tuple[str, str, NodeReading], ...] = ()
    """(node id, host name, its GPUs' reading) of each node the attempt used."""
    nodes: tuple[NodeInfo, ...] = ()
    """Every node of the cluster, as Ray knows it (empty: one machine, or Ray did not say)."""
    demand: dict[str, float] = field(default_factory=dict)
    """What the attempt's placement groups reserved: what the next attempt needs."""
    single_machine: bool = False
    """The embedded cluster: every node is this machine, and nothing can be drained."""
    ran_on: frozenset[str] = frozenset()
    """Every node where an actor of the attempt ran, the dead ones included (they were not swept)."""

    @property
    def used(self) -> set[str]:
        return {node_id for node_id, _, _ in self.readings}


def cluster_nodes_seen(result: TeardownResult, state: RayStateClient | None) -> NodesSeen:
    """A cluster of several machines: what the fence's sweep read on each node of the attempt, and what Ray says
    of the cluster's nodes and of the attempt's reservations (left empty when it does not answer)."""
    readings = tuple((scan.node_id, scan.hostname, scan.health) for scan in result.node_readings)
    nodes: tuple[NodeInfo, ...] = ()
    demand: dict[str, float] = {}
    ran_on: set[str] = set()
    if state is not None:
        try:
            nodes = tuple(state.nodes())
            if result.ray_job_id:
                demand = state.job_demand(result.ray_job_id)
                ran_on = state.job_actor_nodes(result.ray_job_id)
        except Exception as exc:  # noqa: BLE001 - without them nothing is drained; the attempt is still judged
            logger.warning("state API did not describe the cluster's nodes: %s", exc)
    return NodesSeen(readings, nodes, demand, ran_on=frozenset(ran_on))


class ClusterStartFailed(RuntimeError):
    """The backend's Ray cluster could not be started or reached."""


class JobBackend(ABC):
    teardown_config: TeardownConfig
    clock: Clock = Clock()

    @property
    def python(self) -> str:
        """The interpreter ``{python}`` in job.argv means where this backend runs the driver."""
        return sys.executable

    @abstractmethod
    def prepare(self) -> list[Event]:
        """Make the cluster ready for the next attempt (start it, or restart it when unhealthy); returns what it
        did, as events. Raises ``ClusterStartFailed``."""

    @abstractmethod
    def launch(self, spec: LaunchSpec) -> RunningJob:
        """Start the attempt's driver; returns at once."""

    def start_standby(self, spec: LaunchSpec) -> list[Event]:
        """Start the driver of the attempt ``spec`` describes ahead of it, if this backend can; ``launch`` with a
        spec of the same attempt, environment and working directory then uses it. Returns what it did."""
        return []

    @abstractmethod
    def wait(self, job: RunningJob, timeout_s: float | None, wake: Waker | None = None) -> ExitStatus | None:
        """Block until the driver ends (returning how), ``timeout_s`` passes or ``wake`` becomes readable
        (returning None)."""

    @abstractmethod
    def dump_stacks(self, job: RunningJob, stacks_dir: Path, timeout_s: float) -> list[StackDump]:
        """Ask the attempt's processes for their Python stacks (bounded by ``timeout_s``)."""

    @abstractmethod
    def stop(self, job: RunningJob) -> Stopped:
        """Stop the attempt's driver and whatever it started that this backend can reach directly."""

    @abstractmethod
    def attempt_view(self, job: RunningJob, stopped: Stopped) -> AttemptView:
        """What the fence needs to find and end what is left of the attempt, on every node."""

    def flush_output(self, job: RunningJob, timeout_s: float) -> None:  # noqa: B027 - not every backend copies output
        """Let the attempt's output reach its log files once its processes are gone."""

    def teardown(self, job: RunningJob) -> TeardownResult:
        """Stop everything of the attempt, then verify that nothing of it is left (the fence, the same for
        every backend)."""
        started = self.clock.monotonic()
        stopped = self.stop(job)
        view = self.attempt_view(job, stopped)
        fenced = fence(view, fence_rules(self.teardown_config, view), self.clock)
        self.flush_output(job, self.teardown_config.output_drain_s)
        return TeardownResult.of(stopped, fenced, self.clock.monotonic() - started)

    def nodes_after(self, job: RunningJob, result: TeardownResult) -> NodesSeen:
        """After a failed attempt: what its nodes' GPUs read. This default is one machine, this one, read here
        (NVML, and the compute check in a child process)."""
        reading = read_node(compute_timeout_s=COMPUTE_CHECK_MAX_S)
        return NodesSeen(readings=(("local", socket.gethostname(), reading),), single_machine=True)

    def exclude_node(self, node_id: str, message: str) -> DrainOutcome:
        """Keep the next attempts off ``node_id`` (drain it in Ray, with ``message``)."""
        return DrainOutcome(node_id, False, "this backend cannot drain a node")

    def draining_nodes(self) -> dict[str, int]:
        """The nodes Ray is draining, each with its deadline (ms since the epoch, 0: none). This default is one
        machine, which nobody drains from under the job. Raises when the cluster does not answer."""
        return {}

    def nodes_holding(self, job: RunningJob) -> set[str]:
        """The nodes that hold the attempt's live actors or placement-group bundles. Raises when the cluster does
        not answer."""
        return set()

    def cluster_nodes(self) -> list[NodeInfo]:
        """Every node of the cluster as Ray knows it (empty: one machine). Raises when the cluster does not
        answer."""
        return []

    @abstractmethod
    def stale_processes(self) -> list[ProcessInfo]:
        """End processes of this run left by an earlier supervisor (which died) and say which they were."""

    @abstractmethod
    def close(self) -> list[Event]:
        """Release what ``prepare`` started (the embedded cluster); returns what it did, as events."""
