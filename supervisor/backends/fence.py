"""The fence: the next attempt may start only when nothing of the last one is alive, on any node.

Local processes are found by the attempt's marker; Ray actors and placement groups, on every node, by the state
API for the attempt's Ray job. A driver's ordinary actors and placement groups die with it (Ray's ownership); the
ones that outlive it are detached, or actors whose worker does not die. Actors are killed by id through the GCS
(``supervisor.mechanisms.ray_kill``) unless ``teardown.kill_stray_actors`` is off; placement groups are removed
by id unless ``teardown.remove_stray_placement_groups`` is off: a leaked group keeps its bundles' GPUs reserved
and the next attempt's workers would wait for them forever. On a cluster of several machines, a task pinned to
each node of the attempt then ends the attempt's marked processes there and asks NVML whether any of them still
holds GPU memory (``supervisor.mechanisms.node_probe``). Whatever is still alive at the deadline is reported,
and the supervisor does not relaunch next to it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

import psutil

from supervisor.backends.base import TeardownResult
from supervisor.config import TeardownConfig
from supervisor.mechanisms.gpu_memory import GpuMemoryCheck, gpu_memory_holders
from supervisor.mechanisms.node_probe import NodeSweep
from supervisor.mechanisms.processes import ProcessInfo, TerminationReport, terminate_processes
from supervisor.mechanisms.ray_kill import KillResult, kill_actors, remove_placement_groups
from supervisor.mechanisms.ray_resources import cluster_resources, still_held
from supervisor.mechanisms.ray_state import LiveActor, LivePlacementGroup, RayStateClient

logger = logging.getLogger(__name__)

POLL_S = 0.1


@dataclass
class FenceResult:
    terminated: list[ProcessInfo] = field(default_factory=list)
    killed: list[ProcessInfo] = field(default_factory=list)
    survivors: list[ProcessInfo] = field(default_factory=list)
    actors_killed: list[str] = field(default_factory=list)
    actors_alive: int | None = None
    placement_groups_removed: list[str] = field(default_factory=list)
    placement_groups_alive: int | None = None
    resources_held: dict[str, float] = field(default_factory=dict)
    gpu_memory: str | None = None
    """What NVML said of the attempt's processes on this machine's GPUs (``GpuMemoryCheck.summary``)."""
    nodes: str | None = None
    """What the sweep of the attempt's nodes found (``NodeSweep.summary``); None: not swept (one machine)."""
    problems: list[str] = field(default_factory=list)

    def teardown_result(
        self, started: float, stopped: TerminationReport | None = None, problems: Sequence[str] = ()
    ) -> TeardownResult:
        """The whole teardown: what stopping the driver did (``stopped``), then what the fence found and did;
        ``started`` is the teardown's ``time.monotonic()`` start."""
        return TeardownResult(
            duration_s=time.monotonic() - started,
            terminated=(stopped.terminated if stopped else ()) + tuple(self.terminated),
            killed=(stopped.killed if stopped else ()) + tuple(self.killed),
            survivors=tuple(self.survivors),
            actors_alive=self.actors_alive,
            actors_killed=tuple(self.actors_killed),
            placement_groups_removed=tuple(self.placement_groups_removed),
            placement_groups_alive=self.placement_groups_alive,
            resources_held=dict(self.resources_held),
            gpu_memory=self.gpu_memory,
            nodes=self.nodes,
            problems=(*problems, *self.problems),
        )


@dataclass
class RayFence:
    """Removes and verifies the end of one attempt's processes and Ray actors."""

    state: RayStateClient | None
    """The cluster's state API; None when there is none to ask (then local processes alone decide)."""
    gcs_address: str | None
    """Where stray actors are killed; None: they are only waited for."""
    config: TeardownConfig
    kill_timeout_s: float = 10.0
    """Bound on the kill-by-id RPC (``ray.api_timeout_s``)."""
    gpu_check: Callable[[Collection[int]], GpuMemoryCheck] = gpu_memory_holders
    sweep: Callable[[Mapping[str, list[int]], float], NodeSweep] | None = None
    """Ends the attempt's processes, and reads NVML, on each node of the attempt (node id to the attempt's pids
    there), within a time limit (``node_probe.sweep_nodes``); None when every node is this machine."""

    @property
    def kill_stray_actors(self) -> bool:
        return self.config.kill_stray_actors

    def fence(
        self,
        job_id: str | None,
        leftovers: Callable[[], list[psutil.Process]],
        cluster_down: Callable[[], bool] = lambda: False,
        resources_before: Mapping[str, float] | None = None,
        attempt_pids: Collection[int] = (),
    ) -> FenceResult:
        """Wait (up to ``teardown.fence_timeout_s``) until neither ``leftovers()`` nor a live actor or placement
        group of ``job_id`` remains, terminating, killing and removing them on the way; then until the cluster's
        GPUs and custom resources are as available as ``resources_before`` (what they were before the attempt),
        no process of the attempt (``attempt_pids`` and those the fence ended) holds memory on this machine's
        GPUs, and, with ``sweep``, none is left or holds GPU memory on any node of the attempt."""
        result = FenceResult()
        timeout_s = self.config.fence_timeout_s
        grace_s = min(self.config.grace_s, self.config.straggler_grace_s)
        deadline = time.monotonic() + timeout_s
        kill_failures: dict[str, str] = {}
        tried: set[str] = set()
        ended_on: dict[str, set[int]] = {}
        while True:
            processes = leftovers()
            actors = self._live_actors(job_id, cluster_down)
            groups = self._live_groups(job_id, cluster_down)
            result.actors_alive = None if actors is None else len(actors)
            result.placement_groups_alive = None if groups is None else len(groups)
            unasked = self.state is None or job_id is None
            known = unasked or (actors is not None and groups is not None)
            gone = not processes and known and not actors and not groups
            gpu: GpuMemoryCheck | None = None
            swept: NodeSweep | None = None
            if gone:
                result.survivors = []
                result.resources_held = self._held(resources_before, cluster_down)
                gpu = self.gpu_check({*attempt_pids, *(p.pid for p in result.terminated + result.killed)})
                result.gpu_memory = gpu.summary()
                if not result.resources_held and not gpu.holders:
                    swept = self._sweep(job_id, ended_on, deadline, cluster_down)
                    result.nodes = None if swept is None else swept.summary()
                    if swept is None or swept.clean:
                        return result
            if time.monotonic() >= deadline:
                if not gone:
                    left = _Left(processes, actors, groups)
                    result.problems.append(_still_alive(timeout_s, left, kill_failures, self._why_not()))
                if gpu is not None and gpu.holders:
                    result.problems.append(
                        f"after {timeout_s:g} s, processes of the attempt still hold GPU memory: {gpu.summary()}"
                    )
                if gone and result.resources_held:
                    result.problems.append(self._not_back(timeout_s, result.resources_held))
                if swept is not None and not swept.clean:
                    result.problems.append(
                        f"after {timeout_s:g} s, the sweep of the attempt's nodes found: {swept.summary()}"
                    )
                return result
            if processes:
                report = terminate_processes(processes, grace_s, reap_timeout_s=self.config.reap_timeout_s)
                result.terminated += report.terminated
                result.killed += report.killed
                result.survivors = list(report.survivors)
            fresh = [a for a in actors or [] if a.actor_id not in tried]
            if fresh and self.kill_stray_actors and self.gcs_address:
                tried.update(a.actor_id for a in fresh)
                by_id = {a.actor_id: a for a in fresh}
                for outcome in kill_actors(self.gcs_address, list(by_id), self.kill_timeout_s):
                    if outcome.result is KillResult.FAILED:
                        kill_failures[outcome.target_id] = outcome.message
                    else:
                        result.actors_killed.append(_label(by_id[outcome.target_id]))
            fresh_groups = [g for g in groups or [] if g.placement_group_id not in tried]
            if fresh_groups and self.config.remove_stray_placement_groups and self.gcs_address:
                tried.update(g.placement_group_id for g in fresh_groups)
                by_group = {g.placement_group_id: g for g in fresh_groups}
                for outcome in remove_placement_groups(self.gcs_address, list(by_group), self.kill_timeout_s):
                    if outcome.result is KillResult.FAILED:
                        kill_failures[outcome.target_id] = outcome.message
                    else:
                        result.placement_groups_removed.append(_group_label(by_group[outcome.target_id]))
            time.sleep(POLL_S)

    def _sweep(
        self, job_id: str | None, ended_on: dict[str, set[int]], deadline: float, cluster_down: Callable[[], bool]
    ) -> NodeSweep | None:
        if self.sweep is None or cluster_down():
            return None
        try:
            nodes = self.state.attempt_nodes(job_id) if self.state is not None else {}
        except Exception as exc:  # noqa: BLE001 - asked again until the deadline
            return NodeSweep(unanswered={"?": f"the state API did not name the attempt's nodes: {exc}"})
        known = {node: sorted({*pids, *ended_on.get(node, ())}) for node, pids in nodes.items()}
        swept = self.sweep(known, max(5.0, deadline - time.monotonic()))
        for scan in swept.scans:
            ended_on.setdefault(scan.node_id, set()).update(pid for pid, _ in scan.terminated)
        return swept

    def _live_actors(self, job_id: str | None, cluster_down: Callable[[], bool]) -> list[LiveActor] | None:
        if self.state is None or job_id is None:
            return None
        try:
            return self.state.live_actors(job_id)
        except Exception as exc:  # noqa: BLE001 - an unreachable dashboard is retried until the deadline
            if cluster_down():
                return []  # a cluster that is down has no live actors
            logger.warning("state API did not answer: %s", exc)
            return None

    def _live_groups(self, job_id: str | None, cluster_down: Callable[[], bool]) -> list[LivePlacementGroup] | None:
        if self.state is None or job_id is None:
            return None
        try:
            return self.state.live_placement_groups(job_id)
        except Exception as exc:  # noqa: BLE001 - retried until the deadline, as for actors
            if cluster_down():
                return []
            logger.warning("state API did not answer: %s", exc)
            return None

    def _held(self, before: Mapping[str, float] | None, cluster_down: Callable[[], bool]) -> dict[str, float]:
        if not before or not self.config.wait_for_resources or not self.gcs_address or cluster_down():
            return {}
        try:
            available, _ = cluster_resources(self.gcs_address, self.kill_timeout_s)
        except Exception as exc:  # noqa: BLE001 - the GCS is asked again until the deadline
            logger.warning("GCS did not say which resources are available: %s", exc)
            return dict(before)
        return still_held(before, available)

    def _not_back(self, timeout_s: float, held: Mapping[str, float]) -> str:
        amounts = ", ".join(f"{name} {amount:g}" for name, amount in sorted(held.items()))
        holders = ""
        if self.state is not None:
            try:
                groups = self.state.live_placement_groups()
                named = [f"{_group_label(g)} of job {g.creator_job_id}" for g in groups]
                holders = "; live placement groups: " + (", ".join(named) or "none")
            except Exception:  # noqa: BLE001 - the message names what it can
                holders = ""
        return (
            f"after {timeout_s:g} s, resources available before the attempt are still held: {amounts}{holders} "
            f"(teardown.wait_for_resources=false skips this check on a cluster shared with other jobs)"
        )

    def _why_not(self) -> dict[str, str]:
        """Why what is left was not ended, per kind ("" when it was tried)."""
        if not self.gcs_address:
            return {"actors": "no GCS address to kill them through", "groups": "no GCS address to remove them through"}
        return {
            "actors": "" if self.kill_stray_actors else "teardown.kill_stray_actors is off",
            "groups": ""
            if self.config.remove_stray_placement_groups
            else "teardown.remove_stray_placement_groups is off",
        }


@dataclass(frozen=True)
class _Left:
    processes: list[psutil.Process]
    actors: list[LiveActor] | None
    groups: list[LivePlacementGroup] | None


def _group_label(group: LivePlacementGroup) -> str:
    detached = " (detached)" if group.is_detached else ""
    return f"placement group {group.name or group.placement_group_id[:12]}{detached}"


def _label(actor: LiveActor) -> str:
    return f"{actor.class_name} {actor.name or actor.actor_id[:12]}"


def _still_alive(timeout_s: float, left: _Left, kill_failures: dict[str, str], why_not: dict[str, str]) -> str:
    names = [f"{p.name}[{p.pid}]" for p in map(ProcessInfo.of, left.processes)]
    for actor in left.actors or []:
        failure = kill_failures.get(actor.actor_id)
        where = f"actor {_label(actor)} on node {(actor.node_id or '?')[:12]}"
        names.append(f"{where} (kill failed: {failure})" if failure else where)
    for group in left.groups or []:
        failure = kill_failures.get(group.placement_group_id)
        where = f"{_group_label(group)} {group.state}"
        names.append(f"{where} (removal failed: {failure})" if failure else where)
    actors = "an unknown number of" if left.actors is None else str(len(left.actors))
    groups = "an unknown number of" if left.groups is None else str(len(left.groups))
    message = (
        f"after {timeout_s:g} s, {len(left.processes)} processes, {actors} Ray actors and {groups} placement groups "
        f"of the attempt are still alive: {', '.join(names) or 'none identified (the state API did not answer)'}"
    )
    if left.actors and why_not["actors"]:
        message += f"; the actors were not killed: {why_not['actors']}"
    if left.groups and why_not["groups"]:
        message += f"; the placement groups were not removed: {why_not['groups']}"
    return message


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
