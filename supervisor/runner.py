"""The supervisor's loop: launch an attempt, learn of its end at once, tear it down completely, decide.

One loop, one place that waits (``JobBackend.wait``, which a stop signal interrupts). Decisions come from
``supervisor.policy``; processes and Ray from the backend; files from ``supervisor.rundir`` and
``supervisor.checkpoints``. Every step is an event in events.jsonl, and state.json is rewritten after each.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import TextIO

from supervisor.backends.base import ClusterStartFailed, JobBackend, LaunchSpec, RunningJob
from supervisor.checkpoints import choose_resume_checkpoint, read_tracker, scan_checkpoints, set_aside
from supervisor.codes import ExitCode, ExitStatus
from supervisor.config import Action, SupervisorConfig
from supervisor.events import (
    AttemptExited,
    AttemptStarted,
    Backoff,
    CheckpointSetAside,
    EventLog,
    RunFinished,
    RunStarted,
    SignalReceived,
    StacksDumped,
    StaleProcessesSwept,
    StallDetected,
    Teardown,
)
from supervisor.heartbeats import HeartbeatServer
from supervisor.history import AttemptRecord, RunHistory, RunState
from supervisor.job_command import job_argv
from supervisor.policy import (
    AttemptEvidence,
    Classification,
    Restart,
    StartFrom,
    Stop,
    choose_start,
    classify,
    decide,
)
from supervisor.processes import tail
from supervisor.report import attempts_table
from supervisor.rundir import RunDirectory
from supervisor.watchdog import ProgressState, Stall, StallKind, check
from verl_hooks.record import ErrorRecord, read_record, write_record

_STOP_SIGNALS = {signal.SIGINT: ExitCode.INTERRUPTED_SIGINT, signal.SIGTERM: ExitCode.INTERRUPTED_SIGTERM}


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
    if history.finished:
        raise RunAlreadyFinished(
            f"run directory {run_dir.path} holds a finished run ({history.outcome}, exit {history.exit_code}); "
            f"choose another run_dir to start a new run"
        )
    return history


@dataclass
class _Watch:
    """The attempt in flight, for the signal path to tear down."""

    job: RunningJob | None = None
    record: AttemptRecord | None = None


class Supervisor:
    def __init__(
        self,
        config: SupervisorConfig,
        user_args: Sequence[str],
        run_dir: RunDirectory,
        history: RunHistory,
        backend: JobBackend,
        events: EventLog,
        console: TextIO | None = None,
        sleep: Callable[[float], None] = time.sleep,
        heartbeats: HeartbeatServer | None = None,
    ) -> None:
        self.config = config
        self.user_args = list(user_args)
        self.run_dir = run_dir
        self.history = history
        self.backend = backend
        self.events = events
        self.console = console if console is not None else sys.stderr
        self._sleep = sleep
        self.heartbeats = heartbeats
        self._watch = _Watch()
        self._stop_signal: int | None = None
        self._interruptible = False

    # --- the story ---

    def run(self) -> ExitCode:
        previous = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
        for signum in _STOP_SIGNALS:
            signal.signal(signum, self._on_signal)
        try:
            code, reason = self._supervise()
        except Interrupted as stop:
            code, reason = self._interrupted(stop.signum)
        except ClusterStartFailed as exc:
            code, reason = ExitCode.ENVIRONMENT_FAILURE, f"the Ray cluster could not be started: {exc}"
        except Exception as exc:  # noqa: BLE001 - a bug must still tear the job down and say so
            traceback.print_exc(file=self.console)
            self._teardown_in_flight()
            code, reason = ExitCode.INTERNAL_ERROR, f"supervisor error: {type(exc).__name__}: {exc}"
        finally:
            signal.signal(signal.SIGINT, previous[0])
            signal.signal(signal.SIGTERM, previous[1])
        with self._signals_deferred():
            self.backend.close()
        self._finish(code, reason)
        return code

    def _supervise(self) -> tuple[ExitCode, str]:
        carried_over = self._begin()
        if carried_over is not None:
            # A supervisor restarted on the run: the attempt it lost counts, against the same budget.
            decision = decide(self.history, carried_over, self.config.restart)
            if isinstance(decision, Stop):
                return decision.exit_code, decision.reason
        while True:
            self._check_stop()
            start = self._choose_start()
            if isinstance(start, Stop):
                return start.exit_code, start.reason
            self.backend.prepare()
            self._check_stop()  # a stop signal while the cluster started: launch nothing
            job, record = self._launch(start)
            status, stall = self._wait_for_end(job)
            if stall is None:
                evidence = self._evidence(record.number, status)
                classification = classify(evidence, self.config.rules, self.config.default_action)
                self._record_end(record, job, status, evidence, classification)
                report = self._teardown(job)
            else:
                # A stalled job is still running: capture what it is doing, end it, then judge it.
                self._on_stall(job, stall)
                report = self._teardown(job)
                status = self.backend.wait(job, 0) or ExitStatus()
                evidence = self._evidence(record.number, status, stalled=True)
                classification = classify(evidence, self.config.rules, self.config.default_action)
                self._record_end(record, job, status, evidence, classification)
            if not report.fenced:
                return ExitCode.ENVIRONMENT_FAILURE, "; ".join(report.problems) or "attempt could not be fenced"
            decision = decide(self.history, classification, self.config.restart)
            if isinstance(decision, Stop):
                return decision.exit_code, decision.reason
            self._back_off(decision)

    # --- steps ---

    def _begin(self) -> Classification | None:
        """Start (or continue) the run; returns how the attempt a dead supervisor left in flight is judged."""
        history = self.history
        history.supervisor_starts += 1
        carried_over = None
        for attempt in [a for a in history.attempts if not a.ended]:
            attempt.ended_at = time.time()
            attempt.action, attempt.rule = "restart", "supervisor-restarted"
            attempt.reason = "the supervisor stopped while this attempt ran"
            carried_over = Classification(Action.restart, attempt.rule, attempt.reason)
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
            )
        )
        if history.supervisor_starts > 1:
            stale = self.backend.stale_processes()
            if stale:
                self.events.emit(StaleProcessesSwept([f"{p.name}[{p.pid}]" for p in stale]))
            if carried_over is not None and history.attempts:
                history.attempts[-1].reached_step = _newest_complete_step(
                    Path(self.config.checkpoints.dir), self.config
                )
                self.run_dir.save_history(history)
        return carried_over

    def _choose_start(self) -> StartFrom | Stop:
        root = Path(self.config.checkpoints.dir)
        infos = scan_checkpoints(root, verify=self.config.checkpoints.verify)
        choice = choose_resume_checkpoint(infos, read_tracker(root))
        for info in choice.set_aside:
            renamed = set_aside(info)
            self.events.emit(CheckpointSetAside(info.step, str(info.path), str(renamed), list(info.problems)))
        chosen = choice.checkpoint
        self.history.saw_checkpoint(chosen.step if chosen else None)
        return choose_start(chosen.step if chosen else None, str(chosen.path) if chosen else None, self.history)

    def _launch(self, start: StartFrom) -> tuple[RunningJob, AttemptRecord]:
        number = len(self.history.attempts) + 1
        log_dir = self.run_dir.attempt_dir(number)
        error_file = log_dir / "error.json"
        argv = job_argv(self.config.job, self.user_args, Path(self.config.checkpoints.dir), start, self.backend.python)
        env = {
            **self.config.job.env,
            "VERL_SUPERVISOR_RUN_ID": self.history.run_id,
            "VERL_SUPERVISOR_ATTEMPT": str(number),
            "VERL_SUPERVISOR_ERROR_FILE": str(error_file),
            "VERL_SUPERVISOR_RUN_DIR": str(self.run_dir.path),
            "VERL_SUPERVISOR_STACKS_DIR": str(log_dir / "stacks"),
        }
        if self.heartbeats is not None:
            env["VERL_SUPERVISOR_HEARTBEAT_URL"] = self.heartbeats.url
            env["VERL_SUPERVISOR_HEARTBEAT_TOKEN"] = self.heartbeats.token
            env["VERL_SUPERVISOR_HEARTBEAT_INTERVAL_S"] = str(self.config.watchdog.heartbeat_interval_s)
        spec = LaunchSpec(number, argv, env, self.config.job.cwd, log_dir, error_file)
        record = AttemptRecord(number=number, started_at=time.time(), resumed_from_step=start.step, argv=argv)
        self.history.attempts.append(record)
        self.history.move_to(RunState.ATTEMPT_RUNNING)
        self.run_dir.save_history(self.history)
        with self._signals_deferred():
            job = self.backend.launch(spec)
            self._watch = _Watch(job, record)
        self.events.emit(AttemptStarted(number, job.pid or -1, argv, start.step, start.checkpoint, str(log_dir)))
        return job, record

    def _wait_for_end(self, job: RunningJob) -> tuple[ExitStatus, None] | tuple[None, Stall]:
        """Wait for the driver to end, looking at the heartbeats every tick: its exit, or a stall."""
        progress = ProgressState(started_at=time.monotonic())
        beats_log = self.run_dir.attempt_dir(job.attempt) / "heartbeats.jsonl"
        dog = self.config.watchdog
        tick = dog.tick_s if self.heartbeats is not None and dog.enabled else None
        while True:
            with self._signals_raise():
                status = self.backend.wait(job, tick)
            self._take_heartbeats(job.attempt, progress, beats_log)
            if status is not None:
                return status, None
            stall = check(progress, dog, time.monotonic())
            if stall is not None:
                return None, stall

    def _take_heartbeats(self, attempt: int, progress: ProgressState, beats_log: Path) -> None:
        if self.heartbeats is None:
            return
        beats = [b for b in self.heartbeats.drain() if b.attempt == attempt]  # late beats of older attempts
        if not beats:
            return
        with beats_log.open("a") as f:
            for beat in beats:
                if beat.kind == "error_record":
                    # From a driver on another machine: the record file is written here, first one wins.
                    write_record(beats_log.with_name("error.json"), ErrorRecord.from_dict(beat.fields["record"]))
                    continue
                progress.observe(beat)
                f.write(json.dumps({"received_at": time.time(), **beat.fields}) + "\n")

    def _on_stall(self, job: RunningJob, stall: Stall) -> None:
        self.events.emit(
            StallDetected(
                attempt=job.attempt,
                stall_kind=stall.kind.value,
                silent_s=round(stall.silent_s, 3),
                limit_s=stall.limit_s,
                last_step=stall.last_step,
                phase=stall.phase,
                heartbeat_ages_s=stall.heartbeat_ages_s,
                reason=stall.reason,
            )
        )
        log_dir = self.run_dir.attempt_dir(job.attempt)
        started = time.monotonic()
        with self._signals_deferred():
            dumps = self.backend.dump_stacks(job, log_dir / "stacks", self.config.watchdog.stack_dump_timeout_s)
        self.events.emit(StacksDumped(job.attempt, time.monotonic() - started, [asdict(d) for d in dumps]))
        write_record(
            log_dir / "error.json",
            ErrorRecord(
                error_type=f"supervisor.watchdog.{stall.kind.value}",
                message=stall.reason,
                source="supervisor-watchdog",
                phase=stall.phase if stall.kind is StallKind.WEIGHT_SYNC_HANG else None,
                global_step=stall.last_step,
                hang=True,
                attempt=job.attempt,
            ),
        )

    def _evidence(self, attempt: int, status: ExitStatus, stalled: bool = False) -> AttemptEvidence:
        log_dir = self.run_dir.attempt_dir(attempt)
        record = read_record(log_dir / "error.json")
        half = self.config.log_tail_bytes // 2
        log_tail = tail(log_dir / "stdout.log", half) + "\n" + tail(log_dir / "stderr.log", half)
        return AttemptEvidence(status, record, log_tail, stalled)

    def _record_end(self, record: AttemptRecord, job: RunningJob, status: ExitStatus, evidence, classification) -> None:
        error = evidence.record
        record.ended_at = time.time()
        record.exit_code, record.signal = status.code, status.signal_name
        record.error_type = error.error_type if error else None
        record.phase = error.phase if error else None
        record.action, record.rule, record.reason = (
            classification.action.value,
            classification.rule,
            classification.reason,
        )
        self.history.move_to(RunState.TEARING_DOWN)
        self.events.emit(
            AttemptExited(
                attempt=record.number,
                exit_code=status.code,
                signal=status.signal_name,
                duration_s=record.ended_at - record.started_at,
                action=classification.action.value,
                rule=classification.rule,
                reason=classification.reason,
                error_type=record.error_type,
                phase=record.phase,
                global_step=error.global_step if error else None,
                record=_record_summary(error),
            )
        )
        self.run_dir.save_history(self.history)

    def _teardown(self, job: RunningJob):
        with self._signals_deferred():
            report = self.backend.teardown(job, self.config.teardown.grace_s, self.config.teardown.fence_timeout_s)
            self._watch = _Watch()
        reached = _newest_complete_step(Path(self.config.checkpoints.dir), self.config)
        attempt = self.history.attempts[-1]
        attempt.reached_step = reached
        self.history.saw_checkpoint(reached)
        self.run_dir.save_history(self.history)
        self.events.emit(
            Teardown(
                attempt=job.attempt,
                duration_s=report.duration_s,
                terminated=[f"{p.name}[{p.pid}]" for p in report.terminated],
                killed=[f"{p.name}[{p.pid}]" for p in report.killed],
                survivors=[f"{p.name}[{p.pid}]" for p in report.survivors],
                actors_alive=report.actors_alive,
                fenced=report.fenced,
                actors_killed=list(report.actors_killed),
                problems=list(report.problems),
                ray_job_id=job.ray_job_id,
                reached_step=reached,
            )
        )
        return report

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
            self._sleep(decision.delay_s)

    def _interrupted(self, signum: int) -> tuple[ExitCode, str]:
        name = signal.Signals(signum).name
        self.events.emit(SignalReceived(name))
        self._teardown_in_flight()
        return _STOP_SIGNALS[signum], f"interrupted by {name}"

    def _teardown_in_flight(self) -> None:
        watch = self._watch
        if watch.job is None:
            return
        if watch.record is not None and not watch.record.ended:
            watch.record.ended_at = time.time()
            watch.record.action, watch.record.rule = "fail", "interrupted"
            watch.record.reason = "the supervisor was stopped"
        with contextlib.suppress(Exception):
            self._teardown(watch.job)

    def _finish(self, code: ExitCode, reason: str) -> None:
        outcome = {ExitCode.DONE: "done"}.get(code, code.name.lower())
        if not self.history.finished:
            self.history.finish(int(code), outcome)
        self.run_dir.save_history(self.history)
        self.events.emit(RunFinished(int(code), outcome, reason, len(self.history.attempts)))
        print(attempts_table(self.history), file=self.console, flush=True)

    # --- signals: raised as an exception only while waiting; otherwise noted and acted on at the next step ---

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self._stop_signal is None:
            self._stop_signal = signum
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


def _newest_complete_step(root: Path, config: SupervisorConfig) -> int | None:
    complete = [info.step for info in scan_checkpoints(root, verify=config.checkpoints.verify) if info.complete]
    return max(complete) if complete else None


def _record_summary(record: ErrorRecord | None) -> dict | None:
    if record is None:
        return None
    return {
        "error_type": record.error_type,
        "message": record.message[:500],
        "phase": record.phase,
        "global_step": record.global_step,
        "backend": record.backend,
        "hang": record.hang,
        "cleanup": record.cleanup,
        "source": record.source,
        "timestamp": record.timestamp,
    }
