"""What the guard does once it stops waiting for verl's weight sync: a pure function of what it saw.

The guard (``verl_hooks.guard``) waits for the sync's thread up to the deadline, asks ``judge`` what that wait
means, and carries the verdict out: return the sync's result, stop at the safe point the supervisor asked for,
pass on an error that is not the guard's to handle, or clean up, record and raise ``WeightSyncFatalError``.
Nothing here imports verl or Ray, so every branch is a row of a table (tests/verl_hooks/test_sync_verdict.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from verl_hooks.deadline import Deadline
from verl_hooks.errors import WeightSyncFatalError, WeightSyncTimeout
from verl_hooks.phases import SyncPhase


@dataclass(frozen=True)
class Synced:
    """The sync finished: note it, then hand its result back to the trainer, or stop there (``stop_here``)."""


@dataclass(frozen=True)
class PassOn:
    """Not the guard's to handle: a guarded sync inside this one (a subclass calling ``super()``) cleaned up and
    raised already, or something that is not an ``Exception`` (``KeyboardInterrupt``, ``SystemExit``)."""

    error: BaseException


@dataclass(frozen=True)
class Failed:
    """Clean up, record and raise ``WeightSyncFatalError`` from ``primary``."""

    primary: BaseException
    hang: bool
    """The deadline passed with the sync still running: its thread is abandoned (``primary`` a timeout)."""


Verdict = Synced | PassOn | Failed


def judge(
    finished: bool,
    error: BaseException | None,
    deadline: Deadline,
    phase: SyncPhase,
) -> Verdict:
    """``finished``: the sync's thread ended within the deadline, raising ``error`` (None: it returned);
    ``phase``: the phase it was in when the wait ended."""
    if not finished:
        return Failed(
            WeightSyncTimeout(
                f"weight sync did not finish within {deadline.seconds:.3g} s ({deadline.reason}); stuck in phase "
                f"'{phase.value}'"
            ),
            hang=True,
        )
    if error is None:
        return Synced()
    if not isinstance(error, Exception) or isinstance(error, WeightSyncFatalError):
        return PassOn(error)
    return Failed(error, hang=False)


def stop_here(stop_requested: bool, trainer_can_save: bool) -> bool:
    """After a sync that finished and was noted: the supervisor asked the job to stop, and a hooked trainer can
    save the step, so this sync is the safe point (no trainer task is in flight): ``StopRequested`` is raised.
    Without a trainer to save it, the job goes on until the supervisor's wait runs out."""
    return stop_requested and trainer_can_save
