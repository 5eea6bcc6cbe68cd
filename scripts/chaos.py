"""Chaos campaign: randomized faults packed into supervised runs of the mini-PPO job, every run checked.

    .venv/bin/python scripts/chaos.py --quick                 # a fixed seed, 3 runs (a few minutes)
    .venv/bin/python scripts/chaos.py --seed 2 --minutes 55   # the campaign, about an hour (docs/chaos.md)
    .venv/bin/python scripts/chaos.py --seed 1 --only 17      # run 17 of seed 1 again, alone, with the same draws

Each run draws (seeded, printed before it starts) a backend (naive or cpu_gloo) and several faults:
  guard:ACTION        the guard's own injector (VERL_HOOKS_FAULTS): raise, exit or hang in a random phase of the
                      run's sync path, at a random step of a random attempt
  save:ACTION         with a guard raise, a fault inside the emergency save it calls for (the trainer saving the
                      step it is at): raise (the save fails), exit (the TaskRunner dies half-way), hang (the save
                      runs past its deadline, restart.emergency_save_timeout_s), the last one often with a kill of
                      the taskrunner or a trainer worker at the moment the save began (kill:ROLE at emergency_save)
  kill:ROLE, stop:ROLE  SIGKILL or SIGSTOP of one process of the run, in a role (driver, taskrunner, trainer,
                      rollout, raylet, gcs, dashboard, agent), at a moment: start-up (of an attempt, the first one
                      after a supervisor restart included), training, checkpoint save, teardown (the supervisor
                      tearing an attempt down), an emergency save (its save_begin heartbeat), or together with the
                      fault before it
  supervisor:kill, supervisor:term   the supervisor SIGKILLed or SIGTERMed, then started again on the run directory
  damage:KIND         while the supervisor is down: a truncated or empty model shard, a missing data.pt, a tracker
                      naming a missing or an incomplete step, garbage in the tracker, a step "folder" that is a file
  heartbeat:KIND      the supervisor's heartbeat endpoint fed garbage, wrong tokens, or a flood of both
  guard:orphan        the guard's injector starts a helper in a random phase of a sync that sheds the run's
                      marker and its parent (a fresh environment, a session of its own, a parent that exits at
                      once); the sync goes on. The helper logs its pid to the fault log
  disk:fill           right after a step is saved, the run's checkpoint volume (a tmpfs the campaign mounts for
                      the run; the fault does not fire where it may not mount one) is filled to the last byte
  preempt:worker      the run goes to a Ray cluster of three nodes of its own (a head without CPUs, two workers;
                      the supervisor in ray.mode=address; no guard:orphan, out of its reach there): while it
                      trains, the worker node holding the job's actors is drained in Ray with reason PREEMPTION
                      and a deadline (drawn, 15 to 40 s), as a spot-termination handler does, and its raylet
                      killed at the deadline if still there (docs/how-it-works/preemption.md)

A fault "fires" when it is really delivered (a guard fault: when the injector logs it; an external one: when its
target existed); drawn faults whose moment never came are listed, not counted.

Invariants checked after every run (a column each in results.md):
  outcome     exit 0 with final weights bit-identical to the fault-free run's, or the documented exit code
              for a give-up (3 when two attempts in a row drew the same fault at the same step from the same
              checkpoint, 4 budget, 5 crash loop or no valid checkpoint, and 3 disk-full once a disk:fill
              fired: the run must stop at the first attempt that failed on the full disk) with a run_finished
              event naming it
  failures_explained  every attempt that failed had a fault fire while it ran (or shortly before it began): a
              failure nobody injected is the supervisor's (e.g. relaunching onto a cluster it should have replaced)
  no_leftover no process of the run alive once the supervisor is gone (a process of the run: one carrying its
              marker, or a child of one, seen by the campaign's monitor while the run went on, and every helper
              a guard:orphan fault started)
  one_attempt never two attempts of the run alive at once (a standby driver, started ahead for the next attempt
              and idle until it is launched, counts from its attempt's attempt_started on)
  no_file_lost every checkpoint file the campaign saw (hashed while the job was down) still there, byte for byte,
              under its name or a set-aside one (the job's tracker file excepted: verl rewrites it)
  bystanders  a Ray cluster and a look-alike job process started outside every run, still alive; the cluster
              still runs a task at the end of the campaign

Kills only ever target processes of the run under test, found by its marker (VERL_SUPERVISOR_RUN_ID) or as the
children of such a process; never by name. The bystanders are started by this script and stopped by pid.

Outputs in --out: results.json, results.md (a row per run, a summary per fault kind), runs/<n>/ (the run
directory, the supervisor's log, the campaign's own log of what it did).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "scripts" / "workloads")]

from supervisor.config import RayConfig  # noqa: E402
from supervisor.mechanisms.ray_cluster import ClusterSpec, LocalRayCluster  # noqa: E402
from verl_hooks.contract import ENV_ATTEMPT, ENV_HEARTBEAT_TOKEN, ENV_HEARTBEAT_URL, ENV_RUN_ID  # noqa: E402
from verl_hooks.phases import MULTI_PHASE_ORDER, SyncPhase  # noqa: E402

STEPS = 8
# A step of about a second (the training work is real; extra_step_time_s only sleeps): room for faults in training.
JOB_ARGS = (
    f"trainer.total_training_steps={STEPS}",
    "trainer.save_freq=2",
    "seed=11",
    "trainer.n_workers=1",
    "trainer.extra_step_time_s=1.0",
)
MAX_RESTARTS = 10
MAX_FAILURES_WITHOUT_PROGRESS = 4
SUPERVISOR_OVERRIDES = (
    f"restart.max_restarts={MAX_RESTARTS}",
    f"restart.max_failures_without_progress={MAX_FAILURES_WITHOUT_PROGRESS}",
    "restart.backoff_initial_s=0.5",
    "restart.backoff_jitter_s=0.2",
    "restart.backoff_max_s=2",
    "teardown.grace_s=3",
    "teardown.fence_timeout_s=30",
    # A SIGSTOPped process is a stall: caught within seconds rather than the hour a real job needs.
    "watchdog.startup_timeout_s=60",
    "watchdog.step_timeout_s=30",
    "watchdog.adaptive_min_steps=2",
    # Above the guard's fixed sync limit (GUARD_ENV, 15 s), as in the defaults (600 s each): a hang inside a sync
    # is the guard's to end, with its record; a sync slowed by a loaded machine is not a stall.
    "watchdog.adaptive_floor_s=20",
    "watchdog.adaptive_multiple=3",
    "watchdog.driver_timeout_s=15",
    "watchdog.heartbeat_interval_s=2",
    # A hung emergency save is given up after this: the campaign's runs must not wait the default 600 s.
    "restart.emergency_save_timeout_s=5",
)
GUARD_ENV = {
    "VERL_HOOKS_SYNC_TIMEOUT_S": "15",
    "VERL_HOOKS_SYNC_ADAPTIVE": "1",
    "VERL_HOOKS_SYNC_ADAPTIVE_FLOOR_S": "3",
}
GIVE_UPS = {3: ("repeated_failure",), 4: ("budget_exhausted",), 5: ("crash_loop", "no_valid_checkpoint")}
"""The documented give-ups: exit code, and the outcomes its run_finished event may name."""
BACKENDS = ("naive", "cpu_gloo")
PHASES = {"naive": (SyncPhase.NAIVE.value,), "cpu_gloo": tuple(phase.value for phase in MULTI_PHASE_ORDER)}
ROLES = ("driver", "taskrunner", "trainer", "rollout", "raylet", "gcs", "dashboard", "agent")
MOMENTS = ("startup", "training", "save", "teardown")
EMERGENCY_SAVE = "emergency_save"
"""The moment an emergency save begins (drawn with the save faults that make one last: not among MOMENTS)."""
SAVE_ACTIONS = ("raise", "exit", "hang")
WITH_PREVIOUS = "with_previous"
"""A fault delivered right after the one before it: faults together."""
DAMAGES = (
    "truncated_shard",
    "empty_shard",
    "missing_data",
    "tracker_missing_step",
    "tracker_incomplete_step",
    "tracker_garbage",
    "step_is_file",
)
HEARTBEATS = ("garbage", "wrong_token", "flood")
ORPHAN_CHANCE = 0.5
DISK_FILL_CHANCE = 0.2
PREEMPT_CHANCE = 0.25
"""Per run; each drawn from a stream of its own, so that a seed's other draws stay what they were."""
PREEMPT_DEADLINE_S = (15.0, 40.0)
WORKER_CPUS = 4
"""Each worker of a preempted run's cluster: the mini-PPO job needs 3 CPUs, so either worker holds it alone."""
SMALL_VOLUME_BYTES = 256 << 20
FILLER = "chaos-filler"
TRACKER = "latest_checkpointed_iteration.txt"
FINAL = "final.json"


# --- the draw (pure) ---


@dataclass(frozen=True)
class Fault:
    kind: str
    """guard:ACTION, save:ACTION, kill:ROLE, stop:ROLE, supervisor:kill|term, damage:KIND, heartbeat:KIND,
    disk:fill, preempt:worker"""
    moment: str | None = None
    """When an external fault is delivered (MOMENTS); None for guard and damage faults."""
    delay_s: float = 0.0
    spec: str | None = None
    """A guard fault's VERL_HOOKS_FAULTS spec."""
    deadline_s: float | None = None
    """A preemption's deadline, after the drain."""

    def describe(self) -> str:
        if self.spec:
            return f"{self.kind} ({self.spec})"
        if self.deadline_s is not None:
            return f"{self.kind} at {self.moment}+{self.delay_s:.1f}s, deadline {self.deadline_s:.0f}s"
        when = f" at {self.moment}" if self.moment else ""
        delay = f"+{self.delay_s:.1f}s" if self.delay_s else ""
        return f"{self.kind}{when}{delay}"


@dataclass(frozen=True)
class RunPlan:
    index: int
    seed: int
    backend: str
    guard: tuple[Fault, ...]
    schedule: tuple[Fault, ...]
    """External faults, delivered in this order, each at the first moment of its kind after the one before."""

    @property
    def faults(self) -> tuple[Fault, ...]:
        return (*self.guard, *self.schedule)

    @property
    def on_three_nodes(self) -> bool:
        """A preemption needs worker nodes to take away: the run gets a cluster of its own."""
        return any(family(f.kind) == "preempt" for f in self.schedule)

    def describe(self) -> str:
        return f"run {self.index} (seed {self.seed}, {self.backend}): " + "; ".join(f.describe() for f in self.faults)


def draw_run(seed: int, index: int) -> RunPlan:
    """Everything run ``index`` of campaign ``seed`` will do: the same draws whenever it is drawn again."""
    rng = random.Random(f"chaos-{seed}-{index}")
    backend = rng.choice(BACKENDS)
    guard = []
    schedule: list[Fault] = []
    # Early attempts are sure to come; a later one only if enough other faults came first.
    attempts = sorted({rng.choices((1, 2, 3), weights=(4, 3, 2))[0] for _ in range(rng.randint(1, 3))})
    for attempt in attempts:
        action = rng.choice(("raise", "exit", "hang"))
        phase = rng.choice(PHASES[backend])
        # A relaunch resumes from a saved step: a later attempt's fault is drawn past the first save.
        step = rng.randint(1, STEPS) if attempt == 1 else rng.randint(3, STEPS)
        guard.append(Fault(f"guard:{action}", spec=f"{phase}:{action}@{step}#{attempt}"))
        if action == "raise" and rng.random() < 0.5:
            # A raise leaves the trainer side idle: the trainer saves the step, and this fault strikes the save.
            save = rng.choice(SAVE_ACTIONS)
            guard.append(Fault(f"save:{save}", spec=f"{EMERGENCY_SAVE}:{save}@{step}#{attempt}"))
            if save == "hang" and rng.random() < 0.6:
                role = rng.choice(("taskrunner", "trainer"))
                schedule.append(Fault(f"kill:{role}", EMERGENCY_SAVE, round(rng.uniform(0, 1.0), 1)))
    for _ in range(rng.randint(5, 8)):
        family = rng.choices(("kill", "stop", "supervisor", "heartbeat"), weights=(5, 2, 2, 3))[0]
        # Faults together: one right after the fault before it, at the same moment.
        together = bool(schedule) and family != "supervisor" and rng.random() < 0.35
        if family in ("kill", "stop"):
            roles = [r for r in ROLES if backend == "cpu_gloo" or r != "rollout"]
            if together:
                moment, delay = WITH_PREVIOUS, round(rng.uniform(0, 0.5), 1)
            else:
                moment = rng.choices(MOMENTS, weights=(3, 4, 2, 2))[0]
                delay = round(rng.uniform(0.5, 6.0), 1) if moment == "startup" else round(rng.uniform(0, 1.0), 1)
            schedule.append(Fault(f"{family}:{rng.choice(roles)}", moment, delay))
        elif family == "supervisor":
            how = rng.choice(("kill", "kill", "term"))
            moment = rng.choice(("startup", "training", "save", "teardown"))
            schedule.append(Fault(f"supervisor:{how}", moment, round(rng.uniform(0, 2.0), 1)))
            # Damage is done while the supervisor (and so the job) is down: files nobody is writing.
            for damage in rng.sample(DAMAGES, rng.choice((0, 1, 1, 2, 3))):
                schedule.append(Fault(f"damage:{damage}"))
        else:
            schedule.append(Fault(f"heartbeat:{rng.choice(HEARTBEATS)}", WITH_PREVIOUS if together else "training"))
    orphan = random.Random(f"chaos-{seed}-{index}-orphan")
    if orphan.random() < ORPHAN_CHANCE:
        # In the first attempt's first syncs: sure to come, unless a fault before it ends the attempt.
        phase, step = orphan.choice(PHASES[backend]), orphan.randint(1, STEPS // 2)
        guard.append(Fault("guard:orphan", spec=f"{phase}:orphan@{step}#1"))
    disk = random.Random(f"chaos-{seed}-{index}-disk")
    if disk.random() < DISK_FILL_CHANCE:
        schedule.insert(disk.randint(0, len(schedule)), Fault("disk:fill", "save", round(disk.uniform(0, 0.5), 1)))
    preempt = random.Random(f"chaos-{seed}-{index}-preempt")
    if preempt.random() < PREEMPT_CHANCE:
        deadline_s = round(preempt.uniform(*PREEMPT_DEADLINE_S))
        fault = Fault("preempt:worker", "training", round(preempt.uniform(0, 2.0), 1), deadline_s=deadline_s)
        schedule.insert(preempt.randint(0, len(schedule)), fault)
        # On a cluster the supervisor did not start, a helper a Ray worker orphans is out of its reach (documented:
        # docs/how-it-works/supervisor.md, "Orphans"): that fault is the embedded cluster's to test.
        guard = [f for f in guard if f.kind != "guard:orphan"]
    return RunPlan(index, seed, backend, tuple(guard), tuple(schedule))


# --- what a run left (pure checks) ---


def family(kind: str) -> str:
    return kind.split(":", 1)[0]


def judge_outcome(
    exit_code: int | None,
    finished: dict[str, Any] | None,
    weights: str | None,
    reference: str,
    disk_filled: bool = False,
) -> tuple[bool, str]:
    """Exit 0 with the fault-free weights, or a documented give-up that the run_finished event names; once the
    checkpoint volume was filled, exit 3 saying the disk is full is one."""
    if exit_code is None:
        return False, "the supervisor did not exit"
    if finished is None or finished.get("exit_code") != exit_code:
        return False, f"exit {exit_code} without a matching run_finished event"
    if exit_code == 0:
        if weights != reference:
            return False, f"exit 0 but final weights {str(weights)[:12]} differ from the fault-free {reference[:12]}"
        return True, "done, weights bit-identical"
    reason = finished.get("reason", "")
    if disk_filled and exit_code == 3 and "the checkpoint disk is full" in reason:
        return True, f"gave up (exit 3, disk-full): {reason.split(':')[1][:90]}"
    outcomes = GIVE_UPS.get(exit_code)
    if outcomes is None:
        return False, f"exit {exit_code}: {reason}"
    if finished.get("outcome") not in outcomes:
        return False, f"exit {exit_code} but outcome {finished.get('outcome')!r}, not one of {outcomes}: {reason}"
    return True, f"gave up (exit {exit_code}, {finished['outcome']}): {reason.split(';')[0][:90]}"


EXPLAIN_WINDOW_S = 15.0
"""A fault explains a failed attempt when it fired while the attempt ran or this long before it began (a fault in
the teardown before it, a supervisor stopped while no attempt ran)."""


def unexplained_failures(attempts: Iterable[dict[str, Any]], fired_at: Iterable[float]) -> list[str]:
    """The failed attempts (state.json's) during or shortly before which no fault fired: a failure the campaign
    did not cause is the supervisor's, or something it should have repaired (a broken cluster kept)."""
    times = sorted(fired_at)
    out = []
    for attempt in attempts:
        if attempt.get("action") in (None, "done") or attempt.get("ended_at") is None:
            continue
        start, end = attempt["started_at"] - EXPLAIN_WINDOW_S, attempt["ended_at"] + 1.0
        if not any(start <= t <= end for t in times):
            out.append(f"attempt {attempt['number']} ({attempt.get('rule')}: {attempt.get('reason', '')[:80]})")
    return out


def original_path(path: str) -> str:
    """A path with its step folder's set-aside suffix dropped (``global_step_4.incomplete-<time>/x`` ->
    ``global_step_4/x``): a set-aside file is the same file."""
    head, sep, rest = path.partition("/")
    return head.split(".", 1)[0] + sep + rest


def lost_files(snapshots: Iterable[dict[str, str]], present: dict[str, str]) -> list[str]:
    """Files (path -> sha256) seen in a snapshot that are not in ``present`` now, byte for byte, under their name
    or a set-aside one."""
    now = {(original_path(path), digest) for path, digest in present.items()}
    lost = []
    for snapshot in snapshots:
        for path, digest in snapshot.items():
            if (original_path(path), digest) not in now and path not in lost:
                lost.append(path)
    return lost


# --- processes of a run (mechanism) ---


def role_of(cmdline: str) -> str | None:
    checks = (
        ("verl_hooks.launch", "driver"),
        ("verl_hooks.standby", "driver"),  # the standby that became an attempt's driver (restart.warm_standby)
        ("ray::TaskRunner", "taskrunner"),
        ("ray::MiniActorWorker", "trainer"),
        ("ray::MiniRolloutWorker", "rollout"),
        ("/raylet/raylet", "raylet"),
        ("/gcs/gcs_server", "gcs"),
        ("dashboard/dashboard.py", "dashboard"),
        ("ray::DashboardAgent", "agent"),
    )
    return next((role for needle, role in checks if needle in cmdline), None)


@dataclass
class Seen:
    pid: int
    create_time: float
    role: str | None
    attempt: str | None
    cmdline: str


class Monitor(threading.Thread):
    """Watches the run's processes: every one ever seen, and whether two attempts are ever alive at once."""

    def __init__(self, events_path: Path, interval_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.run_id: str | None = None
        self._events = JsonlTail(events_path)
        self.seen: dict[tuple[int, float], Seen] = {}
        self.overlaps: list[str] = []
        self._interval_s = interval_s
        self._halt = threading.Event()
        self._environ: dict[tuple[int, float], dict[str, str] | None] = {}
        self._lock = threading.Lock()

    def run(self) -> None:
        while not self._halt.wait(self._interval_s):
            if self.run_id is not None:
                self.sample()

    def stop(self) -> None:
        self._halt.set()
        self.join(5)

    def sample(self) -> list[Seen]:
        """The run's live processes now (marked ones, and the children of its raylet, whose agents drop the
        environment), remembered in ``seen``."""
        alive = []
        marked_pids = set()
        for process in psutil.process_iter(["pid", "create_time", "status"]):
            info = process.info
            if info["status"] == psutil.STATUS_ZOMBIE:
                continue
            key = (info["pid"], info["create_time"])
            if key not in self._environ:
                try:
                    self._environ[key] = process.environ()
                except (psutil.Error, OSError):
                    self._environ[key] = None
            environ = self._environ[key]
            if environ and environ.get(ENV_RUN_ID) == self.run_id:
                alive.append(self._remember(process, key, environ.get(ENV_ATTEMPT)))
                marked_pids.add(info["pid"])
        for seen in list(alive):
            if seen.role == "raylet":
                with contextlib.suppress(psutil.Error):
                    for child in psutil.Process(seen.pid).children():
                        if child.pid not in marked_pids and child.status() != psutil.STATUS_ZOMBIE:
                            alive.append(self._remember(child, (child.pid, child.create_time()), None))
        # A standby driver carries its attempt's marker from its start, idle until that attempt is launched.
        with self._lock:  # sampled from the monitor's thread and the run's
            events = list(self._events.read())
        started = {str(e["attempt"]) for e in events if e["event"] == "attempt_started"}
        alive = [s for s in alive if s.attempt is None or s.attempt in started]
        attempts = sorted({s.attempt for s in alive if s.attempt is not None})
        if len(attempts) > 1:
            detail = ", ".join(f"{s.role or s.cmdline[:40]}[{s.pid}]#{s.attempt}" for s in alive if s.attempt)
            with self._lock:
                self.overlaps.append(f"{time.strftime('%H:%M:%S')} attempts {attempts} alive at once: {detail}")
        return alive

    def _remember(self, process: psutil.Process, key: tuple[int, float], attempt: str | None) -> Seen:
        with self._lock:
            seen = self.seen.get(key)
            # A Ray worker starts as ray::IDLE and takes its actor's name later: look again until it has a role.
            if seen is None or seen.role is None:
                try:
                    cmdline = " ".join(process.cmdline())
                except (psutil.Error, OSError):
                    cmdline = "?"
                seen = self.seen[key] = Seen(key[0], key[1], role_of(cmdline), attempt, cmdline)
            return seen

    def live(self, role: str | None = None) -> list[Seen]:
        alive = self.sample()
        return [s for s in alive if role is None or s.role == role]

    def survivors(self) -> list[Seen]:
        """Every process of the run ever seen that is still alive (the same process: pid and start time)."""
        out = []
        for seen in list(self.seen.values()):
            with contextlib.suppress(psutil.Error):
                process = psutil.Process(seen.pid)
                if process.create_time() == seen.create_time and process.status() != psutil.STATUS_ZOMBIE:
                    out.append(seen)
        return out


def kill_all(processes: Iterable[Seen]) -> None:
    for seen in processes:
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(seen.pid)
            if process.create_time() == seen.create_time:
                process.kill()


# --- the files of a run (mechanism) ---


def hash_tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (the tracker and final.json left out) -> its sha256."""
    out = {}
    if not root.exists():
        return out
    for path in root.rglob("*"):
        if path.name in (TRACKER, FINAL) and path.parent == root:
            continue
        with contextlib.suppress(OSError):
            if path.is_file():
                out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def step_folders(root: Path) -> list[tuple[int, Path]]:
    found = []
    for path in root.glob("global_step_*"):
        suffix = path.name[len("global_step_") :]
        if suffix.isdigit() and path.is_dir():
            found.append((int(suffix), path))
    return sorted(found)


def damage(kind: str, root: Path, stash: Path, rng: random.Random) -> str | None:
    """Damage the checkpoints as ``kind`` says; what was done, or None when there was nothing to damage.
    Nothing is deleted: a file taken away is moved to ``stash``, outside the checkpoint tree."""
    steps = step_folders(root)
    newest = steps[-1] if steps else None
    if kind in ("truncated_shard", "empty_shard", "missing_data") and newest is None:
        return None
    if kind in ("truncated_shard", "empty_shard"):
        shards = sorted((newest[1] / "actor").glob("model_world_size_*.pt")) if newest else []
        if not shards:
            return None
        shard = shards[0]
        size = shard.stat().st_size
        with open(shard, "r+b") as f:
            f.truncate(size // 2 if kind == "truncated_shard" else 0)
        return f"{shard.relative_to(root)} {size} -> {shard.stat().st_size} bytes"
    if kind == "missing_data":
        data = newest[1] / "data.pt"
        if not data.exists():
            return None
        (stash / newest[1].name).mkdir(parents=True, exist_ok=True)
        shutil.move(data, stash / newest[1].name / "data.pt")
        return f"{data.relative_to(root)} moved out of the tree"
    top = newest[0] if newest else 0
    root.mkdir(parents=True, exist_ok=True)
    if kind == "tracker_missing_step":
        (root / TRACKER).write_text(str(top + 100))
        return f"tracker names global_step_{top + 100}, which does not exist"
    if kind == "tracker_incomplete_step":
        partial = root / f"global_step_{top + 1}" / "actor"
        partial.mkdir(parents=True, exist_ok=True)
        (partial / "model_world_size_1_rank_0.pt").write_bytes(os.urandom(512))
        (root / TRACKER).write_text(str(top + 1))
        return f"tracker names global_step_{top + 1}, holding one shard of garbage"
    if kind == "tracker_garbage":
        (root / TRACKER).write_bytes(bytes(rng.randrange(256) for _ in range(64)))
        return "64 random bytes in the tracker"
    if kind == "step_is_file":
        path = root / f"global_step_{top + 3}"
        if path.exists():
            return None
        path.write_bytes(b"not a folder\n")
        return f"{path.name} is a file"
    raise ValueError(kind)


def fill_volume(filler: Path) -> str:
    """Write ``filler`` until its volume has no byte left; what was written."""
    written = 0
    chunk = b"\0" * (1 << 20)
    with contextlib.suppress(OSError), filler.open("wb") as f:
        while True:
            f.write(chunk)
            f.flush()
            written += len(chunk)
    return f"{filler.parent} filled: {written >> 20} MiB written, {shutil.disk_usage(filler.parent).free} bytes left"


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# --- the heartbeat endpoint (mechanism) ---


def post(url: str, body: bytes, token: str | None) -> int:
    request = urllib.request.Request(url, data=body, method="POST")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return -1


def feed_heartbeats(kind: str, url: str, token: str, rng: random.Random) -> str:
    forged = json.dumps({"kind": "error_record", "attempt": 1, "record": {"error_type": "Forged"}}).encode()
    codes: dict[int, int] = {}

    def count(code: int) -> None:
        codes[code] = codes.get(code, 0) + 1

    if kind == "garbage":
        for body in (b"", b"{", b"[1,2]", bytes(rng.randrange(256) for _ in range(300)), b'"just a string"'):
            count(post(url, body, token))
            count(post(url, body, None))
    elif kind == "wrong_token":
        for _ in range(10):
            count(post(url, forged, rng.randbytes(16).hex()))
        count(post(url, forged, token[:-1]))
        count(post(url, forged, None))
    else:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            count(post(url, forged, "x" * 40))
            count(post(url, b"\x00" * 64, None))
    return "replies " + ", ".join(f"{code}x{n}" for code, n in sorted(codes.items()))


# --- one run (mechanism) ---


class JsonlTail:
    """The complete lines of a JSON-lines file another process appends to, read a little more at each call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[dict[str, Any]] = []
        self._offset = 0

    def read(self) -> list[dict[str, Any]]:
        if self.path.exists():
            with open(self.path) as f:
                f.seek(self._offset)
                chunk = f.read()
            complete, _, _ = chunk.rpartition("\n")  # a line being written waits for the next call
            if complete:
                self._offset += len(complete) + 1
                self.lines += [json.loads(line) for line in complete.splitlines() if line.strip()]
        return self.lines


@dataclass
class Delivery:
    fault: str
    fired: bool
    at: float | None = None
    detail: str = ""


@dataclass
class RunResult:
    index: int
    seed: int
    backend: str
    drawn: list[str]
    deliveries: list[dict[str, Any]]
    faults_fired: int
    attempts: int
    supervisor_starts: int
    exit_code: int | None
    wall_s: float
    invariants: dict[str, bool]
    notes: dict[str, str]
    recoveries: list[dict[str, Any]] = field(default_factory=list)
    fate_sharing_lag_s: list[float] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(self.invariants.values())


class Run:
    def __init__(
        self, plan: RunPlan, workdir: Path, reference: str, limit_s: float, halt: threading.Event | None = None
    ) -> None:
        self.plan = plan
        self.halt = halt or threading.Event()
        """Set when the campaign is stopped: the run ends at once (its supervisor SIGKILLed)."""
        self.workdir = workdir
        self.run_dir = workdir / "run"
        self.ckpt = self.run_dir / "checkpoints"
        self.reference = reference
        self.limit_s = limit_s
        self.rng = random.Random(f"chaos-run-{plan.seed}-{plan.index}")
        self.monitor = Monitor(self.run_dir / "events.jsonl")
        self.deliveries: list[Delivery] = []
        self.snapshots: list[dict[str, str]] = []
        self.fate_lags: list[float] = []
        self.supervisor: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._log = (workdir / "chaos.log").open("a")
        self._events = JsonlTail(self.run_dir / "events.jsonl")
        self._progress = JsonlTail(workdir / "progress.jsonl")
        self._saves_seen: set[str] = set()
        self._teardowns_hashed = 0
        self.small_volume: str | None = None
        """Why the checkpoint folder is not on a volume of the run's own (None: it is, mounted at ``ckpt``)."""
        self.cluster: Any = None
        """The run's own three-node Ray cluster, for a preemption (None: the supervisor's embedded cluster)."""
        self._timers: list[threading.Timer] = []

    def say(self, text: str) -> None:
        self._log.write(f"{time.strftime('%H:%M:%S')} {text}\n")
        self._log.flush()

    # observation

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VERL_HOOKS_", "VERL_SUPERVISOR_", "RAY_"))}
        env.update(GUARD_ENV)
        if self.cluster is not None:
            env.update(self.cluster.env())
        env.update(
            {
                "PYTHONPATH": str(REPO),
                "VERL_HOOKS_FAULTS": ",".join(f.spec for f in self.plan.guard if f.spec),
                "VERL_HOOKS_FAULT_LOG": str(self.workdir / "faults.jsonl"),
            }
        )
        return env

    def argv(self) -> list[str]:
        job = [
            *JOB_ARGS,
            f"rollout.backend={self.plan.backend}",
            f"trainer.progress_file={self.workdir}/progress.jsonl",
        ]
        cluster = []
        if self.cluster is not None:
            cluster = [
                "ray.mode=address",
                f"ray.address={self.cluster.address}",
                f"ray.dashboard_url={self.cluster.dashboard_url}",
                "preemption.poll_s=1",
            ]
        overrides = [*SUPERVISOR_OVERRIDES, *cluster]
        return [sys.executable, "-m", "supervisor", f"run_dir={self.run_dir}", *overrides, "--", *job]

    def start_supervisor(self) -> None:
        self.starts += 1
        log = (self.workdir / "supervisor.log").open("ab")
        self.supervisor = subprocess.Popen(
            self.argv(), cwd=REPO, env=self.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self.say(f"supervisor start {self.starts}: pid {self.supervisor.pid}")

    def events(self) -> list[dict[str, Any]]:
        return self._events.read()

    def progress(self) -> list[dict[str, Any]]:
        return self._progress.read()

    def learn_run_id(self) -> None:
        if self.monitor.run_id is None and (self.run_dir / "state.json").exists():
            with contextlib.suppress(ValueError, OSError):
                self.monitor.run_id = json.loads((self.run_dir / "state.json").read_text())["run_id"]

    def moments(self, moment: str) -> int:
        """How many moments of this kind the run has had so far (a new one is a larger count)."""
        events = self.events()
        if moment == "startup":
            return sum(e["event"] == "attempt_started" for e in events)
        if moment == "training":
            return sum(p.get("event") == "step" for p in self.progress())
        if moment == "save":
            self._saves_seen.update(path.name for _, path in step_folders(self.ckpt))
            return len(self._saves_seen)
        if moment == "teardown":
            return sum(e["event"] in ("error_record_received", "stall_detected", "attempt_exited") for e in events)
        if moment == EMERGENCY_SAVE:
            # The save_begin beats the supervisor logged (sent before the save starts, taken synchronously).
            return sum(
                '"save_begin"' in line
                for beats in self.run_dir.glob("attempts/*/heartbeats.jsonl")
                for line in beats.read_text().splitlines()
            )
        raise ValueError(moment)

    def wait_for(self, condition: Callable[[], bool], timeout_s: float, while_supervised: bool = True) -> bool:
        """Until ``condition`` holds (True), ``timeout_s`` passes or, ``while_supervised``, the supervisor exits."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not self.halt.is_set():
            self.learn_run_id()
            self.snapshot_after_teardowns()
            if condition():
                return True
            if while_supervised and self.supervisor is not None and self.supervisor.poll() is not None:
                return bool(condition())
            time.sleep(0.05)
        return False

    def snapshot_after_teardowns(self) -> None:
        """Hash the checkpoints once each attempt is fenced off (nothing of the job writes then): each file must
        still be there at the end."""
        teardowns = sum(e["event"] == "teardown" and e.get("fenced") for e in self.events())
        if teardowns > self._teardowns_hashed:
            self._teardowns_hashed = teardowns
            self.snapshots.append(hash_tree(self.ckpt))

    # delivering faults

    def deliver(self, fault: Fault, deadline: float) -> Delivery:
        """At the first moment of the fault's kind after now (or the next two, if its target was not there)."""
        if fault.moment is None:
            return Delivery(fault.describe(), False, detail="no moment")
        if fault.moment == WITH_PREVIOUS:
            if self.supervisor is None or self.supervisor.poll() is not None:
                return Delivery(fault.describe(), False, detail="the run ended")
            time.sleep(fault.delay_s)
            return self.fire(fault)
        for _ in range(3):
            before = self.moments(fault.moment)
            if not self.wait_for(lambda m=fault.moment, b=before: self.moments(m) > b, deadline - time.monotonic()):
                return Delivery(fault.describe(), False, detail=f"no {fault.moment} moment came")
            if self.supervisor is None or self.supervisor.poll() is not None:
                return Delivery(fault.describe(), False, detail="the run ended")
            time.sleep(fault.delay_s)
            delivery = self.fire(fault)
            if delivery.fired:
                return delivery
            self.say(f"not yet: {delivery.fault}: {delivery.detail}")
        return delivery

    def fire(self, fault: Fault) -> Delivery:
        fam, what = fault.kind.split(":", 1)
        now = time.time()
        if fam in ("kill", "stop"):
            # At start-up the role's process may not exist yet (an actor is created after the imports): wait for
            # it. Elsewhere the moment passes quickly: a later process would be another moment's.
            patience_s = 30.0 if fault.moment == "startup" else 1.0
            targets: list[Seen] = []
            self.wait_for(lambda: bool(targets.extend(self.monitor.live(what)) or targets), patience_s)
            if not targets:
                return Delivery(fault.describe(), False, detail=f"no live {what}")
            now = time.time()
            target = self.rng.choice(targets)
            with contextlib.suppress(ProcessLookupError):
                os.kill(target.pid, signal.SIGKILL if fam == "kill" else signal.SIGSTOP)
            return Delivery(fault.describe(), True, now, f"{what}[{target.pid}] attempt {target.attempt}")
        if fam == "heartbeat":
            drivers = [d for d in self.monitor.live("driver") if d.attempt is not None]
            if not drivers:
                return Delivery(fault.describe(), False, detail="no driver to learn the endpoint from")
            try:
                environ = psutil.Process(drivers[0].pid).environ()
            except psutil.Error:
                return Delivery(fault.describe(), False, detail="the driver went away")
            url, token = environ.get(ENV_HEARTBEAT_URL), environ.get(ENV_HEARTBEAT_TOKEN)
            if not url or not token:
                return Delivery(fault.describe(), False, detail="no heartbeat endpoint")
            return Delivery(fault.describe(), True, now, feed_heartbeats(what, url, token, self.rng))
        if fam == "disk":
            if self.small_volume is not None:
                return Delivery(fault.describe(), False, detail=self.small_volume)
            return Delivery(fault.describe(), True, now, fill_volume(self.ckpt / FILLER))
        if fam == "preempt":
            return self.preempt(fault)
        raise ValueError(fault.kind)

    def preempt(self, fault: Fault) -> Delivery:
        """Drain the worker that holds most of the job's live actors, with a deadline, as a spot-termination
        handler does; its raylet (and with it the node) is killed at the deadline unless Ray let it go first."""
        from supervisor.mechanisms.ray_drain import drain_node
        from supervisor.mechanisms.ray_state import RayStateClient

        if self.cluster is None:
            return Delivery(fault.describe(), False, detail="the run has no cluster of its own")
        head = {n.node_id for n in RayStateClient(self.cluster.dashboard_url).nodes() if n.is_head}
        held: dict[str, int] = {}
        for actor in RayStateClient(self.cluster.dashboard_url).live_actors():
            if actor.node_id and actor.node_id not in head:
                held[actor.node_id] = held.get(actor.node_id, 0) + 1
        if not held:
            return Delivery(fault.describe(), False, detail="no worker holds an actor of the job")
        node = max(sorted(held), key=held.__getitem__)
        deadline_s = fault.deadline_s or PREEMPT_DEADLINE_S[0]
        now = time.time()
        drained = drain_node(
            self.cluster.address, node, "chaos: spot reclaim", deadline_ms=int((now + deadline_s) * 1000)
        )
        if not drained.accepted:
            return Delivery(fault.describe(), False, detail=f"Ray refused the drain: {drained.message}")
        timer = threading.Timer(deadline_s, self._take_node, (node,))
        timer.daemon = True
        timer.start()
        self._timers.append(timer)
        return Delivery(fault.describe(), True, now, f"node {node[:8]} drained, deadline {deadline_s:.0f} s")

    def _take_node(self, node_id: str) -> None:
        assert self.cluster is not None
        for process in self.cluster.processes():
            with contextlib.suppress(psutil.Error):
                if f"--node_id={node_id}" in " ".join(process.cmdline()):
                    process.kill()
                    self.say(f"node {node_id[:8]} taken at its deadline: raylet[{process.pid}] killed")

    def mount_small_volume(self) -> None:
        """The run's checkpoint folder on a tmpfs of its own, for a disk:fill fault to fill."""
        self.ckpt.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={SMALL_VOLUME_BYTES}", "tmpfs", str(self.ckpt)],
            capture_output=True,
            text=True,
            check=False,
        )
        self.small_volume = None if done.returncode == 0 else f"cannot mount a tmpfs: {done.stderr.strip()[:120]}"
        self.say(f"checkpoint volume: {self.small_volume or f'a tmpfs of {SMALL_VOLUME_BYTES >> 20} MiB'}")

    def unmount_small_volume(self) -> None:
        """Its files are copied out first: the run directory keeps them for a post-mortem."""
        if self.small_volume is None:
            with contextlib.suppress(OSError):
                (self.ckpt / FILLER).unlink()
            kept = self.workdir / "checkpoints-on-the-small-volume"
            shutil.copytree(self.ckpt, kept, dirs_exist_ok=True, symlinks=True)
            subprocess.run(["umount", "--lazy", str(self.ckpt)], check=False)
            self.small_volume = "unmounted"

    def supervisor_down(self, fault: Fault, damages: list[Fault], deadline: float) -> list[Delivery]:
        """Stop the supervisor as ``fault`` says, damage the files while it is down, start it again."""
        assert fault.moment is not None
        before = self.moments(fault.moment)
        if not self.wait_for(lambda: self.moments(fault.moment) > before, deadline - time.monotonic()):
            return [Delivery(f.describe(), False, detail=f"no {fault.moment} moment came") for f in [fault, *damages]]
        time.sleep(fault.delay_s)
        assert self.supervisor is not None
        if self.supervisor.poll() is not None:
            return [Delivery(f.describe(), False, detail="the run ended") for f in [fault, *damages]]
        how = fault.kind.split(":", 1)[1]
        fired_at = time.time()
        self.supervisor.send_signal(signal.SIGKILL if how == "kill" else signal.SIGTERM)
        code = self.supervisor.wait()
        out = [Delivery(fault.describe(), True, fired_at, f"supervisor exit {code}")]
        if how == "kill":
            # The run's processes must follow the supervisor at once (its reaper): how long they took.
            gone = self.wait_for(lambda: not self.monitor.live(), 10, while_supervised=False)
            lag = time.time() - fired_at
            self.fate_lags.append(round(lag, 2))
            if gone:
                out[0].detail += f"; run's processes gone after {lag:.2f} s"
            else:
                left = ", ".join(f"{s.role or s.cmdline[:60]}[{s.pid}]" for s in self.monitor.live())
                out[0].detail += f"; run's processes outlived it by {lag:.0f} s: {left}"
        if self.finished_state():
            # It finished between the draw and the signal: there is nothing to start again.
            out[0].detail += "; the run had finished"
            return out + [Delivery(f.describe(), False, detail="the run had finished") for f in damages]
        for item in damages:
            what = damage(item.kind.split(":", 1)[1], self.ckpt, self.workdir / "stash", self.rng)
            out.append(Delivery(item.describe(), what is not None, time.time(), what or "nothing to damage"))
        self.snapshots.append(hash_tree(self.ckpt))
        self.start_supervisor()
        return out

    def finished_state(self) -> bool:
        with contextlib.suppress(ValueError, OSError):
            return json.loads((self.run_dir / "state.json").read_text()).get("state") == "finished"
        return False

    def execute(self) -> RunResult:
        try:
            return self._execute()
        finally:
            # Interrupted (Ctrl-C) or broken: nothing of the run may outlive the campaign.
            if self.supervisor is not None and self.supervisor.poll() is None:
                self.supervisor.kill()
                self.supervisor.wait()
            kill_all(self.monitor.survivors())
            self.unmount_small_volume()
            self.stop_cluster()
            self._log.close()

    def start_cluster(self) -> None:
        """Three nodes of the run's own: a head without CPUs (the GCS must outlive a preemption) and two workers."""
        from tests.conftest import start_test_cluster

        self.cluster = start_test_cluster(num_cpus=0, dashboard=True)
        for _ in range(2):
            self.cluster.add_node(num_cpus=WORKER_CPUS)
        self.say(f"a cluster of three nodes of the run's own at {self.cluster.address}")

    def stop_cluster(self) -> None:
        for timer in self._timers:
            timer.cancel()
        if self.cluster is not None:
            from tests.conftest import stop_test_cluster

            report = stop_test_cluster(self.cluster)
            self.say(f"the run's cluster stopped ({len(report.survivors)} survivors)")
            self.cluster = None

    def _execute(self) -> RunResult:
        started = time.monotonic()
        deadline = started + self.limit_s
        self.say(self.plan.describe())
        if any(family(f.kind) == "disk" for f in self.plan.schedule):
            self.mount_small_volume()
        if self.plan.on_three_nodes:
            self.start_cluster()
        self.monitor.start()
        self.start_supervisor()
        schedule = list(self.plan.schedule)
        while schedule:
            fault = schedule.pop(0)
            if family(fault.kind) == "supervisor":
                damages = []
                while schedule and family(schedule[0].kind) == "damage":
                    damages.append(schedule.pop(0))
                done = self.supervisor_down(fault, damages, deadline)
            else:
                done = [self.deliver(fault, deadline)]
            for delivery in done:
                self.say(f"{'FIRED' if delivery.fired else 'not fired'}: {delivery.fault}: {delivery.detail}")
            self.deliveries += done
            if self.halt.is_set():
                break
        assert self.supervisor is not None
        supervisor = self.supervisor
        self.wait_for(lambda: supervisor.poll() is not None, max(1.0, deadline - time.monotonic()))
        try:
            code: int | None = supervisor.wait(timeout=1)
        except subprocess.TimeoutExpired:
            self.say("the run was stopped or went over its time limit: SIGKILL")
            self.supervisor.kill()
            self.supervisor.wait()
            code = None
        return self.conclude(code, time.monotonic() - started)

    def conclude(self, code: int | None, wall_s: float) -> RunResult:
        # What the run left: give its processes a few seconds to finish exiting, then count the survivors.
        self.wait_for(lambda: not self.monitor.survivors(), 5, while_supervised=False)
        survivors = self.monitor.survivors()
        self.monitor.stop()
        kill_all(survivors)
        fault_log = [json.loads(line) for line in _lines(self.workdir / "faults.jsonl")]
        orphans = [entry["orphan_pid"] for entry in fault_log if "orphan_pid" in entry]
        orphans_alive = [pid for pid in orphans if running(pid)]
        for pid in orphans_alive:  # the run's job started them: the campaign's to end
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
        events = self.events()
        finished = next((e for e in reversed(events) if e["event"] == "run_finished"), None)
        final_path = self.ckpt / FINAL
        weights = json.loads(final_path.read_text()).get("weights_sha256") if final_path.exists() else None
        deliveries = [asdict(d) for d in self.deliveries]
        filled = any(d["fired"] and d["fault"].startswith("disk:fill") for d in deliveries)
        outcome_ok, outcome = judge_outcome(code, finished, weights, self.reference, disk_filled=filled)
        lost = lost_files(self.snapshots, hash_tree(self.ckpt) | hash_tree(self.workdir / "stash"))
        guard_fired = [entry for entry in fault_log if "spec" in entry]
        for entry in guard_fired:
            action = entry["spec"].split(":", 1)[1].split("@")[0].split("#")[0]
            source = "save" if entry["spec"].startswith(EMERGENCY_SAVE) else "guard"
            fault = f"{source}:{action} ({entry['spec']})"
            deliveries.append(asdict(Delivery(fault, True, entry["ts"], f"pid {entry['pid']}")))
        notes = {
            "outcome": outcome,
            "no_leftover": ", ".join(
                [f"{s.role or s.cmdline[:50]}[{s.pid}]" for s in survivors] + [f"orphan[{p}]" for p in orphans_alive]
            ),
            "one_attempt": "; ".join(self.monitor.overlaps[:3]),
            "no_file_lost": ", ".join(lost[:5]),
        }
        state = _json(self.run_dir / "state.json") or {}
        unexplained = unexplained_failures(state.get("attempts", []), [d["at"] for d in deliveries if d["fired"]])
        notes["failures_explained"] = "; ".join(unexplained)
        return RunResult(
            index=self.plan.index,
            seed=self.plan.seed,
            backend=self.plan.backend,
            drawn=[f.describe() for f in self.plan.faults],
            deliveries=deliveries,
            faults_fired=sum(d["fired"] for d in deliveries),
            attempts=len(state.get("attempts", [])),
            supervisor_starts=self.starts,
            exit_code=code,
            wall_s=round(wall_s, 1),
            invariants={
                "outcome": outcome_ok,
                "no_leftover": not survivors and not orphans_alive,
                "one_attempt": not self.monitor.overlaps,
                "no_file_lost": not lost,
                "failures_explained": not unexplained,
            },
            notes=notes,
            recoveries=recoveries(deliveries, events, self.progress()),
            fate_sharing_lag_s=self.fate_lags,
        )


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _json(path: Path) -> dict[str, Any] | None:
    with contextlib.suppress(ValueError, OSError):
        return json.loads(path.read_text())
    return None


def recoveries(
    deliveries: list[dict[str, Any]], events: list[dict[str, Any]], progress: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Per fired fault: seconds from the fault to the first training step of the next attempt started after it
    (None when none came: the run gave up or ended, or the fault cost no restart)."""
    starts = sorted(e["ts"] for e in events if e["event"] == "attempt_started")
    steps = sorted(p["ts"] for p in progress if p.get("event") == "step")
    out = []
    for d in deliveries:
        # The heartbeat endpoint's faults must cost nothing: there is no recovery to time.
        if not d["fired"] or d["at"] is None or kind_of(d["fault"]).startswith("heartbeat:"):
            continue
        later_start = next((s for s in starts if s > d["at"]), None)
        step = None if later_start is None else next((s for s in steps if s > later_start), None)
        out.append({"fault": kind_of(d["fault"]), "seconds": None if step is None else round(step - d["at"], 2)})
    return out


def kind_of(description: str) -> str:
    return description.split(" ", 1)[0]


# --- bystanders (mechanism) ---


class Bystanders:
    """A Ray cluster and a process that look like a run's, started outside every run: they must survive."""

    def __init__(self) -> None:
        self.cluster = LocalRayCluster(
            ClusterSpec(
                temp_dir=Path(tempfile.mkdtemp(prefix="chaos-bystander-")),
                num_cpus=1,
                object_store_memory_mb=128,
                dashboard=False,
                start_timeout_s=RayConfig().start_timeout_s,
                extra_env={ENV_RUN_ID: "bystander", "PYTHONPATH": str(REPO)},
            )
        )
        self.lookalike: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.cluster.start()
        env = {**os.environ, ENV_RUN_ID: "bystander", ENV_ATTEMPT: "1"}
        self.lookalike = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(86400)", "-m", "verl_hooks.launch", "-m", "mini_ppo.main"],
            env=env,
        )

    def alive(self) -> tuple[bool, str]:
        problems = []
        if self.lookalike is None or self.lookalike.poll() is not None:
            problems.append("the look-alike job process died")
        if not self.cluster.is_healthy():
            problems.append("the bystander Ray cluster is down")
        return not problems, "; ".join(problems)

    def runs_a_task(self) -> tuple[bool, str]:
        code = "import ray; ray.init(); print(ray.get(ray.remote(lambda: 41 + 1).remote()))"
        env = {**os.environ, **self.cluster.env(), "RAY_AUTH_MODE": "disabled"}
        try:
            proc = subprocess.run(
                [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=False
            )
        except subprocess.TimeoutExpired:
            return False, "a task on the bystander cluster did not finish in 120 s"
        ok = proc.returncode == 0 and proc.stdout.strip().endswith("42")
        return ok, "" if ok else f"a task on the bystander cluster failed: {proc.stderr[-300:]}"

    def stop(self) -> None:
        if self.lookalike is not None:
            self.lookalike.kill()
            self.lookalike.wait()
        self.cluster.stop(grace_s=5.0)
        if self.cluster.temp_dir is not None:
            shutil.rmtree(self.cluster.temp_dir, ignore_errors=True)


# --- the campaign ---


def reference_weights(out: Path) -> str:
    """The final weights of a fault-free supervised run of the same job."""
    workdir = out / "reference"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    plan = RunPlan(0, 0, "naive", (), ())
    run = Run(plan, workdir, reference="", limit_s=600)
    run.monitor.start()
    run.start_supervisor()
    assert run.supervisor is not None
    code = run.supervisor.wait(timeout=600)
    run.monitor.stop()
    final = _json(run.ckpt / FINAL)
    if code != 0 or final is None:
        raise SystemExit(f"the fault-free reference run failed (exit {code}): see {workdir}/supervisor.log")
    return final["weights_sha256"]


def summary(results: list[RunResult]) -> list[dict[str, Any]]:
    """Per fault kind: runs that had it fire, how many of those passed, how often it fired, median recovery."""
    kinds: dict[str, dict[str, Any]] = {}
    for result in results:
        fired_here = {kind_of(d["fault"]) for d in result.deliveries if d["fired"]}
        for d in result.deliveries:
            if d["fired"]:
                kinds.setdefault(kind_of(d["fault"]), {"fired": 0, "runs": 0, "passed": 0, "recover_s": []})
                kinds[kind_of(d["fault"])]["fired"] += 1
        for kind in fired_here:
            kinds[kind]["runs"] += 1
            kinds[kind]["passed"] += result.passed
        for rec in result.recoveries:
            if rec["seconds"] is not None:
                kinds[rec["fault"]]["recover_s"].append(rec["seconds"])
    rows = []
    for kind, row in sorted(kinds.items()):
        times = row.pop("recover_s")
        rows.append({"kind": kind, **row, "median_recover_s": round(statistics.median(times), 1) if times else None})
    return rows


def write_report(out: Path, results: list[RunResult], meta: dict[str, Any]) -> None:
    payload = {"meta": meta, "summary": summary(results), "runs": [asdict(r) | {"passed": r.passed} for r in results]}
    (out / "results.json").write_text(json.dumps(payload, indent=2, default=str))
    columns = ["outcome", "failures_explained", "no_leftover", "one_attempt", "no_file_lost", "bystanders"]
    lines = [
        f"# Chaos campaign: seed {meta['seed']}, {len(results)} runs",
        "",
        f"{meta['faults_fired']} faults fired ({meta['faults_drawn']} drawn) in {meta['wall_min']} min; "
        f"{meta['runs_passed']}/{len(results)} runs passed every invariant; "
        f"{len(meta['kinds_fired'])} fault kinds fired. Bystander cluster ran a task at the end: "
        f"{'yes' if meta['bystander_task_ok'] else 'NO: ' + meta['bystander_task_detail']}.",
        "",
        "| run | backend | faults fired | attempts | sup. starts | exit | "
        + " | ".join(columns)
        + " | s | what happened |",
        "| --- | --- | --- | --- | --- | --- | " + " | ".join("---" for _ in columns) + " | --- | --- |",
    ]
    for r in results:
        fired = "; ".join(d["fault"] for d in r.deliveries if d["fired"])
        marks = " | ".join("ok" if r.invariants.get(c) else f"**FAIL** {r.notes.get(c, '')}" for c in columns)
        lines.append(
            f"| {r.index} | {r.backend} | {fired} | {r.attempts} | {r.supervisor_starts} | {r.exit_code} | {marks} "
            f"| {r.wall_s:.0f} | {r.notes['outcome']} |"
        )
    header = "| kind | fired | runs | runs passed | median s to the next attempt's 1st step |"
    lines += ["", "## Per fault kind", "", header]
    lines.append("| --- | --- | --- | --- | --- |")
    for row in summary(results):
        lines.append(
            f"| {row['kind']} | {row['fired']} | {row['runs']} | {row['passed']} | {row['median_recover_s'] or '-'} |"
        )
    lags = [lag for r in results for lag in r.fate_sharing_lag_s]
    if lags:
        lines += [
            "",
            f"Supervisor SIGKILLed: its run's processes gone after {statistics.median(lags):.2f} s "
            f"(median of {len(lags)}, max {max(lags):.2f} s).",
        ]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--only", type=int, action="append", help="run only these run numbers (repeatable)")
    parser.add_argument("--quick", action="store_true", help="seed 1, runs 1-3")
    parser.add_argument("--minutes", type=float, default=None, help="start no new run after this many minutes")
    parser.add_argument("--run-limit-s", type=float, default=420.0)
    parser.add_argument("--parallel", type=int, default=2, help="runs at once (each has its own cluster)")
    parser.add_argument("--out", type=Path, default=REPO / "chaos-results")
    args = parser.parse_args(argv)
    indices = args.only or list(range(1, (3 if args.quick else args.runs) + 1))
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    halt = threading.Event()

    def stop(signum: int, _frame: object) -> None:
        print(f"chaos: {signal.Signals(signum).name}: ending the runs in flight, then the report", flush=True)
        halt.set()

    # A campaign started in the background has SIGINT ignored: SIGTERM stops it the same way.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    bystanders = Bystanders()
    bystanders.start()
    results: list[RunResult] = []
    try:
        print("chaos: the fault-free reference run ...", flush=True)
        reference = reference_weights(out)
        print(f"chaos: reference weights {reference[:16]}", flush=True)

        def one(index: int) -> RunResult | None:
            if halt.is_set() or (args.minutes is not None and time.monotonic() - began > args.minutes * 60):
                return None
            plan = draw_run(args.seed, index)
            print(f"chaos: {plan.describe()}", flush=True)
            workdir = out / "runs" / str(index)
            shutil.rmtree(workdir, ignore_errors=True)
            workdir.mkdir(parents=True)
            result = Run(plan, workdir, reference, args.run_limit_s, halt).execute()
            if halt.is_set():
                print(f"chaos: run {index}: cut off by the stop, not counted", flush=True)
                return None
            ok, detail = bystanders.alive()
            result.invariants["bystanders"] = ok
            result.notes["bystanders"] = detail
            failed = [name for name, good in result.invariants.items() if not good]
            verdict = "PASS" if not failed else "FAIL " + ", ".join(f"{n} ({result.notes.get(n, '')})" for n in failed)
            print(
                f"chaos: run {index}: {result.faults_fired} faults fired, {result.attempts} "
                f"attempt{'' if result.attempts == 1 else 's'}, exit "
                f"{result.exit_code}, {result.wall_s:.0f} s: {verdict}",
                flush=True,
            )
            return result

        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
            for result in pool.map(one, indices):
                if result is not None:
                    results.append(result)
        if args.minutes is not None and time.monotonic() - began > args.minutes * 60:
            print(f"chaos: {args.minutes} min are up: no runs were started after that", flush=True)
        task_ok, task_detail = bystanders.runs_a_task()
    finally:
        bystanders.stop()
    fired_kinds = sorted({kind_of(d["fault"]) for r in results for d in r.deliveries if d["fired"]})
    meta = {
        "seed": args.seed,
        "runs": [r.index for r in results],
        "faults_fired": sum(r.faults_fired for r in results),
        "faults_drawn": sum(len(r.drawn) for r in results),
        "kinds_fired": fired_kinds,
        "runs_passed": sum(r.passed for r in results),
        "wall_min": round((time.monotonic() - began) / 60, 1),
        "bystander_task_ok": task_ok,
        "bystander_task_detail": task_detail,
        "reference_weights": reference,
    }
    write_report(out, results, meta)
    print((out / "results.md").read_text(), flush=True)
    return 0 if task_ok and all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
