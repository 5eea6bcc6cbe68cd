"""``ray.mode=jobs``: each attempt is a submission to an existing cluster's Ray Jobs API.

The driver runs wherever the cluster puts it, so the supervisor sees it only through the Jobs SDK: the status is
polled every ``poll_s``, the logs are tailed into ``attempts/<n>/``, the exit code comes from the job's details,
and the error record comes over the heartbeat channel (the launcher posts it; a file path on another machine is
no use). Teardown is ``stop_job``, then the same fence as the other modes, on the job's Ray job id.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import select
import shlex
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supervisor.backends.base import ClusterStartFailed, JobBackend, LaunchSpec, RunningJob, TeardownResult, Waker
from supervisor.backends.fence import RayFence, resources_now
from supervisor.config import RayConfig, TeardownConfig
from supervisor.mechanisms.marked import find_marked_processes
from supervisor.mechanisms.node_probe import attempt_sweeper
from supervisor.mechanisms.processes import ProcessInfo
from supervisor.mechanisms.ray_auth import auth_env, refusal_hint
from supervisor.mechanisms.ray_state import RayStateClient
from supervisor.mechanisms.stacks import StackDump, dump_remote_stacks, dump_stacks
from supervisor.policy.outcomes import ExitStatus
from supervisor.run.events import Event
from verl_hooks.contract import ENV_ATTEMPT, ENV_RUN_ID, SETUP_HOOK, SUPERVISOR_LOCAL_ENV, forwarded_env

POLL_S = 0.2
_TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


@dataclass
class SubmittedJob(RunningJob):
    submission_id: str = ""
    tail: threading.Thread | None = None
    exit_status: ExitStatus | None = None


def submission_id(run_id: str, attempt: int) -> str:
    return f"verl-supervisor-{run_id[:12]}-{attempt}"


class JobsBackend(JobBackend):
    def __init__(self, ray: RayConfig, teardown: TeardownConfig, run_id: str, echo_output: bool = True) -> None:
        assert ray.address is not None, "resolve_cluster() first"
        self._ray = ray
        self._teardown = teardown
        self._dashboard = ray.address
        self._run_id = run_id
        self._echo = echo_output
        self._state = RayStateClient(ray.address, ray.api_timeout_s)
        self._client: Any = None

    @property
    def python(self) -> str:
        return self._ray.python

    def _jobs(self) -> Any:
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            self._client = JobSubmissionClient(self._dashboard)
        return self._client

    def prepare(self) -> list[Event]:
        try:
            self._jobs().get_version()
        except Exception as exc:
            hint = refusal_hint(exc, self._ray.auth_mode)
            raise ClusterStartFailed(f"the Ray Jobs API at {self._dashboard} does not answer: {hint}") from exc
        return []

    def runtime_env(self, spec: LaunchSpec) -> dict[str, Any]:
        # Paths on this machine mean nothing where the driver runs: the error record comes over the heartbeat
        # channel instead, and stacks can only be taken from processes on this machine.
        local_only = SUPERVISOR_LOCAL_ENV
        # A submitted driver does not inherit the supervisor's environment as a child does: pass on what the
        # guard reads (VERL_HOOKS_* such as faults and deadlines), then the attempt's own variables.
        inherited = forwarded_env(os.environ)
        env_vars = {k: v for k, v in {**inherited, **spec.env}.items() if k not in local_only}
        env: dict[str, Any] = {
            # The driver runs on the cluster, which has its own token: only the mode travels, never a path of ours.
            "env_vars": {**env_vars, "RAY_AUTH_MODE": self._ray.auth_mode or "disabled"},
            "worker_process_setup_hook": SETUP_HOOK,
        }
        if self._ray.ship_verl_hooks:
            # The package's folder, found without importing it: the supervisor runs none of the job's code.
            spec = importlib.util.find_spec("verl_hooks")
            assert spec is not None
            assert spec.origin is not None
            env["py_modules"] = [str(Path(spec.origin).parent)]
        return env

    def launch(self, spec: LaunchSpec) -> SubmittedJob:
        job_id = submission_id(self._run_id, spec.attempt)
        before = resources_now(self._ray.gcs_address, self._ray.api_timeout_s)
        self._jobs().submit_job(
            entrypoint=shlex.join(spec.argv),
            submission_id=job_id,
            runtime_env=self.runtime_env(spec),
            entrypoint_num_cpus=0,
        )
        job = SubmittedJob(attempt=spec.attempt, started_at=time.time(), submission_id=job_id, resources_before=before)
        job.tail = threading.Thread(
            target=self._tail_logs, args=(job_id, spec.log_dir / "stdout.log"), name=f"tail-{job_id}", daemon=True
        )
        job.tail.start()
        return job

    def _tail_logs(self, job_id: str, log_path: Path) -> None:
        async def follow() -> None:
            with log_path.open("a") as log:
                async for chunk in self._jobs().tail_job_logs(job_id):
                    log.write(chunk)
                    log.flush()
                    if self._echo:
                        sys.stdout.write(chunk)
                        sys.stdout.flush()

        try:
            asyncio.run(follow())
        except Exception as exc:  # noqa: BLE001 - losing the log tail must not fail the attempt
            with log_path.open("a") as log:
                log.write(f"\n[verl-supervisor] log tail ended: {type(exc).__name__}: {exc}\n")

    def wait(self, job: RunningJob, timeout_s: float | None, wake: Waker | None = None) -> ExitStatus | None:
        submitted = _submitted(job)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            status = str(self._jobs().get_job_status(submitted.submission_id).value)
            if status in _TERMINAL:
                submitted.exit_status = self._exit_status(submitted, status)
                return submitted.exit_status
            if deadline is not None and time.monotonic() >= deadline:
                return None
            pause = POLL_S if deadline is None else max(0.0, min(POLL_S, deadline - time.monotonic()))
            if select.select([wake] if wake is not None else [], [], [], pause)[0]:
                return None

    def _exit_status(self, job: SubmittedJob, status: str) -> ExitStatus:
        info = self._jobs().get_job_info(job.submission_id)
        job.ray_job_id = getattr(info, "job_id", None) or job.ray_job_id
        code = getattr(info, "driver_exit_code", None)
        if status == "SUCCEEDED":
            return ExitStatus(code=0)
        if status == "STOPPED":
            return ExitStatus(signal=int(signal.SIGTERM))
        return ExitStatus(code=code if code is not None else 1)

    def dump_stacks(self, job: RunningJob, stacks_dir: Path, timeout_s: float) -> list[StackDump]:
        # What runs on this machine is signalled; the attempt's actors on every node are read through the
        # dashboard (the driver itself, when it runs on another node, is not an actor: out of reach).
        submitted = _submitted(job)
        if submitted.ray_job_id is None:
            try:
                submitted.ray_job_id = self._state.job_of_submission(submitted.submission_id)
            except Exception:  # noqa: BLE001 - then only this machine's processes
                submitted.ray_job_id = None
        local = dump_stacks(self._local_processes(job), stacks_dir, timeout_s)
        return local + dump_remote_stacks(self._state, submitted.ray_job_id, stacks_dir, timeout_s)

    def _local_processes(self, job: RunningJob) -> list:
        return find_marked_processes({ENV_RUN_ID: self._run_id, ENV_ATTEMPT: str(job.attempt)})

    def teardown(self, job: RunningJob) -> TeardownResult:
        started = time.monotonic()
        submitted = _submitted(job)
        config = self._teardown
        problems = []
        if submitted.exit_status is None:
            # Ray's stop_job sends SIGTERM, then SIGKILL after its own grace period (RAY_JOB_STOP_WAIT_TIME_S).
            self._jobs().stop_job(submitted.submission_id)
            stop_timeout_s = config.grace_s + config.jobs_stop_timeout_s
            if self.wait(job, stop_timeout_s) is None:
                problems.append(f"Ray job {submitted.submission_id} did not stop within {stop_timeout_s:g} s")
        if submitted.ray_job_id is None:
            submitted.ray_job_id = self._state.job_of_submission(submitted.submission_id)
        sweep = None
        if self._ray.gcs_address and config.sweep_nodes:
            auth = auth_env(self._ray.auth_mode or "disabled", self._ray.auth_token_path)
            sweep = attempt_sweeper(self._ray.gcs_address, auth, self._run_id, job.attempt, config.straggler_grace_s)
        fence = RayFence(self._state, self._ray.gcs_address, config, self._ray.api_timeout_s, sweep=sweep)
        result = fence.fence(
            submitted.ray_job_id, lambda: self._local_processes(job), resources_before=job.resources_before
        )
        if submitted.tail is not None:
            submitted.tail.join(config.output_drain_s)
        return result.teardown_result(started, problems=problems)

    def stale_processes(self) -> list[ProcessInfo]:
        """Stop this run's submissions that an earlier supervisor of the run left running."""
        prefix = submission_id(self._run_id, 0)[:-1]
        stopped = []
        for details in self._jobs().list_jobs():
            if (details.submission_id or "").startswith(prefix) and str(details.status.value) not in _TERMINAL:
                self._jobs().stop_job(details.submission_id)
                stopped.append(ProcessInfo(pid=-1, name=f"ray job {details.submission_id}", cmdline=details.entrypoint))
        return stopped

    def close(self) -> list[Event]:
        return []  # the cluster is not ours


def _submitted(job: RunningJob) -> SubmittedJob:
    assert isinstance(job, SubmittedJob)
    return job
