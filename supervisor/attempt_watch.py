"""What one running attempt's heartbeats say, kept as they arrive.

Each beat is written to the attempt's folder (``heartbeats.jsonl``; the last ``alive`` beat of each process in
``alive.json``, so that the log grows with the steps, not the hours; the job's error record in ``error.json``,
since a driver on another machine cannot reach the supervisor's files) and fed to the watchdog's progress and the
resume check. What needs the run's history or an event is handed back to the loop in ``Taken``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from supervisor.job.beat import Heartbeat
from supervisor.policy.resume import MismatchedResume, ResumeCheck, VerifiedResume
from supervisor.policy.watchdog import ProgressState, Stall, StallKind
from supervisor.run.beats import ALIVE_FILE
from supervisor.run.rundir import write_json_atomic
from verl_hooks.contract import ErrorRecord, HeartbeatKind, RecordSource, record_from_payload, write_record


@dataclass(frozen=True)
class Taken:
    """What a batch of beats showed that the loop acts on."""

    record: ErrorRecord | None = None
    """The job's error record, the first time it arrives."""
    trackers: tuple[tuple[str, str], ...] = ()
    """(backend, run id) of each experiment-tracker run the job reported."""
    verified: VerifiedResume | None = None
    mismatch: MismatchedResume | None = None


@dataclass
class AttemptWatch:
    attempt: int
    folder: Path
    progress: ProgressState
    resume: ResumeCheck | None = None
    """Checks the attempt's first weight syncs against the step it was told to resume from (None: no check)."""
    record_at: float | None = None
    """When the job's error record arrived (the heartbeat clock), starting its driver's grace."""
    alive: dict[str, float] = field(default_factory=dict)
    """``host:pid`` of each process of the attempt that sent an ``alive`` beat, and when the last arrived."""

    def take(self, beats: list[Heartbeat], now: float) -> Taken:
        """Note this attempt's beats (``now``: wall-clock time, written with each)."""
        beats = [b for b in beats if b.attempt == self.attempt]  # late beats of older attempts are dropped
        if not beats:
            return Taken()
        record, trackers, verified, mismatch = None, [], None, None
        alive_before = dict(self.alive)
        with (self.folder / "heartbeats.jsonl").open("a") as log:
            for beat in beats:
                if beat.kind is HeartbeatKind.ERROR_RECORD:
                    record = record or self._take_record(beat)
                    continue
                if beat.kind is HeartbeatKind.TRACKER:
                    backend, run_id = beat.fields.get("backend"), beat.fields.get("run_id")
                    if isinstance(backend, str) and isinstance(run_id, str):
                        trackers.append((backend, run_id))
                    continue
                self.progress.observe(beat)
                if beat.kind is HeartbeatKind.ALIVE:
                    self.alive[f"{beat.fields.get('host', '?')}:{beat.fields.get('pid', '?')}"] = now
                    continue
                log.write(json.dumps({"received_at": now, **beat.fields}) + "\n")
                if self.resume is not None and beat.kind is HeartbeatKind.SYNC_BEGIN:
                    verdict = self.resume.observe(beat.step)
                    if isinstance(verdict, VerifiedResume):
                        verified = verdict
                    elif isinstance(verdict, MismatchedResume):
                        mismatch = mismatch or verdict
        if self.alive != alive_before:
            write_json_atomic(self.folder / ALIVE_FILE, self.alive)
        return Taken(record, tuple(trackers), verified, mismatch)

    def _take_record(self, beat: Heartbeat) -> ErrorRecord | None:
        """The first record wins; the driver's grace starts when it arrives."""
        record = record_from_payload(beat.fields.get("record"))
        if record is None or self.record_at is not None:
            return None
        write_record(self.folder / "error.json", record)
        self.record_at = beat.received_at
        return record


def stall_record(stall: Stall, attempt: int, now: float) -> ErrorRecord:
    """The record of an attempt the watchdog ended: the job wrote none, since it was stuck."""
    return ErrorRecord(
        error_type=f"supervisor.watchdog.{stall.kind.value}",
        message=stall.reason,
        source=RecordSource.SUPERVISOR_WATCHDOG,
        phase=stall.phase if stall.kind is StallKind.WEIGHT_SYNC_HANG else None,
        global_step=stall.last_step,
        hang=True,
        attempt=attempt,
        timestamp=now,
    )


def mismatch_record(mismatch: MismatchedResume, attempt: int, now: float) -> ErrorRecord:
    """The record of an attempt stopped because it did not resume from the checkpoint the supervisor chose."""
    return ErrorRecord(
        error_type="supervisor.resume_mismatch",
        message=mismatch.reason,
        source=RecordSource.SUPERVISOR_RESUME_CHECK,
        global_step=mismatch.seen_step,
        attempt=attempt,
        timestamp=now,
    )
