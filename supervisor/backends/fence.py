"""The fence: the next attempt may start only when nothing of the last one is alive, on any node.

One executor for every backend. It looks at what is left of the attempt (``AttemptView``), asks the pure
judgement (``supervisor.policy.fence.next_step``) what to do, does it through the view's primitives, and looks
again, on the loop's clock, until the judgement says ``Fenced`` or gives up at ``teardown.fence_timeout_s``.

Local processes are found by the attempt's marker; Ray actors and placement groups, on every node, by the state
API for the attempt's Ray job. A driver's ordinary actors and placement groups die with it (Ray's ownership); the
ones that outlive it are detached, or actors whose worker does not die. Actors are killed by id through the GCS
(``supervisor.mechanisms.ray_kill``) unless ``teardown.kill_stray_actors`` is off; placement groups are removed
by id unless ``teardown.remove_stray_placement_groups`` is off: a leaked group keeps its bundles' GPUs reserved
and the next attempt's workers would wait for them forever. On a cluster of several machines, a task pinned to
each node of the attempt then ends the attempt's marked processes there and asks NVML whether any of them still
holds GPU memory (``supervisor.mechanisms.node_probe``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace

import psutil

from supervisor.clock import Clock
from supervisor.config import TeardownConfig
from supervisor.mechanisms.gpu_memory import GpuMemoryCheck, gpu_memory_holders
from supervisor.mechanisms.node_probe import NodeSweep
from supervisor.mechanisms.node_scan import NodeScan
from supervisor.mechanisms.processes import ProcessInfo, terminate_processes
from supervisor.mechanisms.ray_kill import KillOutcome, KillResult, kill_actors, remove_placement_groups
from supervisor.mechanisms.ray_resources import cluster_resources, still_held
from supervisor.mechanisms.ray_state import RayStateClient
from supervisor.policy.fence import (
    CheckGpus,
    CheckResources,
    Fenced,
    FenceRules,
    GiveUp,
    Kill,
    Remove,
    Seen,
    Step,
    Sweep,
    Terminate,
    Tried,
    Wait,
    actor_label,
    group_label,
    next_step,
)

logger = logging.getLogger(__name__)

Sweeper = Callable[[Mapping[str, list[int]], float], NodeSweep]
"""Ends the attempt's processes, and reads NVML, on each node of the attempt (node id to the attempt's pids
there), within a time limit (``node_probe.attempt_sweeper``)."""


@dataclass(frozen=True)
class FenceResult:
    """What the fence found and did."""

    terminated: tuple[ProcessInfo, ...] = ()
    killed: tuple[ProcessInfo, ...] = ()
    survivors: tuple[ProcessInfo, ...] = ()
    actors_killed: tuple[str, ...] = ()
    actors_alive: int | None = None
    """Ray actors of the attempt's job still alive at the end (None: not known)."""
    placement_groups_removed: tuple[str, ...] = ()
    placement_groups_alive: int | None = None
    resources_held: dict[str, float] = field(default_factory=dict)
    gpu_memory: str | None = None
    """What NVML said of the attempt's processes on this machine's GPUs (``GpuMemoryCheck.summary``)."""
    nodes: str | None = None
    """What the sweep of the attempt's nodes found (``NodeSweep.summary``); None: not swept (one machine)."""
    ray_job_id: str | None = None
    problems: tuple[str, ...] = ()
    node_readings: tuple[NodeScan, ...] = field(default=(), metadata={"event": False})
    """Each swept node's answer, its GPUs' health included (for the judgement of the nodes, not the event)."""


@dataclass
class AttemptView:
    """The primitives the fence acts through, for one attempt on one cluster. Every question to the cluster is
    bounded by ``api_timeout_s``; an unanswered one is an unknown, asked again until the fence's deadline."""

    leftovers: Callable[[], list[psutil.Process]]
    """This machine's processes with the attempt's marker."""
    ray_job_id: str | None = None
    state: RayStateClient | None = None
    """The cluster's state API; None when there is none to ask (then local processes alone decide)."""
    gcs_address: str | None = None
    """Where stray actors are killed and resources read; None: neither."""
    cluster_down: Callable[[], bool] = lambda: False
    resources_before: Mapping[str, float] | None = None
    """The cluster's GPUs and custom resources available when the attempt was launched (None: unknown)."""
    attempt_pids: Collection[int] = ()
    """Processes of the attempt already ended (by stopping its driver): NVML is asked about them too."""
    sweeper: Sweeper | None = None
    """None when every node is this machine."""
    api_timeout_s: float = 10.0
    gpu_check: Callable[[Collection[int]], GpuMemoryCheck] = gpu_memory_holders
    problems: tuple[str, ...] = ()
    """What keeps the fence from holding whatever it finds (the attempt's Ray job could not be named)."""

    def look(self, before: Seen | None = None) -> tuple[Seen, dict[int, psutil.Process]]:
        """What is left now; ``before``: the last look, whose sweep is remembered."""
        processes = {p.pid: p for p in self.leftovers()}
        down = self.cluster_down()
        seen = Seen(
            processes=tuple(ProcessInfo.of(p) for p in processes.values()),
            actors=self._ask(lambda state, job: tuple(state.live_actors(job)), down),
            groups=self._ask(lambda state, job: tuple(state.live_placement_groups(job)), down),
            cluster_down=down,
            swept_before=None if before is None else before.nodes or before.swept_before,
        )
        return seen, processes

    def _ask(self, question: Callable[[RayStateClient, str], tuple], down: bool) -> tuple | None:
        if self.state is None or self.ray_job_id is None:
            return ()  # nothing to ask: the local processes alone decide
        try:
            return question(self.state, self.ray_job_id)
        except Exception as exc:  # noqa: BLE001 - an unreachable dashboard is asked again until the deadline
            if down:
                return ()  # a cluster that is down has nothing alive
            logger.warning("state API did not answer: %s", exc)
            return None

    def kill_actors(self, actor_ids: tuple[str, ...]) -> list[KillOutcome]:
        assert self.gcs_address is not None
        return kill_actors(self.gcs_address, list(actor_ids), self.api_timeout_s)

    def remove_groups(self, group_ids: tuple[str, ...]) -> list[KillOutcome]:
        assert self.gcs_address is not None
        return remove_placement_groups(self.gcs_address, list(group_ids), self.api_timeout_s)

    def resources_held(self) -> tuple[dict[str, float], str]:
        """What of ``resources_before`` is not available now, and who holds it (the live placement groups)."""
        assert self.gcs_address is not None
        assert self.resources_before is not None
        try:
            available, _ = cluster_resources(self.gcs_address, self.api_timeout_s)
        except Exception as exc:  # noqa: BLE001 - the GCS is asked again until the deadline
            logger.warning("GCS did not say which resources are available: %s", exc)
            held = dict(self.resources_before)
        else:
            held = still_held(self.resources_before, available)
        return held, self._group_holders() if held else ""

    def _group_holders(self) -> str:
        if self.state is None:
            return ""
        try:
            groups = self.state.live_placement_groups()
        except Exception:  # noqa: BLE001 - the message names what it can
            return ""
        return ", ".join(f"{group_label(g)} of job {g.creator_job_id}" for g in groups) or "none"

    def sweep(self, ended_on: Mapping[str, Collection[int]], limit_s: float) -> NodeSweep:
        assert self.sweeper is not None
        try:
            nodes = self.state.attempt_nodes(self.ray_job_id) if self.state is not None else {}
        except Exception as exc:  # noqa: BLE001 - asked again until the deadline
            return NodeSweep(unanswered={"?": f"the state API did not name the attempt's nodes: {exc}"})
        known = {node: sorted({*pids, *ended_on.get(node, ())}) for node, pids in nodes.items()}
        return self.sweeper(known, limit_s)


def fence_rules(config: TeardownConfig, view: AttemptView) -> FenceRules:
    """What the fence may do and must check for ``view``, under ``teardown.*``."""
    no_gcs = not view.gcs_address
    return FenceRules(
        timeout_s=config.fence_timeout_s,
        grace_s=min(config.grace_s, config.straggler_grace_s),
        reap_timeout_s=config.reap_timeout_s,
        why_actors_stay="no GCS address to kill them through"
        if no_gcs
        else ("" if config.kill_stray_actors else "teardown.kill_stray_actors is off"),
        why_groups_stay="no GCS address to remove them through"
        if no_gcs
        else ("" if config.remove_stray_placement_groups else "teardown.remove_stray_placement_groups is off"),
        check_resources=config.wait_for_resources and bool(view.resources_before) and not no_gcs,
        sweep_nodes=view.sweeper is not None,
    )


@dataclass
class _Done:
    """What the fence did so far, for its result."""

    terminated: list[ProcessInfo] = field(default_factory=list)
    killed: list[ProcessInfo] = field(default_factory=list)
    survivors: list[ProcessInfo] = field(default_factory=list)
    actors_killed: list[str] = field(default_factory=list)
    groups_removed: list[str] = field(default_factory=list)
    ended_on: dict[str, set[int]] = field(default_factory=dict)
    """Per node, the pids the sweep ended there: NVML is asked about them on the next sweep."""


def fence(view: AttemptView, rules: FenceRules, clock: Clock | None = None) -> FenceResult:
    """Look, decide, act, until the judgement says the attempt is fenced or gives up."""
    clock = clock or Clock()
    deadline = clock.monotonic() + rules.timeout_s
    tried, done = Tried(), _Done()
    seen, processes = view.look()
    while True:
        step: Step = next_step(seen, tried, rules, deadline - clock.monotonic())
        match step:
            case Terminate(pids, grace_s, reap_s):
                report = terminate_processes([processes[pid] for pid in pids], grace_s, reap_timeout_s=reap_s)
                done.terminated += report.terminated
                done.killed += report.killed
                done.survivors = list(report.survivors)
                seen, processes = view.look(seen)
            case Kill(actor_ids):
                labels = {a.actor_id: actor_label(a) for a in seen.actors or ()}
                tried = _tried(tried, actor_ids, view.kill_actors(actor_ids), labels, done.actors_killed)
                seen, processes = view.look(seen)
            case Remove(group_ids):
                labels = {g.placement_group_id: group_label(g) for g in seen.groups or ()}
                tried = _tried(tried, group_ids, view.remove_groups(group_ids), labels, done.groups_removed)
                seen, processes = view.look(seen)
            case CheckResources():
                held, holders = view.resources_held()
                seen = replace(seen, resources_held=held, resource_holders=holders)
            case CheckGpus():
                ended = {p.pid for p in done.terminated + done.killed}
                seen = replace(seen, gpu=view.gpu_check({*view.attempt_pids, *ended}))
            case Sweep(limit_s):
                swept = view.sweep(done.ended_on, limit_s)
                for scan in swept.scans:
                    done.ended_on.setdefault(scan.node_id, set()).update(pid for pid, _ in scan.terminated)
                seen = replace(seen, nodes=swept)
            case Wait(seconds):
                clock.sleep(seconds)
                seen, processes = view.look(seen)
            case Fenced():
                return _result(seen, done, view, ())
            case GiveUp(problems):
                return _result(seen, done, view, problems)


def _tried(
    tried: Tried, ids: tuple[str, ...], outcomes: list[KillOutcome], labels: Mapping[str, str], ended: list[str]
) -> Tried:
    failures = dict(tried.failures)
    for outcome in outcomes:
        if outcome.result is KillResult.FAILED:
            failures[outcome.target_id] = outcome.message
        else:
            ended.append(labels.get(outcome.target_id, outcome.target_id))
    return Tried(tried.ids | set(ids), failures)


def _result(seen: Seen, done: _Done, view: AttemptView, problems: tuple[str, ...]) -> FenceResult:
    asked = view.state is not None and view.ray_job_id is not None
    return FenceResult(
        terminated=tuple(done.terminated),
        killed=tuple(done.killed),
        survivors=tuple(done.survivors) if seen.processes else (),
        actors_killed=tuple(done.actors_killed),
        actors_alive=len(seen.actors) if asked and seen.actors is not None else None,
        placement_groups_removed=tuple(done.groups_removed),
        placement_groups_alive=len(seen.groups) if asked and seen.groups is not None else None,
        resources_held=dict(seen.resources_held or {}),
        gpu_memory=None if seen.gpu is None else seen.gpu.summary(),
        nodes=None if seen.nodes is None else seen.nodes.summary(),
        ray_job_id=view.ray_job_id,
        problems=(*view.problems, *problems),
        node_readings=tuple((seen.nodes or seen.swept_before or NodeSweep()).scans),
    )


def resources_now(gcs_address: str | None, timeout_s: float) -> dict[str, float] | None:
    """What is available now, for the fence after the attempt to compare against (None: the GCS did not say)."""
    if not gcs_address:
        return None
    try:
        available, _ = cluster_resources(gcs_address, timeout_s)
    except Exception as exc:  # noqa: BLE001 - without it the fence checks processes, actors and groups only
        logger.warning("GCS did not say which resources are available before the attempt: %s", exc)
        return None
    return available
