"""``ray.mode=local``: the supervisor starts and owns a local Ray cluster; the job's driver is its child.

The cluster is kept between attempts while it is healthy (a restart then costs no cluster start-up) and
replaced when it is not, or for every attempt with ``ray.keep_cluster_between_attempts=false``.
"""

from __future__ import annotations

import time
from pathlib import Path

from supervisor.backends.base import ClusterStartFailed, LaunchSpec
from supervisor.backends.child_driver import ChildDriverBackend, ChildJob
from supervisor.config import RayConfig, TeardownConfig
from supervisor.events import ClusterStarted, ClusterStopped, EventLog
from supervisor.processes import ENV_RUN_ID
from supervisor.ray_cluster import ClusterSpec, ClusterStartError, LocalRayCluster
from supervisor.ray_state import RayStateClient


class LocalBackend(ChildDriverBackend):
    def __init__(
        self,
        ray: RayConfig,
        teardown: TeardownConfig,
        ray_dir: Path,
        run_id: str,
        events: EventLog,
        echo_output: bool = True,
    ) -> None:
        super().__init__(ray, teardown, run_id, echo_output)
        self._ray_dir = ray_dir
        self._events = events
        self._cluster: LocalRayCluster | None = None
        self._attempts_on_cluster = 0

    @property
    def cluster(self) -> LocalRayCluster | None:
        return self._cluster

    def gcs_address(self) -> str:
        assert self._cluster is not None, "prepare() first"
        return self._cluster.address

    def state_client(self) -> RayStateClient | None:
        if self._cluster is None or not self._ray.dashboard:
            return None
        return RayStateClient(self._cluster.dashboard_url)

    def cluster_down(self) -> bool:
        return self._cluster is None or not self._cluster.is_healthy()

    def prepare(self) -> None:
        if self._cluster is None:
            self._start_cluster("first attempt")
        elif not self._cluster.is_healthy():
            self._stop_cluster("unhealthy: a Ray process died")
            self._start_cluster("replacing the unhealthy cluster")
        elif not self._ray.keep_cluster_between_attempts and self._attempts_on_cluster > 0:
            self._stop_cluster("a fresh cluster for every attempt (ray.keep_cluster_between_attempts=false)")
            self._start_cluster("a fresh cluster for every attempt")

    def launch(self, spec: LaunchSpec) -> ChildJob:
        self._attempts_on_cluster += 1
        return super().launch(spec)

    def close(self) -> None:
        self._stop_cluster("the run is over")

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
                survivors=[f"{p.name}[{p.pid}]" for p in report.survivors],
                reason=reason,
            )
        )
