"""The supervisor's loop: launch an attempt, learn of its end at once, judge it, tear it down, decide.

The story is ``_supervise``: choose where to start, launch, wait for the end, conclude, back off, again. Each
attempt ends the same way, whichever way it ended (an exit, a stall, a signal to the supervisor): ``_conclude``
asks ``supervisor.policy.judgement.next_step`` what to do with everything observed of it so far (its evidence,
the checkpoint volume, the fence, its nodes) and carries each step out: record the verdict (``attempt_exited``,
state.json), tear down and fence (``teardown``), read the nodes, drain some, then restart or stop. Decisions come
from ``supervisor.policy``; processes and Ray from the backend; files from ``supervisor.run`` and
``supervisor.checkpoints``; the heartbeats from ``supervisor.attempt_watch``.

The loop blocks in three places only: ``_wait`` (on the job, through the backend, woken early by an urgent beat),
the backoff's sleep, and after a preemption the wait for capacity (``PreemptionWatch.await_capacity``); a stop
signal interrupts each. A preemption notice (``supervisor.preemption_watch``) ends the wait for the attempt's end
early: the job is asked to save, and its end waited for within the drain's deadline (``_on_preemption``). Time,
sleep and randomness are injected (``Clock``, ``rng``) so that the loop can be driven by a fake backend in tests.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sys
import traceback
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Protocol, TextIO

import verl_hooks.contract as contract
from supervisor.attempt_watch import AttemptWatch, Taken, mismatch_record, stall_record
from supervisor.backends.base import ClusterStartFailed, JobBackend, LaunchSpec, RunningJob, TeardownResult
from supervisor.checkpoints import facts_from_overrides, set_aside
from supervisor.checkpoints.folder import CheckpointFolder
from supervisor.clock import Clock
from supervisor.config import SupervisorConfig, ordered_rules
from supervisor.job.beat import Heartbeat
from supervisor.job.command import StartFrom, job_argv, redact_argv
from supervisor.job.environment import HeartbeatAddress, attempt_env
from supervisor.mechanisms.bounded_log import read_tail
from supervisor.mechanisms.gpu_health import NodeReading
from supervisor.outcomes import RESUMABLE_EXIT_CODES, ExitCode, ExitStatus
from supervisor.policy import disk, judgement, nodes, preemption
from supervisor.policy import restart as policy
from supervisor.policy.judgement import (
    AwaitCapacity,
    Exclude,
    Fence,
    Observed,
    Preemption,
    ReadNodes,
    Record,
    TearDown,
)
from supervisor.policy.nodes import Exclusion, NodeFindings
from supervisor.policy.preemption import AskToSave, Drain
from supervisor.policy.restart import Decision, Restart, Stop
from supervisor.policy.resume import MismatchedResume, ResumeCheck
from supervisor.policy.rules import AttemptEvidence, Classification
from supervisor.policy.watchdog import ProgressState, Stall, check
from supervisor.preemption_watch import PreemptionWatch
from supervisor.run.beats import BeatsReader
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
    PreemptionSave,
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
from supervisor.run.rundir import RunDirectory
from supervisor.run.table import attempts_table
from supervisor.stop_signals import Interrupted, StopSignals
from verl_hooks.contract import read_record, write_record

if sys.version_info >= (3, 11):
    from typing import assert_never
else:  # Python 3.10
    from typing_extensions import assert_never


class HeartbeatSource(Protocol):
    """The supervisor's end of the heartbeat channel (``supervisor.job.heartbeats.HeartbeatServer``)."""

    @property
    def url(self) -> str: ...

    @property
    def token(self) -> str: ...

    def take_received(self) -> list[Heartbeat]: ...

    def fileno(self) -> int:
        """Readable when a beat that must be acted on at once (an error record) waits to be drained."""
        ...

    def request_save(self, attempt: int) -> None:
        """Ask the attempt, in the answers to its beats, to save at its next safe point and stop."""
        ...


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
    preemption: Preemption | None = None
    """Ray drained nodes the attempt held while it ran; the wait for its save is over."""


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
        self.checkpoints = CheckpointFolder(
            Path(config.checkpoints.dir),
            config.checkpoints.verify,
            facts_from_overrides([*config.job.args, *self.user_args]),
        )
        self.rules = judgement.Rules(
            ordered_rules(config), config.default_action, config.restart, config.nodes, config.preemption
        )
        self._in_flight = _InFlight()
        self._standby_for: tuple[int, list[str]] | None = None
        # Each node's last GPU reading (ECC counters are judged since the last look) and the nodes drained.
        self._node_readings: dict[str, NodeReading] = {}
        self._drained: set[str] = set()
        self.signals = StopSignals()
        watch = PreemptionWatch(backend, config.preemption.poll_s, self.clock, events, self._drained)
        self._preemptions = watch if config.preemption.watch else None

    # --- the story ---

    def run(self) -> ExitCode:
        with self.signals.handled():  # until the attempt in flight is ended: a second signal cuts its save short
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
        with self.signals.deferred():
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
            self.signals.check()
            start = self._choose_start()
            if isinstance(start, Stop):
                return start
            self._warn_if_low_on_space(start)
            self._emit_all(self.backend.prepare())
            self.signals.check()  # a stop signal while the cluster started: launch nothing
            job, record = self._launch(start)
            end = self._wait_for_end(job, start.step)
            decision = self._conclude(job, record, end)
            if isinstance(decision, Stop):
                return decision
            self._back_off(decision)

    def _conclude(self, job: RunningJob, record: AttemptRecord, end: AttemptEnd) -> Decision:
        """The one way an attempt ends: what was observed of it goes to the judgement, step by step, until it
        says restart or stop (``supervisor/policy/judgement.py``)."""
        if end.stall is not None:
            # A stalled job is still running: capture what it is doing before it is ended.
            self._capture_stall(job, end.stall)
        if end.mismatch is not None:
            write_record(
                self.run_dir.attempt_dir(job.attempt) / "error.json",
                mismatch_record(end.mismatch, job.attempt, self.clock.now()),
            )
        evidence = self._evidence(record.number, end)
        observed = Observed(
            evidence,
            mismatch=end.mismatch.reason if end.mismatch is not None else None,
            space=None if end.mismatch is not None or evidence.clean_exit else self._space_now(),
            drained_before=frozenset(self._drained),
            preemption=end.preemption,
        )
        torn_down = TeardownResult()
        while True:
            step = judgement.next_step(observed, self.history, self.rules, self.rng)
            match step:
                case Record(classification):
                    self._record_end(record, evidence, classification)
                    observed = replace(observed, recorded=classification)
                case TearDown():
                    torn_down = self._teardown(job)
                    observed = replace(observed, fence=Fence(torn_down.fenced, tuple(torn_down.problems)))
                case ReadNodes(restart):
                    gone = observed.preemption.nodes if observed.preemption is not None else frozenset()
                    found = self._read_nodes(job, record, evidence, torn_down, gone)
                    observed = replace(observed, restart=restart, nodes=found)
                case Exclude(exclusions):
                    observed = replace(observed, drained=self._exclude(job.attempt, exclusions))
                case AwaitCapacity():
                    assert self._preemptions is not None  # only a preemption is waited for
                    capacity = self._preemptions.await_capacity(job.attempt, step, self.signals)
                    observed = replace(observed, capacity=capacity)
                case Restart() | Stop():
                    return step
                case _:
                    assert_never(step)

    # --- before an attempt ---

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
                history.attempts[-1].reached_step = self.checkpoints.newest_complete_step()
                self.run_dir.save_history(history)
        return lost

    def _choose_start(self) -> StartFrom | Stop:
        infos = self.checkpoints.scan()
        choice = self.checkpoints.choose(infos)
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
            for done in self.checkpoints.rotate(infos, chosen.step, self.history.unproven_emergency_steps()):
                removal = done.removal
                self.events.emit(
                    CheckpointRotated(
                        removal.step, removal.role, str(removal.path), removal.limit, done.problem is None, done.problem
                    )
                )
        return policy.choose_start(chosen.step if chosen else None, str(chosen.path) if chosen else None, self.history)

    def _space_now(self) -> disk.CheckpointSpace:
        return self.checkpoints.space_now(self.run_dir.path)

    def _warn_if_low_on_space(self, start: StartFrom) -> None:
        space = self.checkpoints.space(self.run_dir.path, Path(start.checkpoint) if start.checkpoint else None)
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

    def _attempt_env(self, number: int) -> dict[str, str]:
        heartbeat = HeartbeatAddress(self.heartbeats.url, self.heartbeats.token) if self.heartbeats else None
        history = self.history
        return attempt_env(
            self.config, history.run_id, history.trackers, self.run_dir.path, number, self.inherited_env, heartbeat
        )

    def _launch_spec(self, number: int, argv: list[str]) -> LaunchSpec:
        log_dir = self.run_dir.path / "attempts" / str(number)  # made when (if) the attempt is launched
        limit_mb = self.config.job.log_limit_mb
        limit = None if limit_mb is None else int(limit_mb * 1024 * 1024)
        env = self._attempt_env(number)
        return LaunchSpec(number, argv, env, self.config.job.cwd, log_dir, log_dir / "error.json", limit)

    def _launch(self, start: StartFrom) -> tuple[RunningJob, AttemptRecord]:
        number = len(self.history.attempts) + 1
        log_dir = self.run_dir.attempt_dir(number)
        argv = job_argv(self.config.job, self.user_args, self.checkpoints.root, start, self.backend.python)
        spec = self._launch_spec(number, argv)
        shown = redact_argv(argv)
        record = AttemptRecord(number=number, started_at=self.clock.now(), resumed_from_step=start.step, argv=shown)
        emergency_of = self._emergency_save_of(start.step)
        if self.heartbeats is not None:
            self.heartbeats.past_save_s = BeatsReader(self.run_dir.path).longest_save_s(range(1, number))
        self.history.attempts.append(record)
        self.history.move_to(RunState.ATTEMPT_RUNNING)
        self.run_dir.save_history(self.history)
        with self.signals.deferred():
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

    def _emergency_save_of(self, step: int | None) -> int | None:
        """The attempt whose emergency save wrote ``step``, when the relaunch resumes from one."""
        for attempt in reversed(self.history.attempts):
            saved = contract.EmergencyCheckpoint.from_dict(attempt.emergency_checkpoint)
            if saved is not None and saved.status is contract.EmergencyStatus.SAVED and saved.step == step:
                return attempt.number
        return None

    def _start_standby(self) -> None:
        """Once the attempt is past its start-up (its first weight sync done), and a restart could still come,
        start the next attempt's driver ahead: it does not compete with this attempt's start-up for CPUs."""
        wanted, self._standby_for = self._standby_for, None
        restarts_left = self.history.restarts_used < self.config.restart.max_restarts
        if wanted is None or not self.config.restart.warm_standby or not restarts_left:
            return
        number, argv = wanted  # only argv's job module matters: the command line comes with the relaunch
        spec = self._launch_spec(number, argv)  # now: the trackers the job reported are in it, as at relaunch
        with self.signals.deferred():
            self._emit_all(self.backend.start_standby(spec))

    # --- while an attempt runs ---

    def _wait_for_end(self, job: RunningJob, resumed_step: int | None) -> AttemptEnd:
        """Wait for the driver to end, looking at the heartbeats every tick: its exit, a stall, a resume that was
        not honoured, or its error record with a driver that did not exit within ``teardown.record_grace_s``."""
        verify = resumed_step is not None and self.config.checkpoints.verify_resume
        watch = self._watch(job, ResumeCheck(resumed_step) if verify and resumed_step is not None else None)
        dog, grace_s = self.config.watchdog, self.config.teardown.record_grace_s
        tick = dog.tick_s if self.heartbeats is not None else None
        if self._preemptions is not None:
            tick = min(tick or self._preemptions.poll_s, self._preemptions.poll_s)
        while True:
            waited = None if watch.record_at is None else self.clock.monotonic() - watch.record_at
            timeout = tick if waited is None else max(0.0, min(tick or grace_s, grace_s - waited))
            status, taken = self._wait(job, watch, timeout, interruptible=True)
            if watch.progress.last_sync_end_at is not None:
                self._start_standby()
            last_step = watch.progress.last_step
            if taken.mismatch is not None or status is not None:
                return AttemptEnd(status=status, mismatch=taken.mismatch, last_step=last_step)
            notices = self._preemptions.notices(job) if self._preemptions is not None else ()
            if notices:
                return self._on_preemption(job, watch, notices)
            if watch.record_at is not None and self.clock.monotonic() - watch.record_at >= grace_s:
                # The job said why it failed; a driver that takes long to die (rollout engines) is not waited for.
                return AttemptEnd(record_grace_over=True, last_step=last_step)
            stall = check(watch.progress, dog, self.clock.monotonic()) if dog.enabled else None
            if stall is not None:
                return AttemptEnd(stall=stall, last_step=last_step)

    def _watch(self, job: RunningJob, resume: ResumeCheck | None = None) -> AttemptWatch:
        progress = ProgressState(started_at=self.clock.monotonic())
        return AttemptWatch(job.attempt, self.run_dir.attempt_dir(job.attempt), progress, resume)

    def _wait(
        self, job: RunningJob, watch: AttemptWatch, timeout_s: float | None, *, interruptible: bool
    ) -> tuple[ExitStatus | None, Taken]:
        """The one place the loop waits on a job: until its driver ends, ``timeout_s`` passes or an urgent beat
        arrives; then what the heartbeats said. ``interruptible``: a stop signal ends the wait (``Interrupted``)."""
        with self.signals.raising() if interruptible else self.signals.deferred():
            status = self.backend.wait(job, timeout_s, wake=self.heartbeats)
        beats: list[Heartbeat] = self.heartbeats.take_received() if self.heartbeats is not None else []
        taken = watch.take(beats, self.clock.now())
        self._act_on(job.attempt, taken)
        return status, taken

    def _act_on(self, attempt: int, taken: Taken) -> None:
        """What the heartbeats said that the run's history and events keep."""
        if taken.record is not None:
            record, grace_s = taken.record, self.config.teardown.record_grace_s
            self.events.emit(ErrorRecordReceived(attempt, record.error_type, record.phase, record.global_step, grace_s))
        for backend, run_id in taken.trackers:
            if backend not in self.history.trackers:  # the first attempt's run is the run's
                self.history.trackers[backend] = run_id
                self.run_dir.save_history(self.history)
                self.events.emit(TrackerRun(attempt, backend, run_id))
        if taken.verified is not None:
            self.history.attempts[attempt - 1].resume_verified = True
            self.run_dir.save_history(self.history)
            self.events.emit(ResumeVerified(attempt, taken.verified.resumed_step, taken.verified.first_step))
        if taken.mismatch is not None:
            mismatch = taken.mismatch
            self.events.emit(ResumeMismatch(attempt, mismatch.resumed_step, mismatch.seen_step, mismatch.reason))

    def _save_before_stop(self, signum: int) -> AttemptEvidence | None:
        """On a stop, when ``restart.save_on_stop_s`` allows it: ask the job (over the heartbeat channel's answers)
        to save at its next safe point and end, and wait for its driver to exit, at most that long or until a
        second signal. The evidence of its end, when it ended."""
        in_flight, wait_s = self._in_flight, policy.save_on_stop_wait(signum, self.config.restart.save_on_stop_s)
        job = in_flight.job
        ended = in_flight.record is None or in_flight.record.ended  # judged already: its teardown was under way
        if job is None or ended or in_flight.torn_down or wait_s <= 0 or self.heartbeats is None:
            return None
        self.heartbeats.request_save(job.attempt)
        self.events.emit(SaveOnStopRequested(job.attempt, wait_s))
        watch = self._watch(job)
        started, status = self.clock.monotonic(), None
        while status is None and not self.signals.repeated:
            left = wait_s - (self.clock.monotonic() - started)
            if left <= 0:
                break
            status, _ = self._wait(job, watch, min(self.config.watchdog.tick_s, left), interruptible=False)
        waited = self.clock.monotonic() - started
        evidence = self._evidence(job.attempt, AttemptEnd(status=status)) if status is not None else None
        saved = evidence.record.emergency_checkpoint if evidence is not None and evidence.record else None
        why = None if status is not None else ("a second signal" if self.signals.repeated else "the wait ran out")
        self.events.emit(SaveOnStop(job.attempt, round(waited, 3), wait_s, status is not None, saved, why))
        return evidence

    # --- a preemption notice ---

    def _on_preemption(self, job: RunningJob, watch: AttemptWatch, notices: Sequence[Drain]) -> AttemptEnd:
        """Ask the job to save at its next safe point (or not, when no save can be had before the node goes),
        wait for its driver within the drain's deadline less ``preemption.margin_s``, and end the attempt as a
        preemption. Further notices meanwhile shorten the wait to the earliest deadline."""
        config, drains, said = self.config.preemption, list(notices), self._preemptions
        assert said is not None
        started = self.clock.monotonic()
        window_s = preemption.save_window_s(drains, said.now_ms(), config)
        response = preemption.respond(
            window_s,
            preemption.typical_step_s(watch.progress.step_intervals_s),
            BeatsReader(self.run_dir.path).longest_save_s(range(1, job.attempt + 1)),
            can_ask=self.heartbeats is not None,
            saving=watch.progress.saving_step is not None,
        )
        said.say_notice(job.attempt, drains, response)
        status, cut_short_by = None, None
        if isinstance(response, AskToSave):
            assert self.heartbeats is not None
            self.heartbeats.request_save(job.attempt)
            while status is None:
                left = window_s - (self.clock.monotonic() - started)
                if left <= 0:
                    cut_short_by = "the drain's deadline, less preemption.margin_s, came first"
                    break
                status, _ = self._wait(job, watch, min(config.poll_s, left), interruptible=True)
                more = said.notices(job) if status is None else ()
                if more:
                    drains += more
                    later = preemption.save_window_s(drains, said.now_ms(), config)
                    window_s = min(window_s, self.clock.monotonic() - started + later)
                    said.say_notice(job.attempt, more, AskToSave(later))
        else:
            cut_short_by = response.reason
        evidence = self._evidence(job.attempt, AttemptEnd(status=status)) if status is not None else None
        saved = evidence.record.emergency_checkpoint if evidence is not None and evidence.record else None
        waited, ended = round(self.clock.monotonic() - started, 3), status is not None
        self.events.emit(PreemptionSave(job.attempt, waited, round(window_s, 3), ended, saved, cut_short_by))
        summary = contract.EmergencyCheckpoint.from_dict(saved)
        what = summary.summary() if summary is not None else f"nothing saved ({cut_short_by or 'the job said nothing'})"
        reason = f"Ray drained {preemption.describe_nodes(drains, said.hostnames())} (a preemption notice); {what}"
        gone = frozenset(drain.node_id for drain in drains)
        return AttemptEnd(status=status, preemption=Preemption(gone, reason), last_step=watch.progress.last_step)

    # --- after an attempt: the judgement's steps ---

    def _capture_stall(self, job: RunningJob, stall: Stall) -> None:
        self.events.emit(StallDetected(job.attempt, stall.event_fields()))
        log_dir = self.run_dir.attempt_dir(job.attempt)
        started = self.clock.monotonic()
        with self.signals.deferred():
            dumps = self.backend.dump_stacks(job, log_dir / "stacks", self.config.watchdog.stack_dump_timeout_s)
        self.events.emit(StacksDumped(job.attempt, self.clock.monotonic() - started, [asdict(d) for d in dumps]))
        write_record(log_dir / "error.json", stall_record(stall, job.attempt, self.clock.now()))

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
        with self.signals.deferred():
            result = self.backend.teardown(job)
            self._in_flight.torn_down = True
        reached = self.checkpoints.newest_complete_step()
        attempt = self.history.attempts[-1]
        attempt.reached_step = reached
        self.history.saw_checkpoint(reached)
        self.run_dir.save_history(self.history)
        self.events.emit(Teardown(job.attempt, reached, result.event_fields()))
        return result

    def _read_nodes(
        self,
        job: RunningJob,
        record: AttemptRecord,
        evidence: AttemptEvidence,
        torn_down: TeardownResult,
        preempted: frozenset[str],
    ) -> NodeFindings:
        """The health of the nodes the attempt used, and the nodes its error names as the place of its failure.
        A node preempted with notice that has gone is not judged: it left as Ray announced, not for its health."""
        with self.signals.deferred():
            seen = self.backend.nodes_after(job, torn_down)
        ran_on = seen.ran_on - preempted
        found = nodes.findings(seen.readings, self._node_readings, ran_on, seen.nodes, seen.demand, seen.single_machine)
        self._node_readings.update({n: r for n, _, r in seen.readings})
        for verdict in found.health:
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
        return found

    def _exclude(self, attempt: int, exclusions: Sequence[Exclusion]) -> tuple[Exclusion, ...]:
        """Drain each node in Ray; the ones Ray accepted."""
        drained = []
        for exclusion in exclusions:
            message = f"verl-supervisor run {self.history.run_id}, after attempt {attempt}: {exclusion.reason}"
            with self.signals.deferred():
                outcome = self.backend.exclude_node(exclusion.node_id, message)
            self.events.emit(
                NodeExcluded(
                    attempt,
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
        return tuple(drained)

    def _back_off(self, decision: Restart) -> None:
        self.history.move_to(RunState.BACKING_OFF)
        self.run_dir.save_history(self.history)
        self.events.emit(
            Backoff(
                next_attempt=len(self.history.attempts) + 1,
                delay_s=decision.delay_s,
                restarts_used=self.history.restarts_used,
                max_restarts=self.config.restart.max_restarts,
                counted=not self.history.attempts[-1].interrupted,
            )
        )
        with self.signals.raising():
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
            self.history.finish(int(code), stop.outcome_name, resumable=code in RESUMABLE_EXIT_CODES)
        self.run_dir.save_history(self.history)
        self.events.emit(RunFinished(int(code), stop.outcome_name, stop.reason, len(self.history.attempts)))
        print(attempts_table(self.history), file=self.console, flush=True)

    def _emit_all(self, events: Iterable[Event]) -> None:
        for event in events:
            self.events.emit(event)
