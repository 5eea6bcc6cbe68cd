"""The run's history: its attempts, its checkpoint progress and its state, as kept in state.json.

The restart budget and the crash-loop guard are functions of this history, so they survive a supervisor
restart on the same run directory.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, ClassVar

from supervisor.outcomes import Action, RuleName, SupervisorRule
from verl_hooks.contract import ErrorRecord

SCHEMA_VERSION = 1


class RunState(str, Enum):
    """Where the run is. Transitions: STARTING -> ATTEMPT_RUNNING -> TEARING_DOWN -> (BACKING_OFF ->
    ATTEMPT_RUNNING ...) -> FINISHED or STOPPED. FINISHED is terminal: a finished run directory is never reused.
    STOPPED is a run a SIGINT or SIGTERM ended (Ctrl-C, a preemption, a requeue): a supervisor started again on
    its run directory continues it (STOPPED -> STARTING)."""

    STARTING = "starting"
    ATTEMPT_RUNNING = "attempt_running"
    TEARING_DOWN = "tearing_down"
    BACKING_OFF = "backing_off"
    FINISHED = "finished"
    STOPPED = "stopped"


class IllegalTransition(RuntimeError):
    pass


@dataclass
class AttemptRecord:
    number: int
    started_at: float
    resumed_from_step: int | None
    argv: list[str] = field(default_factory=list)
    ended_at: float | None = None
    exit_code: int | None = None
    signal: str | None = None
    error_type: str | None = None
    phase: str | None = None
    action: Action | None = None
    rule: RuleName | SupervisorRule | None = None
    """The configured rule that classified the attempt, or the supervisor's own verdict."""
    reason: str | None = None
    reached_step: int | None = None
    """The newest complete checkpoint step once the attempt was over."""
    emergency_checkpoint: dict[str, Any] | None = None
    """What the trainer did about the step it was at before the attempt ended (the error record's)."""
    error_message: str | None = None
    """The error record's message (cut at ``MESSAGE_CHARS``): with ``error_type`` and ``phase``, what a repeated
    failure is recognised by."""
    failed_at_step: int | None = None
    """The global step it failed at: the error record's, else the last step its weight syncs carried."""

    failure_nodes: list[str] = field(default_factory=list)
    """The Ray nodes its error record names as the place of its failure (``policy.nodes.failure_nodes``)."""
    resume_verified: bool = False
    """Its weight syncs showed that it resumed from the checkpoint it was given (``policy.resume``)."""

    MESSAGE_CHARS: ClassVar[int] = 2000

    FROM_RECORD: ClassVar[tuple[str, ...]] = ("error_type", "phase", "emergency_checkpoint")
    """The fields it takes from the attempt's error record, by the same name (``took``), and passes on to the
    attempt_exited event."""

    def took(self, error: ErrorRecord | None) -> dict[str, Any]:
        """Take ``FROM_RECORD`` from the attempt's error record (None: no record, all None); returns them."""
        for name in self.FROM_RECORD:
            setattr(self, name, getattr(error, name) if error is not None else None)
        return {name: getattr(self, name) for name in self.FROM_RECORD}

    @property
    def ended(self) -> bool:
        return self.ended_at is not None

    @property
    def failed(self) -> bool:
        return self.ended and self.action is not Action.done

    def judge(self, ended_at: float, action: Action, rule: RuleName | SupervisorRule, reason: str) -> None:
        """The attempt is over and classified (its fields set together: an ended attempt always has a verdict)."""
        self.ended_at, self.action, self.rule, self.reason = ended_at, action, rule, reason

    @property
    def interrupted(self) -> bool:
        """Ended because the supervisor was stopped by a signal, or because Ray drained one of its nodes (a
        preemption): not the job's failure."""
        return self.rule is SupervisorRule.INTERRUPTED or self.rule is SupervisorRule.PREEMPTED  # members, not names

    @property
    def lost(self) -> bool:
        """In flight when its supervisor died: judged by the next one, whatever the job was doing."""
        return self.rule is SupervisorRule.SUPERVISOR_RESTARTED

    @property
    def made_progress(self) -> bool:
        if self.reached_step is None:
            return False
        return self.resumed_from_step is None or self.reached_step > self.resumed_from_step


@dataclass
class RunHistory:
    run_id: str
    state: RunState = RunState.STARTING
    attempts: list[AttemptRecord] = field(default_factory=list)
    newest_checkpoint_step: int | None = None
    """The newest complete checkpoint step this run has ever seen."""
    exit_code: int | None = None
    outcome: str | None = None
    supervisor_starts: int = 0
    trackers: dict[str, str] = field(default_factory=dict)
    """Experiment-tracker run ids the job reported (backend -> id), given to every later attempt."""

    @property
    def counted_attempts(self) -> int:
        """Attempts the restart budget counts: all but those a stop signal or a preemption notice ended (neither is the
        job's failure)."""
        return sum(not a.interrupted for a in self.attempts)

    @property
    def restarts_used(self) -> int:
        return max(0, self.counted_attempts - 1)

    @property
    def finished(self) -> bool:
        return self.state is RunState.FINISHED

    def failures_without_progress(self) -> int:
        """Failed attempts at the end of the history, none of which advanced the checkpoint step. Attempts a stop
        signal ended, or that were in flight when the supervisor died, are passed over: they say nothing of the
        job (a lost attempt still counts against the restart budget)."""
        count = 0
        for attempt in reversed(self.attempts):
            if attempt.interrupted or attempt.lost:
                continue
            if not attempt.failed or attempt.made_progress:
                break
            count += 1
        return count

    def unproven_emergency_steps(self) -> frozenset[int]:
        """Steps an emergency save wrote that no attempt has yet resumed from and shown to be sound (its resume
        verified, or a step past it reached): until then the run's checkpoint limits must not remove what came
        before them."""
        saved = set()
        for attempt in self.attempts:
            data = attempt.emergency_checkpoint or {}
            if data.get("status") == "saved" and isinstance(data.get("step"), int):
                saved.add(data["step"])
        proven = {
            a.resumed_from_step
            for a in self.attempts
            if a.resumed_from_step is not None and (a.resume_verified or a.made_progress)
        }
        return frozenset(saved - proven)

    def move_to(self, state: RunState) -> None:
        if self.state is RunState.FINISHED and state is not RunState.FINISHED:
            raise IllegalTransition(f"run {self.run_id} is finished; it cannot move to {state.value}")
        self.state = state

    def finish(self, exit_code: int, outcome: str, *, resumable: bool = False) -> None:
        """The supervisor is done with the run: FINISHED, or STOPPED when ``resumable`` (``RESUMABLE_EXIT_CODES``)."""
        if self.state is RunState.FINISHED:
            raise IllegalTransition(f"run {self.run_id} already finished ({self.outcome})")
        self.state = RunState.STOPPED if resumable else RunState.FINISHED
        self.exit_code = exit_code
        self.outcome = outcome

    def resume(self) -> None:
        """A stopped run is continued: what ended it is history, no longer its outcome."""
        if self.state is RunState.STOPPED:
            self.exit_code = self.outcome = None

    def saw_checkpoint(self, step: int | None) -> None:
        if step is not None and (self.newest_checkpoint_step is None or step > self.newest_checkpoint_step):
            self.newest_checkpoint_step = step

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = self.state.value
        for attempt in data["attempts"]:
            attempt["action"] = attempt["action"].value if attempt["action"] is not None else None
            attempt["rule"] = str(attempt["rule"]) if attempt["rule"] is not None else None
        data["schema_version"] = SCHEMA_VERSION
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunHistory:
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"state.json has schema_version {data.get('schema_version')!r}, expected {SCHEMA_VERSION}")
        fields = {k: v for k, v in data.items() if k != "schema_version"}
        fields["state"] = RunState(fields["state"])
        fields["attempts"] = [
            AttemptRecord(
                **{
                    **a,
                    "action": Action(a["action"]) if a.get("action") is not None else None,
                    "rule": SupervisorRule.parse(a["rule"]) if a.get("rule") is not None else None,
                }
            )
            for a in fields.get("attempts", [])
        ]
        return cls(**fields)
