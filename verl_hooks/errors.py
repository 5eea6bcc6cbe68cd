"""Typed errors of the weight-sync guard.

These classes are raised inside Ray actors and must arrive at the driver intact. Ray pickles an exception and,
at the driver, re-raises it as a ``RayTaskError`` subclass of the original class whose ``cause`` is the
unpickled original. Pickling an exception keeps neither ``__cause__`` nor ``__traceback__``, so the original
exception is also kept as text (type, message, formatted traceback) in fields that do survive.
"""

from __future__ import annotations

import traceback
from dataclasses import asdict, dataclass, fields
from enum import Enum
from typing import Any

from verl_hooks.contract import exception_chain, root_cause
from verl_hooks.phases import SyncPhase


class CleanupStatus(str, Enum):
    OK = "ok"
    FAILED = "failed"
    TIMED_OUT = "timed_out"


@dataclass(frozen=True)
class CleanupOutcome:
    """How one best-effort cleanup step ended."""

    step: str
    status: CleanupStatus
    elapsed_s: float
    message: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = self.status.value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CleanupOutcome:
        return cls(
            step=data["step"],
            status=CleanupStatus(data["status"]),
            elapsed_s=float(data["elapsed_s"]),
            message=data.get("message"),
        )


@dataclass
class SyncFailure:
    """What a failed weight sync leaves behind: the fields of ``WeightSyncFatalError``, declared once (its
    constructor, its pickling and the error record are derived from them)."""

    message: str
    phase: SyncPhase
    global_step: int | None
    backend: str
    elapsed_s: float
    cleanup: tuple[CleanupOutcome, ...] = ()
    """How each step of the guard's cleanup went."""
    hang: bool = False
    cause_type: str | None = None
    cause_message: str | None = None
    cause_traceback: str | None = None
    stuck_stack: str | None = None
    trainer_side: dict[str, Any] | None = None
    """``TrainerSide.to_dict()``: whether every trainer task of the sync and its cleanup had finished, on live
    workers (the facts an emergency save of the step needs)."""
    emergency_checkpoint: dict[str, Any] | None = None
    """``EmergencyCheckpoint.to_dict()``, set by the trainer's hook once it has saved or skipped the step."""

    def __post_init__(self) -> None:
        self.phase = SyncPhase(self.phase)
        self.cleanup = tuple(o if isinstance(o, CleanupOutcome) else CleanupOutcome.from_dict(o) for o in self.cleanup)


SYNC_FAILURE_FIELDS = tuple(f.name for f in fields(SyncFailure))


class WeightSyncFatalError(RuntimeError):
    """A weight sync from trainer to rollout failed or hung; the job cannot continue and must be restarted.

    By the time this is raised the guard has already tried to put the rollout back into a running state;
    ``cleanup`` says how each step of that went. The original exception is ``__cause__`` in the process that
    raised this, and is also kept as text (``cause_type``, ``cause_message``, ``cause_traceback``) because
    ``__cause__`` does not survive pickling across Ray. Its attributes are ``SyncFailure``'s fields.
    """

    message: str
    phase: SyncPhase
    global_step: int | None
    backend: str
    elapsed_s: float
    cleanup: tuple[CleanupOutcome, ...]
    hang: bool
    cause_type: str | None
    cause_message: str | None
    cause_traceback: str | None
    stuck_stack: str | None
    trainer_side: dict[str, Any] | None
    emergency_checkpoint: dict[str, Any] | None

    def __init__(self, message: str, **facts: Any) -> None:
        """``facts``: ``SyncFailure``'s fields past the message, by keyword (a name it lacks is a TypeError)."""
        super().__init__(message)
        failure = SyncFailure(message, **facts)
        vars(self).update({name: getattr(failure, name) for name in SYNC_FAILURE_FIELDS})

    @classmethod
    def from_failure(
        cls,
        cause: BaseException,
        *,
        phase: SyncPhase,
        global_step: int | None,
        backend: str,
        elapsed_s: float,
        cleanup: list[CleanupOutcome],
        hang: bool,
        stuck_stack: str | None = None,
        trainer_side: dict[str, Any] | None = None,
    ) -> WeightSyncFatalError:
        what = "hung" if hang else "failed"
        failed_cleanup = [o.step for o in cleanup if o.status is not CleanupStatus.OK]
        cleanup_note = f"; cleanup steps that did not succeed: {', '.join(failed_cleanup)}" if failed_cleanup else ""
        message = (
            f"weight sync {what} in phase '{phase.value}' at global step {global_step} "
            f"(backend {backend}, after {elapsed_s:.1f} s): {type(cause).__name__}: {cause}{cleanup_note}"
        )
        return cls(
            message,
            phase=phase,
            global_step=global_step,
            backend=backend,
            elapsed_s=elapsed_s,
            cleanup=cleanup,
            hang=hang,
            # Through Ray's wrapper: RayTaskError(CheckpointEngineInitError) is a CheckpointEngineInitError.
            cause_type=qualified_name(type(root_cause(cause))),
            cause_message=str(cause),
            cause_traceback="".join(traceback.format_exception(type(cause), cause, cause.__traceback__)),
            stuck_stack=stuck_stack,
            trainer_side=trainer_side,
        )

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain JSON-able values (used for pickling and for the error record)."""
        values = {name: getattr(self, name) for name in SYNC_FAILURE_FIELDS}
        return {**values, "phase": self.phase.value, "cleanup": [o.to_dict() for o in self.cleanup]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WeightSyncFatalError:
        facts = dict(data)
        return cls(facts.pop("message"), **facts)

    def __reduce__(self) -> tuple[Any, ...]:
        # The default reduction calls cls(*self.args) and would lose every keyword-only field.
        return (_rebuild_weight_sync_error, (type(self), self.to_dict()))


def _rebuild_weight_sync_error(cls: type[WeightSyncFatalError], data: dict[str, Any]) -> WeightSyncFatalError:
    return cls.from_dict(data)


class StopRequested(RuntimeError):
    """The supervisor asked the job to stop (``restart.save_on_stop_s``): raised by the guard right after a
    successful weight sync, so that the trainer's hook saves the step it is at and the job ends (exit 143)."""

    def __init__(
        self, message: str, *, global_step: int | None, emergency_checkpoint: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.global_step = global_step
        self.emergency_checkpoint = emergency_checkpoint

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_stop_requested, (type(self), self.message, self.global_step, self.emergency_checkpoint))


def _rebuild_stop_requested(
    cls: type[StopRequested], message: str, step: int | None, checkpoint: dict[str, Any] | None
) -> StopRequested:
    return cls(message, global_step=step, emergency_checkpoint=checkpoint)


class WeightSyncTimeout(TimeoutError):
    """The weight sync did not finish within its deadline: the cause of a ``WeightSyncFatalError`` for a hang."""


class InjectedFault(RuntimeError):
    """Raised by fault injection (``VERL_HOOKS_FAULTS``) inside a weight-sync phase."""


class HookSettingsError(ValueError):
    """A hook setting (``VERL_HOOKS_FAULTS``, a timeout, the attempt number) could not be understood."""


class IncompatibleVerlError(RuntimeError):
    """The installed verl's ``CheckpointEngineManager`` is not the one the guard was written for."""


def qualified_name(cls: type) -> str:
    module = cls.__module__
    return cls.__qualname__ if module in ("builtins", "__main__") else f"{module}.{cls.__qualname__}"


def find_stop_request(exc: BaseException) -> StopRequested | None:
    """The ``StopRequested`` behind ``exc``, if any (through Ray's wrappers, as for ``find_weight_sync_error``)."""
    for current in exception_chain(exc, with_context=True):
        if isinstance(current, StopRequested):
            cause = getattr(current, "cause", None)
            return cause if isinstance(cause, StopRequested) else current
    return None


def find_weight_sync_error(exc: BaseException) -> WeightSyncFatalError | None:
    """The ``WeightSyncFatalError`` behind ``exc``, if any: through Ray's wrappers (``RayTaskError.cause``, which
    may itself wrap another task's error) and Python's exception chain, context included."""
    for current in exception_chain(exc, with_context=True):
        if isinstance(current, WeightSyncFatalError):
            # A RayTaskError re-raised "as instance of cause" is a subclass; its fields live on the cause.
            cause = getattr(current, "cause", None)
            return cause if isinstance(cause, WeightSyncFatalError) else current
    return None


STEP_FAILURE_CHECKPOINT_ATTR = "verl_hooks_emergency_checkpoint"
"""Set on an exception of the job's own that escaped the trainer's ``fit`` (a generation, reward or data failure):
what the emergency save did about it, as ``EmergencyCheckpoint.to_dict()``. An exception's attributes travel with
it through Ray (pickled with its ``__dict__``), so the driver's error record can say it."""


def note_step_failure_checkpoint(exc: BaseException, outcome: dict[str, Any]) -> None:
    try:
        setattr(exc, STEP_FAILURE_CHECKPOINT_ATTR, outcome)
    except (AttributeError, TypeError):  # an exception type with __slots__: the outcome is still printed and logged
        pass


def find_step_failure_checkpoint(exc: BaseException) -> dict[str, Any] | None:
    """What the emergency save did about a failure outside the sync, from anywhere in ``exc``'s chain."""
    for current in exception_chain(exc, with_context=True):
        outcome = getattr(current, STEP_FAILURE_CHECKPOINT_ATTR, None)
        if isinstance(outcome, dict):
            return outcome
    return None
