"""What the supervisor does after an attempt ended, decided from everything observed of it so far.

The loop (``supervisor.loop``) observes, asks ``next_step``, carries the step out, adds what that showed to the
``Observed`` snapshot and asks again, the way the fence does (``supervisor.policy.fence``). Everything here is a
pure function of values: every branch is a table-driven test that starts nothing.

The order is the order of what a relaunch needs:

1. the verdict on the attempt (``Record``): a resume that was not honoured first (the attempt trained from the
   wrong step, whatever it died of), then a full checkpoint disk (every relaunch would fail at its next save),
   then the classification rules;
2. the teardown and its fence (``TearDown``): nothing may start next to what is left of an attempt;
3. the restart policy (budget, crash loop, repeated failure, backoff);
4. before a restart, the nodes the attempt used (``ReadNodes``), then those to drain (``Exclude``), then whether
   what is left can hold the job.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from supervisor.config import NodesConfig, RestartConfig, RuleConfig
from supervisor.mechanisms.volume import CheckpointSpace
from supervisor.outcomes import Action, ExitCode
from supervisor.policy import disk, nodes
from supervisor.policy.nodes import Exclusion, NodeFindings
from supervisor.policy.restart import Decision, Restart, Stop, after_attempt, after_teardown, resume_not_honoured
from supervisor.policy.rules import AttemptEvidence, Classification, classify
from supervisor.run.history import RunHistory

if sys.version_info >= (3, 11):
    from typing import assert_never
else:  # Python 3.10
    from typing_extensions import assert_never


@dataclass(frozen=True)
class Fence:
    """What the teardown's fence concluded."""

    fenced: bool
    problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class Observed:
    """Everything observed of an ended attempt so far; each step of the loop adds what it learnt."""

    evidence: AttemptEvidence
    mismatch: str | None = None
    """Why the attempt's weight syncs showed it did not resume from the chosen checkpoint (None: they did not)."""
    space: CheckpointSpace | None = None
    """The checkpoint volume, read at the attempt's end (None: a clean exit, not read)."""
    recorded: Classification | None = None
    """The verdict, once recorded in the run's history."""
    fence: Fence | None = None
    restart: Restart | None = None
    """The restart decided once the attempt was fenced, while its nodes are judged."""
    nodes: NodeFindings | None = None
    drained_before: frozenset[str] = frozenset()
    """Nodes the supervisor drained after earlier attempts."""
    drained: tuple[Exclusion, ...] | None = None
    """The exclusions Ray accepted before the next attempt (None: none asked for yet)."""


@dataclass(frozen=True)
class Record:
    """Record the verdict on the attempt (history, ``attempt_exited``)."""

    classification: Classification


@dataclass(frozen=True)
class TearDown:
    """Tear the attempt down and fence it."""


@dataclass(frozen=True)
class ReadNodes:
    """Read the health of the nodes the attempt used, with ``restart`` decided."""

    restart: Restart


@dataclass(frozen=True)
class Exclude:
    """Drain these nodes in Ray before the next attempt."""

    exclusions: tuple[Exclusion, ...]


Step = Record | TearDown | ReadNodes | Exclude | Restart | Stop


@dataclass(frozen=True)
class Rules:
    """The configuration the judgement reads."""

    rules: Sequence[RuleConfig]
    default_action: Action
    restart: RestartConfig
    nodes: NodesConfig


def verdict(observed: Observed, rules: Sequence[RuleConfig], default_action: Action) -> Classification:
    """The attempt's classification: a resume not honoured, a full checkpoint disk, else the rules."""
    if observed.mismatch is not None:
        return resume_not_honoured(observed.mismatch)
    full = disk_verdict(observed.evidence, observed.space)
    return full or classify(observed.evidence, rules, default_action)


def disk_verdict(evidence: AttemptEvidence, space: CheckpointSpace | None) -> Classification | None:
    """A failed attempt whose checkpoint volume has less free than the next save needs."""
    if space is None or evidence.clean_exit:
        return None
    error = evidence.record
    texts = [evidence.log_tail, *((error.message, error.traceback) if error is not None else ())]
    return disk.disk_full(texts, space)


def next_step(observed: Observed, history: RunHistory, rules: Rules, rng: random.Random) -> Step:
    """What to do next about the ended attempt. ``rng`` draws the backoff's jitter, once: the restart is kept in
    ``Observed.restart`` while the nodes are judged."""
    if observed.recorded is None:
        return Record(verdict(observed, rules.rules, rules.default_action))
    if observed.fence is None:
        return TearDown()
    if observed.restart is None:
        stopped = after_teardown(observed.fence.fenced, observed.fence.problems)
        decision: Decision = stopped or after_attempt(history, observed.recorded, rules.restart, rng)
        return decision if isinstance(decision, Stop) else ReadNodes(decision)
    if observed.nodes is None:
        return ReadNodes(observed.restart)
    return after_nodes(observed, observed.restart, history, rules.nodes)


def after_nodes(observed: Observed, restart: Restart, history: RunHistory, config: NodesConfig) -> Step:
    """Drain the nodes the next attempt must not land on, and stop when what is left cannot run the job."""
    found = observed.nodes
    assert found is not None
    if not config.exclude:
        return restart
    if found.single_machine:
        unhealthy = nodes.unhealthy_machine(found.health)
        return Stop(ExitCode.NO_HEALTHY_CAPACITY, unhealthy) if unhealthy else restart
    if observed.drained is None:
        failed = [set(a.failure_nodes) for a in history.attempts if a.failed and not a.interrupted][-2:]
        wanted = nodes.exclusions(found.health, failed, found.used, found.cluster, observed.drained_before)
        return Exclude(tuple(wanted)) if wanted else restart
    if not observed.drained:
        return restart
    demand = dict(found.demand)
    missing = nodes.shortfall(demand, found.cluster, {*observed.drained_before, *_ids(observed.drained)})
    if missing:
        return Stop(ExitCode.NO_HEALTHY_CAPACITY, nodes.capacity_lost(missing, demand, observed.drained))
    return restart


def _ids(exclusions: Collection[Exclusion]) -> set[str]:
    return {exclusion.node_id for exclusion in exclusions}


def describe(step: Step) -> str:
    """One line for a step (logs and tests)."""
    match step:
        case Record(classification):
            return f"record {classification.action.value} ({classification.rule})"
        case TearDown():
            return "tear down"
        case ReadNodes():
            return "read the nodes"
        case Exclude(exclusions):
            return f"drain {', '.join(e.node_id[:8] for e in exclusions)}"
        case Restart(delay_s):
            return f"restart in {delay_s:g} s"
        case Stop(exit_code):
            return f"stop with exit {int(exit_code)}"
        case _:
            assert_never(step)
