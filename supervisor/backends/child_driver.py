"""The backend whose job driver is a child process of the supervisor, on a cluster it is given: embedded
(``ray.mode=local``) or existing (``ray.mode=address``).

The driver's exit is read from a pidfd the moment it happens. Teardown stops the driver and every local process
carrying the attempt's marker on one shared grace period, then fences through the Ray state API: no live actor
of the attempt's Ray job may be left on any node (``supervisor.backends.fence``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil

from supervisor.backends.base import (
    JobBackend,
    LaunchSpec,
    NodesSeen,
    RunningJob,
    Stopped,
    TeardownResult,
    Waker,
    cluster_nodes_seen,
)
from supervisor.backends.clusters import Cluster
from supervisor.backends.driver import DriverProcess, StandbyDriver, standby_module
from supervisor.backends.fence import AttemptView, Sweeper, resources_now
from supervisor.clock import Clock
from supervisor.config import RayConfig, TeardownConfig, auth_mode_of
from supervisor.mechanisms import orphans
from supervisor.mechanisms.marked import find_marked_processes
from supervisor.mechanisms.node_probe import attempt_sweeper
from supervisor.mechanisms.processes import ProcessInfo, terminate_processes
from supervisor.mechanisms.ray_auth import auth_env
from supervisor.mechanisms.ray_drain import DrainOutcome, drain_node, draining_nodes
from supervisor.mechanisms.ray_state import NodeInfo, RayStateClient
from supervisor.mechanisms.stacks import StackDump, dump_remote_stacks, dump_stacks
from supervisor.outcomes import ExitStatus
from supervisor.run.events import Event, StandbyStarted
from verl_hooks.contract import ENV_RUN_ID, RAY_INJECTED_JOB_CONFIG, injected_job_config

logger = logging.getLogger(__name__)


@dataclass
class _Attempt:
    """What this backend keeps of one attempt's driver."""

    driver: DriverProcess
    ray_job_id: str | None = None


class ChildDriverBackend(JobBackend):
    def __init__(
        self,
        cluster: Cluster,
        ray: RayConfig,
        teardown: TeardownConfig,
        run_id: str,
        echo_output: bool = True,
        clock: Clock | None = None,
        on_orphans: Callable[[list[psutil.Process]], None] | None = None,
    ) -> None:
        """``on_orphans``: told of each process the supervisor adopts while an attempt runs (the reaper's adopt,
        so that a supervisor SIGKILLed outright still takes them down)."""
        self.cluster = cluster
        self._on_orphans = on_orphans
        self._orphans_told: set[int] = set()
        self._ray = ray
        self.teardown_config = teardown
        self.clock = clock or Clock()
        self._attempts: dict[int, _Attempt] = {}
        self._run_id = run_id
        self._echo = echo_output
        self._standby: StandbyDriver | None = None

    def prepare(self) -> list[Event]:
        return self.cluster.prepare()

    def close(self) -> list[Event]:
        self._discard_standby()
        return self.cluster.close()

    def _driver_env(self, spec: LaunchSpec) -> dict[str, str]:
        auth = auth_env(auth_mode_of(self._ray).value, self._ray.auth_token_path)
        return as_a_job_of_its_own({**os.environ, **spec.env, "RAY_ADDRESS": self.cluster.gcs_address, **auth})

    def start_standby(self, spec: LaunchSpec) -> list[Event]:
        module = standby_module(spec.argv)
        if module is None or self._standby is not None or self.cluster.is_down():
            return []
        python = spec.argv[0]
        self._standby = StandbyDriver(python, module, self._driver_env(spec), spec.cwd, self._run_id, spec.attempt)
        return [StandbyStarted(spec.attempt, self._standby.pid, module)]

    def _discard_standby(self) -> None:
        if self._standby is not None:
            self._discard(self._standby)
            self._standby = None

    def _discard(self, standby: StandbyDriver) -> None:
        standby.discard(self.teardown_config.straggler_grace_s, self.teardown_config.reap_timeout_s)

    def launch(self, spec: LaunchSpec) -> RunningJob:
        env = self._driver_env(spec)
        before = resources_now(self.cluster.gcs_address, self._ray.api_timeout_s)
        standby, self._standby = self._standby, None
        if standby is not None and not standby.fits(spec.attempt, env, spec.cwd):  # the cluster changed
            self._discard(standby)
            standby = None
        driver = DriverProcess(
            spec.argv,
            env,
            spec.cwd,
            spec.log_dir,
            self._run_id,
            spec.attempt,
            echo=self._echo,
            standby=standby,
            log_limit_bytes=spec.log_limit_bytes,
        )
        self.cluster.attempt_launched()
        self._attempts[spec.attempt] = _Attempt(driver)
        return RunningJob(
            attempt=spec.attempt, started_at=self.clock.now(), pid=driver.pid, warm=driver.warm, resources_before=before
        )

    def wait(self, job: RunningJob, timeout_s: float | None, wake: Waker | None = None) -> ExitStatus | None:
        status = self._attempts[job.attempt].driver.wait(timeout_s, wake)
        self._watch_orphans()
        return status

    def _watch_orphans(self) -> None:
        """Tell of the orphans adopted since the last look, and collect those that have exited."""
        orphans.reap_adopted()
        new = [p for p in orphans.adopted() if p.pid not in self._orphans_told]
        if not new:
            return
        self._orphans_told.update(p.pid for p in new)
        named = ", ".join(f"{info.name}[{info.pid}]" for info in map(ProcessInfo.of, new))
        logger.warning("adopted %s: orphans of the run's process tree, ended with the attempt", named)
        if self._on_orphans is not None:
            self._on_orphans(new)

    def dump_stacks(self, job: RunningJob, stacks_dir: Path, timeout_s: float) -> list[StackDump]:
        """This machine's processes by signal and, at the same time, the attempt's actors on every node."""
        state = self.cluster.state_client()
        ray_job_id = self._ray_job_id(job, state)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="remote-stacks") as pool:
            remote = pool.submit(dump_remote_stacks, state, ray_job_id, stacks_dir, timeout_s)
            local = dump_stacks(self._attempts[job.attempt].driver.attempt_processes(), stacks_dir, timeout_s)
            return local + remote.result()

    def _ray_job_id(self, job: RunningJob, state: RayStateClient | None) -> str | None:
        """The attempt's Ray job, found by its driver's pid once and remembered (None: not found)."""
        attempt = self._attempts[job.attempt]
        if state is not None and attempt.ray_job_id is None and job.pid is not None:
            try:
                attempt.ray_job_id = state.job_id_of_driver(job.pid)
            except Exception:  # noqa: BLE001 - without the job id the fence falls back to processes alone
                attempt.ray_job_id = None
        return attempt.ray_job_id

    def stop(self, job: RunningJob) -> Stopped:
        # Asked while the driver is alive: a Ray job's driver pid is how the state API names it.
        self._ray_job_id(job, self.cluster.state_client())
        report = self._attempts[job.attempt].driver.stop_everything(
            self.teardown_config.grace_s, self.teardown_config.reap_timeout_s
        )
        return Stopped(report.terminated, report.killed, report.survivors)

    def attempt_view(self, job: RunningJob, stopped: Stopped) -> AttemptView:
        return AttemptView(
            leftovers=self._attempts[job.attempt].driver.attempt_processes,
            ray_job_id=self._attempts[job.attempt].ray_job_id,
            state=self.cluster.state_client(),
            gcs_address=self.cluster.gcs_address,
            cluster_down=self.cluster.is_down,
            resources_before=job.resources_before,
            attempt_pids=[p.pid for p in (*stopped.terminated, *stopped.killed, *stopped.unkilled)],
            sweeper=self._sweeper(job),
            api_timeout_s=self._ray.api_timeout_s,
        )

    def flush_output(self, job: RunningJob, timeout_s: float) -> None:
        self._attempts.pop(job.attempt).driver.join_output(timeout_s)

    def nodes_after(self, job: RunningJob, result: TeardownResult) -> NodesSeen:
        if not self.cluster.spans_machines:
            return super().nodes_after(job, result)
        return cluster_nodes_seen(result, self.cluster.state_client())

    def exclude_node(self, node_id: str, message: str) -> DrainOutcome:
        if not self.cluster.spans_machines:
            return super().exclude_node(node_id, message)
        return drain_node(self.cluster.gcs_address, node_id, message, self._ray.api_timeout_s)

    def draining_nodes(self) -> dict[str, int]:
        if not self.cluster.spans_machines:
            return super().draining_nodes()
        return draining_nodes(self.cluster.gcs_address, self._ray.api_timeout_s)

    def nodes_holding(self, job: RunningJob) -> set[str]:
        state = self.cluster.state_client()
        ray_job_id = self._ray_job_id(job, state)
        if state is None or ray_job_id is None:
            return set()  # its driver has not connected yet: nothing placed anywhere
        return state.nodes_holding(ray_job_id)

    def cluster_nodes(self) -> list[NodeInfo]:
        state = self.cluster.state_client()
        if not self.cluster.spans_machines or state is None:
            return super().cluster_nodes()
        return state.nodes()

    def _sweeper(self, job: RunningJob) -> Sweeper | None:
        if not (self.cluster.spans_machines and self.teardown_config.sweep_nodes):
            return None  # every node is this machine: the marked sweep above saw them all
        auth = auth_env(auth_mode_of(self._ray).value, self._ray.auth_token_path)
        return attempt_sweeper(
            self.cluster.gcs_address, auth, self._run_id, job.attempt, self.teardown_config.straggler_grace_s
        )

    def stale_processes(self) -> list[ProcessInfo]:
        """This run's processes on this machine that an earlier supervisor of the run left behind."""
        config = self.teardown_config
        marked = find_marked_processes({ENV_RUN_ID: self._run_id})
        report = terminate_processes(marked, config.grace_s, reap_timeout_s=config.reap_timeout_s)
        return list(report.terminated + report.killed + report.survivors)


def as_a_job_of_its_own(env: Mapping[str, str]) -> dict[str, str]:
    """The driver's environment when the supervisor is itself the entrypoint of a Ray Jobs submission (a KubeRay
    RayJob): its children inherit the submission's job config, with which a driver would claim that submission
    as its own. Each attempt is a Ray job of its own: it keeps the submission's runtime_env (the user's env_vars,
    working_dir) and drops its metadata (the submission id)."""
    if RAY_INJECTED_JOB_CONFIG not in env:
        return dict(env)
    runtime_env = (injected_job_config(env) or {}).get("runtime_env") or {}
    return {**env, RAY_INJECTED_JOB_CONFIG: json.dumps({"runtime_env": runtime_env, "metadata": {}})}
