"""Backends whose job driver is a child process of the supervisor (``ray.mode=local`` and ``address``).

The driver's exit is read from a pidfd the moment it happens. Teardown stops the driver and every local process
carrying the attempt's marker on one shared grace period, then fences through the Ray state API: no live actor
of the attempt's Ray job may be left on any node (``supervisor.fence``). The two modes differ only in who owns
the cluster.
"""

from __future__ import annotations

import json
import os
import time
from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path

from supervisor.backends.base import JobBackend, LaunchSpec, RunningJob, TeardownReport
from supervisor.backends.driver import DriverProcess
from supervisor.codes import ExitStatus
from supervisor.config import RayConfig, TeardownConfig
from supervisor.fence import RayFence
from supervisor.processes import ENV_RUN_ID, ProcessInfo, find_marked_processes, terminate_processes
from supervisor.ray_state import RayStateClient
from supervisor.stacks import StackDump, dump_stacks
from verl_hooks.launch import RAY_INJECTED_JOB_CONFIG


@dataclass
class ChildJob(RunningJob):
    driver: DriverProcess | None = None


class ChildDriverBackend(JobBackend):
    def __init__(self, ray: RayConfig, teardown: TeardownConfig, run_id: str, echo_output: bool = True) -> None:
        self._ray = ray
        self._kill_stray_actors = teardown.kill_stray_actors
        self._run_id = run_id
        self._echo = echo_output

    # What a mode provides: where the cluster is, whether it is up, how to ask it about actors.
    @abstractmethod
    def gcs_address(self) -> str: ...

    @abstractmethod
    def state_client(self) -> RayStateClient | None: ...

    @abstractmethod
    def cluster_down(self) -> bool: ...

    def launch(self, spec: LaunchSpec) -> ChildJob:
        env = {**os.environ, **spec.env, "RAY_ADDRESS": self.gcs_address(), "RAY_AUTH_MODE": self._ray.auth_mode}
        driver = DriverProcess(
            spec.argv, as_a_job_of_its_own(env), spec.cwd, spec.log_dir, self._run_id, spec.attempt, echo=self._echo
        )
        return ChildJob(attempt=spec.attempt, started_at=time.time(), pid=driver.pid, driver=driver)

    def wait(self, job: RunningJob, timeout_s: float | None) -> ExitStatus | None:
        return _driver(job).wait(timeout_s)

    def dump_stacks(self, job: RunningJob, stacks_dir: Path, timeout_s: float) -> list[StackDump]:
        return dump_stacks(_driver(job).attempt_processes(), stacks_dir, timeout_s)

    def teardown(self, job: RunningJob, grace_s: float, fence_timeout_s: float) -> TeardownReport:
        started = time.monotonic()
        driver = _driver(job)
        state = self.state_client()
        if state is not None and job.ray_job_id is None and job.pid is not None:
            try:
                job.ray_job_id = state.job_id_of_driver(job.pid)
            except Exception:  # noqa: BLE001 - without the job id the fence falls back to processes alone
                job.ray_job_id = None
        stopped = driver.stop_everything(grace_s)
        fence = RayFence(state, self.gcs_address(), self._kill_stray_actors)
        result = fence.fence(job.ray_job_id, driver.attempt_processes, grace_s, fence_timeout_s, self.cluster_down)
        driver.join_output()
        return result.report(started, stopped)

    def stale_processes(self) -> list[ProcessInfo]:
        """This run's processes on this machine that an earlier supervisor of the run left behind."""
        report = terminate_processes(find_marked_processes({ENV_RUN_ID: self._run_id}), grace_s=5.0)
        return list(report.terminated + report.killed + report.survivors)


def as_a_job_of_its_own(env: dict[str, str]) -> dict[str, str]:
    """The driver's environment when the supervisor is itself the entrypoint of a Ray Jobs submission (a KubeRay
    RayJob): its children inherit the submission's job config, with which a driver would claim that submission
    as its own. Each attempt is a Ray job of its own: it keeps the submission's runtime_env (the user's env_vars,
    working_dir) and drops its metadata (the submission id)."""
    injected = env.get(RAY_INJECTED_JOB_CONFIG)
    if injected is None:
        return env
    try:
        runtime_env = json.loads(injected).get("runtime_env") or {}
    except (ValueError, AttributeError):
        runtime_env = {}
    return {**env, RAY_INJECTED_JOB_CONFIG: json.dumps({"runtime_env": runtime_env, "metadata": {}})}


def _driver(job: RunningJob) -> DriverProcess:
    assert isinstance(job, ChildJob)
    assert job.driver is not None
    return job.driver
