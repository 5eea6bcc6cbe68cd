"""Every decision on whether the run goes on: pure functions of data, returning values the loop carries out.

- ``after_attempt``: restart after a backoff, or stop, from the run's history and the restart policy (a failure
  that repeated itself at the same step is judged by ``policy.repeats``). The
  budget and the backoff are counted from the history, not from a retry loop's own state, because they
  outlive one supervisor process: they are kept in state.json and continue when a supervisor is restarted on
  the same run directory (so tenacity's retry loop, which the supervisor uses for calls it repeats, does not
  fit here). The jitter's randomness is a parameter.
- ``after_teardown``: an attempt that could not be fenced off stops the run.
- ``choose_start``: resume from a checkpoint, start fresh, or refuse to silently start over.
- ``after_interrupt``, ``after_cluster_failure``, ``after_internal_error``: the other ways a run ends.
- ``lost_attempt``, ``interrupted_attempt``: how attempts that no rule judged are classified.
"""

from __future__ import annotations

import random
import signal
from collections.abc import Sequence
from dataclasses import dataclass

from supervisor.config import RestartConfig
from supervisor.job.command import StartFrom
from supervisor.outcomes import (
    LOST_ATTEMPT_REASON,
    Action,
    ExitCode,
    SharedOutcome,
    SupervisorRule,
)
from supervisor.policy.repeats import repeated_failure
from supervisor.policy.rules import Classification
from supervisor.run.history import RunHistory


@dataclass(frozen=True)
class Restart:
    delay_s: float
    reason: str


@dataclass(frozen=True)
class Stop:
    exit_code: ExitCode
    reason: str
    outcome: SharedOutcome | None = None
    """The run's outcome where its exit code is shared (exit 5: ``crash_loop`` or ``no_valid_checkpoint``); by
    default the exit code's own name."""

    @property
    def outcome_name(self) -> str:
        return self.outcome.value if self.outcome is not None else self.exit_code.outcome


Decision = Restart | Stop


def backoff_s(failures_in_a_row: int, policy: RestartConfig, rng: random.Random) -> float:
    """Exponential backoff on the failures since the job last made progress (at least one), plus a jitter drawn
    from ``rng``, never above ``backoff_max_s``."""
    try:
        base = policy.backoff_initial_s * policy.backoff_multiplier ** (max(1, failures_in_a_row) - 1)
    except OverflowError:  # a long streak with a large multiplier: far past the cap
        base = policy.backoff_max_s
    return min(policy.backoff_max_s, base + rng.uniform(0, policy.backoff_jitter_s))


def after_attempt(
    history: RunHistory, classification: Classification, policy: RestartConfig, rng: random.Random
) -> Decision:
    """After an attempt ended and was fenced off: stop (with the exit code that says why) or restart."""
    if classification.action is Action.done:
        return Stop(ExitCode.DONE, f"the job finished: {classification.reason}")
    if classification.rule is SupervisorRule.RESUME_MISMATCH:
        return Stop(ExitCode.RESUME_NOT_HONOURED, f"not restarting: {classification.reason}")
    if classification.action is Action.fail:
        return Stop(ExitCode.JOB_FAILED, f"not restarting: {classification.reason}")
    if classification.rule is SupervisorRule.PREEMPTED:
        return Restart(0.0, f"relaunching on the nodes that remain: {classification.reason}")
    repeated = repeated_failure(history) if policy.stop_on_repeated_failure else None
    if repeated is not None:
        return Stop(ExitCode.JOB_FAILED, repeated.describe(), outcome=SharedOutcome.REPEATED_FAILURE)
    streak = history.failures_without_progress()
    if streak >= policy.max_failures_without_progress:
        return Stop(
            ExitCode.CRASH_LOOP,
            f"crash loop: {streak} failed attempts in a row without the checkpoint step advancing "
            f"(restart.max_failures_without_progress={policy.max_failures_without_progress}); last: "
            f"{classification.reason}",
        )
    if history.counted_attempts > policy.max_restarts:
        return Stop(
            ExitCode.BUDGET_EXHAUSTED,
            f"restart budget exhausted: {history.restarts_used} of {policy.max_restarts} restarts used "
            f"(restart.max_restarts); last: {classification.reason}",
        )
    if streak == 0 and not policy.backoff_after_progress:
        return Restart(0.0, f"restarting at once (the attempt made progress): {classification.reason}")
    return Restart(backoff_s(streak, policy, rng), f"restarting: {classification.reason}")


def after_teardown(fenced: bool, problems: Sequence[str]) -> Stop | None:
    """Nothing may start next to what is left of an attempt: a fence that failed stops the run."""
    if fenced:
        return None
    return Stop(ExitCode.ENVIRONMENT_FAILURE, "; ".join(problems) or "the attempt could not be fenced off")


def choose_start(newest_valid_step: int | None, newest_valid_path: str | None, history: RunHistory) -> StartFrom | Stop:
    """Resume from the newest valid checkpoint; start fresh only if this run never had one.

    A run that saw a complete checkpoint and now finds none valid has lost its progress (deleted or corrupted
    files): silently starting at step 0 would waste the compute and hide the problem.
    """
    if newest_valid_path is not None:
        return StartFrom(newest_valid_path, newest_valid_step)
    if history.newest_checkpoint_step is not None:
        return Stop(
            ExitCode.CRASH_LOOP,
            f"no valid checkpoint to resume from, although this run had reached global_step_"
            f"{history.newest_checkpoint_step}; refusing to start over from step 0 (see the set-aside folders "
            f"and events.jsonl)",
            outcome=SharedOutcome.NO_VALID_CHECKPOINT,
        )
    return StartFrom(None, None)


_INTERRUPTED = {signal.SIGINT: ExitCode.INTERRUPTED_SIGINT, signal.SIGTERM: ExitCode.INTERRUPTED_SIGTERM}
STOP_SIGNALS = tuple(_INTERRUPTED)
"""The signals that stop a supervisor (after tearing the job down)."""


def save_on_stop_wait(signum: int, save_on_stop_s: float) -> float:
    """How long to wait, on a stop signal, for the job to save the step it is at: SIGTERM is how a platform
    announces a preemption or an eviction with a grace period; SIGINT (Ctrl-C) is a person, who wants it now."""
    return save_on_stop_s if signum == signal.SIGTERM else 0.0


def after_interrupt(signum: int) -> Stop:
    name = signal.Signals(signum).name
    return Stop(_INTERRUPTED[signal.Signals(signum)], f"interrupted by {name}")


def after_cluster_failure(message: str) -> Stop:
    return Stop(ExitCode.ENVIRONMENT_FAILURE, f"the Ray cluster could not be started: {message}")


def after_internal_error(exc: BaseException) -> Stop:
    return Stop(ExitCode.INTERNAL_ERROR, f"supervisor error: {type(exc).__name__}: {exc}")


def lost_attempt() -> Classification:
    """How a supervisor restarted on the run judges the attempt a dead one left in flight: a failed attempt,
    counted against the same budget (``after_attempt`` decides what follows, without a backoff: the time the
    supervisor was gone has passed already)."""
    return Classification(Action.restart, SupervisorRule.SUPERVISOR_RESTARTED, LOST_ATTEMPT_REASON)


def resume_not_honoured(reason: str) -> Classification:
    """A relaunch that trained from another step than the one chosen would train on silently, wrongly: stop.
    (A restart would meet the same configuration and do the same.)"""
    return Classification(Action.fail, SupervisorRule.RESUME_MISMATCH, reason)


def unknown_checkpoint_layout(folders: Sequence[str], first_problem: str) -> Stop:
    return Stop(
        ExitCode.UNKNOWN_CHECKPOINT_LAYOUT,
        f"cannot judge checkpoint folder(s) {', '.join(folders)} ({first_problem}); nothing was resumed from, set "
        f"aside or removed. Move them out of the checkpoint directory, or use a layout the supervisor knows "
        f"(docs/how-it-works/checkpoint-layouts.md)",
    )


def preempted_attempt(reason: str) -> Classification:
    """An attempt Ray took a node from: a stop, relaunched at once (the budget and the backoff are for the job's
    failures)."""
    return Classification(Action.restart, SupervisorRule.PREEMPTED, reason)


def interrupted_attempt() -> Classification:
    return Classification(Action.fail, SupervisorRule.INTERRUPTED, "the supervisor was stopped")


def failed_supervisor_attempt() -> Classification:
    return Classification(Action.fail, SupervisorRule.SUPERVISOR_ERROR, "a supervisor error ended the run")
