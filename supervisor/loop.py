"""The supervisor's loop: launch an attempt, learn of its end at once, judge it, tear it down, decide.

One loop, one place that waits (``JobBackend.wait``, which a stop signal interrupts). Every attempt ends the same
way, whichever way it ended (an exit, a stall, a signal to the supervisor): its evidence is classified and
recorded (``attempt_exited``, state.json), then it is torn down and fenced (``teardown``), then the policy
decides. Decisions come from ``supervisor.policy``; processes and Ray from the backend; files from
``supervisor.run`` and ``supervisor.checkpoints``. Time, sleep and randomness are injected (``Clock``, ``rng``)
so that the loop can be driven by a fake backend in tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sys
import traceback
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Protocol, TextIO

import verl_hooks.contract as contract
from supervisor.backends.base import ClusterStartFailed, JobBackend, LaunchSpec, RunningJob, TeardownResult
from supervisor.checkpoints import (
    CheckpointInfo,
    choose_resume_checkpoint,
    facts_from_overrides,
    plan_rotation,
    read_tracker,
    remove,
    run_facts,
    scan_checkpoints,
    set_aside,
)
from supervisor.clock import Clock
from supervisor.config import SupervisorConfig, ordered_rules
from supervisor.job.command import job_argv, redact_argv
from supervisor.job.heartbeats import Heartbeat
from supervisor.job.trackers import tracker_env
from supervisor.mechanisms.bounded_log import read_tail
from supervisor.mechanisms.gpu_health import NodeReading
from supervisor.mechanisms.volume import folder_bytes, run_logs_bytes, volume_of
from supervisor.policy import disk, nodes
from supervisor.policy import restart as policy
from supervisor.policy.disk import CheckpointSpace
from supervisor.policy.outcomes import ExitCode, ExitStatus
from supervisor.policy.restart import Decision, Restart, StartFrom, Stop
from supervisor.policy.resume import MismatchedResume, ResumeCheck, VerifiedResume
from supervisor.policy.rules import AttemptEvidence, Classification, classify
from supervisor.policy.watchdog import ProgressState, Stall, StallKind, check
from supervisor.run.beats import ALIVE_FILE, BeatsReader
from supervisor.run.events import (
    AttemptExited,
    AttemptStarted,
    Backoff,
    CheckpointRotated,
    CheckpointSetAside,
    CheckpointSpaceLow,
    CheckpointsUnjudgeable,
    ErrorRecordReceived,
    Event,
    EventLog,
    NodeExcluded,
    NodeHealthChecked,
    ResumeMismatch,
    ResumeVerified,
    RunFinished,
    RunStarted,
    SaveOnStop,
    SaveOnStopRequested,
    SignalReceived,
    StacksDumped,
    StaleProcessesSwept,
    StallDetected,
    Teardown,
    TrackerRun,
)
from supervisor.run.history import AttemptRecord, RunHistory, RunState
from supervisor.run.rundir import RunDirectory, write_json_atomic
from supervisor.run.table import attempts_table
from verl_hooks.contract import ErrorRecord, HeartbeatKind, RecordSource, read_record, record_from_payload, write_record


class HeartbeatSource(Protocol):
    """The supervisor's end of the heartbeat channel (``supervisor.job.heartbeats.HeartbeatServer``)."""

    @property
    def url(self) -> str: ...

    @property
    def token(self) -> str: ...

    def drain(self) -> list[Heartbeat]: ...

    def fileno(self) -> int:
        """Readable when a beat that must be acted on at once (an error record) waits to be drained."""
        ...

    def request_save(self) -> None:
        """Ask the job, in the answers to its beats, to save at its next safe point and stop."""
        ...


class Interrupted(Exception):
    """A stop signal arrived while the supervisor waited."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class RunAlreadyFinished(RuntimeError):
    pass


def new_history(run_dir: RunDirectory) -> RunHistory:
    """This run's history: continued from state.json when a supervisor is restarted on the run directory."""
    history = run_dir.load_history()
    if history is None:
        return RunHistory(run_id=uuid.uuid4().hex[:16])
    if run_dir.state_problem is not None:
        aside = run_dir.set_aside_damaged_state()
        warning = f"verl-supervisor: warning: {run_dir.state_problem}; the damaged file is kept as {aside}"
        print(warning, file=sys.stderr)
    if history.finished:
        raise RunAlreadyFinished(
            f"run directory {run_dir.path} holds a finished run ({history.outcome}, exit {history.exit_code}); "
            f"choose another run_dir to start a new run"
        )
    history.resume()
    return history


@dataclass(frozen=True)
class AttemptEnd:
    """How waiting for an attempt ended: its driver exited (``status``), the watchdog saw it stall, or its weight
    syncs showed that it did not resume from the chosen checkpoint (``mismatch``)."""

    status: ExitStatus | None = None
    stall: Stall | None = None
    mismatch: MismatchedResume | None = None
    record_grace_over: bool = False
    """The job's error record arrived and its driver did not exit within ``teardown.record_grace_s``."""
    last_step: int | None = None
    """The last global step the attempt's weight syncs carried."""


@dataclass
class _Watch:
    """What is followed while an attempt runs: its progress, its resume, when its error record arrived."""

    progress: ProgressState
    resume: ResumeCheck | None
    beats_log: Path
    record_at: float | None = None
    alive: dict[str, float] = field(default_factory=dict)
    """``host:pid`` of each process of the attempt that sent an ``alive`` beat, and when the last arrived."""


@dataclass
class _InFlight:
    """The attempt in flight, for the signal and error paths to end."""

    job: RunningJob | None = None
    record: AttemptRecord | None = None
    torn_down: bool = field(default=False)


class Supervisor:
    def __init__(
        self,
        config: SupervisorConfig,
        user_args: Sequence[str],
        run_dir: RunDirectory,
        history: RunHistory,
        backend: JobBackend,
        events: EventLog,
        *,
        heartbeats: HeartbeatSource | None = None,
        console: TextIO | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        inherited_env: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self.user_args = list(user_args)
        self.run_dir = run_dir
        self.history = history
        self.backend = backend
        self.events = events
        self.heartbeats = heartbeats
        self.console = console if console is not None else sys.stderr
        self.clock = clock or Clock()
        self.rng = rng or random.Random()
        # The environment the job inherits: a tracker variable the user set there is left alone.
        self.inherited_env = dict(inherited_env or {})
        # What the user's overrides say the job's checkpoints hold; the job's own markers, when it writes them, win.
        self._checkpoint_facts = facts_from_overrides([*config.job.args, *self.user_args])
        self._in_flight = _InFlight()
        self._standby_for: tuple[int, list[str]] | None = None
        # Each node's last GPU reading (ECC counters are judged since the last look) and the nodes drained.
        self._node_readings: dict[str, NodeReading] = {}
        self._drained: set[str] = set()
        self._stop_signal: int | None = None
        self._stop_repeated = False
        self._interruptible = False

    # --- the story ---

    def run(self) -> ExitCode:
        previous = {signum: signal.getsignal(signum) for signum in policy.STOP_SIGNALS}
        for signum in policy.STOP_SIGNALS:
            signal.signal(signum, self._on_signal)
        try:
            stop = self._supervise()
        except Interrupted as interrupt:
            self.events.emit(SignalReceived(signal.Signals(interrupt.signum).name))
            stop = policy.after_interrupt(interrupt.signum)
            self._end_in_flight(policy.interrupted_attempt(), self._save_before_stop(interrupt.signum))
        except ClusterStartFailed as exc:
            stop = policy.after_cluster_failure(str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug must still tear the job down and say so
            traceback.print_exc(file=self.console)
            stop = policy.after_internal_error(exc)
            with contextlib.suppress(Exception):
                self._end_in_flight(policy.failed_supervisor_attempt())
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        with self._signals_deferred():
            self._emit_all(self.backend.close())
        self._finish(stop)
        return stop.exit_code

    def _supervise(self) -> Stop:
        lost = self._begin()
        if lost is not None:
            decision = policy.after_attempt(self.history, lost, self.config.restart, self.rng)
            if isinstance(decision, Stop):
                return decision
        while True:
            self._check_stop()
            start = self._choose_start()
            if isinstance(start, Stop):
                return start
            self._warn_if_low_on_space(start)
            self._emit_all(self.backend.prepare())
            self._check_stop()  # a stop signal while the cluster started: launch nothing
            job, record = self._launch(start)
            end = self._wait_for_end(job, start.step)
            if end.stall is not None:
                # A stalled job is still running: capture what it is doing before it is ended.
                self._capture_stall(job, end.stall)
            if end.mismatch is not None:
                self._record_mismatch(job, end.mismatch)
            evidence = self._evidence(record.number, end)
            if end.mismatch is not None:
                classification = policy.resume_not_honoured(end.mismatch.reason)
            else:
                classification = self._disk_full(evidence) or classify(
                    evidence, ordered_rules(self.config), self.config.default_action
                )
            decision = self._conclude(job, record, evidence, classification)
            if isinstance(decision, Stop):
                return decision
            self._back_off(decision)

    def _conclude(
        self, job: RunningJob, record: AttemptRecord, evidence: AttemptEvidence, classification: Classification
    ) -> Decision:
        """The one way an attempt ends: record the verdict, tear the attempt down and fence it, decide."""
        self._record_end(record, evidence, classification)
        torn_down = self._teardown(job)
        after_fence = policy.after_teardown(torn_down.fenced, torn_down.problems)
        if after_fence is not None:
            return after_fence
        decision = policy.after_attempt(self.history, classification, self.config.restart, self.rng)
        if isinstance(decision, Restart):
            return self._judge_nodes(job, record, evidence, torn_down) or decision
        return decision

    # --- steps ---

    def _begin(self) -> Classification | None:
        """Start (or continue) the run; returns how the attempt a dead supervisor left in flight is judged."""
        history = self.history
        history.supervisor_starts += 1
        lost = None
        for attempt in [a for a in history.attempts if not a.ended]:
            lost = policy.lost_attempt()
            attempt.judge(self.clock.now(), lost.action, lost.rule, lost.reason)
        history.move_to(RunState.STARTING)
        self.run_dir.save_history(history)
        self.events.emit(
            RunStarted(
                run_dir=str(self.run_dir.path),
                job=self.config.job.name,
                ray_mode=self.config.ray.mode.value,
                max_restarts=self.config.restart.max_restarts,
                supervisor_start=history.supervisor_starts,
                restarts_used=history.restarts_used,
                checkpoints_dir=self.config.checkpoints.dir,
                pid=os.getpid(),
            )
        )
        if history.supervisor_starts > 1:
            stale = self.backend.stale_processes()
            if stale:
                self.events.emit(StaleProcessesSwept([f"{p.name}[{p.pid}]" for p in stale]))
            if lost is not None:
                history.attempts[-1].reached_step = self._newest_complete_step()
                self.run_dir.save_history(history)
        return lost

    def _scan(self) -> list[CheckpointInfo]:
        root = Path(self.config.checkpoints.dir)
        return scan_checkpoints(root, verify=self.config.checkpoints.verify, facts=self._checkpoint_facts)

    def _choose_start(self) -> StartFrom | Stop:
        root = Path(self.config.checkpoints.dir)
        infos = self._scan()
        choice = choose_resume_checkpoint(infos, read_tracker(root))
        if choice.unjudgeable:
            problems = [info.problems[0] for info in choice.unjudgeable]
            self.events.emit(CheckpointsUnjudgeable([str(info.path) for info in choice.unjudgeable], problems))
            return policy.unknown_checkpoint_layout([info.path.name for info in choice.unjudgeable], problems[0])
        for info in choice.set_aside:
            renamed = set_aside(info)
            self.events.emit(CheckpointSetAside(info.step, str(info.path), str(renamed), list(info.problems)))
        chosen = choice.checkpoint
        self.history.saw_checkpoint(chosen.step if chosen else None)
        if chosen is not None and self.config.checkpoints.rotate:
            self._rotate(infos, chosen.step)
        return policy.choose_start(chosen.step if chosen else None, str(chosen.path) if chosen else None, self.history)

    def _checkpoint_space(self, newest: Path | None, incomplete: Sequence[Path] = ()) -> CheckpointSpace:
        """``incomplete``: step folders found incomplete and not set aside yet (a save the full disk cut short)."""
        root = Path(self.config.checkpoints.dir)
        aside = [*sorted(root.glob("global_step_*.incomplete-*")), *incomplete] if root.is_dir() else []
        volume = volume_of(root)
        logs = run_logs_bytes(self.run_dir.path) if volume_of(self.run_dir.path).mount == volume.mount else None
        return CheckpointSpace(
            checkpoints_dir=str(root),
            volume=volume,
            newest_step_bytes=folder_bytes(newest) if newest is not None else None,
            set_aside_bytes=sum(folder_bytes(path) for path in aside),
            set_aside_count=len(aside),
            run_logs_bytes=logs,
        )

    def _disk_full(self, evidence: AttemptEvidence) -> Classification | None:
        """The supervisor's own verdict on an attempt that found no room on the checkpoint volume."""
        error = evidence.record
        if evidence.exit is not None and evidence.exit.code == 0 and error is None:
            return None  # it did not fail
        texts = [evidence.log_tail, *((error.message, error.traceback) if error is not None else ())]
        infos = self._scan()
        complete = [info for info in infos if info.complete]
        newest = max(complete, key=lambda info: info.step).path if complete else None
        incomplete = [info.path for info in infos if not info.complete]
        return disk.disk_full(texts, self._checkpoint_space(newest, incomplete))

    def _warn_if_low_on_space(self, start: StartFrom) -> None:
        newest = Path(start.checkpoint) if start.checkpoint else None
        space = self._checkpoint_space(newest)
        warning = disk.space_warning(space)
        if warning is not None:
            self.events.emit(
                CheckpointSpaceLow(
                    space.checkpoints_dir,
                    space.volume.mount,
                    space.volume.free_bytes,
                    space.newest_step_bytes or 0,
                    warning,
                )
            )

    def _rotate(self, infos: Sequence[CheckpointInfo], resume_step: int) -> None:
        facts = run_facts(Path(self.config.checkpoints.dir), self._checkpoint_facts)
        for removal in plan_rotation(infos, facts, resume_step, self.history.unproven_emergency_steps()):
            try:
                remove(removal)
            except OSError as e:
                problem = f"{type(e).__name__}: {e}"
                self.events.emit(
                    CheckpointRotated(removal.step, removal.role, str(removal.path), removal.limit, False, problem)
                )
            else:
                self.events.emit(CheckpointRotated(removal.step, removal.role, str(removal.path), removal.limit, True))

    def _attempt_env(self, number: int, log_dir: Path) -> dict[str, str]:
        restart = self.config.restart
        env = {
            contract.ENV_EMERGENCY_SAVE: "1" if restart.emergency_save else "0",
            contract.ENV_EMERGENCY_SAVE_TIMEOUT_S: str(restart.emergency_save_timeout_s),
            **self.config.job.env,
            contract.ENV_RUN_ID: self.history.run_id,
            contract.ENV_ATTEMPT: str(number),
            contract.ENV_ERROR_FILE: str(log_dir / "error.json"),
            contract.ENV_RUN_DIR: str(self.run_dir.path),
            contract.ENV_STACKS_DIR: str(log_dir / "stacks"),
        }
        user_env = {**self.inherited_env, **self.config.job.env}
        env.update(tracker_env(self.history.run_id, self.run_dir.path, user_env, self.history.trackers))
        if self.heartbeats is not None:
            env[contract.ENV_HEARTBEAT_URL] = self.heartbeats.url
            env[contract.ENV_HEARTBEAT_TOKEN] = self.heartbeats.token
            env[contract.ENV_HEARTBEAT_INTERVAL_S] = str(self.config.watchdog.heartbeat_interval_s)
        return env

    def _launch(self, start: StartFrom) -> tuple[RunningJob, AttemptRecord]:
        number = len(self.history.attempts) + 1
        log_dir = self.run_dir.attempt_dir(number)
        argv = job_argv(self.config.job, self.user_args, Path(self.config.checkpoints.dir), start, self.backend.python)
        env = self._attempt_env(number, log_dir)
        spec = self._launch_spec(number, argv, env, log_dir)
        shown = redact_argv(argv)
        record = AttemptRecord(number=number, started_at=self.clock.now(), resumed_from_step=start.step, argv=shown)
        emergency_of = self._emergency_save_of(start.step)
        if self.heartbeats is not None:
            self.heartbeats.past_save_s = BeatsReader(self.run_dir.path).longest_save_s(range(1, number))
        self.history.attempts.append(record)
        self.history.move_to(RunState.ATTEMPT_RUNNING)
        self.run_dir.save_history(self.history)
        with self._signals_deferred():
            job = self.backend.launch(spec)
            self._in_flight = _InFlight(job, record)
        self.events.emit(
            AttemptStarted(
                number,
                job.pid or -1,
                shown,
                start.step,
                start.checkpoint,
                str(log_dir),
                warm=job.warm,
                emergency_of=emergency_of,
            )
        )
        self._standby_for = (number + 1, argv)
        return job, record

    def _launch_spec(self, number: int, argv: list[str], env: dict[str, str], log_dir: Path) -> LaunchSpec:
        limit_mb = self.config.job.log_limit_mb
        limit = None if limit_mb is None else int(limit_mb * 1024 * 1024)
        return LaunchSpec(number, argv, env, self.config.job.cwd, log_dir, log_dir / "error.json", limit)

    def _emergency_save_of(self, step: int | None) -> int | None:
        """The attempt whose emergency save wrote ``step``, when the relaunch resumes from one."""
        for attempt in reversed(self.history.attempts):
            saved = contract.EmergencyCheckpoint.from_dict(attempt.emergency_checkpoint)
            if saved is not None and saved.status is contract.EmergencyStatus.SAVED and saved.step == step:
                return attempt.number
        return None

    def _save_before_stop(self, signum: int) -> AttemptEvidence | None:
        """On a stop, when ``restart.save_on_stop_s`` allows it: ask the job (over the heartbeat channel's answers)
        to save at its next safe point and end, and wait for its driver to exit, at most that long or until a
        second signal. The evidence of its end, when it ended."""
        in_flight, wait_s = self._in_flight, policy.save_on_stop_wait(signum, self.config.restart.save_on_stop_s)
        job = in_flight.job
        ended = in_flight.record is None or in_flight.record.ended  # judged already: its teardown was under way
        if job is None or ended or in_flight.torn_down or wait_s <= 0 or self.heartbeats is None:
            return None
        self.heartbeats.request_save()
        self.events.emit(SaveOnStopRequested(job.attempt, wait_s))
        beats_log = self.run_dir.attempt_dir(job.attempt) / "heartbeats.jsonl"
        watch = _Watch(ProgressState(started_at=self.clock.monotonic()), resume=None, beats_log=beats_log)
        started, status = self.clock.monotonic(), None
        tick = self.config.watchdog.tick_s
        while status is None and not self._stop_repeated:
            left = wait_s - (self.clock.monotonic() - started)
            if left <= 0:
                break
            with self._signals_deferred():
                status = self.backend.wait(job, min(tick, left), wake=self.heartbeats)
            self._take_heartbeats(job.attempt, watch)
        waited = self.clock.monotonic() - started
        evidence = self._evidence(job.attempt, AttemptEnd(status=status)) if status is not None else None
        saved = evidence.record.emergency_checkpoint if evidence is not None and evidence.record else None
        why = None if status is not None else ("a second signal" if self._stop_repeated else "the wait ran out")
        self.events.emit(SaveOnStop(job.attempt, round(waited, 3), wait_s, status is not None, saved, why))
        return evidence

    def _wait_for_end(self, job: RunningJob, resumed_step: int | None) -> AttemptEnd:
        """Wait for the driver to end, looking at the heartbeats every tick: its exit, a stall, or a resume that
        was not honoured."""
        watch = _Watch(
            progress=ProgressState(started_at=self.clock.monotonic()),
            resume=ResumeCheck(resumed_step)
            if resumed_step is not None and self.config.checkpoints.verify_resume
            else None,
            beats_log=self.run_dir.attempt_dir(job.attempt) / "heartbeats.jsonl",
        )
        return replace(self._watch_until_end(job, watch), last_step=watch.progress.last_step)

    def _watch_until_end(self, job: RunningJob, watch: _Watch) -> AttemptEnd:
        dog, grace_s = self.config.watchdog, self.config.teardown.record_grace_s
        tick = dog.tick_s if self.heartbeats is not None else None
        while True:
            waited = None if watch.record_at is None else self.clock.monotonic() - watch.record_at
            timeout = tick if waited is None else max(0.0, min(tick or grace_s, grace_s - waited))
            with self._signals_raise():
                status = self.backend.wait(job, timeout, wake=self.heartbeats)
            mismatch = self._take_heartbeats(job.attempt, watch)
            if watch.progress.last_sync_end_at is not None:
                self._start_standby()
            if mismatch is not None:
                return AttemptEnd(status=status, mismatch=mismatch)
            if status is not None:
                return AttemptEnd(status=status)
            if watch.record_at is not None and self.clock.monotonic() - watch.record_at >= grace_s:
                # The job said why it failed; a driver that takes long to die (rollout engines) is not waited for.
                return AttemptEnd(record_grace_over=True)
            stall = check(watch.progress, dog, self.clock.monotonic()) if dog.enabled else None
            if stall is not None:
                return AttemptEnd(stall=stall)

    def _start_standby(self) -> None:
        """Once the attempt is past its start-up (its first weight sync done), and a restart could still come,
        start the next attempt's driver ahead: it does not compete with this attempt's start-up for CPUs."""
        wanted, self._standby_for = self._standby_for, None
        restarts_left = self.history.restarts_used < self.config.restart.max_restarts
        if wanted is None or not self.config.restart.warm_standby or not restarts_left:
            return
        number, argv = wanted  # only argv's job module matters: the command line comes with the relaunch
        log_dir = self.run_dir.path / "attempts" / str(number)  # made when (if) the attempt is launched
        env = self._attempt_env(number, log_dir)  # now: the trackers the job reported are in it, as at relaunch
        spec = self._launch_spec(number, argv, env, log_dir)
        with self._signals_deferred():
            self._emit_all(self.backend.start_standby(spec))

    def _take_heartbeats(self, attempt: int, watch: _Watch) -> MismatchedResume | None:
        if self.heartbeats is None:
            return None
        beats = [b for b in self.heartbeats.drain() if b.attempt == attempt]  # late beats of older attempts
        if not beats:
            return None
        mismatch = None
        alive_before = dict(watch.alive)
        with watch.beats_log.open("a") as f:
            for beat in beats:
                if beat.kind is HeartbeatKind.ERROR_RECORD:
                    self._take_record(attempt, watch, beat)
                    continue
                if beat.kind is HeartbeatKind.TRACKER:
                    self._take_tracker(attempt, beat)
                    continue
                watch.progress.observe(beat)
                if beat.kind is HeartbeatKind.ALIVE:
                    # One every few seconds from each process for as long as the attempt lives: kept as the last
                    # of each process (alive.json), so that heartbeats.jsonl grows with the steps, not the hours.
                    watch.alive[f"{beat.fields.get('host', '?')}:{beat.fields.get('pid', '?')}"] = self.clock.now()
                    continue
                f.write(json.dumps({"received_at": self.clock.now(), **beat.fields}) + "\n")
                if watch.resume is not None and beat.kind is HeartbeatKind.SYNC_BEGIN:
                    mismatch = mismatch or self._check_resume(attempt, watch.resume, beat.step)
        if watch.alive != alive_before:
            write_json_atomic(watch.beats_log.with_name(ALIVE_FILE), watch.alive)
        return mismatch

    def _take_tracker(self, attempt: int, beat: Heartbeat) -> None:
        backend, run_id = beat.fields.get("backend"), beat.fields.get("run_id")
        if not isinstance(backend, str) or not isinstance(run_id, str) or backend in self.history.trackers:
            return  # the first attempt's run is the run's
        self.history.trackers[backend] = run_id
        self.run_dir.save_history(self.history)
        self.events.emit(TrackerRun(attempt, backend, run_id))

    def _take_record(self, attempt: int, watch: _Watch, beat: Heartbeat) -> None:
        """The job's error record, posted before its driver exits: written here (from a driver on another machine
        the file is out of reach; the first record wins) and the clock of the driver's grace started."""
        record = record_from_payload(beat.fields.get("record"))
        if record is None or watch.record_at is not None:
            return
        write_record(watch.beats_log.with_name("error.json"), record)
        watch.record_at = beat.received_at
        grace_s = self.config.teardown.record_grace_s
        self.events.emit(ErrorRecordReceived(attempt, record.error_type, record.phase, record.global_step, grace_s))

    def _check_resume(self, attempt: int, resume: ResumeCheck, step: int | None) -> MismatchedResume | None:
        verdict = resume.observe(step)
        if isinstance(verdict, VerifiedResume):
            self.history.attempts[attempt - 1].resume_verified = True
            self.run_dir.save_history(self.history)
            self.events.emit(ResumeVerified(attempt, verdict.resumed_step, verdict.first_step))
        elif isinstance(verdict, MismatchedResume):
            self.events.emit(ResumeMismatch(attempt, verdict.resumed_step, verdict.seen_step, verdict.reason))
            return verdict
        return None

    def _record_mismatch(self, job: RunningJob, mismatch: MismatchedResume) -> None:
        write_record(
            self.run_dir.attempt_dir(job.attempt) / "error.json",
            ErrorRecord(
                error_type="supervisor.resume_mismatch",
                message=mismatch.reason,
                source=RecordSource.SUPERVISOR_RESUME_CHECK,
                global_step=mismatch.seen_step,
                attempt=job.attempt,
                timestamp=self.clock.now(),
            ),
        )

    def _capture_stall(self, job: RunningJob, stall: Stall) -> None:
        self.events.emit(StallDetected(job.attempt, stall.event_fields()))
        log_dir = self.run_dir.attempt_dir(job.attempt)
        started = self.clock.monotonic()
        with self._signals_deferred():
            dumps = self.backend.dump_stacks(job, log_dir / "stacks", self.config.watchdog.stack_dump_timeout_s)
        self.events.emit(StacksDumped(job.attempt, self.clock.monotonic() - started, [asdict(d) for d in dumps]))
        write_record(
            log_dir / "error.json",
            ErrorRecord(
                error_type=f"supervisor.watchdog.{stall.kind.value}",
                message=stall.reason,
                source=RecordSource.SUPERVISOR_WATCHDOG,
                phase=stall.phase if stall.kind is StallKind.WEIGHT_SYNC_HANG else None,
                global_step=stall.last_step,
                hang=True,
                attempt=job.attempt,
                timestamp=self.clock.now(),
            ),
        )

    def _evidence(self, attempt: int, end: AttemptEnd) -> AttemptEvidence:
        log_dir = self.run_dir.attempt_dir(attempt)
        record = read_record(log_dir / "error.json")
        half = self.config.log_tail_bytes // 2
        log_tail = read_tail(log_dir / "stdout.log", half) + "\n" + read_tail(log_dir / "stderr.log", half)
        return AttemptEvidence(end.status, record, log_tail, stalled=end.stall is not None, last_step=end.last_step)

    def _record_end(self, record: AttemptRecord, evidence: AttemptEvidence, classification: Classification) -> None:
        error, status = evidence.record, evidence.exit or ExitStatus()
        record.judge(self.clock.now(), classification.action, classification.rule, classification.reason)
        record.exit_code, record.signal = status.code, status.signal_name
        from_record = record.took(error)
        if record.failed:
            record.error_message = error.message[: record.MESSAGE_CHARS] if error is not None else None
            step = error.global_step if error is not None else None
            record.failed_at_step = step if step is not None else evidence.last_step
        self.history.move_to(RunState.TEARING_DOWN)
        self.run_dir.save_history(self.history)
        self.events.emit(
            AttemptExited(
                attempt=record.number,
                exit_code=status.code,
                signal=status.signal_name,
                duration_s=(record.ended_at or record.started_at) - record.started_at,
                action=classification.action.value,
                rule=str(classification.rule),
                reason=classification.reason,
                global_step=error.global_step if error else None,
                record=error.summary() if error else None,
                **from_record,
            )
        )

    def _teardown(self, job: RunningJob) -> TeardownResult:
        with self._signals_deferred():
            result = self.backend.teardown(job)
            self._in_flight.torn_down = True
        reached = self._newest_complete_step()
        attempt = self.history.attempts[-1]
        attempt.reached_step = reached
        self.history.saw_checkpoint(reached)
        self.run_dir.save_history(self.history)
        self.events.emit(Teardown(job.attempt, reached, result.event_fields()))
        return result

    def _judge_nodes(
        self, job: RunningJob, record: AttemptRecord, evidence: AttemptEvidence, torn_down: TeardownResult
    ) -> Stop | None:
        """Before a relaunch: the health of the nodes the attempt used; drain those it must not land on again,
        and stop when what is left cannot run the job (``supervisor/policy/nodes.py``)."""
        with self._signals_deferred():
            seen = self.backend.nodes_after(job, torn_down)
        health = [nodes.judge_node(n, host, r, self._node_readings.get(n)) for n, host, r in seen.readings]
        health += nodes.dead_nodes(seen.ran_on - seen.used, seen.nodes)
        self._node_readings.update({n: r for n, _, r in seen.readings})
        for verdict in health:
            self.events.emit(
                NodeHealthChecked(
                    job.attempt,
                    verdict.node_id,
                    verdict.hostname,
                    verdict.healthy,
                    list(verdict.problems),
                    verdict.checked,
                )
            )
        error = evidence.record
        record.failure_nodes = sorted(
            nodes.failure_nodes(error.hostname, error.message, seen.nodes) if error is not None else set()
        )
        self.run_dir.save_history(self.history)
        if not self.config.nodes.exclude:
            return None
        if seen.single_machine:
            verdict = nodes.unhealthy_machine(health)
            return Stop(ExitCode.NO_HEALTHY_CAPACITY, verdict) if verdict else None
        failed = [set(a.failure_nodes) for a in self.history.attempts if a.failed and not a.interrupted][-2:]
        drained = []
        for exclusion in nodes.exclusions(health, failed, seen.used, seen.nodes, self._drained):
            message = f"verl-supervisor run {self.history.run_id}, after attempt {job.attempt}: {exclusion.reason}"
            with self._signals_deferred():
                outcome = self.backend.exclude_node(exclusion.node_id, message)
            self.events.emit(
                NodeExcluded(
                    job.attempt,
                    exclusion.node_id,
                    exclusion.hostname,
                    exclusion.reason,
                    outcome.accepted,
                    outcome.message,
                )
            )
            if outcome.accepted:
                self._drained.add(exclusion.node_id)
                drained.append(exclusion)
        missing = nodes.shortfall(seen.demand, seen.nodes, self._drained) if drained else {}
        if missing:
            return Stop(ExitCode.NO_HEALTHY_CAPACITY, nodes.capacity_lost(missing, seen.demand, drained))
        return None

    def _back_off(self, decision: Restart) -> None:
        self.history.move_to(RunState.BACKING_OFF)
        self.run_dir.save_history(self.history)
        self.events.emit(
            Backoff(
                next_attempt=len(self.history.attempts) + 1,
                delay_s=decision.delay_s,
                restarts_used=self.history.restarts_used,
                max_restarts=self.config.restart.max_restarts,
            )
        )
        with self._signals_raise():
            self.clock.sleep(decision.delay_s)

    def _end_in_flight(self, classification: Classification, evidence: AttemptEvidence | None = None) -> None:
        """An attempt still in flight when the run stops is judged, recorded and torn down like any other."""
        in_flight = self._in_flight
        if in_flight.job is None or in_flight.torn_down:
            return
        record = in_flight.record
        if record is not None and not record.ended:
            self._record_end(record, evidence or AttemptEvidence(exit=None), classification)
        self._teardown(in_flight.job)

    def _finish(self, stop: Stop) -> None:
        code = stop.exit_code
        if not self.history.finished:
            self.history.finish(int(code), stop.outcome_name, resumable=code in policy.INTERRUPTED_EXIT_CODES)
        self.run_dir.save_history(self.history)
        self.events.emit(RunFinished(int(code), stop.outcome_name, stop.reason, len(self.history.attempts)))
        print(attempts_table(self.history), file=self.console, flush=True)

    def _emit_all(self, events: Iterable[Event]) -> None:
        for event in events:
            self.events.emit(event)

    def _newest_complete_step(self) -> int | None:
        complete = [info.step for info in self._scan() if info.complete]
        return max(complete) if complete else None

    # --- signals: raised as an exception only while waiting; otherwise noted and acted on at the next step ---

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self._stop_signal is None:
            self._stop_signal = signum
        else:
            self._stop_repeated = True  # cuts short the wait for a save before the stop
        if self._interruptible:
            self._interruptible = False
            raise Interrupted(signum)

    def _check_stop(self) -> None:
        if self._stop_signal is not None:
            raise Interrupted(self._stop_signal)

    @contextlib.contextmanager
    def _signals_raise(self) -> Iterator[None]:
        self._check_stop()
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False

    @contextlib.contextmanager
    def _signals_deferred(self) -> Iterator[None]:
        interruptible, self._interruptible = self._interruptible, False
        try:
            yield
        finally:
            self._interruptible = interruptible
