"""The interface the supervisor's loop drives; it does not know which backend is behind it.

Backends carry out; they decide nothing. What they did comes back as values: a ``TeardownResult`` from
``teardown``, events (``ClusterStarted``, ``ClusterStopped``) from ``prepare`` and ``close``, which the loop
writes to the run's log.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from supervisor.mechanisms.processes import ProcessInfo
from supervisor.mechanisms.stacks import StackDump
from supervisor.policy.outcomes import ExitStatus
from supervisor.run.events import Event


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


@dataclass
class RunningJob:
    """One attempt's driver, as the backend knows it."""

    attempt: int
    started_at: float
    pid: int | None = None
    ray_job_id: str | None = None
    warm: bool = False
    """Its driver was a standby started ahead (``JobBackend.start_standby``)."""
    resources_before: dict[str, float] | None = None
    """The cluster's GPUs and custom resources available when the attempt was launched (None: unknown); the
    fence waits for them to be available again."""


@dataclass(frozen=True)
class TeardownResult:
    """What tearing an attempt down did, and whether the fence holds."""

    duration_s: float
    terminated: tuple[ProcessInfo, ...] = ()
    killed: tuple[ProcessInfo, ...] = ()
    survivors: tuple[ProcessInfo, ...] = ()
    actors_alive: int | None = None
    actors_killed: tuple[str, ...] = ()
    placement_groups_removed: tuple[str, ...] = ()
    placement_groups_alive: int | None = None
    resources_held: dict[str, float] = field(default_factory=dict)
    gpu_memory: str | None = None
    nodes: str | None = None
    """What the sweep of the attempt's nodes found (cluster modes; None: one machine, not swept)."""
    problems: tuple[str, ...] = field(default_factory=tuple)

    @property
    def fenced(self) -> bool:
        """Nothing of the attempt is left: the next attempt may start."""
        left = self.survivors or self.actors_alive or self.placement_groups_alive or self.resources_held
        return not left and not self.problems


class ClusterStartFailed(RuntimeError):
    """The backend's Ray cluster could not be started or reached."""


class JobBackend(ABC):
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
    def teardown(self, job: RunningJob) -> TeardownResult:
        """Stop everything of the attempt, then verify that nothing of it is left (the fence)."""

    @abstractmethod
    def stale_processes(self) -> list[ProcessInfo]:
        """End processes of this run left by an earlier supervisor (which died) and say which they were."""

    @abstractmethod
    def close(self) -> list[Event]:
        """Release what ``prepare`` started (the embedded cluster); returns what it did, as events."""
