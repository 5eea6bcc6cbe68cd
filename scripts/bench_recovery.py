"""Recovery benchmark: the same job, the same injected failures, under this supervisor and the loops users write.

    .venv/bin/python scripts/bench_recovery.py --quick          # a few minutes: raise, supervisor vs shell loop
    .venv/bin/python scripts/bench_recovery.py --repeats 3      # every launcher, every failure kind
    .venv/bin/python scripts/bench_recovery.py --fault-free-only --steps 3   # does every launcher run the job?

Launchers:
  supervisor                the supervisor as configured by default: its Ray cluster kept between attempts, the
                            next attempt's driver started ahead (restart.warm_standby), the guard's deadline
                            adapting to the run's own syncs
  supervisor-fresh-cluster  the same, with a fresh Ray cluster for every attempt
  supervisor-cold-driver    the same, without the standby driver (restart.warm_standby=false)
  supervisor-fixed-deadline the same, with the guard's fixed deadline only (VERL_HOOKS_SYNC_ADAPTIVE=0): run for
                            the hang alone, the one failure a deadline decides
  shell-loop                `until python -m verl_hooks.launch ... trainer.resume_mode=auto; do :; done`
  torchrun                  `torchrun --max-restarts=3` around the same command
  kuberay-like              KubeRay's RayJob with backoffLimit=3: a new Ray cluster per try, the job submitted
                            through the Ray Jobs API, its status read every 3 s (KubeRay's reconcile interval)
Failures, injected into the job's weight sync at the same step on attempt 1 (VERL_HOOKS_FAULTS):
  raise    the sync raises;  kill  the trainer process is SIGKILLed;  hang  the sync never returns;
  rollout  the multi-phase sync (rollout.backend=cpu_gloo), the rollout side raising in resume_generation once
           every trainer task has finished;
  generate the step's generation raises (once its batch is drawn);  reward  the step's reward computation raises.
Job shape: --step-time-s (extra seconds per step), --save-freq, --fault-step, --steps.
The fault's step is not a multiple of the save frequency: what a launcher loses is the steps since the last
periodic save, unless the trainer saves the step it is at (the supervisor's emergency save).

The baselines run the job as a user runs verl today: each attempt gets a Ray cluster of its own that ends with it
(started as the supervisor starts its own, with a private temp dir and ports, so that a shared machine's other
clusters are left alone: see scripts/bench_entry.py), resumes with `trainer.resume_mode=auto`, and has no
weight-sync deadline. Runs that do not finish within --limit-s are cut off and reported as such (a baseline cannot
recover from a hang).

A recovery (the fault firing to the relaunched attempt's first training step) is cut into consecutive parts at
the boundaries the launchers and the job log, so that the parts add up to the whole (PARTS below):
detect, driver exit, stack dump, teardown+fence, backoff, old cluster stop, relaunch, new cluster start,
job start-up, 1st step.
Every run checks that they do (every boundary logged, in order, each launcher's own measure of a part within that
part); a run that fails the check is marked in results.md and the script exits with 1. Steps lost = steps
trained before the fault (the fault's own step included: verl syncs at the end of a step) that the resumed
attempt had to train again; time lost = the fault firing to the job being back at the fault's step (the resumed
attempt's start when it resumed there, else its step finished again).

Timestamps come from the job and the launchers, never from guesses: the fault injector logs when a fault fires
(VERL_HOOKS_FAULT_LOG), the job logs its start and each step (trainer.progress_file), the supervisor its events
(events.jsonl), the baselines' attempts their launch, cluster start and stop, and the job's start and exit
(scripts/bench_entry.py).

Outputs in --out: results.json (every figure), results.md (tables, ratios against the best baseline first),
timeline.png (the attempts of each launcher).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from supervisor.run.timeline import Span, TimelineRow, draw_timeline

REPO = Path(__file__).resolve().parent.parent
SUPERVISORS = ("supervisor", "supervisor-fresh-cluster", "supervisor-cold-driver", "supervisor-fixed-deadline")
ADAPTIVE_GUARD = ("supervisor", "supervisor-fresh-cluster", "supervisor-cold-driver")
ONLY_FAILURES = {"supervisor-fixed-deadline": ("hang",)}
"""Variants that differ from ``supervisor`` only where one failure is concerned: no fault-free run of their own."""
BASELINES = ("shell-loop", "torchrun", "kuberay-like")
LAUNCHERS = (*SUPERVISORS, *BASELINES)
FAILURES = {
    "raise": "naive:raise@{step}#1",
    "kill": "naive:exit@{step}#1",
    "hang": "naive:hang@{step}#1",
    "rollout": "resume_generation:raise@{step}#1",
    "generate": "generate:raise@{step}#1",
    "reward": "reward:raise@{step}#1",
}
DURING_STEP = frozenset({"generate", "reward"})
"""Failures inside a step, before its updates: the step before the fault's is the last one trained."""
FAILURE_JOB_ARGS = {"rollout": ("rollout.backend=cpu_gloo", "rollout.num_replicas=1")}
"""Failures that need another job: their runs have no fault-free run of their own to compare goodput with."""
MARKER = "BENCH_RUN_ID"


@dataclass(frozen=True)
class Plan:
    steps: int = 10
    save_freq: int = 3
    fault_step: int = 5
    extra_step_time_s: float = 0.5
    seed: int = 7
    limit_s: float = 420.0
    guard_deadline_s: float = 20.0
    """The guard's fixed limit for the supervisors' jobs (VERL_HOOKS_SYNC_TIMEOUT_S; its default is 600 s)."""
    guard_adaptive_floor_s: float = 2.0
    """The guard's adaptive deadline is never below this (its default is 60 s): this job's syncs take
    milliseconds, so its adaptive deadline is this floor."""
    watchdog_floor_s: float = 30.0
    """The watchdog's adaptive limit's floor: above the guard's fixed limit, so that a hang in a sync is ended by
    the guard's deadline, adaptive or fixed, which is what the hang compares."""
    max_restarts: int = 3
    """Every launcher's restart budget: the supervisor's restart.max_restarts, the shell loop's attempts less one,
    torchrun's --max-restarts, the RayJob's backoffLimit."""
    job_extra: tuple[str, ...] = ()
    """Job arguments every run gets (scripts/bench_goodput.py: the rollout backend its failures need)."""

    def job_args(self, workdir: Path, failure: str | None = None) -> list[str]:
        return [
            *FAILURE_JOB_ARGS.get(failure or "", ()),
            *self.job_extra,
            f"trainer.total_training_steps={self.steps}",
            f"trainer.save_freq={self.save_freq}",
            f"trainer.extra_step_time_s={self.extra_step_time_s}",
            f"seed={self.seed}",
            "trainer.n_workers=1",
            f"trainer.progress_file={workdir / 'progress.jsonl'}",
        ]


@dataclass
class RunRecord:
    """What one launcher run left behind, before any interpretation."""

    launcher: str
    failure: str | None
    repeat: int
    workdir: str
    started_at: float
    ended_at: float
    exit_code: int | None
    cut_off: bool
    leftover_processes: int
    launcher_max_rss_mb: float
    launcher_cpu_watching_pct: float | None
    """The launcher's CPU from its first attempt's launch to its end, as % of one core (start-up excluded)."""
    final: dict[str, Any] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


# --- running one launcher (mechanism) ---


def command_for(launcher: str, plan: Plan, workdir: Path, failure: str | None = None) -> list[str]:
    job = plan.job_args(workdir, failure)
    if launcher in SUPERVISORS:
        keep = "false" if launcher == "supervisor-fresh-cluster" else "true"
        warm = "false" if launcher == "supervisor-cold-driver" else "true"
        return [
            sys.executable,
            "-m",
            "supervisor",
            f"run_dir={workdir / 'run'}",
            f"ray.keep_cluster_between_attempts={keep}",
            f"restart.warm_standby={warm}",
            f"restart.max_restarts={plan.max_restarts}",
            "watchdog.adaptive_min_steps=2",
            f"watchdog.adaptive_floor_s={plan.watchdog_floor_s:g}",
            "watchdog.adaptive_multiple=3",
            "--",
            *job,
        ]
    baseline_job = [*job, f"trainer.default_local_dir={workdir / 'checkpoints'}", "trainer.resume_mode=auto"]
    entry = [sys.executable, str(REPO / "scripts" / "bench_entry.py"), *baseline_job]
    if launcher == "shell-loop":
        quoted = " ".join(f"'{part}'" for part in entry)
        loop = (
            "attempt=0; while true; do attempt=$((attempt+1)); "
            f'BENCH_ATTEMPT=$attempt {quoted} && exit 0; [ "$attempt" -ge {plan.max_restarts + 1} ] && exit 1; done'
        )
        return ["bash", "-c", loop]
    if launcher == "kuberay-like":
        return [
            sys.executable,
            str(REPO / "scripts" / "bench_entry.py"),
            "--rayjob",
            f"--backoff-limit={plan.max_restarts}",
            *baseline_job,
        ]
    if launcher == "torchrun":
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nnodes=1",
            "--nproc-per-node=1",
            f"--max-restarts={plan.max_restarts}",
            *entry[1:],
        ]
    raise ValueError(f"unknown launcher {launcher}")


def marked_processes(run_id: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(MARKER) == run_id and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return found


def kill_marked(run_id: str) -> int:
    """SIGKILL what is left of a run's processes (the launcher's descendants carry its marker); how many."""
    processes = marked_processes(run_id)
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=10)
    return len(processes)


def launcher_env(launcher: str, failure: str | None, plan: Plan, workdir: Path, run_id: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VERL_HOOKS_", "VERL_SUPERVISOR_", "RAY_ADDRESS"))}
    env.update(
        {
            MARKER: run_id,
            "PYTHONPATH": str(REPO),
            "RAY_AUTH_MODE": "disabled",
            "VERL_HOOKS_FAULT_LOG": str(workdir / "faults.jsonl"),
            "BENCH_LAUNCH_LOG": str(workdir / "launches.jsonl"),
            "BENCH_RAY_DIR": str(workdir / "ray"),
            # The baselines' job has no weight-sync deadline, as verl has none (the guard is there only to inject
            # the faults): neither the fixed one nor the adaptive one; the supervisor's job has the guard's.
            "VERL_HOOKS_SYNC_TIMEOUT_S": str(plan.guard_deadline_s if launcher in SUPERVISORS else 86400),
            "VERL_HOOKS_SYNC_ADAPTIVE": "1" if launcher in ADAPTIVE_GUARD else "0",
            "VERL_HOOKS_SYNC_ADAPTIVE_FLOOR_S": str(plan.guard_adaptive_floor_s),
        }
    )
    if launcher not in SUPERVISORS:
        # The faults of a step fire around the trainer's methods, so its hook must be on for every launcher (the
        # supervisor's preset names the trainer); for the baselines, without the emergency save, which verl has not.
        env["VERL_HOOKS_TRAINER_CLASSES"] = "mini_ppo.trainer:MiniPPOTrainer"
        env["VERL_HOOKS_EMERGENCY_SAVE"] = "0"
    if failure is not None:
        env["VERL_HOOKS_FAULTS"] = FAILURES[failure].format(step=plan.fault_step)
    return env


def fate_sharing_lag(plan: Plan, out: Path, repeat: int) -> dict[str, Any]:
    """The supervisor SIGKILLed while its job trains: how long until no process of the run is left. Nothing
    tells the job; only the supervisor's fate sharing (children that die with it, the reaper) can end it."""
    workdir = out / "runs" / f"fate-sharing-{repeat}"
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    run_id = uuid.uuid4().hex
    env = launcher_env("supervisor", None, plan, workdir, run_id)
    with (workdir / "launcher.log").open("w") as log:
        proc = subprocess.Popen(
            command_for("supervisor", plan, workdir),
            cwd=workdir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    progress = workdir / "progress.jsonl"
    deadline = time.monotonic() + plan.limit_s
    while not any(p["event"] == "step" for p in read_jsonl(progress)) and time.monotonic() < deadline:
        time.sleep(0.2)
    running = len(marked_processes(run_id))
    killed_at = time.monotonic()
    proc.kill()
    lag = None
    while time.monotonic() - killed_at < 10.0:
        if not marked_processes(run_id):
            lag = time.monotonic() - killed_at
            break
    left = len(marked_processes(run_id))
    proc.wait()
    kill_marked(run_id)
    return {"processes_running": running, "gone_after_s": None if lag is None else round(lag, 3), "left": left}


def run_launcher(
    launcher: str,
    failure: str | None,
    repeat: int,
    plan: Plan,
    out: Path,
    *,
    name: str | None = None,
    extra_env: dict[str, str] | None = None,
) -> RunRecord:
    """One run in ``out/runs/<name>``; ``extra_env`` goes over the launcher's environment (another benchmark's
    faults)."""
    name = name or f"{launcher}-{failure or 'fault-free'}-{repeat}"
    workdir = out / "runs" / name
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    run_id = uuid.uuid4().hex
    env = {**launcher_env(launcher, failure, plan, workdir, run_id), **(extra_env or {})}
    log = (workdir / "launcher.log").open("w")
    started = time.time()
    proc = subprocess.Popen(
        command_for(launcher, plan, workdir, failure),
        cwd=workdir,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    sampler = _Sampler(proc.pid)
    sampler.start()
    try:
        code = proc.wait(timeout=plan.limit_s)
        cut_off = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        code, cut_off = proc.wait(), True
    except BaseException:
        # Interrupted (Ctrl-C, or a SIGTERM the caller turned into one): nothing of the run outlives the benchmark.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        sampler.stop()
        kill_marked(run_id)
        log.close()
        raise
    ended = time.time()
    sampler.stop()
    leftovers = _settled_count(run_id)
    kill_marked(run_id)
    log.close()
    final_path = (
        workdir / "run" / "checkpoints" if launcher in SUPERVISORS else workdir / "checkpoints"
    ) / "final.json"
    final = json.loads(final_path.read_text()) if final_path.exists() else None
    record = RunRecord(
        launcher,
        failure,
        repeat,
        str(workdir),
        started,
        ended,
        None if cut_off else code,
        cut_off,
        leftovers,
        sampler.max_rss_mb,
        None,
        final,
    )
    attempts = attempt_launches(record)
    if attempts:
        record.launcher_cpu_watching_pct = sampler.cpu_percent_since(attempts[0]["launched_at"])
    return record


def _settled_count(run_id: str, settle_s: float = 5.0) -> int:
    """Processes of the run still alive once the launcher is gone (given a few seconds to exit by themselves)."""
    deadline = time.monotonic() + settle_s
    count = len(marked_processes(run_id))
    while count and time.monotonic() < deadline:
        time.sleep(0.5)
        count = len(marked_processes(run_id))
    return count


class _Sampler(threading.Thread):
    """The launcher process's own memory and CPU (not its children's), sampled while it runs."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self._pid = pid
        self._halt = threading.Event()
        self.max_rss_mb = 0.0
        self.cpu_samples: list[tuple[float, float]] = []
        """(time.time(), the process's CPU seconds so far)"""

    def run(self) -> None:
        try:
            process = psutil.Process(self._pid)
            while not self._halt.is_set():
                with process.oneshot():
                    self.max_rss_mb = max(self.max_rss_mb, process.memory_info().rss / 2**20)
                    times = process.cpu_times()
                    self.cpu_samples.append((time.time(), times.user + times.system))
                self._halt.wait(0.5)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            return

    def cpu_percent_since(self, since: float) -> float | None:
        """CPU use (% of one core) between ``since`` and the last sample: watching, start-up left out."""
        later = [(ts, cpu) for ts, cpu in self.cpu_samples if ts >= since]
        if len(later) < 2 or later[-1][0] <= later[0][0]:
            return None
        (t0, c0), (t1, c1) = later[0], later[-1]
        return round(100 * (c1 - c0) / (t1 - t0), 2)

    def stop(self) -> None:
        self._halt.set()
        self.join(2)


# --- what the logs say (pure) ---


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def attempt_launches(record: RunRecord) -> list[dict[str, Any]]:
    """[{launched_at, ended_at, detected_at}] per attempt, from the launcher's own log.

    detected_at is when the launcher knew the attempt failed: the supervisor's first error_record_received,
    stall_detected or attempt_exited event; for the baselines, the moment their attempt process saw the job exit
    (bench_entry).
    """
    workdir = Path(record.workdir)
    if record.launcher in SUPERVISORS:
        events = read_jsonl(workdir / "run" / "events.jsonl")
        started = [e for e in events if e["event"] == "attempt_started"]
        exited = [e for e in events if e["event"] == "attempt_exited"]
        # The supervisor knows an attempt failed at the first of: its error record, a stall, its driver's exit.
        known = [e for e in events if e["event"] in ("error_record_received", "stall_detected")]
        attempts = []
        for index, start in enumerate(started):
            end = exited[index]["ts"] if index < len(exited) else None
            first = min((e["ts"] for e in known if e["attempt"] == start["attempt"]), default=None)
            detected = min(t for t in (first, end) if t is not None) if first or end else None
            attempts.append({"launched_at": start["ts"], "ended_at": end, "detected_at": detected})
        return attempts
    launches = read_jsonl(workdir / "launches.jsonl")
    exits = {e["attempt"]: e["ts"] for e in launches if e["event"] == "exit"}
    return [
        {"launched_at": e["ts"], "ended_at": exits.get(e["attempt"]), "detected_at": exits.get(e["attempt"])}
        for e in launches
        if e["event"] == "launch"
    ]


# --- where a recovery's time goes (pure) ---

# The parts of a recovery, in the order they happen: (key, title, meaning). Each is the interval between two
# boundaries that a launcher or the job logs; a part that happens twice (relaunch) is the sum of its intervals.
PARTS = (
    (
        "detect_s",
        "detect",
        "the fault firing to the launcher knowing the attempt failed: the supervisor's error_record_received, "
        "stall_detected or attempt_exited, whichever comes first; for a baseline, the job's driver exit as its "
        "attempt process sees it (the job's own time to die included; kuberay-like: at its next status poll)",
    ),
    (
        "driver_exit_s",
        "driver exit",
        "the supervisor, told of the failure by the job's error record (over the heartbeat channel): its driver "
        "exiting by itself, for at most teardown.record_grace_s",
    ),
    ("stack_dump_s", "stack dump", "the supervisor on a stall: the stalled job's stacks captured before it is ended"),
    (
        "teardown_fence_s",
        "teardown+fence",
        "the supervisor ending every process of the attempt and verifying that no actor of it is left "
        "(then recording the newest complete checkpoint)",
    ),
    ("backoff_s", "backoff", "the supervisor's restart delay"),
    ("old_cluster_stop_s", "old cluster stop", "the failed attempt's Ray cluster going down (a kept cluster: 0)"),
    (
        "relaunch_s",
        "relaunch",
        "the launcher's own work between the other parts: choosing the checkpoint, spawning the driver "
        "(supervisor); the attempt process exiting, the launcher starting the next one, its Python start-up, "
        "spawning the job's driver (shell loop, torchrun); submitting the job (kuberay-like)",
    ),
    ("new_cluster_start_s", "new cluster start", "a new Ray cluster's start-up (a kept cluster: 0)"),
    (
        "job_startup_s",
        "job start-up",
        "the job's driver spawned to its trainer ready: imports, Ray connection, TaskRunner, workers, "
        "the checkpoint loaded",
    ),
    ("first_step_s", "1st step", "the relaunched attempt's first weight sync and training step"),
)
PART_KEYS = tuple(key for key, _, _ in PARTS)
ADD_UP_TOLERANCE_S = 0.05
"""How far the parts' sum may be from the recovery, and a part below zero."""
CONTENT_TOLERANCE_S = 0.25
"""How much longer a part may be than what its launcher measured for it (event writes, state files) before that
excess counts as time the part's name does not account for."""


@dataclass
class Boundary:
    part: str
    """The part that ends at this boundary."""
    ts: float | None
    what: str
    """Which log line it is, for the check's messages."""


@dataclass
class Breakdown:
    parts: dict[str, float | None]
    recover_s: float | None
    """The fault firing to the relaunched attempt's first training step, taken from those two lines alone."""
    measured: dict[str, float] = field(default_factory=dict)
    """A part's duration as the launcher measured it itself (teardown, backoff, cluster stop and start)."""
    problems: list[str] = field(default_factory=list)


def _first(entries: list[dict[str, Any]], event: str, **match: Any) -> dict[str, Any] | None:
    return next((e for e in entries if e["event"] == event and all(e.get(k) == v for k, v in match.items())), None)


def _ts(entry: dict[str, Any] | None, plus: float = 0.0) -> float | None:
    return None if entry is None else entry["ts"] + plus


def _job_boundaries(progress: list[dict[str, Any]], since: float | None) -> list[Boundary]:
    """The relaunched job's own boundaries: its trainer ready (progress "start"), its first step."""
    start = next((p["ts"] for p in progress if since is not None and p["event"] == "start" and p["ts"] >= since), None)
    step = next((p["ts"] for p in progress if since is not None and p["event"] == "step" and p["ts"] >= since), None)
    return [
        Boundary("job_startup_s", start, "the relaunched job's progress 'start'"),
        Boundary("first_step_s", step, "the relaunched job's first progress 'step'"),
    ]


def supervisor_boundaries(
    events: list[dict[str, Any]], progress: list[dict[str, Any]]
) -> tuple[list[Boundary], dict[str, float]]:
    """Attempt 1's end to attempt 2's first step, from events.jsonl (each event's ts is taken when it is written,
    after what it reports)."""
    exited = _first(events, "attempt_exited", attempt=1)
    stall = _first(events, "stall_detected", attempt=1)
    record = _first(events, "error_record_received", attempt=1)
    stacks = _first(events, "stacks_dumped", attempt=1)
    teardown = _first(events, "teardown", attempt=1)
    backoff = _first(events, "backoff", next_attempt=2)
    relaunch = _first(events, "attempt_started", attempt=2)
    measured: dict[str, float] = {}
    if teardown is not None:
        measured["teardown_fence_s"] = teardown["duration_s"]
    if backoff is not None:
        measured["backoff_s"] = backoff["delay_s"]
    if stacks is not None:
        measured["stack_dump_s"] = stacks["duration_s"]
    known = [e for e in (record, stall, exited) if e is not None]
    known_at = min(e["ts"] for e in known) if known else None
    # After the error record, the driver is given a grace to exit; after a stall, its stacks are dumped first.
    waited_for = "stack_dump_s" if stall is not None and stall["ts"] == known_at else "driver_exit_s"
    marks = [
        Boundary("detect_s", known_at, "error_record_received, stall_detected or attempt_exited of attempt 1"),
        Boundary(waited_for, _ts(exited), "attempt_exited of attempt 1"),
        Boundary("teardown_fence_s", _ts(teardown), "teardown of attempt 1"),
        # The sleep follows the backoff event at once and lasts delay_s; nothing is logged when it ends.
        Boundary("backoff_s", _ts(backoff, backoff["delay_s"] if backoff else 0.0), "backoff before attempt 2"),
    ]
    # The cluster's stop and start happen in the backend's prepare(), whose events are written together once it
    # returns: their intervals are the durations they carry, counted back from that moment. Before the stop:
    # choosing the checkpoint (the relaunch's own work).
    low, high = _ts(backoff), _ts(relaunch)
    prepared = [
        e
        for e in events
        if e["event"] in ("cluster_stopped", "cluster_started") and low is not None and high is not None
        if low <= e["ts"] <= high
    ]
    if prepared:
        done = prepared[0]["ts"]
        start_s = sum(e["startup_s"] for e in prepared if e["event"] == "cluster_started")
        stop_s = sum(e["duration_s"] for e in prepared if e["event"] == "cluster_stopped")
        marks += [
            Boundary("relaunch_s", done - start_s - stop_s, "the old cluster's stop beginning (cluster_stopped)"),
            Boundary("old_cluster_stop_s", done - start_s, "the new cluster's start beginning (cluster_started)"),
            Boundary("new_cluster_start_s", done, "cluster_started before attempt 2"),
        ]
    marks.append(Boundary("relaunch_s", high, "attempt_started of attempt 2"))
    marks += _job_boundaries(progress, high)
    return marks, measured


def baseline_boundaries(
    launches: list[dict[str, Any]], progress: list[dict[str, Any]]
) -> tuple[list[Boundary], dict[str, float]]:
    """Attempt 1's end to attempt 2's first step, from bench_entry's launch log."""
    exited = _first(launches, "exit", attempt=1)
    down = _first(launches, "cluster_down", attempt=1)
    launch = _first(launches, "launch", attempt=2)
    up = _first(launches, "cluster_up", attempt=2)
    started = _first(launches, "job_started", attempt=2)
    measured: dict[str, float] = {}
    if down is not None:
        measured["old_cluster_stop_s"] = down["duration_s"]
    if up is not None:
        measured["new_cluster_start_s"] = up["startup_s"]
    marks = [
        Boundary("detect_s", _ts(exited), "exit of attempt 1"),
        Boundary("old_cluster_stop_s", _ts(down), "cluster_down of attempt 1"),
        Boundary("relaunch_s", _ts(launch), "launch of attempt 2"),
        Boundary("new_cluster_start_s", _ts(up), "cluster_up of attempt 2"),
        Boundary("relaunch_s", _ts(started), "job_started of attempt 2"),
        *_job_boundaries(progress, _ts(started)),
    ]
    return marks, measured


def breakdown(fault_at: float, marks: list[Boundary], measured: dict[str, float], launcher: str) -> Breakdown:
    """The parts between consecutive boundaries, and the check that they account for the whole recovery."""
    parts: dict[str, float | None] = dict.fromkeys(PART_KEYS)
    if launcher in SUPERVISORS:
        # Parts a supervisor always has, even when they take no time (no stall, a kept cluster).
        for key in ("driver_exit_s", "stack_dump_s", "old_cluster_stop_s", "new_cluster_start_s"):
            parts[key] = 0.0
    problems = []
    previous = fault_at
    for mark in marks:
        if mark.ts is None:
            problems.append(f"no boundary: {mark.what} is not in the logs")
            break
        if mark.ts < previous - ADD_UP_TOLERANCE_S:
            # Checked per interval: a part made of two intervals could otherwise hide a negative one.
            problems.append(f"{mark.what} comes {previous - mark.ts:.2f} s before the boundary preceding it")
        parts[mark.part] = (parts[mark.part] or 0.0) + mark.ts - previous
        previous = mark.ts
    recover = marks[-1].ts - fault_at if marks and marks[-1].ts is not None else None
    result = Breakdown(parts, recover, measured, problems)
    result.problems += check_breakdown(result) if recover is not None else []
    return result


def check_breakdown(result: Breakdown) -> list[str]:
    """Why the parts do not account for the recovery (empty: they do)."""
    problems = []
    total = sum(value for value in result.parts.values() if value is not None)
    if result.recover_s is None or abs(total - result.recover_s) > ADD_UP_TOLERANCE_S:
        problems.append(f"the parts add up to {total:.2f} s, the recovery took {result.recover_s} s")
    titles = {key: title for key, title, _ in PARTS}
    for key, value in result.parts.items():
        if value is not None and value < -ADD_UP_TOLERANCE_S:
            problems.append(f"{titles[key]} is {value:.2f} s: its boundaries are out of order")
    for key, duration in result.measured.items():
        value = result.parts.get(key)
        if value is None or value < duration - ADD_UP_TOLERANCE_S:
            problems.append(f"{titles[key]} is {value} s, shorter than the {duration:.2f} s its launcher measured")
        elif value - duration > CONTENT_TOLERANCE_S:
            problems.append(
                f"{titles[key]} is {value:.2f} s, of which only {duration:.2f} s is what its launcher measured for it"
            )
    return problems


def compute_metrics(record: RunRecord, plan: Plan) -> dict[str, Any]:
    workdir = Path(record.workdir)
    progress = read_jsonl(workdir / "progress.jsonl")
    faults = read_jsonl(workdir / "faults.jsonl")
    attempts = attempt_launches(record)
    metrics: dict[str, Any] = {
        "wall_s": record.ended_at - record.started_at,
        "attempts": len(attempts),
        "finished": record.final is not None and not record.cut_off,
        "cut_off": record.cut_off,
        "leftover_processes": record.leftover_processes,
        "launcher_max_rss_mb": round(record.launcher_max_rss_mb, 1),
        "launcher_cpu_watching_pct": record.launcher_cpu_watching_pct,
        "first_step_after_launch_s": _first_step_after(progress, record.started_at, record.started_at),
    }
    if record.launcher in SUPERVISORS:
        events = read_jsonl(workdir / "run" / "events.jsonl")
        cluster = [e for e in events if e["event"] == "cluster_started"]
        metrics["cluster_start_s"] = cluster[0]["startup_s"] if cluster else None
        metrics["time_to_first_attempt_s"] = attempts[0]["launched_at"] - record.started_at if attempts else None
    if attempts:
        # A cold attempt: its launch (the cluster already up) to its first training step.
        metrics["attempt_to_first_step_s"] = _first_step_after(progress, attempts[0]["launched_at"], 0.0)
    if record.failure is not None:
        metrics["fault_fired"] = bool(faults)
    if not faults or record.failure is None:
        return metrics
    fault_at = faults[0]["ts"]
    if record.launcher in SUPERVISORS:
        metrics.update(_record_figures(workdir, read_jsonl(workdir / "run" / "events.jsonl")))
    first = attempts[0] if attempts else None
    metrics["detect_s"] = first["detected_at"] - fault_at if first and first["detected_at"] else None
    if len(attempts) < 2:
        return metrics  # no relaunch (cut off): nothing more to break down
    if record.launcher in SUPERVISORS:
        marks, measured = supervisor_boundaries(read_jsonl(workdir / "run" / "events.jsonl"), progress)
    else:
        marks, measured = baseline_boundaries(read_jsonl(workdir / "launches.jsonl"), progress)
    result = breakdown(fault_at, marks, measured, record.launcher)
    metrics.update(result.parts)
    metrics["recover_s"] = result.recover_s
    metrics["measured_parts"] = result.measured
    metrics["adds_up"] = not result.problems
    metrics["breakdown_problems"] = result.problems
    relaunch = attempts[1]["launched_at"]
    metrics["relaunch_to_first_step_s"] = _first_step_after(progress, relaunch, 0.0)
    if metrics.get("deadline_s") is not None and metrics.get("detect_s") is not None:
        metrics["after_deadline_s"] = round(metrics["detect_s"] - metrics["deadline_s"], 3)
    start_events = [p for p in progress if p["event"] == "start" and p["ts"] >= relaunch]
    resumed_from = (start_events[0].get("resumed_from_step") or 0) if start_events else None
    # verl syncs weights at the end of a step, after its save: the fault's step was trained, saved or not. A fault
    # inside a step (generation, reward) comes before its updates: the step before it is the last one trained.
    trained = faults[0]["step"] - (1 if record.failure in DURING_STEP else 0)
    metrics["steps_redone"] = None if resumed_from is None else trained - resumed_from
    back = [
        p["ts"]
        for p in progress
        if p["ts"] >= relaunch and p["event"] in ("start", "step") and (p.get("step") or 0) >= trained
    ]
    metrics["time_lost_s"] = round(min(back) - fault_at, 3) if back else None
    return metrics


def _record_figures(workdir: Path, events: list[dict[str, Any]]) -> dict[str, Any]:
    """From attempt 1's error record: how long after the job wrote it the supervisor had it
    (``record_to_supervisor_s``), and the weight-sync limit that applied to a hang (``deadline_s``, from the
    guard's message: "did not finish within N s (...)")."""
    path = workdir / "run" / "attempts" / "1" / "error.json"
    if not path.exists():
        return {}
    record = json.loads(path.read_text())
    figures: dict[str, Any] = {}
    received = _first(events, "error_record_received", attempt=1)
    if received is not None and record.get("source") != "supervisor-watchdog":
        figures["record_to_supervisor_s"] = round(received["ts"] - record["timestamp"], 4)
    match = re.search(r"within ([0-9.]+) s \(", record.get("message") or "")
    if record.get("hang") and match:
        figures["deadline_s"] = float(match.group(1))
    return figures


def _first_step_after(progress: list[dict[str, Any]], since: float, origin: float) -> float | None:
    steps = [p["ts"] for p in progress if p["event"] == "step" and p["ts"] >= since]
    return (min(steps) - (origin or since)) if steps else None


# --- reporting ---

OUTCOME_COLUMNS = (
    ("recover_s", "recover (s)"),
    ("relaunch_to_first_step_s", "relaunch to 1st step (s)"),
    ("steps_redone", "steps redone"),
    ("time_lost_s", "time lost (s)"),
    ("leftover_processes", "left behind"),
    ("wall_s", "wall (s)"),
    ("goodput", "goodput"),
)
SUPERVISOR_COLUMNS = (
    ("record_to_supervisor_s", "record to supervisor (s)"),
    ("deadline_s", "sync deadline (s)"),
    ("after_deadline_s", "detected after the deadline (s)"),
)
COLUMNS = (*((key, title) for key, title, _ in PARTS), *OUTCOME_COLUMNS, *SUPERVISOR_COLUMNS)


def aggregate(records: list[RunRecord]) -> dict[str, dict[str, dict[str, Any]]]:
    """{failure: {launcher: {metric: {median, min, max, n}}}}, with goodput against the same launcher's
    fault-free run."""
    fault_free = {
        r.launcher: statistics.median(
            [x.metrics["wall_s"] for x in records if x.launcher == r.launcher and x.failure is None]
        )
        for r in records
        if r.failure is None
    }
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for record in records:
        if record.failure is None:
            continue
        if record.launcher in fault_free and record.metrics.get("finished") and record.failure not in FAILURE_JOB_ARGS:
            record.metrics["goodput"] = round(fault_free[record.launcher] / record.metrics["wall_s"], 3)
        cell = table.setdefault(record.failure, {}).setdefault(record.launcher, {"runs": []})
        cell["runs"].append(record.metrics)
    for launchers in table.values():
        for cell in launchers.values():
            runs = cell["runs"]
            cell["cut_off"] = sum(1 for m in runs if m.get("cut_off"))
            cell["not_adding_up"] = sum(1 for m in runs if m.get("adds_up") is False)
            for key, _ in COLUMNS:
                values = [m[key] for m in runs if m.get(key) is not None]
                if values:
                    cell[key] = {
                        "median": statistics.median(values),
                        "min": min(values),
                        "max": max(values),
                        "n": len(values),
                    }
    return table


def headline(table: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    lines = []
    for failure, launchers in table.items():
        ours = launchers.get("supervisor", {}).get("recover_s")
        baselines = {
            name: cell["recover_s"]["median"]
            for name, cell in launchers.items()
            if name not in SUPERVISORS and "recover_s" in cell
        }
        if not ours:
            continue
        if not baselines:
            lines.append(
                f"- **{failure}**: the supervisor recovers in {ours['median']:.1f} s; no baseline recovered "
                f"(cut off after the limit)"
            )
            continue
        best_name, best = min(baselines.items(), key=lambda item: item[1])
        lines.append(
            f"- **{failure}**: time to recover {ours['median']:.1f} s with the supervisor vs {best:.1f} s with the "
            f"best baseline ({best_name}): {best / ours['median']:.2f}x faster"
        )
    return lines


def cost_rows(table: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """What each failure cost each launcher: steps trained again, and the time from the fault to the job being
    back at the fault's step (the work redone, the detection, the teardown and the start-up together)."""
    launchers = [name for name in LAUNCHERS if any(name in cells for cells in table.values())]
    if not table or not launchers:
        return []
    lines = [
        "## What a failure costs",
        "",
        "Steps redone, and time lost (s): the fault to the job back at the last step trained before it (the fault's "
        "step for a failure in its weight sync, the step before for one in its generation or reward). Medians.",
        "",
        "| failure | " + " | ".join(launchers) + " |",
        "|---|" + "---|" * len(launchers),
    ]
    for failure, cells in table.items():
        shown = []
        for name in launchers:
            redone, lost = (_median(table, failure, name, key) for key in ("steps_redone", "time_lost_s"))
            if name not in cells:
                shown.append("")
            elif lost is None:
                shown.append("not back (cut off)" if cells[name]["cut_off"] else "-")
            else:
                shown.append(f"{redone:g} steps, {lost:.1f} s" if redone is not None else f"{lost:.1f} s")
        lines.append(f"| {failure} | " + " | ".join(shown) + " |")
    return [*lines, ""]


def _median(table: dict[str, dict[str, dict[str, Any]]], failure: str, launcher: str, key: str) -> float | None:
    stat = table.get(failure, {}).get(launcher, {}).get(key)
    return None if stat is None else stat["median"]


def goals(table: dict[str, dict[str, dict[str, Any]]], records: list[RunRecord], overhead: dict[str, Any]) -> list[str]:
    """The recovery goals (issue: recover in half the time of the shell loop), each with what this run measured."""
    rows: list[tuple[str, str, float | None, str, bool | None]] = []

    def add(goal: str, target: str, value: float | None, shown: str, met: bool | None) -> None:
        rows.append((goal, target, value, shown, met))

    for failure in ("raise", "kill"):
        ours, loop = (
            _median(table, failure, "supervisor", "recover_s"),
            _median(table, failure, "shell-loop", "recover_s"),
        )
        if ours is not None and loop is not None:
            ratio = ours / loop
            add(
                f"time to recover, {failure}",
                "<= 0.5x the shell loop's",
                ratio,
                f"{ours:.1f} s vs {loop:.1f} s: {ratio:.2f}x",
                ratio <= 0.5,
            )
    for failure in ("raise", "rollout", "generate", "reward"):
        redone = _median(table, failure, "supervisor", "steps_redone")
        what = "a failed sync whose trainer side finished" if failure in ("raise", "rollout") else "a failure in a step"
        if redone is not None:
            add(
                f"steps redone after {what} ({failure})",
                "0 (the emergency save)",
                redone,
                f"{redone:g}",
                redone == 0,
            )
    lags = [
        r.metrics["record_to_supervisor_s"]
        for r in records
        if r.launcher == "supervisor" and r.metrics.get("record_to_supervisor_s") is not None
    ]
    if lags:
        lag = statistics.median(lags)
        add(
            "error record written to the supervisor having it",
            "<= 50 ms",
            lag,
            f"{lag * 1000:.0f} ms (median of {len(lags)})",
            lag <= 0.05,
        )
    cold = [
        r.metrics["attempt_to_first_step_s"]
        for r in records
        if r.launcher == "supervisor" and r.failure is None and r.metrics.get("attempt_to_first_step_s")
    ]
    for launcher in ("supervisor", "supervisor-cold-driver"):
        warm = [
            m for f in ("raise", "kill") if (m := _median(table, f, launcher, "relaunch_to_first_step_s")) is not None
        ]
        if cold and warm:
            ratio = statistics.median(warm) / statistics.median(cold)
            label = "relaunch to its first step" + (
                " (standby driver)" if launcher == "supervisor" else " (cold driver)"
            )
            add(
                label,
                "<= 0.5x a cold attempt's launch to its first step",
                ratio,
                f"{statistics.median(warm):.1f} s vs {statistics.median(cold):.1f} s: {ratio:.2f}x",
                ratio <= 0.5,
            )
    after = _median(table, "hang", "supervisor", "after_deadline_s")
    deadline = _median(table, "hang", "supervisor", "deadline_s")
    fixed = _median(table, "hang", "supervisor-fixed-deadline", "deadline_s")
    if after is not None and deadline is not None:
        versus = f" (fixed: {fixed:g} s)" if fixed is not None else ""
        add(
            "a hang ended after its adaptive deadline",
            "<= 2 s",
            after,
            f"{after:.2f} s after a {deadline:g} s deadline{versus}",
            after <= 2.0,
        )
    memory = overhead.get("resident memory (max, MB)")
    if memory is not None:
        add("the supervisor's resident memory", "<= 80 MB", memory, f"{memory:.0f} MB", memory <= 80)
    fate = overhead.get(FATE_KEY)
    if fate is not None:
        add("a SIGKILLed supervisor's job gone", "<= 1 s", fate, f"{fate:.2f} s", fate <= 1.0)
    if not rows:
        return []
    lines = ["## Goals", "", "| goal | target | measured | met |", "|---|---|---|---|"]
    lines += [f"| {goal} | {target} | {shown} | {'yes' if met else '**no**'} |" for goal, target, _, shown, met in rows]
    return [*lines, ""]


def _cells(cell: dict[str, Any], columns: tuple[tuple[str, str], ...]) -> list[str]:
    values = []
    for key, _ in columns:
        stat = cell.get(key)
        if stat is None:
            values.append("-")
        elif stat["n"] > 1 and stat["min"] != stat["max"]:
            values.append(f"{stat['median']:.2f} [{stat['min']:.2f}-{stat['max']:.2f}]")
        else:
            values.append(f"{stat['median']:.2f}")
    return values


def fault_free_rows(records: list[RunRecord]) -> list[str]:
    rows = [r for r in records if r.failure is None]
    if not rows:
        return []
    lines = [
        "## fault-free",
        "",
        "| launcher | finished | wall (s) | launch to 1st step (s) | cut off |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        m = r.metrics
        first = m.get("first_step_after_launch_s")
        lines.append(
            f"| {r.launcher} | {'yes' if m['finished'] else '**no**'} | {m['wall_s']:.2f} | "
            f"{'-' if first is None else f'{first:.2f}'} | {'yes' if r.cut_off else 'no'} |"
        )
    return [*lines, ""]


def to_markdown(
    table: dict[str, dict[str, dict[str, Any]]],
    plan: Plan,
    overhead: dict[str, Any],
    records: list[RunRecord],
    problems: list[str],
) -> str:
    lines = ["# Recovery benchmark", "", *headline(table), ""]
    if problems:
        lines += ["**This run is not a valid comparison:**", "", *(f"- {p}" for p in problems), ""]
    lines.append(
        f"Job: mini-PPO, {plan.steps} steps, checkpoint every {plan.save_freq}, fault at step {plan.fault_step} "
        f"on attempt 1, {plan.extra_step_time_s} s of extra step time; runs cut off after {plan.limit_s:.0f} s. "
        "Medians, with [min-max] over the repeats. A recovery is the fault firing to the relaunched attempt's "
        "first training step; its parts are consecutive, so that they add up to it (checked on every run: the "
        '"adds up" column), and a part a launcher does not have is "-":'
    )
    lines += ["", *(f"- **{title}**: {meaning}" for _, title, meaning in PARTS), ""]
    lines += goals(table, records, overhead)
    lines += cost_rows(table)
    lines += fault_free_rows(records)
    part_columns = tuple((key, title) for key, title, _ in PARTS)
    for failure, launchers in table.items():
        lines += ["", f"## {failure}", "", "Where the recovery's time goes (s):", ""]
        lines.append("| launcher | " + " | ".join(title for _, title in part_columns) + " | = recover | adds up |")
        lines.append("|" + "---|" * (len(part_columns) + 3))
        for launcher, cell in launchers.items():
            recover = _cells(cell, (("recover_s", ""),))[0]
            runs = len(cell["runs"])
            if "recover_s" not in cell:
                adds_up = "- (no recovery)"
            elif cell["not_adding_up"]:
                adds_up = f"**no** ({cell['not_adding_up']} of {runs})"
            else:
                adds_up = "yes"
            lines.append(f"| {launcher} | " + " | ".join(_cells(cell, part_columns)) + f" | {recover} | {adds_up} |")
        lines += ["", "| launcher | " + " | ".join(title for _, title in OUTCOME_COLUMNS) + " | cut off |"]
        lines.append("|" + "---|" * (len(OUTCOME_COLUMNS) + 2))
        for launcher, cell in launchers.items():
            values = _cells(cell, OUTCOME_COLUMNS)
            lines.append(f"| {launcher} | " + " | ".join(values) + f" | {cell['cut_off']} of {len(cell['runs'])} |")
        ours = {name: cell for name, cell in launchers.items() if name in SUPERVISORS}
        if ours:
            lines += ["", "| supervisor | " + " | ".join(title for _, title in SUPERVISOR_COLUMNS) + " |"]
            lines.append("|" + "---|" * (len(SUPERVISOR_COLUMNS) + 1))
            lines += [
                f"| {name} | " + " | ".join(_cells(cell, SUPERVISOR_COLUMNS)) + " |" for name, cell in ours.items()
            ]
    if overhead:
        lines += ["", "## The supervisor's own cost", ""]
        lines += [f"- {key}: {value}" for key, value in overhead.items()]
    return "\n".join(lines) + "\n"


def validity_problems(records: list[RunRecord]) -> list[str]:
    """What makes this run no valid comparison: a launcher that cannot run the job without a fault, or a
    recovery whose parts do not account for it."""
    problems = []
    for r in records:
        name = f"{r.launcher} / {r.failure or 'fault-free'} / repeat {r.repeat}"
        if r.failure is None and not r.metrics.get("finished"):
            why = f"cut off after {r.metrics['wall_s']:.0f} s" if r.cut_off else f"exit {r.exit_code}"
            problems.append(f"{name}: the fault-free run did not finish ({why}); see {r.workdir}")
        if r.failure is not None and r.metrics.get("fault_fired") is False:
            problems.append(f"{name}: the fault never fired (VERL_HOOKS_FAULT_LOG is empty); see {r.workdir}")
        for problem in r.metrics.get("breakdown_problems") or []:
            problems.append(f"{name}: {problem}")
    return problems


FATE_KEY = "fate sharing: a SIGKILLed supervisor's run gone after (median, s)"


def supervisor_overhead(records: list[RunRecord], fate: list[dict[str, Any]]) -> dict[str, Any]:
    ours = [r for r in records if r.launcher == "supervisor"]
    if not ours:
        return {}
    lags = [f["gone_after_s"] for f in fate if f["gone_after_s"] is not None]
    shared = {}
    if fate:
        shared = {
            FATE_KEY: round(statistics.median(lags), 3) if lags else None,
            "fate sharing: each time (s)": [f["gone_after_s"] for f in fate],
            "fate sharing: the run's processes when the supervisor was killed": [f["processes_running"] for f in fate],
            "fate sharing: processes left 10 s after": sum(f["left"] for f in fate),
        }
    cpu_share = [r.metrics["launcher_cpu_watching_pct"] for r in ours if r.metrics["launcher_cpu_watching_pct"]]
    return {
        "resident memory (max, MB)": round(max(r.metrics["launcher_max_rss_mb"] for r in ours), 1),
        "CPU while watching (median, % of one core)": round(statistics.median(cpu_share), 2) if cpu_share else None,
        "start-up to the first attempt (median, s)": round(
            statistics.median(
                r.metrics["time_to_first_attempt_s"] for r in ours if r.metrics.get("time_to_first_attempt_s")
            ),
            2,
        ),
        "of which the Ray cluster's start (median, s)": round(
            statistics.median(r.metrics["cluster_start_s"] for r in ours if r.metrics.get("cluster_start_s")), 2
        ),
        **shared,
    }


def plot_timeline(records: list[RunRecord], path: Path) -> None:
    shown = [r for r in records if r.failure is not None and r.repeat == 0]
    if not shown:
        return
    rows = []
    for record in shown:
        workdir = Path(record.workdir)
        progress = read_jsonl(workdir / "progress.jsonl")
        row = TimelineRow(f"{record.launcher} / {record.failure}")
        for attempt in attempt_launches(record):
            start = attempt["launched_at"] - record.started_at
            end = (attempt["ended_at"] or record.ended_at) - record.started_at
            first = _first_step_after(progress, attempt["launched_at"], record.started_at)
            training_from = min(first, end) if first is not None and first >= start else end
            row.spans += [Span(start, training_from, "start-up"), Span(training_from, end, "training")]
        row.steps = [p["ts"] - record.started_at for p in progress if p["event"] == "step"]
        faults = read_jsonl(workdir / "faults.jsonl")
        row.failures = [faults[0]["ts"] - record.started_at] if faults else []
        if record.cut_off:
            row.note, row.note_at = "cut off", record.ended_at - record.started_at
        rows.append(row)
    draw_timeline(
        rows,
        path,
        "Recovery timelines",
        "seconds since the launcher started (ticks: steps; x: the fault)",
    )


# --- main ---


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="raise only, supervisor and shell loop, one repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--launchers", default=",".join(LAUNCHERS))
    parser.add_argument("--failures", default=",".join(FAILURES))
    parser.add_argument("--steps", type=int, default=Plan.steps)
    parser.add_argument("--step-time-s", type=float, default=Plan.extra_step_time_s, help="extra seconds per step")
    parser.add_argument("--save-freq", type=int, default=Plan.save_freq)
    parser.add_argument(
        "--fault-step", type=int, default=None, help=f"default: {Plan.fault_step}, or the last step but one"
    )
    parser.add_argument("--limit-s", type=float, default=Plan.limit_s)
    parser.add_argument("--no-fault-free", action="store_true", help="skip the fault-free reference runs")
    parser.add_argument(
        "--fault-free-only", action="store_true", help="only the fault-free runs: does every launcher run the job?"
    )
    parser.add_argument(
        "--no-fate-sharing", action="store_true", help="skip killing the supervisor to time its job's end"
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench_out")
    args = parser.parse_args(argv)
    if args.quick:
        args.launchers, args.failures, args.repeats = "supervisor,shell-loop", "raise", 1
    if args.fault_free_only and args.no_fault_free:
        parser.error("--fault-free-only and --no-fault-free leave nothing to run")
    launchers = [name for name in args.launchers.split(",") if name]
    failures = [] if args.fault_free_only else [name for name in args.failures.split(",") if name]
    unknown = [n for n in launchers if n not in LAUNCHERS] + [f for f in failures if f not in FAILURES]
    if unknown:
        parser.error(f"unknown launcher or failure: {', '.join(unknown)}")
    fault_step = args.fault_step if args.fault_step is not None else min(Plan.fault_step, args.steps - 1)
    if not 1 <= fault_step < args.steps:
        parser.error(f"--fault-step must be in 1..{args.steps - 1} (a step with one after it), got {fault_step}")
    if args.save_freq < 1:
        parser.error("--save-freq must be >= 1")
    plan = Plan(
        steps=args.steps,
        save_freq=args.save_freq,
        fault_step=fault_step,
        extra_step_time_s=args.step_time_s,
        limit_s=args.limit_s,
    )
    args.out = args.out.resolve()  # each launcher runs in its own folder: a relative path would land inside it
    args.out.mkdir(parents=True, exist_ok=True)

    records: list[RunRecord] = []
    schedule = [
        (launcher, None, 0) for launcher in launchers if not args.no_fault_free and launcher not in ONLY_FAILURES
    ]
    schedule += [
        (launcher, failure, r)
        for r in range(args.repeats)
        for failure in failures
        for launcher in launchers
        if failure in ONLY_FAILURES.get(launcher, FAILURES)
    ]
    for number, (launcher, failure, repeat) in enumerate(schedule, 1):
        print(f"[{number}/{len(schedule)}] {launcher} / {failure or 'fault-free'} / repeat {repeat}", flush=True)
        record = run_launcher(launcher, failure, repeat, plan, args.out)
        record.metrics = compute_metrics(record, plan)
        print(f"    {json.dumps(record.metrics)}", flush=True)
        records.append(record)

    digests = {r.final["weights_sha256"] for r in records if r.final}
    table = aggregate(records)
    fate = (
        [] if args.quick or args.no_fate_sharing else [fate_sharing_lag(plan, args.out, r) for r in range(args.repeats)]
    )
    overhead = supervisor_overhead(records, fate)
    problems = validity_problems(records)
    if len(digests) > 1:
        problems.append(f"the finished runs do not end with the same weights ({len(digests)} digests)")
    result = {
        "plan": asdict(plan),
        "valid": not problems,
        "problems": problems,
        "all_finished_runs_have_the_same_weights": len(digests) <= 1,
        "table": table,
        "supervisor_overhead": overhead,
        "runs": [asdict(r) for r in records],
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    (args.out / "results.md").write_text(to_markdown(table, plan, overhead, records, problems))
    plot_timeline(records, args.out / "timeline.png")
    print((args.out / "results.md").read_text())
    print(f"outputs: {args.out}/results.json, results.md, timeline.png")
    if problems:
        # Loudly: numbers from a launcher that never trains, or parts that do not add up, must not be quoted.
        print("\nBENCHMARK NOT VALID:\n" + "\n".join(f"  {p}" for p in problems), file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
