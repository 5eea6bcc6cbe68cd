"""Where a run stands, read from its run directory alone: ``verl-supervisor status``, the report and the metrics.

Everything comes from the files the supervisor keeps (``state.json``, ``events.jsonl``, the attempts' heartbeat
files) and from the checkpoint folder, read without changing anything: it works while the run is live, after it
ended, and from another process than the supervisor.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from supervisor.checkpoints import choose_resume_checkpoint, facts_from_overrides, read_tracker, scan_checkpoints
from supervisor.mechanisms.volume import folder_bytes
from supervisor.run.beats import BeatsReader
from supervisor.run.events import read_events_counted
from supervisor.run.history import AttemptRecord, RunHistory, RunState
from supervisor.run.rundir import RunDirectory
from supervisor.run.table import attempts_table
from verl_hooks.contract import EmergencyCheckpoint


class NotARunDirectory(Exception):
    """The folder holds no run of the supervisor (no state.json)."""


@dataclass(frozen=True)
class InFlight:
    attempt: int
    since: float
    step: int | None
    """The newest step the attempt's weight syncs carried."""
    heartbeat_ages_s: dict[str, float]
    """Seconds since each of its processes (``host:pid``) last sent a beat."""


@dataclass(frozen=True)
class RunStatus:
    run_id: str
    run_dir: str
    state: str
    outcome: str | None
    exit_code: int | None
    supervisor_pid: int | None
    supervisor_alive: bool
    attempts: list[dict[str, Any]]
    in_flight: InFlight | None
    last_error: str | None
    resume_step: int | None
    """The step the next attempt would resume from, judged now (None: a fresh start)."""
    newest_checkpoint_step: int | None
    restarts_used: int
    max_restarts: int | None
    restarts_left: int | None
    lost_s: float
    """Time lost to failures: see :func:`lost_seconds`."""
    seconds_since_progress: float | None
    checkpoints_dir: str | None
    restarts_by_rule: dict[str, int] = field(default_factory=dict)
    unhealthy_nodes: dict[str, str] = field(default_factory=dict)
    """``host/node`` to its problems, for each node whose last health check after a failure found it unhealthy."""
    excluded_nodes: dict[str, str] = field(default_factory=dict)
    """``host/node`` to why, for each node drained in Ray so that no attempt lands there again."""
    preemptions: list[str] = field(default_factory=list)
    """One line per preemption notice: the attempt, the nodes Ray drained, and what the job saved."""
    table: str = ""
    damage: list[str] = field(default_factory=list)
    """What of the run's files could not be read, and what was done instead (skipped lines, a rebuilt history)."""
    written_bytes: dict[str, int] = field(default_factory=dict)
    """What the supervisor has written in the run directory, by part (the checkpoints, the job's, not counted)."""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("table")
        return data


def error_line(record: dict[str, Any] | None, fallback: str | None = None) -> str | None:
    """An error record in one line: type, phase, step, how its cleanup went."""
    if not record:
        return fallback
    parts = [str(record.get("error_type") or "error").rsplit(".", 1)[-1]]
    if record.get("phase"):
        parts.append(f"in {record['phase']}")
    if record.get("global_step") is not None:
        parts.append(f"at step {record['global_step']}")
    if record.get("hang"):
        parts.append("(hang)")
    cleanup = record.get("cleanup") or []
    if cleanup:
        failed = [f"{c.get('step')} {c.get('status')}" for c in cleanup if c.get("status") != "ok"]
        parts.append(f"(cleanup: {', '.join(failed)})" if failed else f"(cleanup: {len(cleanup)} steps ok)")
    emergency = EmergencyCheckpoint.from_dict(record.get("emergency_checkpoint"))
    if emergency is not None:
        parts.append(f"(emergency checkpoint: {emergency.summary()})")
    return " ".join(parts)


def lost_seconds(attempts: list[AttemptRecord], beats: BeatsReader, now: float) -> float:
    """Wall time the failures cost: for each failed attempt, from the moment the work that the next attempt kept
    was done (its first beat carrying the resumed step) to the moment the next attempt was back there (its first
    sync of that step or a later one). That covers the work redone, the detection, teardown, backoff and the start-up.

    Without heartbeats (no guard in the job) the failed attempt counts from its start and the next attempt from
    its launch; a run that gave up counts until its last attempt ended. Overlapping spans count once.
    """
    spans: list[tuple[float, float]] = []
    for index, failed in enumerate(attempts):
        if not failed.failed:
            continue
        nxt = attempts[index + 1] if index + 1 < len(attempts) else None
        kept = nxt.resumed_from_step if nxt is not None else failed.reached_step
        mine = beats.of(failed.number)
        begin = (mine.reached_at(kept) if kept is not None else None) or failed.started_at
        if nxt is None:
            end = failed.ended_at or now
        else:
            back = beats.of(nxt.number).back_at(nxt.resumed_from_step)
            if back is not None:
                end = back
            elif not nxt.ended and beats.of(nxt.number).last_beat_at is not None:
                end = now  # still on its way back
            else:
                end = nxt.started_at
        if end > begin:
            spans.append((begin, end))
    total, reach = 0.0, None
    for begin, end in sorted(spans):
        if reach is not None and begin < reach:
            begin = reach
        if end > begin:
            total += end - begin
            reach = end
    return total


def _supervisor_pid(run_dir: Path) -> int | None:
    try:
        return int((run_dir / "supervisor.lock").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int | None, history: RunHistory) -> bool:
    """Whether the supervisor that wrote the lock still runs (the lock is the kernel's; this only reads it)."""
    if pid is None or history.finished:
        return False
    try:
        cmdline = " ".join(psutil.Process(pid).cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return "supervisor" in cmdline


def _resume_step(checkpoints_dir: str | None, job_argv: list[str]) -> int | None:
    """The loop's own judgement, over what the job's arguments say its steps hold."""
    if not checkpoints_dir:
        return None
    root = Path(checkpoints_dir)
    try:
        infos = scan_checkpoints(root, facts=facts_from_overrides(job_argv))
        choice = choose_resume_checkpoint(infos, read_tracker(root))
    except OSError:
        return None
    return None if choice.checkpoint is None else choice.checkpoint.step


class StatusReader:
    """Reads a run's status again and again (the metrics' scrapes) without re-parsing the heartbeats."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.beats = BeatsReader(self.run_dir)

    def read(self, now: float | None = None) -> RunStatus:
        now = time.time() if now is None else now
        files = RunDirectory(self.run_dir)
        history = files.load_history()  # DamagedRunFile when neither state.json nor the events can be read
        if history is None:
            raise NotARunDirectory(f"{self.run_dir} holds no run of the supervisor (no state.json)")
        read = read_events_counted(files.events_path)
        events = read.events
        damage = [] if files.state_problem is None else [files.state_problem]
        if read.damaged:
            damage.append(
                f"events.jsonl: {read.damaged} line(s) that are not a whole event skipped (an append cut short by a "
                "crash, or a garbled line)"
            )
        started = [e for e in events if e["event"] == "run_started"]
        exited = [e for e in events if e["event"] == "attempt_exited"]
        max_restarts = started[-1].get("max_restarts") if started else None
        checkpoints_dir = (started[-1].get("checkpoints_dir") if started else None) or str(self.run_dir / "checkpoints")
        pid = _supervisor_pid(self.run_dir)

        in_flight = None
        last = history.attempts[-1] if history.attempts else None
        since_progress = None
        if last is not None and not last.ended and history.state is RunState.ATTEMPT_RUNNING:
            beats = self.beats.of(last.number)
            ages = {source: max(0.0, now - at) for source, at in sorted(beats.last_beat_by_source.items())}
            in_flight = InFlight(last.number, last.started_at, beats.max_step, ages)
            since_progress = max(0.0, now - (beats.last_progress_at or last.started_at))

        failed = [a for a in history.attempts if a.failed]
        last_error = None
        if failed:
            event = next((e for e in reversed(exited) if e.get("attempt") == failed[-1].number), None)
            last_error = error_line(event.get("record") if event else None, failed[-1].reason)

        by_rule: dict[str, int] = {}
        for index, attempt in enumerate(history.attempts):
            # A restart is a failed attempt followed by another one, or the last one while the run goes on.
            followed = index + 1 < len(history.attempts) or not history.finished
            if attempt.failed and followed and attempt.rule and not attempt.interrupted:
                by_rule[attempt.rule] = by_rule.get(attempt.rule, 0) + 1
        return RunStatus(
            run_id=history.run_id,
            run_dir=str(self.run_dir),
            state=history.state.value,
            outcome=history.outcome,
            exit_code=history.exit_code,
            supervisor_pid=pid,
            supervisor_alive=_alive(pid, history),
            attempts=[{**asdict(a), "action": a.action.value if a.action else None} for a in history.attempts],
            in_flight=in_flight,
            last_error=last_error,
            resume_step=_resume_step(checkpoints_dir, last.argv if last is not None else []),
            newest_checkpoint_step=history.newest_checkpoint_step,
            restarts_used=history.restarts_used,
            max_restarts=max_restarts,
            restarts_left=None if max_restarts is None else max(0, max_restarts - history.restarts_used),
            lost_s=lost_seconds(history.attempts, self.beats, now),
            seconds_since_progress=since_progress,
            checkpoints_dir=checkpoints_dir,
            restarts_by_rule=by_rule,
            unhealthy_nodes=_unhealthy_nodes(events),
            excluded_nodes={
                _node_name(e): e.get("reason") for e in events if e["event"] == "node_excluded" and e.get("drained")
            },
            preemptions=preemption_lines(events),
            table=attempts_table(history),
            damage=damage,
            written_bytes=written_bytes(self.run_dir),
        )


def written_bytes(run_dir: Path) -> dict[str, int]:
    """The supervisor's own files in a run directory: attempt logs (bounded by ``job.log_limit_mb`` each), Ray's
    logs (rotated), and the run's records."""
    records = sum(p.stat().st_size for p in run_dir.glob("*") if p.is_file())
    return {
        "attempt logs": folder_bytes(run_dir / "attempts") if (run_dir / "attempts").is_dir() else 0,
        "Ray logs": folder_bytes(run_dir / "ray") if (run_dir / "ray").is_dir() else 0,
        "records": records,
    }


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.0f} kB"


def _node_name(event: dict[str, Any]) -> str:
    return f"{event.get('hostname') or '?'}/{str(event.get('node_id'))[:8]}"


def preemption_lines(events: list[dict[str, Any]]) -> list[str]:
    """Each preemption notice in one line, with how the save it asked for ended (or that it is under way)."""
    saves = {e.get("attempt"): e for e in events if e["event"] == "preemption_save"}
    lines = []
    for notice in (e for e in events if e["event"] == "preemption_notice"):
        nodes = ", ".join(_node_name(n) for n in notice.get("nodes") or [])
        deadline = notice.get("deadline_in_s")
        when = "no deadline" if deadline is None else f"deadline {deadline:.0f} s after the notice"
        saved = saves.get(notice.get("attempt"))
        if saved is None:
            outcome = f"saving (up to {notice.get('window_s', 0):.0f} s)"
        elif saved.get("exited"):
            emergency = EmergencyCheckpoint.from_dict(saved.get("emergency_checkpoint"))
            outcome = emergency.summary() if emergency is not None else "ended without saying what it saved"
        else:
            outcome = f"nothing saved: {saved.get('cut_short_by')}"
        lines.append(f"attempt {notice.get('attempt')}: {nodes} drained by Ray ({when}); {outcome}")
    return lines


def _unhealthy_nodes(events: list[dict[str, Any]]) -> dict[str, str]:
    last = {e.get("node_id"): e for e in events if e["event"] == "node_health"}
    return {_node_name(e): "; ".join(e.get("problems") or []) for e in last.values() if e.get("healthy") is False}


def read_status(run_dir: Path, now: float | None = None) -> RunStatus:
    return StatusReader(run_dir).read(now)


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def render_status(status: RunStatus, now: float | None = None) -> str:
    """The status as a person reads it in a terminal."""
    now = time.time() if now is None else now
    if status.state == RunState.FINISHED.value:
        head = f"finished: {status.outcome} (exit {status.exit_code})"
    elif status.state == RunState.STOPPED.value:
        head = f"stopped: {status.outcome} (exit {status.exit_code}); verl-supervisor on this run_dir continues it"
    else:
        who = f"supervisor pid {status.supervisor_pid}" if status.supervisor_alive else "NO LIVE SUPERVISOR"
        head = f"{status.state} ({who})"
    lines = [f"run {status.run_id}: {head}", f"run dir: {status.run_dir}"]
    flight = status.in_flight
    if flight is not None:
        step = "no step yet" if flight.step is None else f"at step {flight.step}"
        lines.append(f"attempt {flight.attempt} running since {_ago(now - flight.since)}, {step}")
        if flight.step is None:
            lines.append("last progress: none yet (starting up)")
        elif status.seconds_since_progress is not None:
            lines.append(f"last progress: {_ago(status.seconds_since_progress)}")
        if flight.heartbeat_ages_s:
            ages = ", ".join(f"{source} {age:.0f} s" for source, age in flight.heartbeat_ages_s.items())
            lines.append(f"heartbeats: {ages}")
    if status.last_error:
        lines.append(f"last error: {status.last_error}")
    if status.state == RunState.FINISHED.value:
        newest = "none" if status.resume_step is None else f"global_step_{status.resume_step}"
        lines.append(f"newest complete checkpoint: {newest} (in {status.checkpoints_dir})")
    else:
        resume = "a fresh start" if status.resume_step is None else f"global_step_{status.resume_step}"
        lines.append(f"next resume from: {resume} (in {status.checkpoints_dir})")
    if status.max_restarts is not None:
        lines.append(f"restarts: {status.restarts_used} used, {status.restarts_left} left of {status.max_restarts}")
    lines.append(f"time lost to failures: {status.lost_s:.1f} s")
    lines += [f"node unhealthy: {node}: {problems}" for node, problems in status.unhealthy_nodes.items()]
    lines += [f"node excluded (drained in Ray): {node}: {why}" for node, why in status.excluded_nodes.items()]
    lines += [f"preempted: {line}" for line in status.preemptions]
    if status.written_bytes:
        parts = ", ".join(f"{name} {_megabytes(n)}" for name, n in status.written_bytes.items())
        lines.append(f"written by the supervisor: {parts} (checkpoints not counted)")
    lines += [f"warning: {damage}" for damage in status.damage]
    lines += ["", status.table]
    return "\n".join(lines)
