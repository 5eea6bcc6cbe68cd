"""Preemption benchmark: what a worker node taken away costs a run, with Ray's notice and without it.

    .venv/bin/python scripts/bench_preemption.py            # the fault-free reference and three launchers
    .venv/bin/python scripts/bench_preemption.py --quick    # a shorter job and a 20 s deadline: a smoke run
    .venv/bin/python scripts/bench_preemption.py --launchers supervisor,shell-loop --deadline-s 60

Launchers, each on the same job and the same preemption:
  supervisor            the supervisor against the existing cluster (ray.mode=address), default settings,
                        preemption.poll_s=1: on the notice it asks the job to save the step it is at, ends the
                        attempt and relaunches on the nodes that remain
  supervisor-no-notice  the same with preemption.watch=false: it learns of the preemption when the node dies
  shell-loop            `until python -m mini_ppo.main ... trainer.resume_mode=auto; do :; done` against the same
                        cluster through RAY_ADDRESS, as users run verl on a persistent Ray cluster (the job's own
                        command: no verl_hooks, nothing that could hear of the drain)
The fault-free run (the supervisor, nothing drained) gives the reference final weights and the step time.

Every run gets a fresh Ray cluster of three nodes on this machine, started as the tests start theirs: a head with
0 CPUs and two workers with 4 CPUs each (tests.conftest.start_test_cluster, MultiNodeCluster.add_node). The job is
the mini-PPO job (--steps, --save-freq, --step-time-s: extra seconds per step; seed 11, one trainer rank), logging
each step with its time to trainer.progress_file.

The preemption: once the job has logged step --preempt-step, the worker node holding most of the cluster's live
actors (the job's: the cluster is the run's own) is drained in Ray with reason PREEMPTION and a deadline
--deadline-s ahead (supervisor.mechanisms.ray_drain.drain_node, what the autoscaler, KubeRay or a
spot-termination handler sends), and its raylet is killed at the deadline unless Ray let the node go before (a
drained node leaves once nothing runs there).

Measured per launcher, from the job's progress file and the drain's time:
  steps redone      steps trained before a relaunch and trained again after it
  time lost         the progress the run did not make: from the first time it logged the furthest step it had
                    reached before the relaunch, to the relaunched run back at that step (its start when it
                    resumed there, else that step trained again); the save, the teardown, the wait for the node,
                    the detection, the relaunch's start-up and the steps redone together
  drain to back     the drain to the same moment (what it adds to "time lost": the steps trained on the draining
                    node before it went)
  delay             the run's training span (its first start to "done") less the fault-free run's
  wall time, whether it finished, and its final weights (checkpoints/final.json's weights_sha256) against the
  fault-free run's; ratios between the launchers, from the same run of the script.

Outputs in --out: results.json (every figure), results.md (a table per launcher, the ratios, the knobs). Exit code
1 when a launcher did not finish, its final weights differ from the fault-free run's, or the run is no valid
comparison (the fault-free run failed; the node was never drained).

Only processes this script started are ever killed: each launcher's process group, the processes carrying its
BENCH_RUN_ID marker, and the drained node's raylet (found by pid through the cluster's own processes); each
cluster is stopped by tests.conftest.stop_test_cluster, also on a failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
# Some dependency installs a top-level `tests` package: this repository's must come first.
sys.path.insert(0, str(REPO))

from supervisor.mechanisms.ray_drain import drain_node  # noqa: E402
from supervisor.mechanisms.ray_state import RayStateClient  # noqa: E402
from tests.conftest import start_test_cluster, stop_test_cluster  # noqa: E402
from tests.multi_node import MultiNodeCluster  # noqa: E402

sys.path.insert(0, str(REPO / "scripts"))
from bench_recovery import MARKER, kill_marked  # noqa: E402  (one marker and one cleanup for every benchmark)

REFERENCE = "fault-free"
LAUNCHERS = ("supervisor", "supervisor-no-notice", "shell-loop")
LOOP_MAX_ATTEMPTS = 5
"""The shell loop gives up after this many attempts (an unbounded loop would retry a broken job forever)."""
SUPERVISOR_STOP_S = 40.0
"""How long a supervisor cut off with SIGTERM is given to tear its attempt down before its group is SIGKILLed."""


@dataclass(frozen=True)
class Plan:
    steps: int = 45
    """Enough for the job to outlast the deadline: at about 1 s a step, the job trains on the drained node for
    --deadline-s more steps before it goes (without the notice), and must still have steps left then."""
    save_freq: int = 5
    step_time_s: float = 1.0
    """trainer.extra_step_time_s: a sleep after each step, on top of mini-PPO's own fraction of a second."""
    preempt_step: int = 7
    """The drain comes once the job has logged this step: two steps after the periodic save at 5."""
    deadline_s: float = 30.0
    seed: int = 11
    poll_s: float = 1.0
    """The supervisor's preemption.poll_s."""
    limit_s: float = 600.0
    """A launcher still running this long after its start is cut off."""

    def job_args(self, workdir: Path) -> list[str]:
        return [
            f"trainer.total_training_steps={self.steps}",
            f"trainer.save_freq={self.save_freq}",
            f"trainer.extra_step_time_s={self.step_time_s:g}",
            f"seed={self.seed}",
            "trainer.n_workers=1",
            f"trainer.progress_file={workdir / 'progress.jsonl'}",
        ]


QUICK = {"steps": 32, "deadline_s": 20.0}
"""--quick: the job just long enough to outlast the shorter deadline."""


@dataclass
class Preemption:
    """What was done to the node, and when (epoch seconds)."""

    node_id: str | None = None
    actors_on_node: list[str] = field(default_factory=list)
    """The class names of the live actors on the node when it was drained."""
    drained_at: float | None = None
    deadline_at: float | None = None
    accepted: bool = False
    message: str = ""
    step_at_drain: int | None = None
    node_gone_at: float | None = None
    killed_at_deadline: bool = False
    """True: its raylet was killed at the deadline; False: Ray let the node go before (or it never went)."""


@dataclass
class RunRecord:
    launcher: str
    workdir: str
    started_at: float
    ended_at: float
    exit_code: int | None
    cut_off: bool
    final: dict[str, Any] | None = None
    preemption: Preemption | None = None
    load: tuple[float, float] = (0.0, 0.0)
    """The machine's 1-minute load average at the launcher's start and end: other work on the machine (a CPU
    busier than the run's own) slows start-ups and steps."""
    metrics: dict[str, Any] = field(default_factory=dict)


# --- the launchers' commands (mechanism) ---


def supervisor_command(plan: Plan, workdir: Path, cluster: MultiNodeCluster, watch: bool = True) -> list[str]:
    """As the end-to-end tests start it (tests/supervisor/e2e/conftest.py), with the mini_ppo preset named."""
    return [
        sys.executable,
        "-m",
        "supervisor",
        f"run_dir={workdir / 'run'}",
        "job=mini_ppo",
        "ray.mode=address",
        f"ray.address={cluster.address}",
        f"ray.dashboard_url={cluster.dashboard_url}",
        f"preemption.poll_s={plan.poll_s:g}",
        f"preemption.watch={'true' if watch else 'false'}",
        "--",
        *plan.job_args(workdir),
    ]


def shell_loop_command(plan: Plan, workdir: Path) -> list[str]:
    """The job's own command in a loop until it succeeds, resuming from its newest checkpoint; as the recovery
    benchmark's shell loop (scripts/bench_recovery.py), but against the cluster in RAY_ADDRESS rather than a
    cluster of each attempt's own, and without verl_hooks.launch (no fault to inject here)."""
    job = [
        sys.executable,
        "-m",
        "mini_ppo.main",
        *plan.job_args(workdir),
        f"trainer.default_local_dir={workdir / 'checkpoints'}",
        "trainer.resume_mode=auto",
    ]
    # `if`, not `[ ... ] && exit 1`: the loop's status is its body's last command's, and a false test would make
    # a loop that ended on the job's success exit 1.
    loop = (
        f"attempt=1; until {shlex.join(job)}; do "
        f'attempt=$((attempt+1)); if [ "$attempt" -gt {LOOP_MAX_ATTEMPTS} ]; then exit 1; fi; done'
    )
    return ["bash", "-c", loop]


def command_for(launcher: str, plan: Plan, workdir: Path, cluster: MultiNodeCluster) -> list[str]:
    if launcher in ("supervisor", REFERENCE):
        return supervisor_command(plan, workdir, cluster)
    if launcher == "supervisor-no-notice":
        return supervisor_command(plan, workdir, cluster, watch=False)
    if launcher == "shell-loop":
        return shell_loop_command(plan, workdir)
    raise ValueError(f"unknown launcher {launcher}")


def launcher_env(cluster: MultiNodeCluster, run_id: str) -> dict[str, str]:
    """The environment as tests/supervisor/e2e/conftest.py's supervisor_env builds it, with the cluster's
    address (and auth) as cluster.env() gives it, and the marker that finds every process of the run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VERL_HOOKS_", "VERL_SUPERVISOR_", "RAY_"))}
    return {**env, "PYTHONPATH": str(REPO), **cluster.env(), MARKER: run_id}


def final_path(launcher: str, workdir: Path) -> Path:
    folder = workdir / "checkpoints" if launcher == "shell-loop" else workdir / "run" / "checkpoints"
    return folder / "final.json"


# --- the cluster and the processes (mechanism) ---


def start_three_nodes() -> MultiNodeCluster:
    cluster = start_test_cluster(num_cpus=0, dashboard=True)
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=4)
    except BaseException:
        stop_test_cluster(cluster)
        raise
    return cluster


def raylets_of(cluster: MultiNodeCluster, node_id: str) -> list[psutil.Process]:
    found = []
    for process in cluster.processes():
        try:
            if f"--node_id={node_id}" in " ".join(process.cmdline()):
                found.append(process)
        except psutil.Error:
            continue
    return found


def stop_launcher(proc: subprocess.Popen[bytes], launcher: str) -> None:
    """A launcher still running: SIGTERM (the supervisor then tears its attempt down), then SIGKILL its group."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=SUPERVISOR_STOP_S if launcher != "shell-loop" else 5.0)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        pass
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


# --- the preemption (mechanism) ---


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def logged_step(progress_path: Path) -> int:
    return max((p["step"] for p in read_jsonl(progress_path) if p["event"] == "step"), default=0)


def busiest_worker(cluster: MultiNodeCluster) -> tuple[str, list[str]] | None:
    """The worker node (not the head) with the most live actors, and their class names."""
    state = RayStateClient(cluster.dashboard_url)
    heads = {node.node_id for node in state.nodes() if node.is_head}
    actors = [a for a in state.live_actors() if a.node_id and a.node_id not in heads]
    counts = Counter(a.node_id for a in actors)
    if not counts:
        return None
    node = counts.most_common(1)[0][0]
    return node, sorted(a.class_name for a in actors if a.node_id == node)


def preempt(
    cluster: MultiNodeCluster, proc: subprocess.Popen[bytes], progress_path: Path, plan: Plan, until: float
) -> Preemption:
    """Wait for the job to log plan.preempt_step, drain the busiest worker with the deadline, and take the node
    away at the deadline (its raylet killed) unless Ray let it go before. Returns early if the launcher ends."""
    outcome = Preemption()
    while logged_step(progress_path) < plan.preempt_step:
        if proc.poll() is not None or time.time() > until:
            outcome.message = f"the job never logged step {plan.preempt_step}"
            return outcome
        time.sleep(0.1)
    target = busiest_worker(cluster)
    if target is None:
        outcome.message = "no worker node holds a live actor"
        return outcome
    outcome.node_id, outcome.actors_on_node = target
    outcome.step_at_drain = logged_step(progress_path)
    outcome.drained_at = time.time()
    outcome.deadline_at = outcome.drained_at + plan.deadline_s
    drained = drain_node(
        cluster.address, outcome.node_id, "bench: spot reclaim", deadline_ms=int(outcome.deadline_at * 1000)
    )
    outcome.accepted, outcome.message = drained.accepted, drained.message
    print(
        f"    drained node {outcome.node_id[:12]} ({', '.join(outcome.actors_on_node)}) at step "
        f"{outcome.step_at_drain}: accepted={drained.accepted} {drained.message}",
        flush=True,
    )
    if not drained.accepted:
        return outcome
    take_node_at_deadline(cluster, outcome)
    return outcome


def take_node_at_deadline(cluster: MultiNodeCluster, outcome: Preemption) -> None:
    """Until the deadline, note when the node's raylet goes by itself; at it, kill the raylet if still there."""
    assert outcome.node_id is not None
    assert outcome.deadline_at is not None
    while time.time() < outcome.deadline_at:
        if not raylets_of(cluster, outcome.node_id):
            outcome.node_gone_at = time.time()
            print(f"    Ray let the node go {outcome.node_gone_at - outcome.drained_at:.1f} s after the drain")
            return
        time.sleep(0.2)
    raylets = raylets_of(cluster, outcome.node_id)
    for raylet in raylets:
        try:
            raylet.kill()
        except psutil.Error:
            pass
    outcome.node_gone_at = time.time()
    outcome.killed_at_deadline = bool(raylets)
    print(f"    node taken at the deadline (raylet killed: {bool(raylets)})", flush=True)


# --- one launcher run (mechanism) ---


def run_launcher(launcher: str, plan: Plan, out: Path) -> RunRecord:
    workdir = out / "runs" / launcher
    workdir.mkdir(parents=True, exist_ok=False)
    run_id = uuid.uuid4().hex
    cluster = start_three_nodes()
    proc = None
    try:
        load_at_start = os.getloadavg()[0]
        started = time.time()
        with (workdir / "launcher.log").open("w") as log:
            proc = subprocess.Popen(
                command_for(launcher, plan, workdir, cluster),
                cwd=workdir,
                env=launcher_env(cluster, run_id),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        until = started + plan.limit_s
        preemption = None
        if launcher != REFERENCE:
            preemption = preempt(cluster, proc, workdir / "progress.jsonl", plan, until)
        try:
            code, cut_off = proc.wait(timeout=max(0.0, until - time.time())), False
        except subprocess.TimeoutExpired:
            stop_launcher(proc, launcher)
            code, cut_off = None, True
        ended = time.time()
    finally:
        if proc is not None:
            stop_launcher(proc, launcher)  # on a failure or Ctrl-C: nothing here outlives the script
        left = kill_marked(run_id)
        if left:
            print(f"    {left} processes of the run were left and killed", flush=True)
        stop_test_cluster(cluster)
    path = final_path(launcher, workdir)
    final = json.loads(path.read_text()) if path.exists() else None
    load = (round(load_at_start, 2), round(os.getloadavg()[0], 2))
    return RunRecord(launcher, str(workdir), started, ended, code, cut_off, final, preemption, load)


# --- what the progress file says (pure) ---


def relaunches_after(progress: list[dict[str, Any]], since: float) -> list[dict[str, Any]]:
    """The job's "start" lines after ``since``: each attempt's trainer logs one, with the step it resumed at."""
    return [p for p in progress if p["event"] == "start" and p["ts"] > since]


def furthest_before(progress: list[dict[str, Any]], ts: float) -> tuple[int, float | None]:
    """The furthest step logged before ``ts``, and when it was first logged."""
    steps = [p for p in progress if p["event"] == "step" and p["ts"] < ts]
    if not steps:
        return 0, None
    furthest = max(p["step"] for p in steps)
    return furthest, min(p["ts"] for p in steps if p["step"] == furthest)


def steps_redone(progress: list[dict[str, Any]], since: float) -> int:
    """Steps trained before a relaunch after ``since`` and trained again after it: for each such relaunch, the
    furthest step logged before it less the step it resumed at. A job stopped right after a step's weight sync
    (the supervisor's save on a notice) saved a step it had not logged yet: nothing is redone, not -1."""
    return sum(
        max(0, furthest_before(progress, start["ts"])[0] - start["step"]) for start in relaunches_after(progress, since)
    )


def back_at(progress: list[dict[str, Any]], since: float, step: int) -> float | None:
    """When the run, relaunched after ``since``, was back at ``step``: the relaunch's start when it resumed at or
    beyond it, else the step trained again."""
    for p in progress:
        if p["ts"] > since and p["event"] in ("start", "step") and p["step"] >= step:
            return p["ts"]
    return None


def training_span(progress: list[dict[str, Any]]) -> float | None:
    """The job's first start to its "done": the training, its interruptions included, without the launcher's
    own start-up."""
    starts = [p["ts"] for p in progress if p["event"] == "start"]
    done = [p["ts"] for p in progress if p["event"] == "done"]
    return max(done) - min(starts) if starts and done else None


def step_time(progress: list[dict[str, Any]]) -> float | None:
    """The median time between consecutive steps of one attempt (a pid)."""
    intervals = []
    steps = [p for p in progress if p["event"] == "step"]
    for before, after in itertools.pairwise(steps):
        if after["pid"] == before["pid"] and after["step"] == before["step"] + 1:
            intervals.append(after["ts"] - before["ts"])
    return statistics.median(intervals) if intervals else None


def recovery_metrics(progress: list[dict[str, Any]], drained_at: float) -> dict[str, Any]:
    """Steps redone, time lost and drain to back, for a run drained at ``drained_at``."""
    relaunches = relaunches_after(progress, drained_at)
    if not relaunches:
        return {"relaunched": False, "steps_redone": 0, "time_lost_s": 0.0, "drain_to_back_s": None}
    first = relaunches[0]
    reached, reached_at = furthest_before(progress, first["ts"])
    back = back_at(progress, first["ts"] - 1e-9, reached)
    return {
        "relaunched": True,
        "step_before_relaunch": reached,
        "resumed_at_step": first["step"],
        "steps_redone": steps_redone(progress, drained_at),
        "time_lost_s": None if back is None or reached_at is None else round(back - reached_at, 2),
        "drain_to_back_s": None if back is None else round(back - drained_at, 2),
        "first_relaunch_after_drain_s": round(first["ts"] - drained_at, 2),
    }


# --- per run (pure, but for reading the run's files) ---


def supervisor_figures(workdir: Path) -> dict[str, Any]:
    """What the supervisor said of the preemption: its response to the notice and the step saved."""
    events = read_jsonl(workdir / "run" / "events.jsonl")
    notice = next((e for e in events if e["event"] == "preemption_notice"), None)
    saved = next((e for e in events if e["event"] == "preemption_save"), None)
    exits = [e for e in events if e["event"] == "attempt_exited"]
    checkpoint = (saved or {}).get("emergency_checkpoint") or {}
    return {
        "notice_response": None if notice is None else notice.get("response"),
        "saved_at_notice_step": checkpoint.get("step") if checkpoint.get("status") == "saved" else None,
        "first_attempt_rule": exits[0].get("rule") if exits else None,
    }


def compute_metrics(record: RunRecord, reference: RunRecord | None) -> dict[str, Any]:
    workdir = Path(record.workdir)
    progress = read_jsonl(workdir / "progress.jsonl")
    span = training_span(progress)
    metrics: dict[str, Any] = {
        "finished": record.final is not None and not record.cut_off and record.exit_code == 0,
        "exit_code": record.exit_code,
        "cut_off": record.cut_off,
        "wall_s": round(record.ended_at - record.started_at, 2),
        "training_span_s": None if span is None else round(span, 2),
        "attempts": sum(1 for p in progress if p["event"] == "start"),
        "step_time_s": None if (s := step_time(progress)) is None else round(s, 3),
        "weights_sha256": (record.final or {}).get("weights_sha256"),
    }
    if reference is not None and reference.final is not None:
        metrics["same_weights_as_fault_free"] = metrics["weights_sha256"] == reference.final["weights_sha256"]
        ref_span = reference.metrics.get("training_span_s")
        if span is not None and ref_span is not None:
            metrics["delay_s"] = round(span - ref_span, 2)
    drain = record.preemption
    if drain is not None and drain.drained_at is not None:
        metrics["step_at_drain"] = drain.step_at_drain
        if drain.node_gone_at is not None:
            metrics["node_gone_after_s"] = round(drain.node_gone_at - drain.drained_at, 2)
        metrics.update(recovery_metrics(progress, drain.drained_at))
    if record.launcher != "shell-loop":
        metrics.update(supervisor_figures(workdir))
    return metrics


# --- reporting (pure) ---


def ratios(records: dict[str, RunRecord]) -> list[dict[str, Any]]:
    """Each figure of the supervisor against each other launcher's, from this one run of the script."""
    ours = records.get("supervisor")
    if ours is None:
        return []
    rows = []
    for other in ("shell-loop", "supervisor-no-notice"):
        theirs = records.get(other)
        if theirs is None:
            continue
        # Not "drain to back": without the notice it holds the steps trained on the draining node, which are no loss.
        for key, title in (("time_lost_s", "time lost"), ("delay_s", "delay")):
            a, b = ours.metrics.get(key), theirs.metrics.get(key)
            # Only figures of two relaunches: a run that never relaunched lost nothing to compare with.
            relaunched = ours.metrics.get("relaunched") and theirs.metrics.get("relaunched")
            if relaunched and a is not None and b is not None and b > 0:
                rows.append({"figure": title, "of": "supervisor", "against": other, "a": a, "b": b, "ratio": a / b})
        a, b = ours.metrics.get("steps_redone"), theirs.metrics.get("steps_redone")
        if relaunched and a is not None and b is not None:
            rows.append({"figure": "steps redone", "of": "supervisor", "against": other, "a": a, "b": b, "ratio": None})
    return rows


def validity_problems(records: dict[str, RunRecord]) -> list[str]:
    problems = []
    for name, record in records.items():
        m = record.metrics
        if not m.get("finished"):
            why = "cut off" if record.cut_off else f"exit {record.exit_code}"
            problems.append(f"{name}: did not finish ({why}); see {record.workdir}/launcher.log")
        if name != REFERENCE and m.get("same_weights_as_fault_free") is False:
            problems.append(f"{name}: its final weights differ from the fault-free run's")
        drain = record.preemption
        if name != REFERENCE and (drain is None or not drain.accepted):
            problems.append(f"{name}: no preemption ({drain.message if drain else 'not attempted'})")
        elif name != REFERENCE and m.get("relaunched") is False:
            problems.append(f"{name}: the job finished before the node went, no relaunch to measure (raise --steps)")
    if REFERENCE in records and records[REFERENCE].final is None:
        problems.append("the fault-free run left no final weights to compare with")
    return problems


def _cell(value: Any, fmt: str = "{:.1f}") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    return fmt.format(value) if isinstance(value, float) else str(value)


def node_fate(record: RunRecord) -> str:
    drain = record.preemption
    if drain is None or drain.node_gone_at is None or drain.drained_at is None:
        return "-"
    after = drain.node_gone_at - drain.drained_at
    return f"killed at the deadline ({after:.0f} s)" if drain.killed_at_deadline else f"left idle after {after:.1f} s"


def _table(columns: tuple[str, ...], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def cost_table(records: dict[str, RunRecord]) -> list[str]:
    """What the preemption cost each launcher."""
    columns = (
        "launcher",
        "finished",
        "same weights",
        "steps redone",
        "time lost (s)",
        "drain to back (s)",
        "delay (s)",
        "wall (s)",
    )
    rows = []
    for name, record in records.items():
        m = record.metrics
        same = "(reference)" if name == REFERENCE else _cell(m.get("same_weights_as_fault_free"))
        keys = ("steps_redone", "time_lost_s", "drain_to_back_s", "delay_s", "wall_s")
        rows.append([name, _cell(m.get("finished")), same, *(_cell(m.get(key)) for key in keys)])
    return _table(columns, rows)


def course_table(records: dict[str, RunRecord]) -> list[str]:
    """What happened in each preempted run: where the job was, what ended its first attempt, where it resumed."""
    columns = (
        "launcher",
        "drained at step",
        "actors on the node",
        "first attempt ended",
        "saved at the notice",
        "last step before the relaunch",
        "resumed at",
        "attempts",
        "the node",
    )
    rows = []
    for name, record in records.items():
        if name == REFERENCE:
            continue
        m, drain = record.metrics, record.preemption
        rule = m.get("first_attempt_rule") if name != "shell-loop" else ("job failed" if m.get("relaunched") else None)
        rows.append(
            [
                name,
                _cell(m.get("step_at_drain")),
                ", ".join(drain.actors_on_node) if drain and drain.actors_on_node else "-",
                _cell(rule),
                _cell(m.get("saved_at_notice_step")),
                _cell(m.get("step_before_relaunch")),
                _cell(m.get("resumed_at_step")),
                _cell(m.get("attempts")),
                node_fate(record),
            ]
        )
    return _table(columns, rows)


def ratio_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for row in rows:
        if row["ratio"] is None:
            lines.append(f"- {row['figure']}: {row['a']:g} with the notice vs {row['b']:g} for {row['against']}")
        else:
            lines.append(
                f"- {row['figure']}, supervisor / {row['against']}: {row['a']:.1f} s / {row['b']:.1f} s = "
                f"**{row['ratio']:.2f}x**"
            )
    return lines


def to_markdown(plan: Plan, records: dict[str, RunRecord], problems: list[str], reference_step_s: float | None) -> str:
    lines = ["# Preemption benchmark", ""]
    if problems:
        lines += ["**Not a valid comparison:**", "", *(f"- {p}" for p in problems), ""]
    step = f"{reference_step_s:.2f} s" if reference_step_s else "unknown"
    lines += [
        f"Job: mini-PPO, {plan.steps} steps, a checkpoint every {plan.save_freq}, {plan.step_time_s:g} s of extra "
        f"step time (a step: {step} in the fault-free run), seed {plan.seed}, one trainer rank. Cluster: a head "
        "with 0 CPUs and two workers with 4 CPUs each, fresh for every run. Preemption: once step "
        f"{plan.preempt_step} is logged, the worker with the job's actors drained with reason PREEMPTION and a "
        f"{plan.deadline_s:g} s deadline, its raylet killed at the deadline if still there. The supervisor: "
        f"default settings, preemption.poll_s={plan.poll_s:g}; runs cut off after {plan.limit_s:.0f} s.",
        "",
        *cost_table(records),
        "",
        "- **steps redone**: trained before the relaunch and trained again after it.",
        "- **time lost**: the first time the run logged the furthest step it reached before the relaunch, to the "
        "relaunched run back at that step (its start when it resumed there, else the step trained again). A job "
        "stopped on the notice saves the step whose weight sync it had just done, before logging it: its time "
        "lost counts from the step before, one step more than it lost.",
        "- **drain to back**: the drain to that same moment (it adds the steps trained on the draining node).",
        "- **delay**: the training span (the job's first start to its end) less the fault-free run's.",
        "",
        *course_table(records),
        "",
        "- **first attempt ended**: the supervisor's rule for it (`preempted`: on the notice; otherwise its "
        "judgement of the failure once the node died); the shell loop's job failed when the node died.",
        "- **saved at the notice**: the step the job saved when the supervisor asked it to on the notice.",
        "- **the node**: when it went after the drain: by itself once idle (Ray lets a drained node go when nothing "
        "runs there), or its raylet killed at the deadline.",
        "",
        "## Ratios (the same run)",
        "",
        *(ratio_lines(ratios(records)) or ["- none: the supervisor or its baselines are missing"]),
        "",
        "## Knobs",
        "",
        *(f"- {key}: {value}" for key, value in asdict(plan).items()),
        f"- the machine: {os.cpu_count()} CPUs; its 1-minute load average at each run's start and end: "
        + ", ".join(f"{name} {r.load[0]:g} -> {r.load[1]:g}" for name, r in records.items()),
        "",
    ]
    return "\n".join(lines)


# --- main ---


def parse_plan(argv: list[str] | None) -> tuple[Plan, list[str], Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Plan()
    parser.add_argument("--quick", action="store_true", help=f"a smoke run: {QUICK} unless given")
    parser.add_argument("--launchers", default=",".join(LAUNCHERS), help="comma-separated, of " + ", ".join(LAUNCHERS))
    parser.add_argument("--steps", type=int, help=f"default {defaults.steps}")
    parser.add_argument("--save-freq", type=int, default=defaults.save_freq)
    parser.add_argument("--step-time-s", type=float, default=defaults.step_time_s, help="extra seconds per step")
    parser.add_argument("--preempt-step", type=int, default=defaults.preempt_step)
    parser.add_argument("--deadline-s", type=float, help=f"default {defaults.deadline_s:g}")
    parser.add_argument("--limit-s", type=float, default=defaults.limit_s)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_preemption"))
    args = parser.parse_args(argv)
    quick = QUICK if args.quick else {}
    plan = Plan(
        steps=args.steps if args.steps is not None else quick.get("steps", defaults.steps),
        save_freq=args.save_freq,
        step_time_s=args.step_time_s,
        preempt_step=args.preempt_step,
        deadline_s=args.deadline_s if args.deadline_s is not None else quick.get("deadline_s", defaults.deadline_s),
        limit_s=args.limit_s,
    )
    launchers = [name for name in args.launchers.split(",") if name]
    unknown = [name for name in launchers if name not in LAUNCHERS]
    if unknown:
        parser.error(f"unknown launcher: {', '.join(unknown)}")
    if not 1 <= plan.preempt_step < plan.steps:
        parser.error(f"--preempt-step must be in 1..{plan.steps - 1}")
    if plan.save_freq < 1 or plan.deadline_s <= 0:
        parser.error("--save-freq must be >= 1 and --deadline-s > 0")
    return plan, launchers, args.out.resolve()


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    plan, launchers, out = parse_plan(argv)
    if out.exists() and any(out.iterdir()):
        print(f"{out} is not empty: give another --out", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _interrupt)  # a SIGTERM cleans up as Ctrl-C does: every finally runs
    records: dict[str, RunRecord] = {}
    schedule = [REFERENCE, *launchers]
    for number, launcher in enumerate(schedule, 1):
        print(f"[{number}/{len(schedule)}] {launcher}", flush=True)
        record = run_launcher(launcher, plan, out)
        record.metrics = compute_metrics(record, records.get(REFERENCE))
        records[launcher] = record
        print(f"    {json.dumps(record.metrics)}", flush=True)
        if launcher == REFERENCE:
            warn_if_too_short(plan, record)
    problems = validity_problems(records)
    reference_step = records[REFERENCE].metrics.get("step_time_s")
    result = {
        "plan": asdict(plan),
        "valid": not problems,
        "problems": problems,
        "ratios": ratios(records),
        "runs": {name: asdict(record) for name, record in records.items()},
    }
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "results.md").write_text(to_markdown(plan, records, problems, reference_step))
    print((out / "results.md").read_text())
    print(f"outputs: {out}/results.json, {out}/results.md")
    if problems:
        print("\nBENCHMARK NOT VALID:\n" + "\n".join(f"  {p}" for p in problems), file=sys.stderr, flush=True)
        return 1
    return 0


def warn_if_too_short(plan: Plan, reference: RunRecord) -> None:
    """A job that finishes before the drained node goes has no relaunch to measure without the notice."""
    step = reference.metrics.get("step_time_s")
    if step and plan.preempt_step + plan.deadline_s / step >= plan.steps:
        print(
            f"    warning: at {step:.2f} s a step, the job may finish within the {plan.deadline_s:g} s deadline "
            f"after step {plan.preempt_step}: raise --steps above {plan.preempt_step + plan.deadline_s / step:.0f}",
            flush=True,
        )


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: every process and cluster of the run stopped", file=sys.stderr)
        sys.exit(130)
