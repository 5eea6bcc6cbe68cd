"""The Ray clusters a child-driver backend runs its attempts on: one it starts and owns, or one that exists.

- ``EmbeddedCluster`` (``ray.mode=local``): a local cluster of the supervisor's own, kept between attempts
  while it is healthy (a restart then costs no cluster start-up) and replaced when it is not, or for every
  attempt with ``ray.keep_cluster_between_attempts=false``.
- ``ExistingCluster`` (``ray.mode=address``): a (multi-node) cluster the supervisor joins and owns nothing of.
  Checkpoints must be on storage that this machine and the cluster's nodes share.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

import psutil

from supervisor.backends.base import ClusterStartFailed
from supervisor.config import RayConfig, TeardownConfig, auth_mode_of
from supervisor.mechanisms.outage import Outage
from supervisor.mechanisms.processes import port_open
from supervisor.mechanisms.ray_auth import refusal_hint
from supervisor.mechanisms.ray_cluster import ClusterSpec, ClusterStartError, LocalRayCluster
from supervisor.mechanisms.ray_state import RayStateClient
from supervisor.run.events import ClusterStarted, ClusterStopped, Event
from verl_hooks.contract import ENV_RUN_ID


class Cluster(ABC):
    """Where a child driver connects, how to ask about the attempt's actors, whether the cluster is up."""

    spans_machines = False
    """Whether its nodes may be other machines, which the fence sweeps by a task on each (``node_probe``)."""

    @property
    @abstractmethod
    def gcs_address(self) -> str: ...

    @abstractmethod
    def state_client(self) -> RayStateClient | None:
        """The state API the fence asks; None when there is none (then local processes alone decide)."""

    @abstractmethod
    def is_down(self) -> bool: ...

    @abstractmethod
    def prepare(self) -> list[Event]:
        """Ready for the next attempt; raises ``ClusterStartFailed``."""

    def attempt_launched(self) -> None:  # noqa: B027 - most clusters do not count attempts
        """An attempt was launched on the cluster."""

    @abstractmethod
    def close(self) -> list[Event]: ...


class EmbeddedCluster(Cluster):
    def __init__(
        self,
        ray: RayConfig,
        ray_dir: Path,
        run_id: str,
        teardown: TeardownConfig,
        on_unmarked: Callable[[list[psutil.Process]], None] | None = None,
    ) -> None:
        """``on_unmarked``: told of the cluster's processes that carry no readable marker (the reaper's adopt)."""
        self._on_unmarked = on_unmarked
        self._ray = ray
        self._ray_dir = ray_dir
        self._run_id = run_id
        self._grace_s = teardown.grace_s
        self._reap_timeout_s = teardown.reap_timeout_s
        self._cluster: LocalRayCluster | None = None
        self._attempts_on_cluster = 0

    @property
    def cluster(self) -> LocalRayCluster | None:
        return self._cluster

    @property
    def gcs_address(self) -> str:
        assert self._cluster is not None, "prepare() first"
        return self._cluster.address

    def state_client(self) -> RayStateClient | None:
        if self._cluster is None or not self._ray.dashboard:
            return None
        return RayStateClient(self._cluster.dashboard_url, self._ray.api_timeout_s)

    def is_down(self) -> bool:
        return self._cluster is None or not self._cluster.is_healthy()

    def prepare(self) -> list[Event]:
        if self._cluster is None:
            return [self._start("first attempt")]
        if not self._cluster.is_healthy():
            dead = ", ".join(self._cluster.dead_core_processes()) or "`ray start` or the GCS"
            why = f"unhealthy: {dead} gone or stopped"
            return [self._stop(why), self._start("replacing the unhealthy cluster")]
        if not self._ray.keep_cluster_between_attempts and self._attempts_on_cluster > 0:
            why = "a fresh cluster for every attempt (ray.keep_cluster_between_attempts=false)"
            return [self._stop(why), self._start("a fresh cluster for every attempt")]
        return []

    def attempt_launched(self) -> None:
        self._attempts_on_cluster += 1

    def close(self) -> list[Event]:
        return [self._stop("the run is over")] if self._cluster is not None else []

    def _start(self, reason: str) -> ClusterStarted:
        spec = ClusterSpec(
            temp_dir=self._ray_dir,
            num_cpus=self._ray.num_cpus,
            num_gpus=self._ray.num_gpus,
            resources=dict(self._ray.resources),
            object_store_memory_mb=self._ray.object_store_memory_mb,
            dashboard=self._ray.dashboard,
            auth_mode=auth_mode_of(self._ray).value,
            auth_token_path=self._ray.auth_token_path,
            start_timeout_s=self._ray.start_timeout_s,
            # The run's marker on the cluster lets a restarted supervisor sweep what a dead one left.
            extra_env={ENV_RUN_ID: self._run_id},
        )
        cluster = LocalRayCluster(spec, on_unmarked=self._on_unmarked)
        started = time.monotonic()
        try:
            cluster.start()
        except ClusterStartError as exc:
            raise ClusterStartFailed(str(exc)) from exc
        self._cluster = cluster
        self._attempts_on_cluster = 0
        dashboard = cluster.dashboard_url if self._ray.dashboard else None
        return ClusterStarted(cluster.address, dashboard, time.monotonic() - started, reason)

    def _stop(self, reason: str) -> ClusterStopped:
        assert self._cluster is not None
        started = time.monotonic()
        report = self._cluster.stop(self._grace_s, self._reap_timeout_s)
        self._cluster = None
        return ClusterStopped(
            duration_s=time.monotonic() - started,
            killed=len(report.killed),
            survivors=[f"{p.name}[{p.pid}]" for p in report.survivors],
            reason=reason,
        )


class ExistingCluster(Cluster):
    spans_machines = True

    def __init__(self, ray: RayConfig) -> None:
        assert ray.address is not None, "resolve_cluster() first"
        assert ray.dashboard_url is not None, "resolve_cluster() first"
        self._gcs = ray.address
        self._auth_mode = ray.auth_mode
        self._state = RayStateClient(ray.dashboard_url, ray.api_timeout_s)
        self._start_timeout_s = ray.start_timeout_s
        self._outage = Outage(f"the Ray cluster at {ray.address} (dashboard {ray.dashboard_url})")

    @property
    def gcs_address(self) -> str:
        return self._gcs

    def state_client(self) -> RayStateClient:
        return self._state

    def is_down(self) -> bool:
        host, _, port = self._gcs.rpartition(":")
        return not port_open(host, int(port))

    def prepare(self) -> list[Event]:
        """The GCS and the state API must answer; a head that is restarting gets ``ray.start_timeout_s``."""
        try:
            self._outage.retried(self._check, self._start_timeout_s)
        except Exception as exc:
            raise ClusterStartFailed(
                f"the Ray cluster at {self._gcs} (ray.address) or its dashboard at {self._state.dashboard_url} does "
                f"not answer ({refusal_hint(exc, self._auth_mode)}); the fence needs its state API "
                f"(ray.dashboard_url)"
            ) from exc
        return []

    def _check(self) -> None:
        if self.is_down():
            raise ConnectionRefusedError(f"the GCS at {self._gcs} refuses connections")
        self._state.check()

    def close(self) -> list[Event]:
        return []  # the cluster is not ours
