"""Typed events: one JSON object per line in events.jsonl, and one line each on the console.

Every event carries the wall-clock time (``ts``, Unix seconds) so that latencies can be computed from the log,
and the run id. The writer is the only place that formats or writes events.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar, TextIO

from verl_hooks.contract import EmergencyCheckpoint


@dataclass(frozen=True)
class Event:
    kind: ClassVar[str]
    """The ``event`` field of its line in events.jsonl, declared once, by each event."""

    def describe(self) -> str:
        raise NotImplementedError

    def payload(self) -> dict[str, Any]:
        """The event's fields as its line holds them: a field marked ``flatten`` (a mapping that another type
        derived from itself) is written at the top level, so the event does not copy that type's fields."""
        values: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("flatten"):
                values.update(asdict_value(value))
            else:
                values[f.name] = asdict_value(value)
        return values


def asdict_value(value: Any) -> Any:
    """A field's value as JSON takes it (dataclasses as dicts, mappings as dicts)."""
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, Mapping):
        return {key: asdict_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [asdict_value(item) for item in value]
    return value


@dataclass(frozen=True)
class RunStarted(Event):
    kind: ClassVar[str] = "run_started"
    run_dir: str
    job: str
    ray_mode: str
    max_restarts: int
    supervisor_start: int
    """1 for a new run; more when a supervisor was restarted on this run directory."""
    restarts_used: int = 0
    checkpoints_dir: str | None = None
    pid: int | None = None
    """The supervisor's own process."""

    def describe(self) -> str:
        again = f" (supervisor start {self.supervisor_start}, {self.restarts_used} restarts used)"
        return f"run started: job {self.job}, ray {self.ray_mode}, run dir {self.run_dir}" + (
            again if self.supervisor_start > 1 else ""
        )


@dataclass(frozen=True)
class ClusterStarted(Event):
    kind: ClassVar[str] = "cluster_started"
    address: str
    dashboard: str | None
    startup_s: float
    reason: str

    def describe(self) -> str:
        return f"Ray cluster up at {self.address} in {self.startup_s:.1f} s ({self.reason})"


@dataclass(frozen=True)
class ClusterStopped(Event):
    kind: ClassVar[str] = "cluster_stopped"
    duration_s: float
    killed: int
    survivors: list[str]
    reason: str

    def describe(self) -> str:
        tail = f"; SURVIVORS: {', '.join(self.survivors)}" if self.survivors else ""
        return f"Ray cluster stopped in {self.duration_s:.1f} s ({self.reason}){tail}"


@dataclass(frozen=True)
class StaleProcessesSwept(Event):
    kind: ClassVar[str] = "stale_processes_swept"
    processes: list[str]

    def describe(self) -> str:
        return f"ended {len(self.processes)} processes left from an earlier supervisor of this run"


@dataclass(frozen=True)
class CheckpointSetAside(Event):
    kind: ClassVar[str] = "checkpoint_set_aside"
    step: int
    path: str
    renamed_to: str
    problems: list[str]

    def describe(self) -> str:
        first = self.problems[0] if self.problems else "incomplete"
        return f"checkpoint global_step_{self.step} is incomplete ({first}); set aside as {Path(self.renamed_to).name}"


@dataclass(frozen=True)
class ErrorRecordReceived(Event):
    """The job's error record arrived over the heartbeat channel: the failure is known before its driver exits."""

    kind: ClassVar[str] = "error_record_received"
    attempt: int
    error_type: str
    phase: str | None
    global_step: int | None
    grace_s: float

    def describe(self) -> str:
        where = f" in phase {self.phase!r}" if self.phase else ""
        return (
            f"attempt {self.attempt} reported {self.error_type}{where}; its driver has {self.grace_s:g} s to exit "
            f"before the teardown"
        )


@dataclass(frozen=True)
class CheckpointRotated(Event):
    """A role folder removed because the run's own ``max_*_ckpt_to_keep`` says so (``removed`` False: it could
    not be, see ``problem``)."""

    kind: ClassVar[str] = "checkpoint_rotated"
    step: int
    role: str
    path: str
    limit: int
    removed: bool
    problem: str | None = None

    def describe(self) -> str:
        if self.removed:
            return f"checkpoint global_step_{self.step}/{self.role} removed: the run keeps {self.limit}"
        return f"checkpoint global_step_{self.step}/{self.role} could not be removed: {self.problem}"


@dataclass(frozen=True)
class CheckpointSpaceLow(Event):
    """Before a launch: the checkpoint volume has less free than the newest complete step takes."""

    kind: ClassVar[str] = "checkpoint_space_low"
    checkpoints_dir: str
    mount: str
    free_bytes: int
    newest_step_bytes: int
    message: str

    def describe(self) -> str:
        return f"WARNING: {self.message}"


@dataclass(frozen=True)
class CheckpointsUnjudgeable(Event):
    kind: ClassVar[str] = "checkpoints_unjudgeable"
    folders: list[str]
    problems: list[str]

    def describe(self) -> str:
        return f"checkpoint folder(s) in a layout the supervisor does not know: {', '.join(self.folders)}"


@dataclass(frozen=True)
class ResumeVerified(Event):
    kind: ClassVar[str] = "resume_verified"
    attempt: int
    resume_step: int
    first_step: int

    def describe(self) -> str:
        return (
            f"attempt {self.attempt} resumed from global_step_{self.resume_step}: its first sync carried "
            f"{self.resume_step}, its first step is {self.first_step}"
        )


@dataclass(frozen=True)
class ResumeMismatch(Event):
    kind: ClassVar[str] = "resume_mismatch"
    attempt: int
    resume_step: int
    seen_step: int
    reason: str

    def describe(self) -> str:
        return f"attempt {self.attempt}: {self.reason}"


@dataclass(frozen=True)
class AttemptStarted(Event):
    kind: ClassVar[str] = "attempt_started"
    attempt: int
    pid: int
    argv: list[str]
    resume_step: int | None
    resume_path: str | None
    log_dir: str
    warm: bool = False
    """Its driver was the standby started during the attempt before (``restart.warm_standby``)."""
    emergency_of: int | None = None
    """The attempt whose emergency save wrote the step it resumes from."""

    def describe(self) -> str:
        start = f"resuming from global_step_{self.resume_step}" if self.resume_step is not None else "fresh start"
        if self.emergency_of is not None:
            start += f" (the emergency checkpoint of attempt {self.emergency_of})"
        driver = "standby driver " if self.warm else ""
        return f"attempt {self.attempt} started: {start} ({driver}pid {self.pid}, logs {self.log_dir})"


@dataclass(frozen=True)
class StandbyStarted(Event):
    """The next attempt's driver was started ahead, with its imports; it waits, holding nothing, until needed."""

    kind: ClassVar[str] = "standby_started"
    attempt: int
    pid: int
    module: str

    def describe(self) -> str:
        return f"standby driver for attempt {self.attempt} started (pid {self.pid}, preloading {self.module})"


@dataclass(frozen=True)
class AttemptExited(Event):
    kind: ClassVar[str] = "attempt_exited"
    attempt: int
    exit_code: int | None
    signal: str | None
    duration_s: float
    action: str
    rule: str
    reason: str
    error_type: str | None = None
    phase: str | None = None
    global_step: int | None = None
    record: dict[str, Any] | None = None
    emergency_checkpoint: dict[str, Any] | None = None
    """What the trainer did about the step it was at (``verl_hooks.contract.EmergencyCheckpoint``)."""

    def describe(self) -> str:
        line = f"attempt {self.attempt} ended after {self.duration_s:.1f} s: {self.reason} -> {self.action}"
        saved = EmergencyCheckpoint.from_dict(self.emergency_checkpoint)
        return line if saved is None else f"{line}; emergency checkpoint: {saved.summary()}"


@dataclass(frozen=True)
class SaveOnStopRequested(Event):
    """The supervisor was asked to stop (SIGTERM) and asked the job to save at its next safe point first."""

    kind: ClassVar[str] = "save_on_stop_requested"
    attempt: int
    wait_s: float

    def describe(self) -> str:
        return (
            f"asked attempt {self.attempt} to save at its next weight sync and stop; waiting up to {self.wait_s:g} s "
            "(restart.save_on_stop_s; a second signal stops at once)"
        )


@dataclass(frozen=True)
class SaveOnStop(Event):
    """How the wait for a save before the stop ended."""

    kind: ClassVar[str] = "save_on_stop"
    attempt: int
    waited_s: float
    wait_s: float
    exited: bool
    emergency_checkpoint: dict[str, Any] | None = None
    cut_short_by: str | None = None
    """Why the driver was not waited for any longer (``exited`` false): a second signal, or the wait ran out."""

    def describe(self) -> str:
        saved = EmergencyCheckpoint.from_dict(self.emergency_checkpoint)
        if not self.exited:
            waited = f"{self.cut_short_by} after {self.waited_s:.1f} s"
            return f"attempt {self.attempt} saved nothing before the stop: {waited}"
        what = saved.summary() if saved is not None else "its driver exited without saying what it saved"
        return f"attempt {self.attempt} ended for the stop after {self.waited_s:.1f} s: {what}"


@dataclass(frozen=True)
class StallDetected(Event):
    """The watchdog's finding, every field of ``supervisor.policy.watchdog.Stall`` as it writes them (``stall``
    is written at the top level of the line, not nested: a field added to the finding reaches the event)."""

    kind: ClassVar[str] = "stall_detected"
    attempt: int
    stall: Mapping[str, Any] = field(metadata={"flatten": True})

    def describe(self) -> str:
        return f"attempt {self.attempt} STALLED ({self.stall['stall_kind']}): {self.stall['reason']}"


@dataclass(frozen=True)
class StacksDumped(Event):
    kind: ClassVar[str] = "stacks_dumped"
    attempt: int
    duration_s: float
    dumps: list[dict[str, Any]]

    def describe(self) -> str:
        dumped = sum(1 for d in self.dumps if d["status"] == "dumped")
        took = f"{self.duration_s:.1f} s"
        return f"attempt {self.attempt}: stacks of {dumped} of {len(self.dumps)} processes saved in {took}"


@dataclass(frozen=True)
class Teardown(Event):
    """An attempt torn down and fenced: every field of ``supervisor.backends.base.TeardownResult`` as it writes
    them (``result``, at the top level of the line: a field added to the fence's result reaches the event with no
    other edit), and the newest complete checkpoint once the attempt is gone (what it may still have been writing
    included)."""

    kind: ClassVar[str] = "teardown"
    attempt: int
    reached_step: int | None
    result: Mapping[str, Any] = field(metadata={"flatten": True})

    def describe(self) -> str:
        result = self.result
        parts = [f"{len(result['terminated'])} ended on SIGTERM", f"{len(result['killed'])} SIGKILLed"]
        if result.get("actors_killed"):
            parts.append(f"{len(result['actors_killed'])} stray actors killed")
        if result.get("placement_groups_removed"):
            parts.append(f"{len(result['placement_groups_removed'])} stray placement groups removed")
        if result.get("actors_alive") is not None:
            parts.append(f"{result['actors_alive']} actors alive")
        verdict = "fenced" if result["fenced"] else "FENCE FAILED: " + "; ".join(result["problems"])
        return f"attempt {self.attempt} torn down in {result['duration_s']:.1f} s ({', '.join(parts)}): {verdict}"


@dataclass(frozen=True)
class NodeHealthChecked(Event):
    """After a failed attempt: what the probe read of one node it used (``supervisor/policy/nodes.py``)."""

    kind: ClassVar[str] = "node_health"
    attempt: int
    node_id: str
    hostname: str
    healthy: bool
    problems: list[str]
    checked: str
    """What was read (``2 GPU(s)``), or why nothing was."""

    def describe(self) -> str:
        where = f"node {self.hostname}/{self.node_id[:8]}"
        if self.healthy:
            return f"{where} healthy after attempt {self.attempt} ({self.checked})"
        return f"WARNING: {where} UNHEALTHY after attempt {self.attempt}: {'; '.join(self.problems)}"


@dataclass(frozen=True)
class NodeExcluded(Event):
    """A node the next attempt must not use, drained in Ray (``ray drain-node``'s call) with the reason."""

    kind: ClassVar[str] = "node_excluded"
    attempt: int
    node_id: str
    hostname: str
    reason: str
    drained: bool
    """Ray accepted the drain; False: ``message`` says why not (the next attempt may land there)."""
    message: str = ""

    def describe(self) -> str:
        where = f"node {self.hostname}/{self.node_id[:8]}"
        if self.drained:
            return f"{where} drained before attempt {self.attempt + 1}: {self.reason}"
        return f"WARNING: {where} could not be drained ({self.message}): {self.reason}"


@dataclass(frozen=True)
class PreemptionNotice(Event):
    """Ray is draining nodes that hold the attempt's work (``supervisor/policy/preemption.py``): what the
    supervisor does about it (``response``: ``save``, asking the job to save at its next safe point within
    ``window_s``; ``end_now``, tearing the attempt down at once, ``reason`` says why)."""

    kind: ClassVar[str] = "preemption_notice"
    attempt: int
    nodes: list[dict[str, Any]]
    """Each node drained: ``node_id``, ``hostname``, ``deadline`` (unix seconds; None: no deadline)."""
    deadline_in_s: float | None
    """From the notice to the earliest deadline (None: no drain gave one)."""
    response: str
    window_s: float
    reason: str = ""

    def describe(self) -> str:
        where = ", ".join(f"{n['hostname'] or '?'}/{str(n['node_id'])[:8]}" for n in self.nodes)
        deadline = "no deadline" if self.deadline_in_s is None else f"deadline in {self.deadline_in_s:.0f} s"
        if self.response == "save":
            what = f"asked attempt {self.attempt} to save at its next safe point, waiting up to {self.window_s:.0f} s"
        else:
            what = f"ending attempt {self.attempt} at once: {self.reason}"
        return f"PREEMPTION notice: Ray is draining {where} ({deadline}); {what}"


@dataclass(frozen=True)
class DrainIgnored(Event):
    """A node Ray is draining that is not a notice for this run (said once per node)."""

    kind: ClassVar[str] = "drain_ignored"
    attempt: int
    node_id: str
    hostname: str
    deadline: float | None
    reason: str

    def describe(self) -> str:
        return f"node {self.hostname or '?'}/{self.node_id[:8]} is draining in Ray; ignored: {self.reason}"


@dataclass(frozen=True)
class PreemptionSave(Event):
    """How the wait for the job's save after a preemption notice ended."""

    kind: ClassVar[str] = "preemption_save"
    attempt: int
    waited_s: float
    window_s: float
    exited: bool
    emergency_checkpoint: dict[str, Any] | None = None
    cut_short_by: str | None = None
    """Why the driver was not waited for any longer (``exited`` false)."""

    def describe(self) -> str:
        saved = EmergencyCheckpoint.from_dict(self.emergency_checkpoint)
        if not self.exited:
            return f"attempt {self.attempt} saved nothing before its node went: {self.cut_short_by}"
        what = saved.summary() if saved is not None else "its driver exited without saying what it saved"
        return f"attempt {self.attempt} ended for the preemption after {self.waited_s:.1f} s: {what}"


@dataclass(frozen=True)
class CapacityShort(Event):
    """After a preemption, the nodes left cannot hold what the job reserved: the supervisor waits for more."""

    kind: ClassVar[str] = "capacity_short"
    attempt: int
    demand: dict[str, float]
    missing: dict[str, float]
    wait_s: float

    def describe(self) -> str:
        short = ", ".join(f"{name} {lack:g}" for name, lack in sorted(self.missing.items()))
        return (
            f"the nodes left after the preemption cannot hold the job ({short} short): waiting up to "
            f"{self.wait_s:g} s for a node to join (preemption.replacement_wait_s)"
        )


@dataclass(frozen=True)
class CapacityWait(Event):
    """After a preemption, the wait for the nodes left to hold what the job reserved."""

    kind: ClassVar[str] = "capacity_wait"
    attempt: int
    demand: dict[str, float]
    waited_s: float
    met: bool
    missing: dict[str, float]
    """What was still short at the end (empty when met)."""

    def describe(self) -> str:
        if self.met:
            return f"the cluster holds the job again after {self.waited_s:.1f} s: relaunching"
        short = ", ".join(f"{name} {lack:g}" for name, lack in sorted(self.missing.items()))
        return f"no node made up for the preempted ones in {self.waited_s:.1f} s ({short} short)"


@dataclass(frozen=True)
class Backoff(Event):
    kind: ClassVar[str] = "backoff"
    next_attempt: int
    delay_s: float
    restarts_used: int
    max_restarts: int
    counted: bool = True
    """False after a preemption: the relaunch is not one of ``restart.max_restarts``."""

    def describe(self) -> str:
        if not self.counted:
            return (
                f"relaunch after a preemption (not counted against restart.max_restarts): attempt "
                f"{self.next_attempt} in {self.delay_s:.1f} s"
            )
        return (
            f"restart {self.restarts_used + 1} of {self.max_restarts}: attempt {self.next_attempt} "
            f"in {self.delay_s:.1f} s"
        )


@dataclass(frozen=True)
class SignalReceived(Event):
    kind: ClassVar[str] = "signal_received"
    signal: str

    def describe(self) -> str:
        return f"received {self.signal}: tearing the job down"


@dataclass(frozen=True)
class RunFinished(Event):
    kind: ClassVar[str] = "run_finished"
    exit_code: int
    outcome: str
    reason: str
    attempts: int

    def describe(self) -> str:
        attempts = f"{self.attempts} attempt{'' if self.attempts == 1 else 's'}"
        return f"run finished: {self.outcome} (exit {self.exit_code}) after {attempts}: {self.reason}"


@dataclass(frozen=True)
class TrackerRun(Event):
    """The job reported an experiment tracker's run id: every later attempt writes into that run."""

    kind: ClassVar[str] = "tracker_run"
    attempt: int
    backend: str
    run_id: str

    def describe(self) -> str:
        return f"attempt {self.attempt} opened {self.backend} run {self.run_id}: later attempts continue it"


@dataclass(frozen=True)
class MetricsServing(Event):
    kind: ClassVar[str] = "metrics_serving"
    url: str

    def describe(self) -> str:
        return f"metrics at {self.url}"


@dataclass(frozen=True)
class Notification(Event):
    """What became of one webhook alert (the webhook's URL and headers are never written)."""

    kind: ClassVar[str] = "notification"
    about: str
    delivered: bool
    status: int | None = None
    problem: str | None = None
    duration_s: float | None = None

    def describe(self) -> str:
        if self.delivered:
            return f"webhook alert ({self.about}) delivered in {self.duration_s or 0:.2f} s"
        return f"webhook alert ({self.about}) NOT delivered: {self.problem}"


@dataclass
class EventLog:
    """Appends events to events.jsonl (flushed per event), prints them to the console, tells the listeners."""

    path: Path
    run_id: str
    console: TextIO | None = field(default_factory=lambda: sys.stderr)
    now: Callable[[], float] = time.time
    listeners: list[Callable[[dict[str, Any]], None]] = field(default_factory=list)
    """Called with each event as written (the webhook notifier); they must return at once and not raise."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def emit(self, event: Event) -> dict[str, Any]:
        now = self.now()
        entry = {"ts": now, "event": event.kind, "run_id": self.run_id, **event.payload()}
        line = json.dumps(entry, sort_keys=True, default=str)
        with self._lock:
            with open(os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "a") as f:
                f.write(line + "\n")
                f.flush()
                os.fsync(f.fileno())
            if self.console is not None:
                stamp = time.strftime("%H:%M:%S", time.localtime(now))
                print(f"[supervisor {stamp}] {event.describe()}", file=self.console, flush=True)
        for listener in self.listeners:
            try:
                listener(entry)
            except Exception as exc:  # noqa: BLE001 - an observer's bug must not stop the run
                if self.console is not None:
                    print(f"[supervisor] event listener failed: {exc!r}", file=self.console, flush=True)
        return entry


@dataclass(frozen=True)
class EventsRead:
    events: list[dict[str, Any]]
    damaged: int
    """Lines that are not a whole event: the last one cut short by a SIGKILL or a power loss during an append,
    or a line garbled by hand. Skipped."""


def read_events_counted(path: Path) -> EventsRead:
    """Every whole event of a run, in order, and how many lines were not one."""
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return EventsRead([], 0)
    events, damaged = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except ValueError:
            damaged += 1
            continue
        if isinstance(event, dict) and isinstance(event.get("event"), str) and isinstance(event.get("ts"), int | float):
            events.append(event)
        else:
            damaged += 1
    return EventsRead(events, damaged)


def read_events(path: Path) -> list[dict[str, Any]]:
    """Every whole event of a run, in order (for status, reports, tests and the benchmark)."""
    return read_events_counted(path).events
