"""Goodput benchmark: a long run under a seeded stream of failures, under this supervisor and the loops users write.

    .venv/bin/python scripts/bench_goodput.py --quick       # ~4 minutes: 2 failures, supervisor vs shell loop
    .venv/bin/python scripts/bench_goodput.py               # the default stream, every launcher: ~45 minutes
    .venv/bin/python scripts/bench_goodput.py --dry-run     # print the stream and the projection's inputs only

The mini-PPO job runs for 1 step to warm the caches (not measured; --no-warm-up), once without failures (the
reference, under --reference-launcher, default shell-loop), then once under each launcher (--launchers: supervisor,
shell-loop, torchrun, kuberay-like by default; the launchers, their commands, environments, clusters and process
handling are scripts/bench_recovery.py's), every launcher meeting the same failures at the same global steps.

The job's shape, as a real run has it, scaled down (knobs, defaults):
  --steps 60          global steps
  --save-freq 10      a periodic checkpoint every 10 steps
  --step-time-s 5     seconds of extra time per step (trainer.extra_step_time_s): a step takes about 5.1 s. A real
                      step is about as long as the job's start-up or longer; this job's start-up (a launcher's start
                      to the job's first step) measured 22 s warm and 34 s cold on this 2-core machine, and 60 steps
                      of that length under five launchers would take about 2.5 hours. 5 s keeps the default run at
                      about 45 minutes, with a baseline's steps redone after a failure (about 5 with a save every
                      10) still costing about as much as its restart; --step-time-s 20 gives the real shape.
  rollout.backend=cpu_gloo rollout.num_replicas=1: a standalone rollout replica, whose process a failure can kill
                      (every run gets it, the reference too, so that the job is the same).

The failure stream (--seed 5, --mean-gap 12, --mix): gaps between failures, in global steps, drawn from the seed
as exponential with that mean (rounded, at least 1: a failure right after a relaunch, inside its recovery, is kept),
kinds drawn in the --mix proportions (DEFAULT_MIX: 20%, 10%, 15%, 20%, 10%, 25% in this order). Seed 5 is the
first seed whose stream has at least 4 failures and no hang (step 12 reward-raise, 31 trainer-killed, 47
trainer-killed, 48 replica-killed): a hang leaves every baseline stuck, with no ETTR to compare; --seed 3 draws a
stream with one. The kinds:
  sync-raise      update_weights:raise   the weight sync raises (the step was trained)
  sync-hang       update_weights:hang    the weight sync never returns
  generate-raise  generate:raise         the step's generation raises (once its batch is drawn)
  replica-killed  generate:exit          a rollout replica's process SIGKILLed as the step's generation starts
  reward-raise    reward:raise           the step's reward computation raises
  trainer-killed  reward:exit            the trainer's process SIGKILLed in the step (no save can run)
The sync failures use the multi-phase sync's update_weights phase, not `naive`: the cpu_gloo backend, which the
killed replica needs, never runs the naive phase. Each failure fires once per run, at its step, whichever attempt
gets there (VERL_HOOKS_FAULT_LEDGER): a loop that resumes from step 10 and trains 11 to 18 again does not meet the
failure at 18 twice. Every launcher has the same restart budget (--max-restarts, default: the stream's failures
plus 2). The baselines have no weight-sync deadline (as in bench_recovery): a hang leaves them stuck until the
per-run limit (--limit-multiple, default 3 x the reference's wall time, plus 60 s per failure of the stream: a
baseline that redoes many steps still finishes within it), and such a run is reported as never finished, with the
step it reached.

What it reports, per launcher: ETTR (the reference's wall time over the run's; only for a finished run), the
productive fraction (time in kept steps over wall time; a step is kept if it is the last time that global step was
trained), steps redone, failures met and survived, and per failure kind the time lost (median [min-max]): the
wall time the failure cost, i.e. the work it threw away (steps trained and trained again, the part of the failing
step done) and its recovery (the failure firing to the relaunched job's start, its emergency save and start-up
included). Every second of a run is in one of: start-up (to the first attempt's first step), productive, a
failure's work lost or recovery, finish (after the last step), other (nothing accounts for it). It also gives, for
comparison with scripts/bench_preemption.py, the time from a failure to the run back at the furthest step reached
before it. Every finished run's final weights are compared with the reference's.

Projected to a real cluster (--project-*): the same seed and mix, with gaps scaled to the cluster's failure rate, are
replayed with each launcher's measured costs (its own overhead per failure kind: detection, teardown, cluster
and relaunch; whether it saved at the failure) against the user's step time, start-up time, failure rate, run length
and save frequency. results.md says which figure came from where.

Outputs in --out (default /tmp/bench_goodput): results.json (every figure), results.md (tables, knobs, the
machine's load), timeline.png (each launcher's run: productive time and each kind of loss in its own colour).
Exit 1 when the comparison is not valid: the reference did not finish, a finished run's weights differ from it, a
finished run did not meet every failure of the stream, or a run met a failure of its own (time no failure of the
stream accounts for: an attempt that ended or stalled with none fired).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import signal
import statistics
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/bench_recovery.py, whose launchers these are

import bench_recovery as recovery

from supervisor.run.timeline import Span, TimelineRow, draw_timeline

KINDS = {
    "sync-raise": "update_weights:raise",
    "sync-hang": "update_weights:hang",
    "generate-raise": "generate:raise",
    "replica-killed": "generate:exit",
    "reward-raise": "reward:raise",
    "trainer-killed": "reward:exit",
}
"""Each failure kind and the fault (VERL_HOOKS_FAULTS, without its step) that makes it."""
DURING_STEP = frozenset({"generate-raise", "replica-killed", "reward-raise", "trainer-killed"})
"""Failures inside a step, before its updates: the step before is the last one trained. The others fail the step's
weight sync, which comes after its updates and its save."""
HANG = "sync-hang"
DEFAULT_MIX = {
    "sync-raise": 0.2,
    "sync-hang": 0.1,
    "generate-raise": 0.15,
    "replica-killed": 0.2,
    "reward-raise": 0.1,
    "trainer-killed": 0.25,
}
"""Process deaths (a replica's, the trainer's) are the most frequent, then errors that raise; hangs are rarer, and
cost most where nothing ends them."""
JOB_ARGS = recovery.FAILURE_JOB_ARGS["rollout"]
"""A standalone rollout replica (cpu_gloo), whose process replica-killed SIGKILLs: every run gets it."""
DEFAULT_LAUNCHERS = ("supervisor", "shell-loop", "torchrun", "kuberay-like")
REFERENCE = "fault-free"
QUICK = {
    "steps": 12,
    "save_freq": 5,
    "step_time_s": 1.0,
    "stream": "4:sync-raise,8:trainer-killed",
    "launchers": "supervisor,shell-loop",
}
"""--quick: a smoke run, a few minutes."""


@dataclass(frozen=True)
class Failure:
    step: int
    kind: str

    @property
    def spec(self) -> str:
        return f"{KINDS[self.kind]}@{self.step}"


@dataclass(frozen=True)
class Plan:
    steps: int = 60
    save_freq: int = 10
    step_time_s: float = 5.0
    """Shorter than the job's start-up (22-34 s here): see the module's docstring."""
    seed: int = 5
    """The first seed whose stream (at the default steps and gap) has at least 4 failures and no hang: a hang
    leaves every baseline stuck, with no ETTR to compare (--seed 3 draws one)."""
    mean_gap: float = 12.0
    mix: tuple[tuple[str, float], ...] = tuple(DEFAULT_MIX.items())
    limit_multiple: float = 3.0
    """A faulted run is cut off after this many times the reference's wall time, plus ``limit_per_failure_s`` for
    each failure of the stream."""
    limit_per_failure_s: float = 60.0
    reference_limit_s: float | None = None
    """The reference run's own limit; default: 3 x its expected length plus 10 minutes."""
    max_restarts: int | None = None
    """Every launcher's restart budget; default: the stream's failures plus 2."""
    stream: str | None = None
    """A stream given by hand (STEP:KIND,...) instead of the seed's; the projection still draws from the seed."""

    def recovery_plan(self, stream: Sequence[Failure], limit_s: float) -> recovery.Plan:
        return recovery.Plan(
            steps=self.steps,
            save_freq=self.save_freq,
            fault_step=1,  # unused: the faults are the stream's
            extra_step_time_s=self.step_time_s,
            limit_s=limit_s,
            max_restarts=self.max_restarts if self.max_restarts is not None else len(stream) + 2,
            job_extra=JOB_ARGS,
        )


@dataclass(frozen=True)
class Cluster:
    """A real cluster's figures, the user's: what the projection replays the measured costs against."""

    step_s: float = 300.0
    startup_s: float = 600.0
    mtbf_h: float = 4.0
    """Mean training hours between failures."""
    hours: float = 168.0
    """The run's length without failures (its steps: hours x 3600 / step_s)."""
    save_freq: int = 10
    sync_deadline_s: float = 60.0
    """The guard's deadline on a hung sync there (its adaptive floor's default is 60 s)."""
    hang_stuck_s: float = 3600.0
    """Without a deadline, how long a hang lasts before a person restarts the job."""
    step_fraction: float = 0.5
    """How far into its step a failure inside the step (generation, reward) lands, on average."""


# --- the failure stream (pure) ---


def draw_stream(seed: int, steps: int, mean_gap: float, mix: Mapping[str, float]) -> list[Failure]:
    """Failures at strictly increasing global steps below ``steps``: exponential gaps of mean ``mean_gap`` steps
    (rounded, at least 1), kinds in the ``mix`` proportions. The seed fixes the sequence of kinds and of unit gaps,
    so that another ``mean_gap`` gives the same kinds, in the same order, at scaled steps (the projection)."""
    kinds = [kind for kind, weight in mix.items() if weight > 0]
    weights = [mix[kind] for kind in kinds]
    rng = random.Random(seed)
    stream, step = [], 0
    while True:
        unit_gap = rng.expovariate(1.0)
        kind = rng.choices(kinds, weights)[0]
        step += max(1, round(unit_gap * mean_gap))
        if step >= steps:  # a failure needs a step after it
            return stream
        stream.append(Failure(step, kind))


def parse_stream(text: str) -> list[Failure]:
    """``STEP:KIND,...``, e.g. ``4:sync-raise,8:trainer-killed``."""
    stream = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        step, _, kind = item.partition(":")
        if kind not in KINDS or not step.isdigit() or int(step) < 1:
            raise ValueError(f"cannot read {item!r}: STEP:KIND with KIND one of {', '.join(KINDS)}")
        stream.append(Failure(int(step), kind))
    if [f.step for f in stream] != sorted({f.step for f in stream}):
        raise ValueError("the stream's steps must be strictly increasing")
    return stream


def parse_mix(text: str) -> dict[str, float]:
    """``KIND=WEIGHT,...``; kinds not named keep their default weight, weights are normalised."""
    mix = dict(DEFAULT_MIX)
    for item in filter(None, (part.strip() for part in text.split(","))):
        kind, _, weight = item.partition("=")
        if kind not in KINDS:
            raise ValueError(f"unknown failure kind {kind!r}: one of {', '.join(KINDS)}")
        mix[kind] = float(weight)
    total = sum(mix.values())
    if total <= 0 or any(w < 0 for w in mix.values()):
        raise ValueError("the mix's weights must be >= 0, and not all 0")
    return {kind: weight / total for kind, weight in mix.items()}


# --- what the logs say (pure) ---


@dataclass(frozen=True)
class Fired:
    """A failure of the stream as it fired (VERL_HOOKS_FAULT_LOG)."""

    ts: float
    kind: str
    step: int


@dataclass(frozen=True)
class Segment:
    """The time one attempt spent on one global step: from its previous progress line to the step's own line, or
    to the failure that cut it short."""

    step: int
    start: float
    end: float
    logged: bool
    """Ended by the step's progress line; else by a failure."""
    completed: bool
    """The step's training finished: logged, or cut by a failure after its updates that the next attempt resumed
    at or beyond (a failed sync whose step was saved)."""
    kept: bool = False
    """The last completed training of that step: the one the final weights come from."""


@dataclass(frozen=True)
class Piece:
    """One stretch of a run's wall time and what it went to."""

    start: float
    end: float
    what: str
    """productive, start-up, finish, work lost, recovery, other"""
    failure: int | None = None
    """For work lost and recovery: the index of the failure it is charged to."""


def fired_failures(fault_log: Iterable[Mapping[str, Any]]) -> list[Fired]:
    kind_of = {spec: kind for kind, spec in KINDS.items()}
    fired = []
    for entry in fault_log:
        if "spec" in entry:  # (an orphan helper's line has none)
            head = entry["spec"].split("@")[0].split("#")[0]
            fired.append(Fired(entry["ts"], kind_of.get(head, head), entry["step"]))
    return sorted(fired, key=lambda f: f.ts)


def _lines(progress: Iterable[Mapping[str, Any]], events: tuple[str, ...] = ("start", "step")) -> list[Mapping]:
    return sorted((p for p in progress if p["event"] in events), key=lambda p: p["ts"])


def step_segments(progress: Iterable[Mapping[str, Any]], fired: Sequence[Fired]) -> list[Segment]:
    """Each attempt (from one "start" line to the next) as the segments of the steps it trained, the last one cut
    short by the first failure after its last line, if one fired before the next attempt started."""
    lines = _lines(progress)
    starts = [index for index, line in enumerate(lines) if line["event"] == "start"]
    segments: list[Segment] = []
    for number, first in enumerate(starts):
        after = starts[number + 1] if number + 1 < len(starts) else len(lines)
        next_start = lines[after] if after < len(lines) else None
        previous = lines[first]
        for line in lines[first + 1 : after]:
            segments.append(Segment(line["step"], previous["ts"], line["ts"], True, True))
            previous = line
        window_end = next_start["ts"] if next_start is not None else math.inf
        cut = next((f for f in fired if previous["ts"] < f.ts <= window_end), None)
        if cut is not None:
            step = previous["step"] + 1
            resumed = next_start["step"] if next_start is not None else None
            segments.append(Segment(step, previous["ts"], cut.ts, False, resumed is not None and resumed >= step))
    last: dict[int, int] = {}
    for index, segment in enumerate(segments):
        if segment.completed and (segment.step not in last or segment.end >= segments[last[segment.step]].end):
            last[segment.step] = index
    return [replace(s, kept=last.get(s.step) == index) for index, s in enumerate(segments)]


def partition(
    progress: Sequence[Mapping[str, Any]],
    fired: Sequence[Fired],
    started_at: float,
    ended_at: float,
    finished: bool,
) -> list[Piece]:
    """The run's wall time, ``started_at`` to ``ended_at``, cut into consecutive pieces, each with what it went to:
    kept steps are productive; a step trained and thrown away (trained again later, or cut short by a failure and
    not saved) is work lost, charged to the first failure at or after its end; the time from a failure to the next
    progress line is that failure's recovery; before the first line, start-up; after the last step of a finished
    run, finish. Time nothing explains (an attempt ended with no failure fired) is other."""
    segments = step_segments(progress, fired)
    line_times = sorted(p["ts"] for p in progress if p["event"] in ("start", "step", "done"))
    last_step = max((p["ts"] for p in progress if p["event"] == "step"), default=None)
    cuts = {started_at, ended_at, *(f.ts for f in fired), *line_times}
    for segment in segments:
        cuts.update((segment.start, segment.end))
    times = sorted(t for t in cuts if started_at <= t <= ended_at)

    def what(middle: float) -> tuple[str, int | None]:
        segment = next((s for s in segments if s.start <= middle < s.end), None)
        if segment is not None and segment.kept:
            return "productive", None
        if segment is not None:
            charged = next((i for i, f in enumerate(fired) if f.ts >= segment.end), None)
            return ("work lost", charged) if charged is not None else ("other", None)
        seen = [t for t in line_times if t <= middle]
        if not seen:
            return "start-up", None
        before = [i for i, f in enumerate(fired) if f.ts <= middle]
        if before and seen[-1] < fired[before[-1]].ts:
            return "recovery", before[-1]
        if finished and last_step is not None and middle >= last_step:
            return "finish", None
        return "other", None

    pieces: list[Piece] = []
    for start, end in itertools.pairwise(times):
        if end <= start:
            continue
        label, failure = what((start + end) / 2)
        if pieces and (pieces[-1].what, pieces[-1].failure) == (label, failure) and pieces[-1].end == start:
            pieces[-1] = replace(pieces[-1], end=end)
        else:
            pieces.append(Piece(start, end, label, failure))
    return pieces


def failure_figures(
    progress: Sequence[Mapping[str, Any]],
    fired: Sequence[Fired],
    pieces: Sequence[Piece],
    job_starts: Sequence[float],
) -> list[dict[str, Any]]:
    """Per failure: where it fired, where the run resumed, what it cost. ``job_starts``: when each attempt's job
    began to start (the supervisor's attempt_started, a baseline's job_started)."""
    lines = _lines(progress)
    figures = []
    for index, failure in enumerate(fired):
        steps_before = [line["step"] for line in lines if line["event"] == "step" and line["ts"] < failure.ts]
        reached = max(steps_before, default=0)
        relaunch = next((line for line in lines if line["event"] == "start" and line["ts"] > failure.ts), None)
        back = next((line["ts"] for line in lines if line["ts"] > failure.ts and line["step"] >= reached), None)
        job = next((t for t in sorted(job_starts) if t > failure.ts), None)
        if relaunch is None or job is None or job > relaunch["ts"]:
            job = None
        trained = failure.step - (1 if failure.kind in DURING_STEP else 0)
        resumed = None if relaunch is None else relaunch["step"]
        work = sum(p.end - p.start for p in pieces if p.failure == index and p.what == "work lost")
        recover = sum(p.end - p.start for p in pieces if p.failure == index and p.what == "recovery")
        figures.append(
            {
                "kind": failure.kind,
                "step": failure.step,
                "fired_at": failure.ts,
                "trained_step": trained,
                "reached_step": reached,
                "resumed_at_step": resumed,
                "steps_redone": None if resumed is None else max(0, trained - resumed),
                "work_lost_s": round(work, 3),
                "recovery_s": round(recover, 3),
                "lost_s": round(work + recover, 3),
                "back_after_s": None if back is None else round(back - failure.ts, 3),
                "overhead_s": None if job is None else round(job - failure.ts, 3),
                "job_startup_s": None if job is None or relaunch is None else round(relaunch["ts"] - job, 3),
            }
        )
    return figures


def saved_at_failure(figures: Sequence[Mapping[str, Any]], save_freq: int) -> list[bool | None]:
    """For each failure, in firing order: did the launcher save at it (the relaunch resumed past every checkpoint
    known before: the periodic ones, and where earlier relaunches resumed)? None where it cannot be told: no
    relaunch, or nothing trained since the last checkpoint."""
    known = {0}
    verdicts: list[bool | None] = []
    for figure in figures:
        trained, resumed = figure["trained_step"], figure["resumed_at_step"]
        periodic = {k * save_freq for k in range(1, trained // save_freq + 1)}
        last_known = max(step for step in known | periodic if step <= trained)
        if resumed is None:
            verdicts.append(None)
            continue
        if resumed > last_known:
            verdicts.append(True)
        elif trained == last_known:
            verdicts.append(None)
        else:
            verdicts.append(False)
        known.add(resumed)
    return verdicts


def totals(pieces: Sequence[Piece]) -> dict[str, float]:
    """Seconds per kind of piece (they add up to the wall time)."""
    sums = {what: 0.0 for what in ("start-up", "productive", "work lost", "recovery", "finish", "other")}
    for piece in pieces:
        sums[piece.what] += piece.end - piece.start
    return {key: round(value, 3) for key, value in sums.items()}


def stat(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def by_kind(figures: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per failure kind: how often it fired, how often the run never came back from it, and the median and spread
    of each cost over the failures it came back from (one it never came back from lost until the cut-off, which
    is the benchmark's limit, not the failure's cost)."""
    table: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        mine = [f for f in figures if f["kind"] == kind]
        if not mine:
            continue
        back = [f for f in mine if f["resumed_at_step"] is not None]
        table[kind] = {"fired": len(mine), "never_recovered": len(mine) - len(back)}
        for key in ("lost_s", "work_lost_s", "recovery_s", "back_after_s", "steps_redone", "overhead_s"):
            table[kind][key] = stat([f[key] for f in back if f.get(key) is not None])
    return table


# --- the projection to a real cluster (pure) ---


@dataclass(frozen=True)
class KindCost:
    """What one failure of a kind costs a launcher, besides the steps: its own time from the failure to the job's
    start-up (detection, a hang's wait, teardown, clusters, relaunch), and whether it saves the step at the failure."""

    overhead_s: float
    saves_at_failure: bool


def replay(
    stream: Sequence[Failure], total_steps: int, cluster: Cluster, costs: Mapping[str, KindCost]
) -> dict[str, Any]:
    """The run of ``total_steps`` steps of ``cluster.step_s`` meeting ``stream``: each failure costs the part of its
    step done (the whole step for a failed sync, ``step_fraction`` of it inside a step), the launcher's overhead, a
    start-up, and the steps since the checkpoint it resumes from (the step saved at the failure, else the newest
    checkpoint: periodic, or saved at an earlier failure)."""
    wall = cluster.startup_s
    at = 0  # the step the run holds
    checkpoints = {0}
    redone = 0
    lost = {"work lost": 0.0, "recovery": 0.0}
    met = 0
    for failure in stream:
        if failure.step > total_steps:
            break
        met += 1
        cost = costs[failure.kind]
        trained = failure.step - (1 if failure.kind in DURING_STEP else 0)
        done_in_step = cluster.step_fraction if failure.kind in DURING_STEP else 0.0
        wall += (trained - at + done_in_step) * cluster.step_s
        checkpoints.update(k * cluster.save_freq for k in range(1, trained // cluster.save_freq + 1))
        resume = trained if cost.saves_at_failure else max(c for c in checkpoints if c <= trained)
        checkpoints.add(resume)
        redone += trained - resume
        lost["work lost"] += (trained - resume + done_in_step) * cluster.step_s
        lost["recovery"] += cost.overhead_s + cluster.startup_s
        wall += cost.overhead_s + cluster.startup_s
        at = resume
    wall += (total_steps - at) * cluster.step_s
    reference = cluster.startup_s + total_steps * cluster.step_s
    return {
        "failures": met,
        "steps_redone": redone,
        "wall_h": round(wall / 3600, 2),
        "reference_wall_h": round(reference / 3600, 2),
        "ettr": round(reference / wall, 4),
        "work_lost_h": round(lost["work lost"] / 3600, 2),
        "recovery_h": round(lost["recovery"] / 3600, 2),
    }


def projection_costs(
    launcher: str,
    kinds_measured: Mapping[str, Mapping[str, Any]],
    saves: Mapping[str, bool | None],
    cluster: Cluster,
    deadline_used_s: float,
) -> tuple[dict[str, KindCost], dict[str, str]]:
    """Each kind's cost for ``launcher``, and where each figure came from. ``kinds_measured``: by_kind's table of
    the launcher's run; ``saves``: per kind, whether it saved at the failure (None: not told by the run)."""
    measured = {k: v["overhead_s"]["median"] for k, v in kinds_measured.items() if v.get("overhead_s")}
    pooled = statistics.median(measured.values()) if measured else None
    has_deadline = launcher in recovery.SUPERVISORS
    costs, sources = {}, {}
    for kind in KINDS:
        if kind in measured and (kind != HANG or has_deadline):
            overhead, source = measured[kind], f"measured (n={kinds_measured[kind]['overhead_s']['n']})"
        elif pooled is not None:
            overhead, source = pooled, "measured: the median over the kinds this run met"
        else:
            overhead, source = math.nan, "not measured: no relaunch in the run"
        if kind == HANG and has_deadline:
            # Here the guard's adaptive deadline was its floor; there it is the user's.
            overhead += cluster.sync_deadline_s - (deadline_used_s if kind in measured else 0.0)
            source += f" + the user's sync deadline ({cluster.sync_deadline_s:g} s)"
        elif kind == HANG:
            overhead += cluster.hang_stuck_s
            source += f" + the user's {cluster.hang_stuck_s:g} s stuck (no deadline: a person restarts it)"
        told = saves.get(kind)
        if told is not None:
            save, save_source = told, "measured"
        elif launcher not in recovery.SUPERVISORS:
            save, save_source = False, "by construction: no emergency save"
        else:
            save, save_source = kind != "trainer-killed", "assumed: the run could not tell"
        costs[kind] = KindCost(overhead, save)
        sources[kind] = f"overhead {overhead:.1f} s: {source}; saves at the failure: {save} ({save_source})"
    return costs, sources


def kind_saves(figures: Sequence[Mapping[str, Any]], verdicts: Sequence[bool | None]) -> dict[str, bool | None]:
    """Per kind: saved at the failure (the majority of the failures that told), or None."""
    told: dict[str, list[bool]] = {}
    for figure, verdict in zip(figures, verdicts, strict=True):
        if verdict is not None:
            told.setdefault(figure["kind"], []).append(verdict)
    return {kind: sum(v) * 2 >= len(v) for kind, v in told.items()}


# --- running (mechanism) ---


@dataclass
class Run:
    name: str
    launcher: str
    record: recovery.RunRecord
    load: tuple[float, float]
    """The 1-minute load average at the run's start and end."""
    figures: dict[str, Any] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)
    pieces: list[Piece] = field(default_factory=list)


def run_one(launcher: str, name: str, plan: recovery.Plan, out: Path, stream: Sequence[Failure]) -> Run:
    workdir = out / "runs" / name
    extra = {}
    if stream:
        extra = {
            "VERL_HOOKS_FAULTS": ",".join(f.spec for f in stream),
            "VERL_HOOKS_FAULT_LEDGER": str(workdir / "fault_ledger.jsonl"),
        }
    load = os.getloadavg()[0]
    record = recovery.run_launcher(launcher, None, 0, plan, out, name=name, extra_env=extra)
    return Run(name, launcher, record, (round(load, 2), round(os.getloadavg()[0], 2)))


def job_starts(record: recovery.RunRecord) -> list[float]:
    workdir = Path(record.workdir)
    if record.launcher in recovery.SUPERVISORS:
        events = recovery.read_jsonl(workdir / "run" / "events.jsonl")
        return [e["ts"] for e in events if e["event"] == "attempt_started"]
    return [e["ts"] for e in recovery.read_jsonl(workdir / "launches.jsonl") if e["event"] == "job_started"]


def measure(run: Run, reference: Run | None) -> None:
    """The run's figures, from its files."""
    record, workdir = run.record, Path(run.record.workdir)
    progress = recovery.read_jsonl(workdir / "progress.jsonl")
    fired = fired_failures(recovery.read_jsonl(workdir / "faults.jsonl"))
    finished = record.final is not None and not record.cut_off and record.exit_code == 0
    run.pieces = partition(progress, fired, record.started_at, record.ended_at, finished)
    run.failures = failure_figures(progress, fired, run.pieces, job_starts(record))
    wall = record.ended_at - record.started_at
    spent = totals(run.pieces)
    digest = (record.final or {}).get("weights_sha256")
    reference_wall = reference.figures.get("wall_s") if reference is not None else None
    relaunched = [f for f in run.failures if f["resumed_at_step"] is not None]
    run.figures = {
        "finished": finished,
        "cut_off": record.cut_off,
        "exit_code": record.exit_code,
        "wall_s": round(wall, 2),
        "reached_step": max((p["step"] for p in progress if p["event"] == "step"), default=0),
        "attempts": sum(1 for p in progress if p["event"] == "start"),
        "ettr": round(reference_wall / wall, 4) if finished and reference_wall else None,
        "productive_fraction": round(spent["productive"] / wall, 4) if wall > 0 else None,
        "spent_s": spent,
        "failures_fired": len(fired),
        "failures_survived": len(relaunched),
        "unexplained_restarts": max(0, sum(1 for p in progress if p["event"] == "start") - 1 - len(relaunched)),
        "steps_redone": sum(f["steps_redone"] or 0 for f in run.failures),
        "weights_sha256": digest,
        "same_weights_as_reference": (
            None
            if digest is None or reference is None or reference.record.final is None
            else digest == reference.record.final["weights_sha256"]
        ),
        "leftover_processes": record.leftover_processes,
    }


def validity_problems(runs: Sequence[Run], stream: Sequence[Failure]) -> list[str]:
    problems = []
    reference = runs[0] if runs and runs[0].name == REFERENCE else None
    if reference is None or not reference.figures.get("finished"):
        problems.append("the fault-free reference did not finish: no ETTR can be computed")
    for run in runs[1:]:
        figures = run.figures
        fired = [(f["step"], f["kind"]) for f in run.failures]
        if len(fired) != len(set(fired)):
            problems.append(f"{run.name}: a failure fired twice ({fired}): the ledger did not hold")
        if figures["finished"] and figures["same_weights_as_reference"] is not True:
            problems.append(f"{run.name}: finished with weights other than the reference's")
        if figures["finished"] and sorted(fired) != sorted((f.step, f.kind) for f in stream):
            problems.append(f"{run.name}: finished without meeting the stream as drawn (met {fired})")
        other = figures["spent_s"]["other"]
        if other > UNEXPLAINED_S:
            problems.append(
                f"{run.name}: {other:.1f} s of its wall time follow no failure of the stream "
                f"({figures['unexplained_restarts']} restarts of its own): it met a failure the others did not; "
                f"see {run.record.workdir}"
            )
    return problems


UNEXPLAINED_S = 0.5
"""More time than this that no failure of the stream accounts for ("other") means a run met a failure of its own."""


# --- reporting ---

PIECE_COLOURS = {"productive": "tab:blue", "start-up": "tab:gray", "finish": "silver", "other": "black"}
KIND_COLOURS = {
    "sync-raise": "tab:orange",
    "sync-hang": "tab:red",
    "generate-raise": "tab:purple",
    "replica-killed": "tab:brown",
    "reward-raise": "tab:pink",
    "trainer-killed": "tab:olive",
}


def span_kind(piece: Piece, kinds: Sequence[str]) -> str:
    if piece.failure is None:
        return piece.what
    kind = kinds[piece.failure]
    return f"{kind}: work lost" if piece.what == "work lost" else f"{kind}: recovery"


def timeline_styles() -> dict[str, dict[str, Any]]:
    styles: dict[str, dict[str, Any]] = {
        what: {"color": colour, "alpha": 0.7} for what, colour in PIECE_COLOURS.items()
    }
    for kind, colour in KIND_COLOURS.items():
        styles[f"{kind}: recovery"] = {"color": colour, "alpha": 0.85}
        styles[f"{kind}: work lost"] = {"color": colour, "alpha": 0.45, "hatch": "//", "edgecolor": "white"}
    return styles


def plot(runs: Sequence[Run], path: Path) -> None:
    rows = []
    for run in runs:
        start = run.record.started_at
        kinds = [f["kind"] for f in run.failures]
        row = TimelineRow(run.name)
        row.spans = [Span(p.start - start, p.end - start, span_kind(p, kinds)) for p in run.pieces]
        row.failures = [f["fired_at"] - start for f in run.failures]
        if not run.figures.get("finished"):
            why = "cut off" if run.record.cut_off else f"gave up (exit {run.record.exit_code})"
            row.note, row.note_at = f"{why} at step {run.figures['reached_step']}", run.figures["wall_s"]
        rows.append(row)
    draw_timeline(
        rows,
        path,
        "Goodput under the same failure stream",
        "seconds since the launcher started (x: a failure; hatched: work thrown away; solid: recovery)",
        styles=timeline_styles(),
    )


def _spread(value: Mapping[str, float] | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if value["n"] > 1 and value["min"] != value["max"]:
        return f"{value['median']:.{digits}f} [{value['min']:.{digits}f}-{value['max']:.{digits}f}]"
    return f"{value['median']:.{digits}f}"


def _kind_cell(cell: Mapping[str, Any] | None, key: str) -> str:
    if cell is None:
        return "-"
    shown = _spread(cell[key], 0 if key == "steps_redone" else 1) if cell[key] is not None else ""
    never = f"never recovered x{cell['never_recovered']}" if cell["never_recovered"] else ""
    recovered = cell["fired"] - cell["never_recovered"]
    return ", ".join(part for part in (f"{shown} (x{recovered})" if shown else "", never) if part) or "-"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def headline(runs: Sequence[Run]) -> list[str]:
    faulted = {run.name: run for run in runs if run.name != REFERENCE}
    ours = faulted.get("supervisor")
    lines = []
    for run in faulted.values():
        f = run.figures
        if f["finished"]:
            lines.append(
                f"- **{run.name}**: ETTR {_percent(f['ettr'])} (productive {_percent(f['productive_fraction'])} of "
                f"its {f['wall_s']:.0f} s), {f['failures_fired']} failures, {f['steps_redone']} steps redone"
            )
        else:
            why = "cut off" if f["cut_off"] else f"gave up, exit {f['exit_code']}"
            lines.append(
                f"- **{run.name}**: never finished ({why} after {f['wall_s']:.0f} s at step {f['reached_step']}, "
                f"{f['failures_fired']} failures met, {f['failures_survived']} survived)"
            )
    loop = faulted.get("shell-loop")
    if ours and loop and ours.figures["ettr"] and loop.figures["ettr"]:
        lines.append(
            f"- the supervisor's ETTR against the shell loop's: {_percent(ours.figures['ettr'])} vs "
            f"{_percent(loop.figures['ettr'])}; its wall time {loop.figures['wall_s'] / ours.figures['wall_s']:.2f}x "
            "shorter"
        )
    return lines


def to_markdown(
    plan: Plan,
    stream: Sequence[Failure],
    runs: Sequence[Run],
    projection: Mapping[str, Any],
    problems: Sequence[str],
    limit_s: float | None,
) -> str:
    faulted = [run for run in runs if run.name != REFERENCE]
    lines = ["# Goodput benchmark", ""]
    if problems:
        lines += ["**This run is not a valid comparison:**", "", *(f"- {p}" for p in problems), ""]
    reference = runs[0].figures if runs else {}
    lines += [
        f"Job: mini-PPO, {plan.steps} steps, a checkpoint every {plan.save_freq}, {plan.step_time_s:g} s of extra "
        f"time per step, {' '.join(JOB_ARGS)}. The fault-free reference took {reference.get('wall_s', 0):.1f} s; "
        f"faulted runs were cut off after {limit_s or 0:.0f} s ({plan.limit_multiple:g}x). The stream ("
        + ("given by hand" if plan.stream else f"seed {plan.seed}, mean gap {plan.mean_gap:g} steps")
        + "): "
        + ", ".join(f"step {f.step} {f.kind}" for f in stream)
        + ".",
        "",
        *headline(runs),
        "",
        "## Per launcher",
        "",
    ]
    rows = []
    for run in runs:
        f = run.figures
        done = "yes" if f["finished"] else ("**no** (cut off)" if f["cut_off"] else f"**no** (exit {f['exit_code']})")
        same = {True: "yes", False: "**no**", None: "-"}[f["same_weights_as_reference"]]
        rows.append(
            [
                run.name,
                done,
                f"{f['wall_s']:.1f}",
                _percent(f["ettr"]),
                _percent(f["productive_fraction"]),
                f"{f['failures_fired']} / {f['failures_survived']}"
                + (f" (+{f['unexplained_restarts']} of its own)" if f["unexplained_restarts"] else ""),
                str(f["steps_redone"]),
                str(f["reached_step"]),
                str(f["attempts"]),
                same if run.name != REFERENCE else "(reference)",
                str(f["leftover_processes"]),
            ]
        )
    header = ["launcher", "finished", "wall (s)", "ETTR", "productive", "failures met / survived"]
    lines += _table([*header, "steps redone", "reached step", "attempts", "same weights", "left behind"], rows)
    lines += ["", "Where the wall time went (s):", ""]
    parts = ("start-up", "productive", "work lost", "recovery", "finish", "other")
    lines += _table(
        ["launcher", *parts, "= wall"],
        (
            [run.name, *(f"{run.figures['spent_s'][p]:.1f}" for p in parts), f"{run.figures['wall_s']:.1f}"]
            for run in runs
        ),
    )
    kinds = [kind for kind in KINDS if any(f["kind"] == kind for run in faulted for f in run.failures)]
    for key, title in (
        ("lost_s", "Time lost per failure (s): its work thrown away and its recovery. Median [min-max] (failures)"),
        ("steps_redone", "Steps redone per failure: median [min-max] (failures)"),
        ("back_after_s", "From the failure to the run back at the furthest step reached before it (s)"),
        ("overhead_s", "The launcher's own time per failure (s): the failure to the relaunched job's start-up"),
    ):
        lines += ["", f"{title}:", ""]
        table_rows = []
        for kind in kinds:
            table_rows.append([kind, *(_kind_cell(by_kind(run.failures).get(kind), key) for run in faulted)])
        lines += _table(["kind", *(run.name for run in faulted)], table_rows)
    lines += ["", "## The stream, failure by failure", ""]
    lines += ["Each cell: resumed at step (steps redone), time lost.", ""]
    stream_rows = []
    for failure in stream:
        cells = []
        for run in faulted:
            met = next((f for f in run.failures if f["step"] == failure.step), None)
            if met is None:
                cells.append("not reached")
            elif met["resumed_at_step"] is None:
                cells.append(f"never recovered ({met['lost_s']:.0f} s until the end)")
            else:
                cells.append(f"{met['resumed_at_step']} ({met['steps_redone']}), {met['lost_s']:.1f} s")
        stream_rows.append([str(failure.step), failure.kind, f"`{failure.spec}`", *cells])
    lines += _table(["step", "kind", "fault", *(run.name for run in faulted)], stream_rows)
    lines += ["", *projection_markdown(projection)]
    lines += [
        "",
        "## Knobs and machine",
        "",
        f"- plan: `{json.dumps(asdict(plan))}`",
        f"- {os.cpu_count()} CPUs; 1-minute load average at each run's start and end: "
        + ", ".join(f"{run.name} {run.load[0]:g} -> {run.load[1]:g}" for run in runs),
        "",
    ]
    return "\n".join(lines)


def projection_markdown(projection: Mapping[str, Any]) -> list[str]:
    if not projection:
        return []
    cluster = projection["cluster"]
    lines = [
        "## Projected to a real cluster",
        "",
        f"The seed's stream (seed {projection['seed']}, the same mix), gaps scaled to a failure every "
        f"{cluster['mtbf_h']:g} training hours "
        f"({projection['failures']} failures over {cluster['hours']:g} h of steps), replayed with each launcher's "
        "measured costs. Figures from the user: "
        f"step {cluster['step_s']:g} s, start-up {cluster['startup_s']:g} s, a checkpoint every "
        f"{cluster['save_freq']} steps, a failure every {cluster['mtbf_h']:g} h, {cluster['hours']:g} h of "
        f"training, the sync deadline {cluster['sync_deadline_s']:g} s (supervisor), a hang stuck "
        f"{cluster['hang_stuck_s']:g} s (no deadline), a failure inside a step landing "
        f"{cluster['step_fraction']:g} of the way through it. From the measurement: each launcher's overhead per "
        "failure kind (detection, teardown, clusters, relaunch: this machine's, not a cluster's) and whether it "
        "saved at the failure.",
        "",
    ]
    rows = [
        [
            name,
            _percent(p["ettr"]),
            f"{p['wall_h']:.1f}",
            str(p["steps_redone"]),
            f"{p['work_lost_h']:.1f}",
            f"{p['recovery_h']:.1f}",
        ]
        for name, p in projection["launchers"].items()
    ]
    lines += _table(["launcher", "ETTR", "wall (h)", "steps redone", "work lost (h)", "recovery (h)"], rows)
    lines += ["", "Where each launcher's costs came from:", ""]
    for name, sources in projection["sources"].items():
        lines.append(f"- **{name}**")
        lines += [f"  - {kind}: {source}" for kind, source in sources.items()]
    return lines


def project(plan: Plan, cluster: Cluster, runs: Sequence[Run], deadline_used_s: float) -> dict[str, Any]:
    total = max(1, round(cluster.hours * 3600 / cluster.step_s))
    stream = draw_stream(plan.seed, total, cluster.mtbf_h * 3600 / cluster.step_s, dict(plan.mix))
    launchers, sources = {}, {}
    for run in runs:
        if run.name == REFERENCE or not run.failures:
            continue
        verdicts = saved_at_failure(run.failures, plan.save_freq)
        costs, sources[run.name] = projection_costs(
            run.launcher, by_kind(run.failures), kind_saves(run.failures, verdicts), cluster, deadline_used_s
        )
        if all(math.isfinite(c.overhead_s) for c in costs.values()):
            launchers[run.name] = replay(stream, total, cluster, costs)
    return {
        "cluster": asdict(cluster),
        "seed": plan.seed,
        "failures": len(stream),
        "launchers": launchers,
        "sources": sources,
    }


# --- main ---


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Plan, Cluster, list[Failure], list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults, cluster_defaults = Plan(), Cluster()
    parser.add_argument("--quick", action="store_true", help=f"a smoke run: {QUICK}, unless given")
    parser.add_argument("--dry-run", action="store_true", help="print the stream and the plan, run nothing")
    parser.add_argument("--launchers", help=f"comma-separated, of {', '.join(recovery.LAUNCHERS)}")
    parser.add_argument("--reference-launcher", default="shell-loop", help="the fault-free run's launcher")
    parser.add_argument(
        "--no-warm-up", action="store_true", help="skip the untimed 1-step run that warms the caches (--quick skips it)"
    )
    parser.add_argument("--steps", type=int, help=f"default {defaults.steps}")
    parser.add_argument("--save-freq", type=int, help=f"default {defaults.save_freq}")
    parser.add_argument("--step-time-s", type=float, help=f"extra seconds per step, default {defaults.step_time_s:g}")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="the failure stream's seed")
    parser.add_argument("--mean-gap", type=float, default=defaults.mean_gap, help="mean steps between failures")
    parser.add_argument("--mix", default="", help="KIND=WEIGHT,...: the kinds' proportions (see DEFAULT_MIX)")
    parser.add_argument("--stream", help="STEP:KIND,...: this stream instead of a drawn one")
    parser.add_argument("--limit-multiple", type=float, default=defaults.limit_multiple)
    parser.add_argument("--reference-limit-s", type=float)
    parser.add_argument("--max-restarts", type=int, help="default: the stream's failures plus 2")
    parser.add_argument("--project-step-s", type=float, default=cluster_defaults.step_s)
    parser.add_argument("--project-startup-s", type=float, default=cluster_defaults.startup_s)
    parser.add_argument("--project-mtbf-h", type=float, default=cluster_defaults.mtbf_h)
    parser.add_argument("--project-hours", type=float, default=cluster_defaults.hours)
    parser.add_argument("--project-save-freq", type=int, default=cluster_defaults.save_freq)
    parser.add_argument("--project-sync-deadline-s", type=float, default=cluster_defaults.sync_deadline_s)
    parser.add_argument("--project-hang-stuck-s", type=float, default=cluster_defaults.hang_stuck_s)
    parser.add_argument("--project-step-fraction", type=float, default=cluster_defaults.step_fraction)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_goodput"))
    args = parser.parse_args(argv)
    quick = QUICK if args.quick else {}
    try:
        mix = parse_mix(args.mix)
        plan = Plan(
            steps=args.steps or quick.get("steps", defaults.steps),
            save_freq=args.save_freq or quick.get("save_freq", defaults.save_freq),
            step_time_s=args.step_time_s
            if args.step_time_s is not None
            else quick.get("step_time_s", defaults.step_time_s),
            seed=args.seed,
            mean_gap=args.mean_gap,
            mix=tuple(mix.items()),
            limit_multiple=args.limit_multiple,
            reference_limit_s=args.reference_limit_s,
            max_restarts=args.max_restarts,
            stream=args.stream or quick.get("stream"),
        )
        stream = parse_stream(plan.stream) if plan.stream else draw_stream(plan.seed, plan.steps, plan.mean_gap, mix)
    except ValueError as exc:
        parser.error(str(exc))
    if any(f.step >= plan.steps for f in stream):
        parser.error(f"every failure's step must be below --steps ({plan.steps}): a failure needs a step after it")
    launchers = [n for n in (args.launchers or quick.get("launchers") or ",".join(DEFAULT_LAUNCHERS)).split(",") if n]
    unknown = [n for n in [*launchers, args.reference_launcher] if n not in recovery.LAUNCHERS]
    if unknown:
        parser.error(f"unknown launcher: {', '.join(unknown)}")
    if plan.save_freq < 1 or plan.steps < 2 or plan.limit_multiple <= 1:
        parser.error("--save-freq must be >= 1, --steps >= 2, --limit-multiple > 1")
    cluster = Cluster(
        step_s=args.project_step_s,
        startup_s=args.project_startup_s,
        mtbf_h=args.project_mtbf_h,
        hours=args.project_hours,
        save_freq=args.project_save_freq,
        sync_deadline_s=args.project_sync_deadline_s,
        hang_stuck_s=args.project_hang_stuck_s,
        step_fraction=args.project_step_fraction,
    )
    return args, plan, cluster, stream, launchers


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args, plan, cluster, stream, launchers = parse_args(argv)
    print("stream: " + (", ".join(f"{f.step}:{f.kind}" for f in stream) or "(no failure)"), flush=True)
    if args.dry_run:
        print(json.dumps({"plan": asdict(plan), "cluster": asdict(cluster), "launchers": launchers}, indent=2))
        return 0
    out = args.out.resolve()  # each launcher runs in its own folder: a relative path would land inside it
    out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _interrupt)  # a SIGTERM cleans up as Ctrl-C does
    expected_s = plan.steps * (plan.step_time_s + 0.5) + 60
    reference_plan = plan.recovery_plan(stream, plan.reference_limit_s or 3 * expected_s + 600)
    if not (args.quick or args.no_warm_up):
        # The session's first run pays cold caches (imports of torch, Ray and verl read from disk): 10 s more
        # start-up here, which would lengthen the reference and flatter every ETTR.
        print("[warm-up] 1 step, not measured", flush=True)
        warm = run_one(args.reference_launcher, "warm-up", replace(plan, steps=1).recovery_plan((), 600.0), out, ())
        if warm.record.final is None:
            print(f"    the warm-up did not finish: see {warm.record.workdir}", flush=True)
    schedule = [(REFERENCE, args.reference_launcher), *((name, name) for name in launchers)]
    runs: list[Run] = []
    limit_s = None
    for number, (name, launcher) in enumerate(schedule, 1):
        print(f"[{number}/{len(schedule)}] {name}" + (f" (limit {limit_s:.0f} s)" if limit_s else ""), flush=True)
        if name == REFERENCE:
            run = run_one(launcher, name, reference_plan, out, ())
        else:
            run = run_one(launcher, name, plan.recovery_plan(stream, limit_s), out, stream)
        measure(run, runs[0] if runs else None)
        runs.append(run)
        print(f"    {json.dumps(run.figures)}", flush=True)
        if name == REFERENCE:
            if not run.figures["finished"]:
                print(f"the fault-free run did not finish: see {run.record.workdir}", file=sys.stderr)
                break
            limit_s = plan.limit_multiple * run.figures["wall_s"] + plan.limit_per_failure_s * len(stream)
    problems = validity_problems(runs, stream)
    projection = project(plan, cluster, runs, reference_plan.guard_adaptive_floor_s)
    result = {
        "plan": asdict(plan),
        "stream": [asdict(f) | {"spec": f.spec} for f in stream],
        "limit_s": limit_s,
        "valid": not problems,
        "problems": problems,
        "runs": {
            run.name: {
                "launcher": run.launcher,
                "figures": run.figures,
                "by_kind": by_kind(run.failures),
                "failures": run.failures,
                "pieces": [asdict(p) for p in run.pieces],
                "load": run.load,
                "record": asdict(run.record),
            }
            for run in runs
        },
        "projection": projection,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "results.md").write_text(to_markdown(plan, stream, runs, projection, problems, limit_s))
    plot(runs, out / "timeline.png")
    print((out / "results.md").read_text())
    print(f"outputs: {out}/results.json, results.md, timeline.png")
    if problems:
        print("\nBENCHMARK NOT VALID:\n" + "\n".join(f"  {p}" for p in problems), file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: every process of the run stopped", file=sys.stderr)
        sys.exit(130)
