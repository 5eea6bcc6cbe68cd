"""``ray.mode=jobs``: each attempt is a submission to an existing cluster's Ray Jobs API.

The driver runs wherever the cluster puts it, so the supervisor sees it only through the Jobs SDK: the status is
polled every ``POLL_S``, the logs are tailed into ``attempts/<n>/``, the exit code comes from the job's details,
and the error record comes over the heartbeat channel (the launcher posts it; a file path on another machine is
no use). Teardown is ``stop_job``, then the same fence as the other modes, on the job's Ray job id. The Jobs
API may stop answering while the job trains (``supervisor.mechanisms.outage``): it is asked again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.util
import logging
import os
import select
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from supervisor.backends.base import (
    ClusterStartFailed,
    JobBackend,
    LaunchSpec,
    NodesSeen,
    RunningJob,
    Stopped,
    TeardownResult,
    Waker,
    cluster_nodes_seen,
)
from supervisor.backends.fence import AttemptView, resources_now
from supervisor.clock import Clock
from supervisor.config import RayConfig, TeardownConfig, auth_mode_of
from supervisor.mechanisms.bounded_log import BoundedLog
from supervisor.mechanisms.marked import find_marked_processes
from supervisor.mechanisms.node_probe import attempt_sweeper
from supervisor.mechanisms.outage import BoundedCalls, Outage
from supervisor.mechanisms.processes import ProcessInfo
from supervisor.mechanisms.ray_auth import auth_env, refusal_hint
from supervisor.mechanisms.ray_drain import DrainOutcome, drain_node, draining_nodes
from supervisor.mechanisms.ray_state import NodeInfo, RayStateClient
from supervisor.mechanisms.stacks import StackDump, dump_remote_stacks, dump_stacks
from supervisor.outcomes import ExitStatus
from supervisor.run.events import Event

if TYPE_CHECKING:
    from ray.job_submission import JobStatus

from verl_hooks.contract import ENV_ATTEMPT, ENV_RUN_ID, SETUP_HOOK, SUPERVISOR_LOCAL_ENV, forwarded_env

POLL_S = 0.2
"""Between two status polls: the exit of a submission is seen within this (a child driver's, at once)."""
RECONNECT_S = 1.0
"""Between a dropped log tail and the next connection."""

logger = logging.getLogger(__name__)

_SDK_ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")

T = TypeVar("T")


def _job_status(value: str) -> JobStatus:
    """A submission's status as Ray's Jobs SDK names it (imported here: the supervisor imports Ray only when a
    backend needs it)."""
    from ray.job_submission import JobStatus

    return JobStatus(value)


def _terminal(status: str) -> bool:
    """A status this Ray does not name is not an end: the submission is asked again, or stopped."""
    try:
        return _job_status(status).is_terminal()
    except ValueError:
        return False


@dataclass
class _Submission:
    """What this backend keeps of one attempt's submission."""

    submission_id: str
    tail: _LogTail
    exit_status: ExitStatus | None = None
    ray_job_id: str | None = None


def submission_id(run_id: str, attempt: int) -> str:
    return f"verl-supervisor-{run_id[:12]}-{attempt}"


class JobsBackend(JobBackend):
    def __init__(
        self,
        ray: RayConfig,
        teardown: TeardownConfig,
        run_id: str,
        echo_output: bool = True,
        clock: Clock | None = None,
    ) -> None:
        assert ray.address is not None, "resolve_cluster() first"
        self._ray = ray
        self.teardown_config = teardown
        self.clock = clock or Clock()
        self._submissions: dict[int, _Submission] = {}
        self._api_s = ray.api_timeout_s
        self._outage = Outage(f"the Ray Jobs API at {ray.address}", self.clock, POLL_S)
        self._bounded = BoundedCalls(ray.api_timeout_s)
        self._state_outage = Outage(f"the Ray state API at {ray.address}", self.clock, POLL_S)
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

            # The SDK prefers $RAY_API_SERVER_ADDRESS and $RAY_ADDRESS to the address it is given
            # (get_address_for_submission_client, ray/dashboard/utils.py): with either set to another cluster,
            # ray.address would be ignored. Made once, in prepare(), before any tail thread starts.
            with _environ_without(*_SDK_ADDRESS_VARIABLES):
                self._client = JobSubmissionClient(self._dashboard)
        return self._client

    def _sdk(self, call: Callable[[Any], T], timeout_s: float | None = None) -> T:
        """One call to the Jobs SDK's client, bounded by ``ray.api_timeout_s`` (the SDK sets no timeout)."""
        return self._bounded(lambda: call(self._jobs()), timeout_s)

    def prepare(self) -> list[Event]:
        """The Jobs API must answer; a head whose dashboard is restarting gets ``ray.start_timeout_s``."""
        try:
            self._outage.retried(lambda: self._sdk(lambda jobs: jobs.get_version()), self._ray.start_timeout_s)
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
            "env_vars": {**env_vars, "RAY_AUTH_MODE": auth_mode_of(self._ray).value},
            "worker_process_setup_hook": SETUP_HOOK,
        }
        if self._ray.ship_verl_hooks:
            # The package's folder, found without importing it: the supervisor runs none of the job's code.
            spec = importlib.util.find_spec("verl_hooks")
            assert spec is not None
            assert spec.origin is not None
            env["py_modules"] = [str(Path(spec.origin).parent)]
        return env

    def launch(self, spec: LaunchSpec) -> RunningJob:
        job_id = submission_id(self._run_id, spec.attempt)
        before = resources_now(self._ray.gcs_address, self._ray.api_timeout_s)
        runtime_env = self.runtime_env(spec)
        asked = []

        def submit(jobs: Any) -> str:
            asked.append(job_id)
            try:
                return jobs.submit_job(
                    entrypoint=shlex.join(spec.argv),
                    submission_id=job_id,
                    runtime_env=runtime_env,
                    entrypoint_num_cpus=0,
                )
            except RuntimeError as exc:
                if len(asked) > 1 and "already exists" in str(exc):
                    return job_id  # an earlier try went through and only its answer was lost
                raise

        try:
            # Uploading the job's packages may take longer than one API call: the start-up's limit.
            limit_s = self._ray.start_timeout_s
            self._outage.retried(lambda: self._sdk(submit, limit_s), limit_s)
        except Exception as exc:
            raise ClusterStartFailed(f"attempt {spec.attempt} could not be submitted as {job_id}: {exc}") from exc
        tail = _LogTail(self._sdk, job_id, spec.log_dir / "stdout.log", self._echo, spec.log_limit_bytes)
        self._submissions[spec.attempt] = _Submission(job_id, tail)
        tail.start()
        return RunningJob(attempt=spec.attempt, started_at=self.clock.now(), resources_before=before)

    def wait(self, job: RunningJob, timeout_s: float | None, wake: Waker | None = None) -> ExitStatus | None:
        """Poll the submission's status. An unanswered poll is asked again at the next: the job may be training
        fine while the Jobs API restarts (a KubeRay head's dashboard), and the watchdog bounds how long nothing
        is heard of it."""
        submitted = self._submissions[job.attempt]
        deadline = None if timeout_s is None else self.clock.monotonic() + timeout_s
        while True:
            try:
                status = _job_status(
                    self._outage.ask(lambda: self._sdk(lambda jobs: jobs.get_job_status(submitted.submission_id)))
                )
            except Exception:  # noqa: BLE001 - noted by the outage, asked again at the next poll
                status = None
            if status is not None and _terminal(status):
                submitted.exit_status = self._exit_status(submitted, status)
                return submitted.exit_status
            if deadline is not None and self.clock.monotonic() >= deadline:
                return None
            pause = POLL_S if deadline is None else max(0.0, min(POLL_S, deadline - self.clock.monotonic()))
            if select.select([wake] if wake is not None else [], [], [], pause)[0]:
                return None

    def _exit_status(self, submitted: _Submission, status: JobStatus) -> ExitStatus:
        """How the submission ended (``status``: a terminal one), from its details: its driver's exit code, and
        the Ray job it was (kept for the fence). Without them (the API went away again), the error record that
        came over the heartbeat channel still classifies the attempt."""
        try:
            info = self._outage.retried(
                lambda: self._sdk(lambda jobs: jobs.get_job_info(submitted.submission_id)), self._api_s
            )
        except Exception as exc:  # noqa: BLE001 - an unknown code, not a supervisor bug
            logger.warning("the details of %s are unknown: %s", submitted.submission_id, exc)
            info = None
        submitted.ray_job_id = getattr(info, "job_id", None) or submitted.ray_job_id
        if status is _job_status("SUCCEEDED"):
            return ExitStatus(code=0)
        if status is _job_status("STOPPED"):
            return ExitStatus(signal=int(signal.SIGTERM))
        code = getattr(info, "driver_exit_code", None)
        return ExitStatus(code=code if code is not None else 1)

    def dump_stacks(self, job: RunningJob, stacks_dir: Path, timeout_s: float) -> list[StackDump]:
        # What runs on this machine is signalled; the attempt's actors on every node are read through the
        # dashboard (the driver itself, when it runs on another node, is not an actor: out of reach).
        try:
            ray_job_id = self._ray_job_id(job)
        except Exception:  # noqa: BLE001 - then only this machine's processes
            ray_job_id = None
        local = dump_stacks(self._local_processes(job), stacks_dir, timeout_s)
        return local + dump_remote_stacks(self._state, ray_job_id, stacks_dir, timeout_s)

    def _ray_job_id(self, job: RunningJob) -> str | None:
        """The attempt's Ray job (None: its driver never connected). Raises when the state API does not say."""
        submitted = self._submissions[job.attempt]
        if submitted.ray_job_id is None:
            submitted.ray_job_id = self._state_outage.retried(
                lambda: self._state.job_of_submission(submitted.submission_id), self._api_s
            )
        return submitted.ray_job_id

    def _local_processes(self, job: RunningJob) -> list:
        return find_marked_processes({ENV_RUN_ID: self._run_id, ENV_ATTEMPT: str(job.attempt)})

    def stop(self, job: RunningJob) -> Stopped:
        """``stop_job`` (Ray sends SIGTERM, then SIGKILL after its own ``RAY_JOB_STOP_WAIT_TIME_S``), asked again
        while the Jobs API does not answer, then wait for the submission to end."""
        submitted = self._submissions[job.attempt]
        limit_s = self.teardown_config.grace_s + self.teardown_config.jobs_stop_timeout_s
        if submitted.exit_status is not None:
            return Stopped()
        started = self.clock.monotonic()
        try:
            self._outage.retried(lambda: self._sdk(lambda jobs: jobs.stop_job(submitted.submission_id)), limit_s)
        except Exception as exc:  # noqa: BLE001 - the fence still runs; the run stops on this problem
            return Stopped(problems=(f"Ray job {submitted.submission_id} could not be stopped: {exc}",))
        left_s = max(0.0, limit_s - (self.clock.monotonic() - started))
        if self.wait(job, left_s) is None:
            return Stopped(problems=(f"Ray job {submitted.submission_id} did not stop within {limit_s:g} s",))
        return Stopped()

    def attempt_view(self, job: RunningJob, stopped: Stopped) -> AttemptView:
        sweeper = None
        if self._ray.gcs_address and self.teardown_config.sweep_nodes:
            auth = auth_env(auth_mode_of(self._ray).value, self._ray.auth_token_path)
            sweeper = attempt_sweeper(
                self._ray.gcs_address, auth, self._run_id, job.attempt, self.teardown_config.straggler_grace_s
            )
        try:
            ray_job_id = self._ray_job_id(job)
        except Exception as exc:  # noqa: BLE001 - a problem of the fence, not a supervisor bug
            # Without the Ray job id the fence cannot see the attempt's actors: it must not say they are gone.
            problem = f"the Ray job of submission {self._submissions[job.attempt].submission_id} is unknown: {exc}"
            return AttemptView(leftovers=lambda: self._local_processes(job), problems=(problem,))
        return AttemptView(
            leftovers=lambda: self._local_processes(job),
            ray_job_id=ray_job_id,
            state=self._state,
            gcs_address=self._ray.gcs_address,
            resources_before=job.resources_before,
            sweeper=sweeper,
            api_timeout_s=self._ray.api_timeout_s,
        )

    def flush_output(self, job: RunningJob, timeout_s: float) -> None:
        self._submissions.pop(job.attempt).tail.finish(timeout_s)

    def nodes_after(self, job: RunningJob, result: TeardownResult) -> NodesSeen:
        return cluster_nodes_seen(result, self._state)

    def exclude_node(self, node_id: str, message: str) -> DrainOutcome:
        if not self._ray.gcs_address:
            return DrainOutcome(node_id, False, "no ray.gcs_address to drain it through")
        return drain_node(self._ray.gcs_address, node_id, message, self._ray.api_timeout_s)

    def draining_nodes(self) -> dict[str, int]:
        if not self._ray.gcs_address:
            return super().draining_nodes()  # the GCS is how Ray tells; without its address nothing is watched
        return draining_nodes(self._ray.gcs_address, self._ray.api_timeout_s)

    def nodes_holding(self, job: RunningJob) -> set[str]:
        ray_job_id = self._ray_job_id(job)
        return self._state.nodes_holding(ray_job_id) if ray_job_id is not None else set()

    def cluster_nodes(self) -> list[NodeInfo]:
        return self._state.nodes()

    def stale_processes(self) -> list[ProcessInfo]:
        """Stop this run's submissions that an earlier supervisor of the run left running (before any attempt:
        the Jobs API gets ``ray.start_timeout_s`` to answer)."""
        prefix = submission_id(self._run_id, 0)[:-1]
        stopped = []
        try:
            listed = self._outage.retried(lambda: self._sdk(lambda jobs: jobs.list_jobs()), self._ray.start_timeout_s)
            for details in listed:
                if (details.submission_id or "").startswith(prefix) and not _terminal(details.status):
                    stop = functools.partial(self._sdk, lambda jobs, sid=details.submission_id: jobs.stop_job(sid))
                    self._outage.retried(stop, self._api_s)
                    name = f"ray job {details.submission_id}"
                    stopped.append(ProcessInfo(pid=-1, name=name, cmdline=details.entrypoint))
        except Exception as exc:
            raise ClusterStartFailed(
                f"an earlier supervisor's submissions of this run cannot be stopped: {exc}"
            ) from exc
        return stopped

    def close(self) -> list[Event]:
        return []  # the cluster is not ours


class _LogTail(threading.Thread):
    """Copies a submission's log into its attempt's ``stdout.log`` (and the console) as it is written.

    The Jobs API replays a log from its start on every connection (``file_tail_iterator`` in
    ray/dashboard/modules/job/utils.py): after a dropped connection the tail connects again and skips what it
    has already copied, so the attempt's log goes on whole, once."""

    def __init__(
        self, sdk: Callable[..., Any], job_id: str, log_path: Path, echo: bool, limit_bytes: int | None = None
    ) -> None:
        """``sdk``: ``JobsBackend._sdk``, a bounded call to the Jobs SDK's client."""
        super().__init__(name=f"tail-{job_id}", daemon=True)
        self._sdk = sdk
        self._job_id = job_id
        self._log_path = log_path
        self._echo = echo
        self._limit_bytes = limit_bytes
        self._finishing = threading.Event()
        self.copied = 0
        """Characters of the log copied so far."""
        self._dropped_since: float | None = None

    def run(self) -> None:
        with contextlib.closing(_TextLog(BoundedLog(self._log_path, self._limit_bytes))) as log:
            while True:
                try:
                    asyncio.run(self._follow(log))
                except Exception as exc:  # noqa: BLE001 - a dropped connection must not end the attempt's log
                    why = f"{type(exc).__name__}: {exc}"
                else:
                    # Some Rays end the stream quietly when the connection drops: done only if the job is.
                    if self._finishing.is_set() or self._submission_ended():
                        return
                    why = "the stream ended before the submission did"
                if self._dropped_since is None:
                    self._dropped_since = time.monotonic()
                    logger.warning("the log tail of %s dropped (%s); connecting again", self._job_id, why)
                if self._finishing.wait(RECONNECT_S):
                    log.write(f"\n[verl-supervisor] log tail ended: {why}\n")
                    return

    def _submission_ended(self) -> bool:
        try:
            return _terminal(self._sdk(lambda jobs: jobs.get_job_status(self._job_id)))
        except Exception:  # noqa: BLE001 - unknown: connect again
            return False

    async def _follow(self, log: _TextLog) -> None:
        replayed = 0
        # The stream's own connection: a silent one ends with the submission, or drops and is connected again.
        async for chunk in self._sdk(lambda jobs: jobs).tail_job_logs(self._job_id):
            fresh = chunk[max(0, self.copied - replayed) :]
            replayed += len(chunk)
            if not fresh:
                continue
            if self._dropped_since is not None:
                logger.warning(
                    "the log tail of %s is back after %.1f s", self._job_id, time.monotonic() - self._dropped_since
                )
                self._dropped_since = None
            self.copied += len(fresh)
            log.write(fresh)
            log.flush()
            if self._echo:
                sys.stdout.write(fresh)
                sys.stdout.flush()

    def finish(self, timeout_s: float) -> None:
        """Let it copy what is left (the submission has ended), for ``timeout_s`` at most; no reconnecting."""
        self._finishing.set()
        self.join(timeout_s)


class _TextLog:
    """The Jobs API streams text: written to a ``BoundedLog`` as UTF-8."""

    def __init__(self, log: BoundedLog) -> None:
        self._log = log

    def write(self, text: str) -> None:
        self._log.write(text.encode("utf-8", errors="replace"))

    def flush(self) -> None:
        pass  # BoundedLog flushes each write

    def close(self) -> None:
        self._log.close()


@contextlib.contextmanager
def _environ_without(*names: str) -> Iterator[None]:
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)
