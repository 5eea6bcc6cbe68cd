"""Recovery benchmark: the same job, the same injected failures, under this supervisor and the loops users write.

    .venv/bin/python scripts/bench_recovery.py --quick          # a few minutes: raise, supervisor vs shell loop
    .venv/bin/python scripts/bench_recovery.py --repeats 3      # every launcher, every failure kind

Launchers:
  supervisor                the supervisor, its Ray cluster kept between attempts (the default)
  supervisor-fresh-cluster  the supervisor, a fresh Ray cluster for every attempt
  shell-loop                `until python -m verl_hooks.launch ... trainer.resume_mode=auto; do :; done`
  torchrun                  `torchrun --max-restarts=3` around the same command
Failures, injected into the job's weight sync at the same step on attempt 1 (VERL_HOOKS_FAULTS):
  raise  the sync raises;  kill  the trainer process is SIGKILLed;  hang  the sync never returns.

The loops run the job as a user runs verl today: each attempt gets a Ray cluster of its own that ends with it
(started as the supervisor starts its own, with a private temp dir and ports, so that a shared machine's other
clusters are left alone: see scripts/bench_entry.py), resumes with `trainer.resume_mode=auto`, and has no
weight-sync deadline. Runs that do not finish within --limit-s are cut off and reported as such (a loop cannot
recover from a hang).

Per failure: detect = the fault firing to the launcher knowing the attempt is over (the job's own time to die
included); teardown+fence = from there to ready to relaunch (the supervisor's teardown and fence; for a loop,
its attempt's cluster going down and the relaunch); relaunch to 1st step = to the first training step of the
next attempt, of which cluster start = a new Ray cluster's start-up; recover = fault to that first step; steps
lost = steps trained before the fault (the fault's own step included: verl syncs at the end of a step) that
the resumed attempt had to train again.

Timestamps come from the job and the launchers, never from guesses: the fault injector logs when a fault fires
(VERL_HOOKS_FAULT_LOG), the job logs its start and each step (trainer.progress_file), the supervisor its events
(events.jsonl), the loops' attempts their launch and exit (scripts/bench_entry.py).

Outputs in --out: results.json (every figure), results.md (tables, ratios against the best baseline first),
timeline.png (the attempts of each launcher).
"""

from __future__ import annotations

import argparse
import json
import os
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

REPO = Path(__file__).resolve().parent.parent
SUPERVISORS = ("supervisor", "supervisor-fresh-cluster")
LAUNCHERS = (*SUPERVISORS, "shell-loop", "torchrun")
FAILURES = {"raise": "naive:raise@{step}#1", "kill": "naive:exit@{step}#1", "hang": "naive:hang@{step}#1"}
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

    def job_args(self, workdir: Path) -> list[str]:
        return [
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


def command_for(launcher: str, plan: Plan, workdir: Path) -> list[str]:
    job = plan.job_args(workdir)
    if launcher in SUPERVISORS:
        keep = "true" if launcher == "supervisor" else "false"
        return [
            sys.executable,
            "-m",
            "supervisor",
            f"run_dir={workdir / 'run'}",
            f"ray.keep_cluster_between_attempts={keep}",
            "restart.max_restarts=3",
            "watchdog.adaptive_min_steps=2",
            "watchdog.adaptive_floor_s=10",
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
            f'BENCH_ATTEMPT=$attempt {quoted} && exit 0; [ "$attempt" -ge 4 ] && exit 1; done'
        )
        return ["bash", "-c", loop]
    if launcher == "torchrun":
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nnodes=1",
            "--nproc-per-node=1",
            "--max-restarts=3",
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


def kill_marked(run_id: str) -> None:
    processes = marked_processes(run_id)
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=10)


def run_launcher(launcher: str, failure: str | None, repeat: int, plan: Plan, out: Path) -> RunRecord:
    name = f"{launcher}-{failure or 'fault-free'}-{repeat}"
    workdir = out / "runs" / name
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    run_id = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VERL_HOOKS_", "VERL_SUPERVISOR_", "RAY_ADDRESS"))}
    env.update(
        {
            MARKER: run_id,
            "PYTHONPATH": str(REPO),
            "RAY_AUTH_MODE": "disabled",
            "VERL_HOOKS_FAULT_LOG": str(workdir / "faults.jsonl"),
            "BENCH_LAUNCH_LOG": str(workdir / "launches.jsonl"),
            "BENCH_RAY_DIR": str(workdir / "ray"),
            # The loops' job has no guard deadline, as verl has none; the supervisor's job has the guard's.
            "VERL_HOOKS_SYNC_TIMEOUT_S": str(plan.guard_deadline_s if launcher in SUPERVISORS else 86400),
        }
    )
    if failure is not None:
        env["VERL_HOOKS_FAULTS"] = FAILURES[failure].format(step=plan.fault_step)
    log = (workdir / "launcher.log").open("w")
    started = time.time()
    proc = subprocess.Popen(
        command_for(launcher, plan, workdir),
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

    detected_at is when the launcher knew the attempt was over: the supervisor's attempt_exited (or
    stall_detected) event; for the loops, the moment their attempt process saw the job exit (bench_entry).
    """
    workdir = Path(record.workdir)
    if record.launcher in SUPERVISORS:
        events = read_jsonl(workdir / "run" / "events.jsonl")
        started = [e for e in events if e["event"] == "attempt_started"]
        exited = [e for e in events if e["event"] == "attempt_exited"]
        stalls = [e for e in events if e["event"] == "stall_detected"]
        attempts = []
        for index, start in enumerate(started):
            end = exited[index]["ts"] if index < len(exited) else None
            stall = next((s["ts"] for s in stalls if s["attempt"] == start["attempt"]), None)
            attempts.append({"launched_at": start["ts"], "ended_at": end, "detected_at": stall or end})
        return attempts
    launches = read_jsonl(workdir / "launches.jsonl")
    exits = {e["attempt"]: e["ts"] for e in launches if e["event"] == "exit"}
    return [
        {"launched_at": e["ts"], "ended_at": exits.get(e["attempt"]), "detected_at": exits.get(e["attempt"])}
        for e in launches
        if e["event"] == "launch"
    ]


def relaunch_cluster_start_s(record: RunRecord) -> float:
    """Seconds the relaunch (attempt 2) spent starting a Ray cluster: none when the cluster was kept."""
    workdir = Path(record.workdir)
    if record.launcher in SUPERVISORS:
        events = read_jsonl(workdir / "run" / "events.jsonl")
        starts = [e["startup_s"] for e in events if e["event"] == "cluster_started"]
        return starts[1] if len(starts) > 1 else 0.0
    ups = [e["startup_s"] for e in read_jsonl(workdir / "launches.jsonl") if e["event"] == "cluster_up"]
    return ups[1] if len(ups) > 1 else 0.0


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
        teardowns = [e for e in events if e["event"] == "teardown"]
        cluster = [e for e in events if e["event"] == "cluster_started"]
        metrics["cluster_start_s"] = cluster[0]["startup_s"] if cluster else None
        metrics["time_to_first_attempt_s"] = attempts[0]["launched_at"] - record.started_at if attempts else None
    if not faults or record.failure is None:
        return metrics
    fault_at = faults[0]["ts"]
    first = attempts[0] if attempts else None
    metrics["detection_s"] = first["detected_at"] - fault_at if first and first["detected_at"] else None
    if record.launcher in SUPERVISORS:
        metrics["teardown_to_fence_s"] = teardowns[0]["duration_s"] if teardowns else None
    elif len(attempts) >= 2 and first and first["ended_at"]:
        # What a loop does between seeing the exit and relaunching: its attempt's cluster going down.
        metrics["teardown_to_fence_s"] = attempts[1]["launched_at"] - first["ended_at"]
    if len(attempts) >= 2:
        relaunch = attempts[1]["launched_at"]
        first_step = _first_step_after(progress, relaunch, 0.0)
        start_events = [p for p in progress if p["event"] == "start" and p["ts"] >= relaunch]
        resumed_from = (start_events[0].get("resumed_from_step") or 0) if start_events else None
        # verl syncs weights at the end of a step, after its save: the fault's step was trained, saved or not.
        trained_before_fault = faults[0]["step"]
        metrics["relaunch_to_first_step_s"] = first_step
        metrics["relaunch_cluster_start_s"] = relaunch_cluster_start_s(record)
        metrics["recover_s"] = (relaunch + first_step - fault_at) if first_step is not None else None
        metrics["steps_lost"] = None if resumed_from is None else trained_before_fault - resumed_from
    return metrics


def _first_step_after(progress: list[dict[str, Any]], since: float, origin: float) -> float | None:
    steps = [p["ts"] for p in progress if p["event"] == "step" and p["ts"] >= since]
    return (min(steps) - (origin or since)) if steps else None


# --- reporting ---

COLUMNS = (
    ("detection_s", "detect (s)"),
    ("teardown_to_fence_s", "teardown+fence (s)"),
    ("relaunch_to_first_step_s", "relaunch to 1st step (s)"),
    ("relaunch_cluster_start_s", "of which cluster start (s)"),
    ("recover_s", "recover (s)"),
    ("steps_lost", "steps lost"),
    ("leftover_processes", "left behind"),
    ("wall_s", "wall (s)"),
    ("goodput", "goodput"),
)


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
        if record.launcher in fault_free and record.metrics.get("finished"):
            record.metrics["goodput"] = round(fault_free[record.launcher] / record.metrics["wall_s"], 3)
        cell = table.setdefault(record.failure, {}).setdefault(record.launcher, {"runs": []})
        cell["runs"].append(record.metrics)
    for launchers in table.values():
        for cell in launchers.values():
            runs = cell["runs"]
            cell["cut_off"] = sum(1 for m in runs if m.get("cut_off"))
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


def to_markdown(table: dict[str, dict[str, dict[str, Any]]], plan: Plan, overhead: dict[str, Any]) -> str:
    lines = ["# Recovery benchmark", "", *headline(table), ""]
    lines.append(
        f"Job: mini-PPO, {plan.steps} steps, checkpoint every {plan.save_freq}, fault at step {plan.fault_step} "
        f"on attempt 1, {plan.extra_step_time_s} s of extra step time; runs cut off after {plan.limit_s:.0f} s. "
        "Medians, with [min-max] over the repeats. detect: the fault firing to the launcher knowing the attempt "
        "is over; teardown+fence: from there to ready to relaunch; relaunch to 1st step: to the next attempt's "
        "first training step (a new Ray cluster's start-up included); recover: fault to that step."
    )
    for failure, launchers in table.items():
        lines += ["", f"## {failure}", "", "| launcher | " + " | ".join(title for _, title in COLUMNS) + " | cut off |"]
        lines.append("|" + "---|" * (len(COLUMNS) + 2))
        for launcher, cell in launchers.items():
            values = []
            for key, _ in COLUMNS:
                stat = cell.get(key)
                if stat is None:
                    values.append("-")
                elif stat["n"] > 1 and stat["min"] != stat["max"]:
                    values.append(f"{stat['median']:.2f} [{stat['min']:.2f}-{stat['max']:.2f}]")
                else:
                    values.append(f"{stat['median']:.2f}")
            lines.append(f"| {launcher} | " + " | ".join(values) + f" | {cell['cut_off']} of {len(cell['runs'])} |")
    lines += ["", "## The supervisor's own cost", ""]
    for key, value in overhead.items():
        lines.append(f"- {key}: {value}")
    return "\n".join(lines) + "\n"


def supervisor_overhead(records: list[RunRecord]) -> dict[str, Any]:
    ours = [r for r in records if r.launcher == "supervisor"]
    if not ours:
        return {}
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
    }


def plot_timeline(records: list[RunRecord], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in records if r.failure is not None and r.repeat == 0]
    if not shown:
        return
    fig, ax = plt.subplots(figsize=(12, 0.7 * len(shown) + 1.5))
    for row, record in enumerate(shown):
        workdir = Path(record.workdir)
        progress = read_jsonl(workdir / "progress.jsonl")
        for attempt in attempt_launches(record):
            start = attempt["launched_at"] - record.started_at
            end = (attempt["ended_at"] or record.ended_at) - record.started_at
            first = _first_step_after(progress, attempt["launched_at"], record.started_at)
            training_from = min(first, end) if first is not None and first >= start else end
            ax.barh(row, training_from - start, left=start, height=0.5, color="tab:gray", alpha=0.5)
            ax.barh(row, end - training_from, left=training_from, height=0.5, color="tab:blue", alpha=0.7)
        steps = [p["ts"] - record.started_at for p in progress if p["event"] == "step"]
        ax.plot(steps, [row] * len(steps), "|", color="black", markersize=10)
        faults = read_jsonl(workdir / "faults.jsonl")
        if faults:
            ax.plot(faults[0]["ts"] - record.started_at, row, "x", color="red", markersize=12, mew=3)
        if record.cut_off:
            ax.text(record.ended_at - record.started_at, row, "  cut off", va="center", color="red")
    ax.set_yticks(range(len(shown)), [f"{r.launcher} / {r.failure}" for r in shown])
    ax.set_xlabel(
        "seconds since the launcher started (grey: an attempt starting up; blue: training; ticks: steps; x: the fault)"
    )
    ax.set_title("Recovery timelines")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --- main ---


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="raise only, supervisor and shell loop, one repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--launchers", default=",".join(LAUNCHERS))
    parser.add_argument("--failures", default=",".join(FAILURES))
    parser.add_argument("--steps", type=int, default=Plan.steps)
    parser.add_argument("--limit-s", type=float, default=Plan.limit_s)
    parser.add_argument("--no-fault-free", action="store_true", help="skip the fault-free reference runs")
    parser.add_argument("--out", type=Path, default=REPO / "bench_out")
    args = parser.parse_args(argv)
    if args.quick:
        args.launchers, args.failures, args.repeats = "supervisor,shell-loop", "raise", 1
    launchers = [name for name in args.launchers.split(",") if name]
    failures = [name for name in args.failures.split(",") if name]
    unknown = [n for n in launchers if n not in LAUNCHERS] + [f for f in failures if f not in FAILURES]
    if unknown:
        parser.error(f"unknown launcher or failure: {', '.join(unknown)}")
    plan = Plan(steps=args.steps, fault_step=min(Plan.fault_step, args.steps - 1), limit_s=args.limit_s)
    args.out.mkdir(parents=True, exist_ok=True)

    records: list[RunRecord] = []
    schedule = [(launcher, None, 0) for launcher in launchers if not args.no_fault_free]
    schedule += [(launcher, failure, r) for r in range(args.repeats) for failure in failures for launcher in launchers]
    for number, (launcher, failure, repeat) in enumerate(schedule, 1):
        print(f"[{number}/{len(schedule)}] {launcher} / {failure or 'fault-free'} / repeat {repeat}", flush=True)
        record = run_launcher(launcher, failure, repeat, plan, args.out)
        record.metrics = compute_metrics(record, plan)
        print(f"    {json.dumps(record.metrics)}", flush=True)
        records.append(record)

    digests = {r.final["weights_sha256"] for r in records if r.final}
    table = aggregate(records)
    overhead = supervisor_overhead(records)
    result = {
        "plan": asdict(plan),
        "all_finished_runs_have_the_same_weights": len(digests) <= 1,
        "table": table,
        "supervisor_overhead": overhead,
        "runs": [asdict(r) for r in records],
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    (args.out / "results.md").write_text(to_markdown(table, plan, overhead))
    plot_timeline(records, args.out / "timeline.png")
    print((args.out / "results.md").read_text())
    print(f"outputs: {args.out}/results.json, results.md, timeline.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
