"""What to do after an attempt: pure functions of data, no processes, files or clocks.

- ``classify``: ordered rules, first match wins (in the spirit of Kubernetes' podFailurePolicy), over the
  evidence an attempt leaves: its exit status, its error record, the end of its output.
- ``decide``: restart (after a backoff) or stop, from the run's history and the restart policy. Backoff and the
  restart budget are tenacity's own strategies (``wait_exponential_jitter``, ``stop_after_attempt``) applied
  to a snapshot of the history, because the budget outlives one supervisor process: it is kept in state.json
  and continues when a supervisor is restarted on the same run directory.
- ``choose_start``: resume from a checkpoint, start fresh, or refuse to silently start over.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import tenacity

from supervisor.codes import ExitCode, ExitStatus
from supervisor.config import Action, RestartConfig, RuleConfig
from supervisor.history import RunHistory
from verl_hooks.record import ErrorRecord


@dataclass(frozen=True)
class AttemptEvidence:
    """What an ended attempt left behind, for classification."""

    exit: ExitStatus
    record: ErrorRecord | None = None
    log_tail: str = ""
    stalled: bool = False
    """The watchdog ended the attempt: it had stopped making progress."""


@dataclass(frozen=True)
class Classification:
    action: Action
    rule: str
    """The name of the rule that matched, or "default"."""
    reason: str


def rule_matches(rule: RuleConfig, evidence: AttemptEvidence) -> bool:
    """Every criterion the rule gives must hold; criteria it leaves out match anything."""
    status, record = evidence.exit, evidence.record
    if rule.stalled is not None and rule.stalled != evidence.stalled:
        return False
    if rule.exit_codes is not None and status.code not in rule.exit_codes:
        return False
    if rule.signals is not None:
        if status.signal is None:
            return False
        if "any" not in rule.signals and status.signal_name not in rule.signals:
            return False
    if rule.error_type is not None and (record is None or not re.search(rule.error_type, record.error_type)):
        return False
    if rule.phases is not None and (record is None or record.phase not in rule.phases):
        return False
    return rule.log_regex is None or re.search(rule.log_regex, evidence.log_tail) is not None


def classify(evidence: AttemptEvidence, rules: Sequence[RuleConfig], default_action: Action) -> Classification:
    for rule in rules:
        if rule_matches(rule, evidence):
            return Classification(rule.action, rule.name, _describe(evidence, rule.name))
    return Classification(default_action, "default", _describe(evidence, "no rule matched"))


def _describe(evidence: AttemptEvidence, why: str) -> str:
    text = "stalled, then " + evidence.exit.describe() if evidence.stalled else evidence.exit.describe()
    record = evidence.record
    if record is not None:
        short_type = record.error_type.rsplit(".", 1)[-1]
        text += f", {short_type}"
        if record.phase:
            text += f" in phase {record.phase} at step {record.global_step}"
    return f"{text} ({why})"


@dataclass(frozen=True)
class Restart:
    delay_s: float
    reason: str


@dataclass(frozen=True)
class Stop:
    exit_code: ExitCode
    reason: str


Decision = Restart | Stop


def _retry_state(attempt_number: int) -> tenacity.RetryCallState:
    """A tenacity call state standing for the run's history, for tenacity's strategies to read."""
    state = tenacity.RetryCallState(retry_object=None, fn=None, args=(), kwargs={})
    state.attempt_number = attempt_number
    return state


def backoff_s(failures_in_a_row: int, policy: RestartConfig) -> float:
    """Exponential backoff with jitter on the failures since the job last made progress (at least one)."""
    wait = tenacity.wait_exponential_jitter(
        initial=policy.backoff_initial_s,
        max=policy.backoff_max_s,
        exp_base=policy.backoff_multiplier,
        jitter=policy.backoff_jitter_s,
    )
    return float(wait(_retry_state(max(1, failures_in_a_row))))


def decide(history: RunHistory, classification: Classification, policy: RestartConfig) -> Decision:
    """After an attempt ended: stop (with the exit code that says why) or restart after a backoff."""
    if classification.action is Action.done:
        return Stop(ExitCode.DONE, f"the job finished: {classification.reason}")
    if classification.action is Action.fail:
        return Stop(ExitCode.JOB_FAILED, f"not restarting: {classification.reason}")
    streak = history.failures_without_progress()
    if streak >= policy.max_failures_without_progress:
        return Stop(
            ExitCode.CRASH_LOOP,
            f"crash loop: {streak} failed attempts in a row without the checkpoint step advancing "
            f"(restart.max_failures_without_progress={policy.max_failures_without_progress}); last: "
            f"{classification.reason}",
        )
    budget = tenacity.stop_after_attempt(policy.max_restarts + 1)
    if budget(_retry_state(len(history.attempts))):
        return Stop(
            ExitCode.BUDGET_EXHAUSTED,
            f"restart budget exhausted: {history.restarts_used} of {policy.max_restarts} restarts used "
            f"(restart.max_restarts); last: {classification.reason}",
        )
    return Restart(backoff_s(streak, policy), f"restarting: {classification.reason}")


@dataclass(frozen=True)
class StartFrom:
    """Where the next attempt starts: a checkpoint folder, or from scratch (both None)."""

    checkpoint: str | None
    step: int | None


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
        )
    return StartFrom(None, None)
