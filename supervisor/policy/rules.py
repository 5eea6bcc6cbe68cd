"""Classification: ordered rules, first match wins (in the spirit of Kubernetes' podFailurePolicy), over the
evidence an attempt leaves: its exit status, its error record, the end of its output, whether it stalled.

A pure function of data: no processes, files or clocks.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from supervisor.config import RuleConfig
from supervisor.outcomes import Action, ExitStatus, RuleName, SupervisorRule
from verl_hooks.contract import ErrorRecord


@dataclass(frozen=True)
class AttemptEvidence:
    """What an ended attempt left behind, for classification."""

    exit: ExitStatus | None
    """How the driver ended by itself; None when the supervisor ended it (a stall)."""
    record: ErrorRecord | None = None
    log_tail: str = ""
    stalled: bool = False
    """The watchdog ended the attempt: it had stopped making progress."""
    last_step: int | None = None
    """The last global step its weight syncs carried (None: none seen)."""

    @property
    def clean_exit(self) -> bool:
        """The driver exited 0 by itself, with no error record and no stall: the job says it finished."""
        return self.exit is not None and self.exit.code == 0 and self.record is None and not self.stalled


@dataclass(frozen=True)
class Classification:
    action: Action
    rule: RuleName | SupervisorRule
    """The name of the configured rule that matched, or the supervisor's own verdict."""
    reason: str


def rule_matches(rule: RuleConfig, evidence: AttemptEvidence) -> bool:
    """Every criterion the rule gives must hold; criteria it leaves out match anything."""
    status, record = evidence.exit or ExitStatus(), evidence.record
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
    """The first rule that matches decides; a clean exit no rule matched is done, anything else
    ``default_action``."""
    for rule in rules:
        if rule_matches(rule, evidence):
            return Classification(rule.action, rule.name, describe(evidence, rule.name))
    if evidence.clean_exit:
        return Classification(Action.done, SupervisorRule.CLEAN_EXIT, describe(evidence, "no rule matched"))
    return Classification(default_action, SupervisorRule.DEFAULT, describe(evidence, "no rule matched"))


def describe(evidence: AttemptEvidence, why: str) -> str:
    if evidence.exit is None:
        text = "stalled" if evidence.stalled else "ended by the supervisor"
    else:
        text = ("stalled, then " if evidence.stalled else "") + evidence.exit.describe()
    record = evidence.record
    if record is not None:
        short_type = record.error_type.rsplit(".", 1)[-1]
        text += f", {short_type}"
        if record.phase:
            text += f" in phase {record.phase} at step {record.global_step}"
    return f"{text} ({why})"
