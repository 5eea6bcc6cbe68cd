"""One attempt of the benchmark's job for the baseline launchers (a shell loop, torchrun), or a KubeRay-like
controller that retries the job on a new Ray cluster (``--rayjob``).

An attempt numbers itself (from the loop's counter, or torchrun's TORCHELASTIC_RESTART_COUNT) so that an injected
fault fires on attempt 1 only, and runs the job as a user would run verl, as a child, exiting with its code:
``python -m verl_hooks.launch -m mini_ppo.main <args>``. Like verl's own ``ray.init()``, each attempt
gets a Ray cluster of its own that ends with it; unlike it, the cluster has its own temp dir and ports (the
supervisor's mechanism, ``LocalRayCluster``), because a default local cluster takes Ray's fixed ports and the
shared /tmp/ray, and would collide with other clusters on a shared machine.

``--rayjob`` is KubeRay's ``RayJob`` with ``backoffLimit`` on one machine: every try gets a new Ray cluster (with
its dashboard, which the Jobs API needs), the job is submitted through the Jobs API, and its status is read at
KubeRay's reconcile interval; a failed try's cluster is deleted and the job resubmitted to a new one.

Every boundary of an attempt goes to BENCH_LAUNCH_LOG, one JSON line each, so that the benchmark can account for
every second of a recovery: ``launch`` (this process's first line; ``created`` is when the process was created),
``cluster_up`` (``startup_s``), ``job_started`` (the job's driver spawned or submitted), ``exit`` (the launcher
knows the job ended, with its code), ``cluster_down`` (the attempt's cluster gone, ``duration_s``).

    BENCH_LAUNCH_LOG=<file> BENCH_RAY_DIR=<dir> python scripts/bench_entry.py [--rayjob [--backoff-limit=N]] <job args>
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from supervisor.config import RayConfig
from supervisor.mechanisms.ray_cluster import ClusterSpec, LocalRayCluster

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

# What torchrun sets for the process it launches (torch/distributed/elastic/agent/server/local_elastic_agent.py).
# Left in place, the Ray cluster and, through it, every Ray worker of the job inherit them, and verl's workers
# then call init_process_group with TORCHELASTIC_USE_AGENT_STORE=True: torch then makes every rank, rank 0
# included, a mere client of a TCPStore it expects torchrun's agent to serve at the MASTER_ADDR:MASTER_PORT that
# verl chose for its workers, which nobody serves, and waits for it until the process group's timeout (30 min by
# default; torch/distributed/rendezvous.py, _create_c10d_store). Seen in a stack dump of the job's worker: the
# job never reaches its first step. A Ray job under torchrun must drop them first.
TORCHRUN_VARIABLES = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_NAME",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)

# KubeRay's RayJob controller reads the job's status when it reconciles, every 3 s while the job runs
# (RayJobDefaultRequeueDuration, ray-operator/controllers/ray/rayjob_controller.go): it learns of a failure at
# the first reconcile after it, as this controller does.
RAYJOB_POLL_S = 3.0
RAYJOB_BACKOFF_LIMIT = 3
_TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def without_torchrun(environ: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in environ.items() if k not in TORCHRUN_VARIABLES and not k.startswith("TORCHELASTIC_")}


def log(event: str, attempt: int, **fields: object) -> None:
    with open(os.environ["BENCH_LAUNCH_LOG"], "a") as f:
        f.write(json.dumps({"ts": time.time(), "event": event, "attempt": attempt, **fields}) + "\n")


def job_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "verl_hooks.launch", "-m", "mini_ppo.main", *args]


def attempt_temp_dir(attempt: int) -> Path:
    return Path(os.environ["BENCH_RAY_DIR"]) / f"attempt-{attempt}"


def stop_cluster(cluster: LocalRayCluster, attempt: int) -> None:
    """The attempt's cluster going down, timed: a loop's relaunch waits for it, as verl's driver waits for its
    ``ray.init()`` cluster to shut down at exit."""
    started = time.monotonic()
    cluster.stop(grace_s=5.0)
    if cluster.temp_dir is not None:
        # A submitted job's output is in the cluster's logs (the loops' job writes to the launcher's log).
        for driver_log in cluster.temp_dir.glob("session_*/logs/job-driver-*.log"):
            shutil.copy(driver_log, Path(os.environ["BENCH_RAY_DIR"]) / f"attempt-{attempt}-{driver_log.name}")
    if cluster.temp_dir is not None and cluster.temp_dir != attempt_temp_dir(attempt).resolve():
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)  # Ray's logs (moved home from /tmp): not kept
    log("cluster_down", attempt, duration_s=time.monotonic() - started)


def run_attempt(args: list[str]) -> int:
    """One attempt for a loop: its own cluster, the job as a child, the job's exit code."""
    if "TORCHELASTIC_RESTART_COUNT" in os.environ:
        attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"]) + 1
    else:
        attempt = int(os.environ.get("BENCH_ATTEMPT", "1"))
    log("launch", attempt, pid=os.getpid(), created=psutil.Process().create_time())
    clean = without_torchrun(dict(os.environ))
    os.environ.clear()
    os.environ.update(clean)  # the cluster started below copies this process's environment
    cluster = LocalRayCluster(
        ClusterSpec(
            temp_dir=attempt_temp_dir(attempt), num_cpus=8, dashboard=False, start_timeout_s=RayConfig().start_timeout_s
        )
    )
    try:
        started = time.monotonic()
        cluster.start()
        log("cluster_up", attempt, startup_s=time.monotonic() - started)
        env = {**os.environ, **cluster.env(), "VERL_SUPERVISOR_ATTEMPT": str(attempt)}
        child = subprocess.Popen(job_command(args), env=env)
        log("job_started", attempt, pid=child.pid)
        code = child.wait()
        log("exit", attempt, code=code)
        return code
    finally:
        stop_cluster(cluster, attempt)


def run_rayjob(args: list[str], backoff_limit: int = RAYJOB_BACKOFF_LIMIT) -> int:
    """KubeRay's RayJob with ``backoffLimit``: 1 + backoff_limit tries, each on a new cluster, through the Jobs API."""
    created = psutil.Process().create_time()
    for attempt in range(1, backoff_limit + 2):
        log("launch", attempt, pid=os.getpid(), created=created)
        # The job's driver runs under the cluster's job agent and inherits the cluster's environment: the try's
        # number reaches it there (a submission's runtime_env would clash with the one verl_hooks.launch sets).
        spec = ClusterSpec(
            temp_dir=attempt_temp_dir(attempt),
            num_cpus=8,
            dashboard=True,
            start_timeout_s=RayConfig().start_timeout_s,
            extra_env={"VERL_SUPERVISOR_ATTEMPT": str(attempt)},
        )
        cluster = LocalRayCluster(spec)
        try:
            started = time.monotonic()
            cluster.start()
            # KubeRay submits once the head is ready: here, once its Jobs API answers (part of the start-up).
            client = _jobs_client(cluster.dashboard_url)
            log("cluster_up", attempt, startup_s=time.monotonic() - started)
            submission = client.submit_job(entrypoint=shlex.join(job_command(args)), submission_id=f"rayjob-{attempt}")
            log("job_started", attempt, submission_id=submission)
            while (status := str(client.get_job_status(submission).value)) not in _TERMINAL:
                time.sleep(RAYJOB_POLL_S)
            info = client.get_job_info(submission)
            code = info.driver_exit_code if info.driver_exit_code is not None else int(status != "SUCCEEDED")
            log("exit", attempt, code=code, status=status)
        finally:
            stop_cluster(cluster, attempt)
        if status == "SUCCEEDED":
            return 0
    return 1


def _jobs_client(dashboard_url: str, timeout_s: float = 60.0) -> JobSubmissionClient:
    """A Jobs API client once the dashboard's job module answers (its port opens a little before)."""
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return JobSubmissionClient(dashboard_url)
        except Exception:  # not up yet: connection refused, or the job module still loading
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--rayjob"]:
        args = argv[1:]
        if args[:1] and args[0].startswith("--backoff-limit="):
            return run_rayjob(args[1:], int(args[0].partition("=")[2]))
        return run_rayjob(args)
    return run_attempt(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
