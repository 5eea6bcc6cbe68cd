"""The run's history rebuilt from ``events.jsonl``, for a ``state.json`` that cannot be read.

``state.json`` is replaced atomically, so the supervisor never leaves it half-written; a copy cut short, a disk that
filled under another tool, or a hand edit can. Every change the loop makes to the history is also said by an event
(``supervisor.loop``: ``run_started``, ``attempt_started``, ``attempt_exited``, ``teardown``, ``resume_verified``,
``tracker_run``, ``run_finished``), each line carrying the run's id, so the history can be read back from them.
What the events do not hold is approximated, and said here: an attempt's start and end times are its events'
timestamps (the supervisor's wall clock, as state.json's are), its ``failed_at_step`` is its error record's step
only (not the last step its syncs carried), and the Ray nodes its record names are not kept (node exclusion after
the next failure then looks at that failure alone).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from supervisor.outcomes import LOST_ATTEMPT_REASON, RESUMABLE_EXIT_CODES, Action, SupervisorRule
from supervisor.run.history import AttemptRecord, RunHistory, RunState


def _run_id(events: list[dict[str, Any]]) -> str | None:
    # A tracker_run event's own run_id field (the tracker's run) shadows the supervisor's in its line.
    ids = [e.get("run_id") for e in events if e.get("event") != "tracker_run" and isinstance(e.get("run_id"), str)]
    return ids[-1] if ids else None


def history_from_events(events: Iterable[dict[str, Any]]) -> RunHistory | None:
    """The history the events tell, or None when they do not name the run (no event, or none with its id)."""
    events = list(events)
    run_id = _run_id(events)
    if run_id is None:
        return None
    history = RunHistory(run_id=run_id)
    attempts: dict[int, AttemptRecord] = {}
    for event in events:
        kind = event.get("event")
        number = event.get("attempt")
        record = attempts.get(number) if isinstance(number, int) else None
        if kind == "run_started":
            _supervisor_started(history)
        elif kind == "attempt_started" and isinstance(number, int):
            record = AttemptRecord(
                number=number,
                started_at=float(event["ts"]),
                resumed_from_step=event.get("resume_step"),
                argv=list(event.get("argv") or []),
            )
            attempts[number] = record
            history.attempts.append(record)
            history.saw_checkpoint(record.resumed_from_step)
            history.state = RunState.ATTEMPT_RUNNING
        elif kind == "attempt_exited" and record is not None:
            _exited(record, event)
            history.state = RunState.TEARING_DOWN
        elif kind == "teardown" and record is not None:
            record.reached_step = event.get("reached_step")
            history.saw_checkpoint(record.reached_step)
            history.state = RunState.BACKING_OFF
        elif kind == "resume_verified" and record is not None:
            record.resume_verified = True
        elif kind == "tracker_run" and isinstance(event.get("backend"), str) and isinstance(event.get("run_id"), str):
            history.trackers[event["backend"]] = event["run_id"]
        elif kind == "run_finished" and isinstance(event.get("exit_code"), int):
            code = event["exit_code"]
            if not history.finished:
                history.finish(code, str(event.get("outcome")), resumable=code in RESUMABLE_EXIT_CODES)
    return history


def _supervisor_started(history: RunHistory) -> None:
    """As ``Supervisor._begin``: a stopped run continues, and an attempt a dead supervisor left in flight is lost."""
    history.supervisor_starts += 1
    history.resume()
    if history.state is RunState.STOPPED:
        history.state = RunState.STARTING
    for attempt in history.attempts:
        if not attempt.ended:
            attempt.judge(attempt.started_at, Action.restart, SupervisorRule.SUPERVISOR_RESTARTED, LOST_ATTEMPT_REASON)
    if not history.finished:
        history.state = RunState.STARTING


def _exited(record: AttemptRecord, event: dict[str, Any]) -> None:
    duration = event.get("duration_s")
    ended_at = record.started_at + float(duration) if isinstance(duration, int | float) else float(event["ts"])
    record.judge(ended_at, Action(event["action"]), SupervisorRule.parse(event["rule"]), str(event.get("reason")))
    record.exit_code, record.signal = event.get("exit_code"), event.get("signal")
    record.error_type, record.phase = event.get("error_type"), event.get("phase")
    record.emergency_checkpoint = event.get("emergency_checkpoint")
    summary = event.get("record") if isinstance(event.get("record"), dict) else {}
    if record.failed:
        message = summary.get("message")
        record.error_message = message[: record.MESSAGE_CHARS] if isinstance(message, str) else None
        record.failed_at_step = event.get("global_step")
