"""``ray.mode=local``: the supervisor starts and owns a local Ray cluster and runs the job's driver as its child.

The cluster is kept between attempts while it is healthy (a restart then costs no cluster start-up) and
replaced when it is not. Teardown stops the driver and every process carrying the attempt's marker, then
fences: the next attempt starts only when no such process is left and the state API shows no live actor of
the attempt's Ray job.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from supervisor.backends.base import ClusterStartFailed, JobBackend, LaunchSpec, RunningJob, TeardownReport
from supervisor.backends.driver import DriverProcess
from supervisor.codes import ExitStatus
from supervisor.config import RayConfig
from supervisor.events import ClusterStarted, ClusterStopped, EventLog
from supervisor.processes import ENV_RUN_ID, ProcessInfo, find_marked_processes, terminate_processes
from supervisor.ray_cluster import ClusterSpec, ClusterStartError, LocalRayCluster
from supervisor.ray_state import RayStateClient
from supervisor.stacks import StackDump, dump_stacks

FENCE_POLL_S = 0.1


@dataclass
class LocalJob(RunningJob):
    driver: DriverProcess | None = None


class LocalBackend(JobBackend):
    def __init__(self, ray: RayConfig, ray_dir: Path, run_id: str, events: EventLog, echo_output: bool = True) -> None:
        self._ray = ray
        self._ray_dir = ray_dir
        self._run_id = run_id
        self._events = events
        self._echo = echo_output
        self._cluster: LocalRayCluster | None = None
        self._attempts_on_cluster = 0

    @property
    def cluster(self) -> LocalRayCluster | None:
        return self._cluster

    def prepare(self) -> None:
        if self._cluster is not None:
            if not self._cluster.is_healthy():
                self._stop_cluster("unhealthy: a Ray process died")
                self._start_cluster("replacing the unhealthy cluster")
            elif not self._ray.keep_cluster_between_attempts and self._attempts_on_cluster > 0:
                self._stop_cluster("a fresh cluster for every attempt (ray.keep_cluster_between_attempts=false)")
                self._start_cluster("a fresh cluster for every attempt")
            return
        self._start_cluster("first attempt")

    def _start_cluster(self, reason: str) -> None:
        spec = ClusterSpec(
            temp_dir=self._ray_dir,
            num_cpus=self._ray.num_cpus,
            object_store_memory_mb=self._ray.object_store_memory_mb,
            dashboard=self._ray.dashboard,
            auth_mode=self._ray.auth_mode,
            start_timeout_s=self._ray.start_timeout_s,
            # The run's marker on the cluster lets a restarted supervisor sweep what a dead one left.
            extra_env={ENV_RUN_ID: self._run_id},
        )
        cluster = LocalRayCluster(spec)
        started = time.monotonic()
        try:
            cluster.start()
        except ClusterStartError as exc:
            raise ClusterStartFailed(str(exc)) from exc
        self._cluster = cluster
        self._attempts_on_cluster = 0
        dashboard = cluster.dashboard_url if self._ray.dashboard else None
        self._events.emit(ClusterStarted(cluster.address, dashboard, time.monotonic() - started, reason))

    def _stop_cluster(self, reason: str) -> None:
        if self._cluster is None:
            return
        started = time.monotonic()
        report = self._cluster.stop()
        self._cluster = None
        self._events.emit(
            ClusterStopped(
                duration_s=time.monotonic() - started,
                killed=len(report.killed),
                survivors=[_label(p) for p in report.survivors],
                reason=reason,
            )
        )

    def launch(self, spec: LaunchSpec) -> LocalJob:
        assert self._cluster is not None, "prepare() first"
        self._attempts_on_cluster += 1
        env = {**os.environ, **spec.env, **self._cluster.env()}
        driver = DriverProcess(spec.argv, env, spec.cwd, spec.log_dir, self._run_id, spec.attempt, echo=self._echo)
        return LocalJob(attempt=spec.attempt, started_at=time.time(), pid=driver.pid, driver=driver)

    def wait(self, job: RunningJob, timeout_s: float | None) -> ExitStatus | None:
        return _driver(job).wait(timeout_s)

    def dump_stacks(self, job: RunningJob, stacks_dir: Path, timeout_s: float) -> list[StackDump]:
        return dump_stacks(_driver(job).attempt_processes(), stacks_dir, timeout_s)

    def teardown(self, job: RunningJob, grace_s: float, fence_timeout_s: float) -> TeardownReport:
        started = time.monotonic()
        driver = _driver(job)
        state = self._state_client()
        if state is not None and job.ray_job_id is None and job.pid is not None:
            job.ray_job_id = _quietly(lambda: state.job_id_of_driver(job.pid))
        stopped = driver.stop_everything(grace_s)
        terminated, killed, survivors = list(stopped.terminated), list(stopped.killed), list(stopped.survivors)
        problems: list[str] = []
        actors_alive = None
        deadline = time.monotonic() + fence_timeout_s
        while True:
            leftovers = driver.attempt_processes()
            actors = self._live_actors(state, job.ray_job_id)
            actors_alive = None if actors is None else len(actors)
            if not leftovers and actors is not None and not actors:
                survivors = []
                break
            if not leftovers and actors is None and (state is None or job.ray_job_id is None):
                survivors = []
                break  # no state API to ask (dashboard off, or the driver never connected): processes decide
            if time.monotonic() >= deadline:
                names = [_label(ProcessInfo.of(p)) for p in leftovers] + [a.class_name for a in actors or []]
                unknown = " (the state API did not answer)" if actors is None else ""
                problems.append(
                    f"after {fence_timeout_s:g} s, {len(leftovers)} processes and "
                    f"{actors_alive if actors_alive is not None else 'an unknown number of'} Ray actors of attempt "
                    f"{job.attempt} are still alive{unknown}: {', '.join(names) or 'none identified'}"
                )
                break
            again = terminate_processes(leftovers, grace_s=min(grace_s, 2.0))
            killed += again.killed
            terminated += again.terminated
            survivors = list(again.survivors)
            time.sleep(FENCE_POLL_S)
        driver.join_output()
        return TeardownReport(
            duration_s=time.monotonic() - started,
            terminated=tuple(terminated),
            killed=tuple(killed),
            survivors=tuple(survivors),
            actors_alive=actors_alive,
            problems=tuple(problems),
        )

    def _live_actors(self, state: RayStateClient | None, job_id: str | None) -> list | None:
        """Live actors of the job, or None when they cannot be known. A cluster that is down has none."""
        if state is None or job_id is None:
            return None
        actors = _quietly(lambda: state.live_actors(job_id))
        if actors is None and self._cluster is not None and not self._cluster.is_healthy():
            return []
        return actors

    def _state_client(self) -> RayStateClient | None:
        if self._cluster is None or not self._ray.dashboard:
            return None
        return RayStateClient(self._cluster.dashboard_url)

    def stale_processes(self) -> list[ProcessInfo]:
        stale = find_marked_processes({ENV_RUN_ID: self._run_id})
        report = terminate_processes(stale, grace_s=5.0)
        return list(report.terminated + report.killed + report.survivors)

    def close(self) -> None:
        self._stop_cluster("the run is over")


def _driver(job: RunningJob) -> DriverProcess:
    assert isinstance(job, LocalJob)
    assert job.driver is not None
    return job.driver


def _label(info: ProcessInfo) -> str:
    return f"{info.name}[{info.pid}]"


def _quietly(call):  # a best-effort lookup must not fail a teardown
    try:
        return call()
    except Exception:  # noqa: BLE001
        return None
