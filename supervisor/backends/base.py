"""The interface the supervisor's loop drives; it does not know which backend is behind it."""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from supervisor.codes import ExitStatus
from supervisor.processes import ProcessInfo
from supervisor.stacks import StackDump


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


@dataclass(frozen=True)
class TeardownReport:
    duration_s: float
    terminated: tuple[ProcessInfo, ...] = ()
    killed: tuple[ProcessInfo, ...] = ()
    survivors: tuple[ProcessInfo, ...] = ()
    actors_alive: int | None = None
    actors_killed: tuple[str, ...] = ()
    problems: tuple[str, ...] = field(default_factory=tuple)

    @property
    def fenced(self) -> bool:
        """Nothing of the attempt is left: the next attempt may start."""
        return not self.survivors and not self.actors_alive and not self.problems


class ClusterStartFailed(RuntimeError):
    """The backend's Ray cluster could not be started or reached."""


class JobBackend(ABC):
    @property
    def python(self) -> str:
        """The interpreter ``{python}`` in job.argv means where this backend runs the driver."""
        return sys.executable

    @abstractmethod
    def prepare(self) -> None:
        """Make the cluster ready for the next attempt (start it, or restart it when unhealthy)."""

    @abstractmethod
    def launch(self, spec: LaunchSpec) -> RunningJob:
        """Start the attempt's driver; returns at once."""

    @abstractmethod
    def wait(self, job: RunningJob, timeout_s: float | None) -> ExitStatus | None:
        """Block until the driver ends (returning how) or ``timeout_s`` passes (returning None)."""

    @abstractmethod
    def dump_stacks(self, job: RunningJob, stacks_dir: Path, timeout_s: float) -> list[StackDump]:
        """Ask the attempt's processes for their Python stacks (bounded by ``timeout_s``)."""

    @abstractmethod
    def teardown(self, job: RunningJob, grace_s: float, fence_timeout_s: float) -> TeardownReport:
        """Stop everything of the attempt, then verify that nothing of it is left (the fence)."""

    @abstractmethod
    def stale_processes(self) -> list[ProcessInfo]:
        """End processes of this run left by an earlier supervisor (which died) and say which they were."""

    @abstractmethod
    def close(self) -> None:
        """Release what ``prepare`` started (the embedded cluster)."""
