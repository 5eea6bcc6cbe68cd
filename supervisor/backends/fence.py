"""The fence: the next attempt may start only when nothing of the last one is alive, on any node.

Local processes are found by the attempt's marker; Ray actors, on every node, by the state API for the
attempt's Ray job. A driver's ordinary actors die with it (Ray's ownership); the ones that outlive it are
detached actors, or actors whose worker does not die. Those are killed by id through the GCS
(``supervisor.mechanisms.ray_kill``) unless ``teardown.kill_stray_actors`` is off. Whatever is still alive at the
deadline is reported, and the supervisor does not relaunch next to it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import psutil

from supervisor.backends.base import TeardownResult
from supervisor.config import TeardownConfig
from supervisor.mechanisms.processes import ProcessInfo, TerminationReport, terminate_processes
from supervisor.mechanisms.ray_kill import KillResult, kill_actors
from supervisor.mechanisms.ray_state import LiveActor, RayStateClient

logger = logging.getLogger(__name__)

POLL_S = 0.1


@dataclass
class FenceResult:
    terminated: list[ProcessInfo] = field(default_factory=list)
    killed: list[ProcessInfo] = field(default_factory=list)
    survivors: list[ProcessInfo] = field(default_factory=list)
    actors_killed: list[str] = field(default_factory=list)
    actors_alive: int | None = None
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

    @property
    def kill_stray_actors(self) -> bool:
        return self.config.kill_stray_actors

    def fence(
        self,
        job_id: str | None,
        leftovers: Callable[[], list[psutil.Process]],
        cluster_down: Callable[[], bool] = lambda: False,
    ) -> FenceResult:
        """Wait (up to ``teardown.fence_timeout_s``) until neither ``leftovers()`` nor a live actor of ``job_id``
        remains, terminating the first and killing the second on the way."""
        result = FenceResult()
        timeout_s = self.config.fence_timeout_s
        grace_s = min(self.config.grace_s, self.config.straggler_grace_s)
        deadline = time.monotonic() + timeout_s
        kill_failures: dict[str, str] = {}
        tried: set[str] = set()
        while True:
            processes = leftovers()
            actors = self._live_actors(job_id, cluster_down)
            result.actors_alive = None if actors is None else len(actors)
            known = actors is not None or self.state is None or job_id is None
            if not processes and known and not actors:
                result.survivors = []
                return result
            if time.monotonic() >= deadline:
                why_not = self._why_not_killed()
                result.problems.append(_still_alive(timeout_s, processes, actors, kill_failures, why_not))
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
                        kill_failures[outcome.actor_id] = outcome.message
                    else:
                        result.actors_killed.append(_label(by_id[outcome.actor_id]))
            time.sleep(POLL_S)

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

    def _why_not_killed(self) -> str:
        if not self.kill_stray_actors:
            return "teardown.kill_stray_actors is off"
        if not self.gcs_address:
            return "no GCS address to kill them through"
        return ""


def _label(actor: LiveActor) -> str:
    return f"{actor.class_name} {actor.name or actor.actor_id[:12]}"


def _still_alive(
    timeout_s: float,
    processes: list[psutil.Process],
    actors: list[LiveActor] | None,
    kill_failures: dict[str, str],
    why_not_killed: str,
) -> str:
    names = [f"{p.name}[{p.pid}]" for p in map(ProcessInfo.of, processes)]
    for actor in actors or []:
        failure = kill_failures.get(actor.actor_id)
        where = f"actor {_label(actor)} on node {(actor.node_id or '?')[:12]}"
        names.append(f"{where} (kill failed: {failure})" if failure else where)
    count = "an unknown number of" if actors is None else str(len(actors))
    message = (
        f"after {timeout_s:g} s, {len(processes)} processes and {count} Ray actors of the attempt are still alive: "
        f"{', '.join(names) or 'none identified (the state API did not answer)'}"
    )
    if actors and why_not_killed:
        message += f"; they were not killed: {why_not_killed}"
    return message
