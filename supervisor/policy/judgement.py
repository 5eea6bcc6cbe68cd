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
   what is left can hold the job: after a preemption, waiting a bounded time for a node to take the preempted
   one's place (``AwaitCapacity``).
"""

from __future__ import annotations

import random
import sys
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from supervisor.config import NodesConfig, PreemptionConfig, RestartConfig, RuleConfig
from supervisor.mechanisms.volume import CheckpointSpace
from supervisor.outcomes import Action, ExitCode
from supervisor.policy import disk, nodes
from supervisor.policy.nodes import Exclusion, NodeFindings
from supervisor.policy.restart import (
    Decision,
    Restart,
    Stop,
    after_attempt,
    after_teardown,
    preempted_attempt,
    resume_not_honoured,
)
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
class Preemption:
    """Ray drained nodes the attempt held while it ran (a preemption notice)."""

    nodes: frozenset[str]
    reason: str
    """What happened, for the attempt's verdict (the nodes, the deadline, what was saved)."""


@dataclass(frozen=True)
class Capacity:
    """How the wait for the cluster to hold the job again ended."""

    met: bool
    waited_s: float
    missing: tuple[tuple[str, float], ...] = ()
    """What was still short when the wait ended (resource name, amount)."""


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
    preemption: Preemption | None = None
    """The attempt's nodes Ray drained while it ran (None: no preemption notice)."""
    capacity: Capacity | None = None
    """How the wait for capacity ended (None: not waited)."""


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


@dataclass(frozen=True)
class AwaitCapacity:
    """Wait at most ``wait_s`` until the live nodes, less ``gone`` and those Ray is draining, hold ``demand``."""

    demand: tuple[tuple[str, float], ...]
    gone: frozenset[str]
    wait_s: float


Step = Record | TearDown | ReadNodes | Exclude | AwaitCapacity | Restart | Stop


@dataclass(frozen=True)
class Rules:
    """The configuration the judgement reads."""

    rules: Sequence[RuleConfig]
    default_action: Action
    restart: RestartConfig
    nodes: NodesConfig
    preemption: PreemptionConfig


def verdict(observed: Observed, rules: Sequence[RuleConfig], default_action: Action) -> Classification:
    """The attempt's classification: a resume not honoured, a full checkpoint disk, a preemption (unless the job
    finished), else the rules."""
    if observed.mismatch is not None:
        return resume_not_honoured(observed.mismatch)
    full = disk_verdict(observed.evidence, observed.space)
    if full is not None:
        return full
    if observed.preemption is not None and not observed.evidence.clean_exit:
        return preempted_attempt(observed.preemption.reason)
    return classify(observed.evidence, rules, default_action)


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
    return after_nodes(observed, observed.restart, history, rules)


def after_nodes(observed: Observed, restart: Restart, history: RunHistory, rules: Rules) -> Step:
    """Drain the nodes the next attempt must not land on; after a preemption, wait for what the job needs; stop
    when what is left cannot run the job."""
    found = observed.nodes
    assert found is not None
    if found.single_machine:
        unhealthy = nodes.unhealthy_machine(found.health) if rules.nodes.exclude else None
        return Stop(ExitCode.NO_HEALTHY_CAPACITY, unhealthy) if unhealthy else restart
    if rules.nodes.exclude and observed.drained is None:
        failed = [set(a.failure_nodes) for a in history.attempts if a.failed and not a.interrupted][-2:]
        wanted = nodes.exclusions(found.health, failed, found.used, found.cluster, observed.drained_before)
        if wanted:
            return Exclude(tuple(wanted))
    drained = observed.drained or ()
    preempted = observed.preemption.nodes if observed.preemption is not None else frozenset()
    if not drained and not preempted:
        return restart
    demand = dict(found.demand)
    gone = frozenset({*observed.drained_before, *_ids(drained), *preempted})
    missing = nodes.shortfall(demand, found.cluster, gone)
    if not missing:
        return restart
    if not preempted:
        return Stop(ExitCode.NO_HEALTHY_CAPACITY, nodes.capacity_lost(missing, demand, drained))
    if observed.capacity is None and rules.preemption.replacement_wait_s > 0:
        return AwaitCapacity(tuple(sorted(demand.items())), gone, rules.preemption.replacement_wait_s)
    if observed.capacity is not None and observed.capacity.met:
        return restart
    short = dict(observed.capacity.missing) if observed.capacity is not None else missing
    return Stop(ExitCode.NO_HEALTHY_CAPACITY, capacity_after_preemption(short, demand, rules.preemption))


def capacity_after_preemption(
    missing: Mapping[str, float], demand: Mapping[str, float], config: PreemptionConfig
) -> str:
    needs = ", ".join(f"{name} {demand[name]:g} ({lack:g} short)" for name, lack in sorted(missing.items()))
    return (
        f"after the preemption, the nodes left cannot hold the job: it reserved {needs}, and no node made up for "
        f"it within preemption.replacement_wait_s={config.replacement_wait_s:g} s. Add nodes, then start the "
        f"supervisor again on this run directory: it resumes from the checkpoint the preempted attempt saved"
    )


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
        case AwaitCapacity(demand, _, wait_s):
            return f"wait up to {wait_s:g} s for {', '.join(f'{name} {amount:g}' for name, amount in demand)}"
        case Restart(delay_s):
            return f"restart in {delay_s:g} s"
        case Stop(exit_code):
            return f"stop with exit {int(exit_code)}"
        case _:
            assert_never(step)
