"""The interface the supervisor's loop drives; it does not know which backend is behind it.

Backends carry out; they decide nothing. What they did comes back as values: a ``TeardownResult`` from
``teardown``, events (``ClusterStarted``, ``ClusterStopped``) from ``prepare`` and ``close``, which the loop
writes to the run's log.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol

from supervisor.backends.fence import AttemptView, FenceResult, fence, fence_rules
from supervisor.clock import Clock
from supervisor.config import TeardownConfig
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
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = [f"{v.name}[{v.pid}]" if isinstance(v, ProcessInfo) else v for v in value]
            values[f.name] = value
        return values

    @property
    def fenced(self) -> bool:
        """Nothing of the attempt is left: the next attempt may start."""
        left = self.survivors or self.actors_alive or self.placement_groups_alive or self.resources_held
        return not left and not self.problems


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

    def drain_output(self, job: RunningJob, timeout_s: float) -> None:  # noqa: B027 - not every backend copies output
        """Let the attempt's output reach its log files once its processes are gone."""

    def teardown(self, job: RunningJob) -> TeardownResult:
        """Stop everything of the attempt, then verify that nothing of it is left (the fence, the same for
        every backend)."""
        started = self.clock.monotonic()
        stopped = self.stop(job)
        view = self.attempt_view(job, stopped)
        fenced = fence(view, fence_rules(self.teardown_config, view), self.clock)
        self.drain_output(job, self.teardown_config.output_drain_s)
        return TeardownResult.of(stopped, fenced, self.clock.monotonic() - started)

    @abstractmethod
    def stale_processes(self) -> list[ProcessInfo]:
        """End processes of this run left by an earlier supervisor (which died) and say which they were."""

    @abstractmethod
    def close(self) -> list[Event]:
        """Release what ``prepare`` started (the embedded cluster); returns what it did, as events."""
