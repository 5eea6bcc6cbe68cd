"""What the fence does next, decided from what it has seen of the attempt and how much time is left.

The fence (``supervisor.backends.fence``) looks, asks ``next_step``, carries the step out and looks again, the
way tenacity separates deciding from doing. Everything here is a pure function of values, so every branch, the
deadline included, is a table-driven test that starts nothing.

The order of what is asked is the order of what a relaunch needs: first no process, actor or placement group of
the attempt may be alive; then the cluster's GPUs and custom resources must be as available as before the
attempt, and no process of it may hold memory on this machine's GPUs; then, on a cluster of several machines,
the sweep of the attempt's nodes must find nothing. Whatever is still there at the deadline is named in a
problem, and the supervisor does not relaunch next to it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from supervisor.mechanisms.gpu_memory import GpuMemoryCheck
from supervisor.mechanisms.node_probe import NodeSweep
from supervisor.mechanisms.processes import ProcessInfo
from supervisor.mechanisms.ray_state import LiveActor, LivePlacementGroup

POLL_S = 0.1
"""Between two looks at what is left: the state API answers in milliseconds, and a fence that waits on a
detached actor's death wants to see it soon."""
MIN_SWEEP_S = 5.0
"""The least time a sweep of the attempt's nodes is given: its probe starts a Ray task on each node, which takes
seconds, so a shorter sweep could only fail. The first sweep gets it even past the deadline (without one the
fence proves nothing of the other nodes); a later one is not started with less time left."""


@dataclass(frozen=True)
class Seen:
    """One look at what is left of the attempt. The later checks are None until the judgement asks for them."""

    processes: tuple[ProcessInfo, ...] = ()
    """This machine's processes that carry the attempt's marker."""
    actors: tuple[LiveActor, ...] | None = ()
    """Live actors of the attempt's Ray job; None: the state API did not answer (empty when there is none to ask)."""
    groups: tuple[LivePlacementGroup, ...] | None = ()
    """Its placement groups not removed; None: the state API did not answer."""
    cluster_down: bool = False
    """A cluster that is down holds nothing: its resources are not waited for and its nodes not swept."""
    resources_held: Mapping[str, float] | None = None
    """GPUs and custom resources available before the attempt and not now (None: not looked at yet)."""
    resource_holders: str = ""
    """Who holds them, for the message (the live placement groups of every job)."""
    gpu: GpuMemoryCheck | None = None
    """What NVML says of the attempt's processes on this machine's GPUs (None: not looked at yet)."""
    nodes: NodeSweep | None = None
    """What the sweep of the attempt's nodes found (None: not swept yet)."""
    swept_before: NodeSweep | None = None
    """What the last sweep before this look found: named when the deadline leaves no time for another."""

    @property
    def gone(self) -> bool:
        """No process, actor or placement group of the attempt is known to be alive."""
        return not self.processes and self.actors == () and self.groups == ()


@dataclass(frozen=True)
class FenceRules:
    """What the fence may do and must check, from ``teardown.*`` and what the cluster offers."""

    timeout_s: float
    grace_s: float
    """Between SIGTERM and SIGKILL for a process the fence finds."""
    reap_timeout_s: float
    why_actors_stay: str = ""
    """Why stray actors are not killed ("" when they are: ``teardown.kill_stray_actors`` and a GCS to ask)."""
    why_groups_stay: str = ""
    check_resources: bool = False
    """``teardown.wait_for_resources``, and what was available before the attempt is known."""
    sweep_nodes: bool = False
    """The attempt's nodes may be other machines, and ``teardown.sweep_nodes`` is on."""
    poll_s: float = POLL_S


@dataclass(frozen=True)
class Tried:
    """What the fence has already asked the cluster to end: each id once, and why it failed."""

    ids: frozenset[str] = frozenset()
    failures: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Terminate:
    """SIGTERM the processes, SIGKILL them after ``grace_s``, wait ``reap_s`` for the kernel to reap them."""

    pids: tuple[int, ...]
    grace_s: float
    reap_s: float


@dataclass(frozen=True)
class Kill:
    """Kill actors by id, through the GCS."""

    actor_ids: tuple[str, ...]


@dataclass(frozen=True)
class Remove:
    """Remove placement groups by id, through the GCS."""

    group_ids: tuple[str, ...]


@dataclass(frozen=True)
class CheckResources:
    """Ask the GCS what is available now."""


@dataclass(frozen=True)
class CheckGpus:
    """Ask NVML whether the attempt's processes hold memory on this machine's GPUs."""


@dataclass(frozen=True)
class Sweep:
    """End the attempt's processes on each of its nodes and read NVML there, within ``limit_s``."""

    limit_s: float


@dataclass(frozen=True)
class Wait:
    seconds: float


@dataclass(frozen=True)
class Fenced:
    """Nothing of the attempt is left: the next attempt may start."""


@dataclass(frozen=True)
class GiveUp:
    """The deadline passed with something of the attempt left, named in ``problems``."""

    problems: tuple[str, ...]


Step = Terminate | Kill | Remove | CheckResources | CheckGpus | Sweep | Wait | Fenced | GiveUp


def next_step(seen: Seen, tried: Tried, rules: FenceRules, remaining_s: float) -> Step:
    """The fence's next step after ``seen``, with ``remaining_s`` left of ``rules.timeout_s``."""
    if not seen.gone:
        return _end_what_is_alive(seen, tried, rules, remaining_s)
    if rules.check_resources and not seen.cluster_down and seen.resources_held is None:
        return CheckResources()
    if seen.gpu is None:
        return CheckGpus()
    if seen.resources_held or seen.gpu.holders:
        if remaining_s <= 0:
            return GiveUp(_still_held(seen, rules.timeout_s))
        return Wait(min(rules.poll_s, remaining_s))
    if rules.sweep_nodes and not seen.cluster_down:
        return _sweep_the_nodes(seen, rules, remaining_s)
    return Fenced()


def _sweep_the_nodes(seen: Seen, rules: FenceRules, remaining_s: float) -> Step:
    if seen.nodes is not None:  # swept since this look
        if seen.nodes.clean:
            return Fenced()
        if remaining_s <= 0:
            return GiveUp((_swept(seen.nodes, rules.timeout_s),))
        return Wait(min(rules.poll_s, remaining_s))
    if seen.swept_before is None:  # never swept: once, even past the deadline
        return Sweep(max(remaining_s, MIN_SWEEP_S))
    if remaining_s < MIN_SWEEP_S:  # no time for another: what the last one found
        return GiveUp((_swept(seen.swept_before, rules.timeout_s),))
    return Sweep(remaining_s)


def _swept(found: NodeSweep, timeout_s: float) -> str:
    return f"after {timeout_s:g} s, the sweep of the attempt's nodes found: {found.summary()}"


def _end_what_is_alive(seen: Seen, tried: Tried, rules: FenceRules, remaining_s: float) -> Step:
    if remaining_s <= 0:
        return GiveUp((still_alive(seen, tried, rules),))
    # Each stray actor and placement group is asked for once, before processes are (again) terminated: a
    # process that survives SIGKILL (stuck in the kernel) must not keep the fence from freeing the cluster.
    actors = tuple(a.actor_id for a in seen.actors or () if a.actor_id not in tried.ids)
    if actors and not rules.why_actors_stay:
        return Kill(actors)
    groups = tuple(g.placement_group_id for g in seen.groups or () if g.placement_group_id not in tried.ids)
    if groups and not rules.why_groups_stay:
        return Remove(groups)
    if seen.processes:
        grace_s = min(rules.grace_s, remaining_s)
        reap_s = min(rules.reap_timeout_s, max(remaining_s - grace_s, rules.poll_s))
        return Terminate(tuple(p.pid for p in seen.processes), grace_s, reap_s)
    return Wait(min(rules.poll_s, remaining_s))


def still_alive(seen: Seen, tried: Tried, rules: FenceRules) -> str:
    """The problem that names every process, actor and placement group of the attempt still alive."""
    names = [f"{p.name}[{p.pid}]" for p in seen.processes]
    for actor in seen.actors or ():
        failure = tried.failures.get(actor.actor_id)
        where = f"actor {actor_label(actor)} on node {(actor.node_id or '?')[:12]}"
        names.append(f"{where} (kill failed: {failure})" if failure else where)
    for group in seen.groups or ():
        failure = tried.failures.get(group.placement_group_id)
        where = f"{group_label(group)} {group.state}"
        names.append(f"{where} (removal failed: {failure})" if failure else where)
    actors = "an unknown number of" if seen.actors is None else str(len(seen.actors))
    groups = "an unknown number of" if seen.groups is None else str(len(seen.groups))
    message = (
        f"after {rules.timeout_s:g} s, {len(seen.processes)} processes, {actors} Ray actors and {groups} placement "
        f"groups of the attempt are still alive: {', '.join(names) or 'none identified (the state API did not answer)'}"
    )
    if seen.actors and rules.why_actors_stay:
        message += f"; the actors were not killed: {rules.why_actors_stay}"
    if seen.groups and rules.why_groups_stay:
        message += f"; the placement groups were not removed: {rules.why_groups_stay}"
    return message


def _still_held(seen: Seen, timeout_s: float) -> tuple[str, ...]:
    problems = []
    if seen.gpu is not None and seen.gpu.holders:
        problems.append(f"after {timeout_s:g} s, processes of the attempt still hold GPU memory: {seen.gpu.summary()}")
    if seen.resources_held:
        amounts = ", ".join(f"{name} {amount:g}" for name, amount in sorted(seen.resources_held.items()))
        holders = f"; live placement groups: {seen.resource_holders}" if seen.resource_holders else ""
        problems.append(
            f"after {timeout_s:g} s, resources available before the attempt are still held: {amounts}{holders} "
            f"(teardown.wait_for_resources=false skips this check on a cluster shared with other jobs)"
        )
    return tuple(problems)


def group_label(group: LivePlacementGroup) -> str:
    detached = " (detached)" if group.is_detached else ""
    return f"placement group {group.name or group.placement_group_id[:12]}{detached}"


def actor_label(actor: LiveActor) -> str:
    return f"{actor.class_name} {actor.name or actor.actor_id[:12]}"
