"""A fake backend, clock and heartbeat channel, for driving the supervisor's real loop in milliseconds.

The fakes behave like the real parts as the loop sees them: ``wait`` returns None when its timeout passes and the
driver's exit status when it ends; the fake clock moves only when the loop waits or sleeps; heartbeats arrive
with the clock's monotonic time; an attempt writes its error record and its checkpoints (real, complete verl
folders, the supervisor's checkpoint code reads them) as a real job does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from supervisor.backends.base import (
    ClusterStartFailed,
    JobBackend,
    LaunchSpec,
    NodesSeen,
    RunningJob,
    Stopped,
    TeardownResult,
)
from supervisor.backends.fence import AttemptView
from supervisor.clock import Clock
from supervisor.config import TeardownConfig
from supervisor.job.beat import Heartbeat
from supervisor.mechanisms.gpu_memory import GpuMemoryCheck
from supervisor.mechanisms.processes import ProcessInfo
from supervisor.mechanisms.ray_drain import DrainOutcome
from supervisor.mechanisms.ray_state import NodeInfo
from supervisor.mechanisms.stacks import StackDump
from supervisor.outcomes import ExitStatus
from supervisor.run.events import ClusterStarted, Event
from tests.supervisor.checkpoint_files import write_step
from verl_hooks.contract import (
    EmergencyCheckpoint,
    EmergencyStatus,
    EmergencyTrigger,
    ErrorRecord,
    HeartbeatKind,
    RecordSource,
    write_record,
)


class FakeClock:
    """Starts at a fixed time; moves only when the loop waits (through the backend) or sleeps."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.wall = start
        self.mono = 1000.0
        self.sleeps: list[float] = []
        self.signal_on_sleep: int | None = None
        """A signal sent to this process when the loop next sleeps (a Ctrl-C during the backoff)."""

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if self.signal_on_sleep is not None:
            signum, self.signal_on_sleep = self.signal_on_sleep, None
            os.kill(os.getpid(), signum)
        self.advance(seconds)

    def clock(self) -> Clock:
        return Clock(now=lambda: self.wall, monotonic=lambda: self.mono, sleep=self.sleep)


@dataclass
class FakeHeartbeats:
    url: str = "http://127.0.0.1:9/heartbeat"
    token: str = "fake-token"
    queue: list[Heartbeat] = field(default_factory=list)

    def take_received(self) -> list[Heartbeat]:
        beats, self.queue = self.queue, []
        return beats

    def fileno(self) -> int:
        raise AssertionError("the fake backend does not wait on file descriptors")

    saves_requested: list[int] = field(default_factory=list)
    """The attempts asked to save and stop, in order."""
    past_save_s: float | None = None
    """What every answer to the job's beats says of the run's longest earlier save (the real server's field)."""

    def request_save(self, attempt: int) -> None:
        self.saves_requested.append(attempt)

    def save_requested(self, attempt: int) -> bool:
        return attempt in self.saves_requested


@dataclass
class Attempt:
    """What one attempt of the fake job does."""

    exit: ExitStatus | None = field(default_factory=lambda: ExitStatus(code=0))
    """How the driver ends by itself; None: it runs until it is torn down."""
    runs_s: float = 10.0
    record: ErrorRecord | None = None
    """Written to the attempt's error file when it ends (as the launcher does)."""
    saves: tuple[int, ...] = ()
    """Complete checkpoint steps the attempt has written by the time it ends."""
    beats: tuple[tuple[float, HeartbeatKind, dict], ...] = ()
    """(seconds after launch, kind, fields) of the heartbeats it sends."""
    output: str = ""
    fence_problems: tuple[str, ...] = ()
    """What the fence finds left of it."""
    nodes: NodesSeen = field(default_factory=NodesSeen)
    """What its nodes read after it failed (by default: nothing, as on a machine the fake knows nothing of)."""
    drains: tuple[tuple[float, str, float | None], ...] = ()
    """(seconds after launch, node id, deadline in seconds after that, None: none) of each node Ray starts
    draining while it runs (a drain stays for the rest of the run, as in Ray until the node is gone)."""
    holds: frozenset[str] = frozenset()
    """The nodes that hold its actors or placement-group bundles."""
    on_save_request: SaveAnswer | None = None
    """How it answers a request to save and stop (None: it does not hear it, as a job without the hook)."""


@dataclass(frozen=True)
class SaveAnswer:
    """A job asked to save at its next safe point: it ends ``takes_s`` after the request, with exit 143 and the
    record the launcher writes for ``StopRequested``, having saved ``step`` (None: saved nothing)."""

    takes_s: float
    step: int | None

    def record(self) -> ErrorRecord:
        saved = EmergencyCheckpoint(
            EmergencyStatus.SAVED if self.step is not None else EmergencyStatus.SKIPPED,
            EmergencyTrigger.STOP_REQUEST,
            self.step,
            elapsed_s=self.takes_s / 2,
        )
        return ErrorRecord(
            error_type="verl_hooks.errors.StopRequested",
            message="the supervisor asked the job to stop",
            source=RecordSource.LAUNCHER,
            exit_code=143,
            global_step=self.step,
            emergency_checkpoint=saved.to_dict(),
        )


class FakeBackend(JobBackend):
    def __init__(
        self,
        attempts: list[Attempt],
        clock: FakeClock,
        heartbeats: FakeHeartbeats,
        checkpoint_dir: Path,
        *,
        signal_at: dict[str, int] | None = None,
        cluster_fails: bool = False,
        stale: list[ProcessInfo] | None = None,
    ) -> None:
        self.attempts = attempts
        self.fake_clock = clock
        self.clock = clock.clock()
        self.teardown_config = TeardownConfig()
        self.heartbeats = heartbeats
        self.checkpoint_dir = checkpoint_dir
        self.signal_at = dict(signal_at or {})
        """Step name (``prepare``, ``launch``, ``wait``, ``teardown``, ``sleep``) -> a signal sent to this process
        when the loop reaches it: a user's Ctrl-C at that moment."""
        self.cluster_fails = cluster_fails
        self.stale = stale or []
        self.calls: list[str] = []
        self.drained: list[tuple[str, str]] = []
        """(node id, message) of each drain asked for."""
        self.undrainable: set[str] = set()
        self.launched: list[LaunchSpec] = []
        self.past_save_at_launch: list[float | None] = []
        """What the heartbeat answers said of the run's longest earlier save when each attempt was launched."""
        self.standbys: list[tuple[float, LaunchSpec]] = []
        """(when, spec) of each standby driver the loop asked for; the next launch of a spec that fits uses it."""
        self._started_at: dict[int, float] = {}
        self._sent: dict[int, int] = {}
        self._finished: set[int] = set()
        self._specs: dict[int, LaunchSpec] = {}
        self._scripts: dict[int, Attempt] = {}
        """The scripts in launch order: attempt numbers continue a run's history."""
        self.draining: dict[str, int] = {}
        """What Ray drains (node id to deadline in ms), as the attempts' ``drains`` add to it."""
        self.drains_unanswered = False
        """``draining_nodes`` raises, as a GCS that does not answer."""
        self.cluster: list[NodeInfo] = []
        """What ``cluster_nodes`` says (the loop's wait for capacity reads it)."""
        self.joins: list[tuple[float, NodeInfo]] = []
        """(monotonic time, node) of nodes that join the cluster then."""
        self._save_asked_at: dict[int, float] = {}

    def _step(self, name: str) -> None:
        self.calls.append(name)
        signum = self.signal_at.pop(name, None)
        if signum is not None:
            os.kill(os.getpid(), signum)

    def prepare(self) -> list[Event]:
        self._step("prepare")
        if self.cluster_fails:
            raise ClusterStartFailed("ports taken")
        if self.calls.count("prepare") == 1:
            return [ClusterStarted("127.0.0.1:1", None, 0.5, "first attempt")]
        return []

    def start_standby(self, spec: LaunchSpec) -> list[Event]:
        self._step("start_standby")
        self.standbys.append((self.fake_clock.mono, spec))
        return []

    def launch(self, spec: LaunchSpec) -> RunningJob:
        self._step("launch")
        assert len(self.launched) < len(self.attempts), f"the loop launched attempt {spec.attempt}, unscripted"
        self.launched.append(spec)
        self.past_save_at_launch.append(self.heartbeats.past_save_s)
        self._specs[spec.attempt] = spec
        self._scripts[spec.attempt] = self.attempts[len(self.launched) - 1]
        self._started_at[spec.attempt] = self.fake_clock.mono
        (spec.log_dir / "stdout.log").write_text(self._script(spec.attempt).output)
        return RunningJob(attempt=spec.attempt, started_at=self.fake_clock.wall, pid=10_000 + spec.attempt)

    def _script(self, attempt: int) -> Attempt:
        return self._scripts[attempt]

    def wait(self, job: RunningJob, timeout_s: float | None, wake=None) -> ExitStatus | None:
        self._step("wait")
        script = self._script(job.attempt)
        elapsed = self.fake_clock.mono - self._started_at[job.attempt]
        ends_in = script.runs_s - elapsed if script.exit is not None else None
        answer, saving = script.on_save_request, False
        if answer is not None and self.heartbeats.save_requested(job.attempt):
            asked_at = self._save_asked_at.setdefault(job.attempt, self.fake_clock.mono)
            saved_in = asked_at + answer.takes_s - self.fake_clock.mono
            if ends_in is None or saved_in < ends_in:
                ends_in, saving = saved_in, True
        if timeout_s is None:
            assert ends_in is not None, "the loop would wait forever for a job that never ends"
            step = ends_in
        else:
            step = timeout_s if ends_in is None else min(timeout_s, ends_in)
        self.fake_clock.advance(max(0.0, step))
        self._deliver_beats(job.attempt, script)
        if ends_in is not None and step >= ends_in:
            if saving:  # the save it was asked for is done: it ends as the launcher ends it on StopRequested
                assert answer is not None
                saved = (*script.saves, *([answer.step] if answer.step is not None else []))
                script = replace(script, exit=ExitStatus(code=143), record=answer.record(), saves=saved)
                self._scripts[job.attempt] = script
            self._finish(job, script)
            return script.exit
        return None

    def _deliver_beats(self, attempt: int, script: Attempt) -> None:
        elapsed = self.fake_clock.mono - self._started_at[attempt]
        sent = self._sent.get(attempt, 0)
        for at_s, kind, fields in script.beats[sent:]:
            if at_s > elapsed:
                break
            received = self._started_at[attempt] + at_s
            payload = {"kind": kind.value, "attempt": attempt, **fields}
            self.heartbeats.queue.append(Heartbeat(kind, attempt, received, payload))
            sent += 1
        self._sent[attempt] = sent

    def _finish(self, job: RunningJob, script: Attempt) -> None:
        """What the job leaves when it is over: its checkpoints and its error record."""
        if job.attempt in self._finished:
            return
        self._finished.add(job.attempt)
        for step in script.saves:
            if not (self.checkpoint_dir / f"global_step_{step}").exists():
                write_step(self.checkpoint_dir, step, world_size=1, payload=4)
        if script.record is not None:
            write_record(self._specs[job.attempt].error_file, script.record)

    def dump_stacks(self, job: RunningJob, stacks_dir: Path, timeout_s: float) -> list[StackDump]:
        self._step("dump_stacks")
        return [StackDump(job.pid or 0, "python", "dumped", str(stacks_dir / "fake.txt"))]

    def stop(self, job: RunningJob) -> Stopped:
        self._step("teardown")
        self._finish(job, self._script(job.attempt))
        return Stopped(terminated=(ProcessInfo(job.pid or 0, "python", "the driver"),))

    def attempt_view(self, job: RunningJob, stopped: Stopped) -> AttemptView:
        """Nothing is left for the real fence to find; what the script says it finds comes as its problems."""
        return AttemptView(
            leftovers=list,
            gpu_check=lambda pids: GpuMemoryCheck(skipped="no GPU in a fake"),
            problems=tuple(self._script(job.attempt).fence_problems),
        )

    def nodes_after(self, job: RunningJob, result: TeardownResult) -> NodesSeen:
        self._step("nodes_after")
        return self._script(job.attempt).nodes

    def exclude_node(self, node_id: str, message: str) -> DrainOutcome:
        self.drained.append((node_id, message))
        return DrainOutcome(node_id, node_id not in self.undrainable, "refused" if node_id in self.undrainable else "")

    def draining_nodes(self) -> dict[str, int]:
        if self.drains_unanswered:
            raise OSError("the GCS did not answer")
        for attempt, script in self._scripts.items():
            elapsed = self.fake_clock.mono - self._started_at[attempt]
            for at_s, node_id, deadline_in_s in script.drains:
                if at_s <= elapsed and node_id not in self.draining:
                    start = self.fake_clock.wall - (elapsed - at_s)
                    self.draining[node_id] = 0 if deadline_in_s is None else int((start + deadline_in_s) * 1000)
        return dict(self.draining)

    def nodes_holding(self, job: RunningJob) -> set[str]:
        return set(self._script(job.attempt).holds)

    def cluster_nodes(self) -> list[NodeInfo]:
        joined = [node for at, node in self.joins if at <= self.fake_clock.mono]
        return [*self.cluster, *joined]

    def stale_processes(self) -> list[ProcessInfo]:
        self._step("stale_processes")
        return list(self.stale)

    def close(self) -> list[Event]:
        self._step("close")
        return []
