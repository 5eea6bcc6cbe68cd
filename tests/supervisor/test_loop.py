"""The supervisor's loop, driven in-process by a fake backend, clock and heartbeat channel: every way a run can
go, in milliseconds. The real configuration, policy, run directory, events and checkpoint code are used; the
end-to-end runs with real processes and Ray clusters are in tests/supervisor/e2e."""

from __future__ import annotations

import io
import random
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest

from supervisor.checkpoints import folder
from supervisor.cli import compose_config, to_supervisor_config
from supervisor.loop import Supervisor, new_history
from supervisor.mechanisms.volume import Volume
from supervisor.outcomes import Action, ExitCode, ExitStatus, SupervisorRule
from supervisor.run.events import EventLog, read_events
from supervisor.run.history import AttemptRecord, RunHistory, RunState
from supervisor.run.rundir import RunDirectory
from tests.supervisor.checkpoint_files import write_step
from tests.supervisor.fakes import Attempt, FakeBackend, FakeClock, FakeHeartbeats
from verl_hooks.contract import ErrorRecord, HeartbeatKind, JobExitCode, RecordSource

WEIGHT_SYNC = ErrorRecord(
    error_type="verl_hooks.errors.WeightSyncFatalError",
    message="weight sync failed in phase 'update_weights' at global step 3",
    source=RecordSource.LAUNCHER,
    exit_code=JobExitCode.WEIGHT_SYNC_FATAL,
    phase="update_weights",
    global_step=3,
)


def weight_sync_failure(saves: tuple[int, ...] = (2,)) -> Attempt:
    return Attempt(exit=ExitStatus(code=75), record=WEIGHT_SYNC, saves=saves)


def success(saves: tuple[int, ...] = (6,)) -> Attempt:
    return Attempt(exit=ExitStatus(code=0), saves=saves)


@dataclass
class Run:
    code: ExitCode
    backend: FakeBackend
    clock: FakeClock
    run_dir: Path
    console: str

    def events(self, kind: str | None = None) -> list[dict]:
        return [e for e in read_events(self.run_dir / "events.jsonl") if kind is None or e["event"] == kind]

    def kinds(self) -> list[str]:
        return [e["event"] for e in self.events()]

    def history(self) -> RunHistory:
        history = RunDirectory(self.run_dir).load_history()
        assert history is not None
        return history


def supervise(
    tmp_path: Path,
    attempts: list[Attempt],
    *overrides: str,
    signal_at: dict[str, int] | None = None,
    signal_on_sleep: int | None = None,
    cluster_fails: bool = False,
    prepare_run_dir=None,
    user_args: tuple[str, ...] = (),
    wire_events=None,
    prepare_backend=None,
) -> Run:
    run_path = tmp_path / "run"
    config = to_supervisor_config(
        compose_config([f"run_dir={run_path}", "restart.backoff_jitter_s=0", "watchdog.tick_s=1", *overrides])
    )
    run_dir = RunDirectory(Path(config.run_dir))
    run_dir.path.mkdir(parents=True, exist_ok=True)
    if prepare_run_dir is not None:
        prepare_run_dir(run_dir, Path(config.checkpoints.dir))
    history = new_history(run_dir)
    clock, beats = FakeClock(), FakeHeartbeats()
    clock.signal_on_sleep = signal_on_sleep
    backend = FakeBackend(
        attempts, clock, beats, Path(config.checkpoints.dir), signal_at=signal_at, cluster_fails=cluster_fails
    )
    if prepare_backend is not None:
        prepare_backend(backend)
    console = io.StringIO()
    events = EventLog(run_dir.events_path, history.run_id, console=console, now=lambda: clock.wall)
    if wire_events is not None:
        wire_events(events)
    supervisor = Supervisor(
        config,
        list(user_args),
        run_dir,
        history,
        backend,
        events,
        heartbeats=beats,
        console=console,
        clock=clock.clock(),
        rng=random.Random(7),
    )
    code = supervisor.run()
    return Run(code, backend, clock, run_dir.path, console.getvalue())


def test_a_job_that_succeeds_is_run_once(tmp_path: Path) -> None:
    run = supervise(tmp_path, [success()])
    assert run.code is ExitCode.DONE
    assert run.kinds() == [
        "run_started",
        "cluster_started",
        "attempt_started",
        "attempt_exited",
        "teardown",
        "run_finished",
    ]
    history = run.history()
    assert (history.state, history.outcome, history.exit_code) == (RunState.FINISHED, "done", 0)
    assert history.attempts[0].reached_step == 6
    assert "attempt  started" in run.console


@pytest.mark.parametrize(("after_progress", "sleeps"), [("false", [0.0]), ("true", [1.5])])
def test_a_weight_sync_failure_is_restarted_from_the_newest_checkpoint(
    tmp_path: Path, after_progress: str, sleeps: list[float]
) -> None:
    """An attempt that made progress is restarted at once unless restart.backoff_after_progress says otherwise."""
    overrides = ("restart.backoff_initial_s=1.5", f"restart.backoff_after_progress={after_progress}")
    run = supervise(tmp_path, [weight_sync_failure(saves=(2,)), success()], *overrides)
    assert run.code is ExitCode.DONE
    exited = run.events("attempt_exited")
    assert [(e["exit_code"], e["rule"], e["action"]) for e in exited] == [
        (75, "weight-sync-failure", "restart"),
        (0, "success", "done"),
    ]
    assert exited[0]["record"]["phase"] == "update_weights"
    assert run.clock.sleeps == sleeps
    resumed = run.backend.launched[1].argv
    assert f"trainer.resume_from_path={tmp_path / 'run' / 'checkpoints' / 'global_step_2'}" in resumed
    assert run.events("attempt_started")[1]["resume_step"] == 2
    assert run.kinds().index("teardown") < run.kinds().index("backoff")


@pytest.mark.parametrize(
    ("attempt", "rule", "code"),
    [
        (Attempt(exit=ExitStatus(code=78)), "configuration-error", ExitCode.JOB_FAILED),
        (Attempt(exit=ExitStatus(code=2)), "usage-error", ExitCode.JOB_FAILED),
        (
            Attempt(exit=ExitStatus(code=1), output="Could not override 'trainer.lr'"),
            "hydra-error-in-output",
            ExitCode.JOB_FAILED,
        ),
        (Attempt(exit=ExitStatus(signal=int(signal.SIGKILL))), "killed-by-signal", ExitCode.DONE),
        (Attempt(exit=ExitStatus(code=75)), "weight-sync-exit-code", ExitCode.DONE),
        (Attempt(exit=ExitStatus(code=1)), "default", ExitCode.DONE),
    ],
)
def test_each_rule_decides_restart_or_fail(tmp_path: Path, attempt: Attempt, rule: str, code: ExitCode) -> None:
    run = supervise(tmp_path, [attempt, success()])
    assert run.code is code
    assert run.events("attempt_exited")[0]["rule"] == rule
    assert len(run.backend.launched) == (2 if code is ExitCode.DONE else 1)


def test_the_restart_budget_is_spent_then_exit_4(tmp_path: Path) -> None:
    attempts = [weight_sync_failure(saves=(2 * n,)) for n in range(1, 4)]
    run = supervise(tmp_path, attempts, "restart.max_restarts=2", "restart.backoff_initial_s=1")
    assert run.code is ExitCode.BUDGET_EXHAUSTED
    assert len(run.backend.launched) == 3
    assert run.clock.sleeps == [0.0, 0.0], "an attempt that made progress is restarted at once"
    assert "restart budget exhausted: 2 of 2 restarts used" in run.events("run_finished")[0]["reason"]


def test_failures_without_progress_are_a_crash_loop_with_growing_backoff(tmp_path: Path) -> None:
    attempts = [Attempt(exit=ExitStatus(code=1)) for _ in range(3)]
    run = supervise(tmp_path, attempts, "restart.max_failures_without_progress=3", "restart.backoff_initial_s=1")
    assert run.code is ExitCode.CRASH_LOOP
    assert len(run.backend.launched) == 3
    assert run.clock.sleeps == [1.0, 2.0]
    assert run.events("run_finished")[0]["outcome"] == "crash_loop"
    assert RunDirectory(run.run_dir).load_history().outcome == "crash_loop"


def test_a_failure_that_repeats_at_the_same_step_from_the_same_checkpoint_stops_with_exit_3(tmp_path: Path) -> None:
    attempts = [weight_sync_failure(saves=(2,)), weight_sync_failure(saves=()), success()]
    run = supervise(tmp_path, attempts)
    assert run.code is ExitCode.JOB_FAILED
    assert len(run.backend.launched) == 2
    (finished,) = run.events("run_finished")
    assert finished["outcome"] == "repeated_failure"
    assert (
        "attempts 1 and 2 both failed with WeightSyncFatalError in phase update_weights at global step 3"
        in (finished["reason"])
    )
    failed = run.history().attempts
    assert [(a.failed_at_step, a.error_message) for a in failed] == [(3, WEIGHT_SYNC.message)] * 2
    assert supervise(tmp_path / "off", attempts, "restart.stop_on_repeated_failure=false").code is ExitCode.DONE


def test_a_run_that_lost_its_checkpoints_refuses_to_start_over(tmp_path: Path) -> None:
    def damage(run_dir: RunDirectory, checkpoints: Path) -> None:
        history = RunHistory(run_id="lost", newest_checkpoint_step=4)
        run_dir.save_history(history)

    run = supervise(tmp_path, [success()], prepare_run_dir=damage)
    assert run.code is ExitCode.CRASH_LOOP
    assert not run.backend.launched
    (finished,) = run.events("run_finished")
    assert "refusing to start over from step 0" in finished["reason"]
    assert finished["outcome"] == "no_valid_checkpoint", "exit 5 is shared: the outcome says which give-up it was"
    assert RunDirectory(run.run_dir).load_history().outcome == "no_valid_checkpoint"


def test_an_incomplete_newest_checkpoint_is_set_aside_and_the_complete_one_resumed(tmp_path: Path) -> None:
    def two_steps(run_dir: RunDirectory, checkpoints: Path) -> None:
        write_step(checkpoints, 2, world_size=1, payload=4)
        broken = write_step(checkpoints, 4, world_size=1, payload=4)
        (broken / "data.pt").unlink()

    run = supervise(tmp_path, [success()], prepare_run_dir=two_steps)
    assert run.code is ExitCode.DONE
    assert run.events("checkpoint_set_aside")[0]["step"] == 4
    assert run.events("attempt_started")[0]["resume_step"] == 2


def sync_beats(steps: int, every_s: float = 1.0) -> tuple[tuple[float, HeartbeatKind, dict], ...]:
    beats = []
    for step in range(1, steps + 1):
        at = step * every_s
        beats += [
            (at, HeartbeatKind.SYNC_BEGIN, {"step": step, "backend": "fake"}),
            (at, HeartbeatKind.SYNC_END, {"step": step, "duration_s": 0.1}),
        ]
    return tuple(beats)


STALL_LIMITS = ("watchdog.startup_timeout_s=30", "watchdog.step_timeout_s=8", "watchdog.adaptive=false")


def test_a_stalled_job_is_captured_judged_recorded_then_torn_down(tmp_path: Path) -> None:
    stalls = Attempt(exit=None, beats=sync_beats(3), saves=(2,))
    run = supervise(tmp_path, [stalls, success()], *STALL_LIMITS)
    assert run.code is ExitCode.DONE
    stall = run.events("stall_detected")[0]
    assert (stall["stall_kind"], stall["last_step"]) == ("job_stall", 3)
    assert 8 < stall["silent_s"] <= 9, "detected on the first tick past the limit"
    exited = run.events("attempt_exited")[0]
    assert (exited["rule"], exited["exit_code"], exited["signal"]) == ("stalled", None, None)
    assert exited["record"]["source"] == "supervisor-watchdog"
    first = run.kinds()[: run.kinds().index("backoff")]
    assert first[-4:] == ["stall_detected", "stacks_dumped", "attempt_exited", "teardown"]
    assert run.backend.calls.index("dump_stacks") < run.backend.calls.index("teardown")
    assert (tmp_path / "run" / "attempts" / "1" / "heartbeats.jsonl").read_text().count("\n") == 6


def test_stalled_and_exited_attempts_are_recorded_in_the_same_order(tmp_path: Path) -> None:
    stalled = supervise(tmp_path / "a", [Attempt(exit=None, beats=sync_beats(2)), success()], *STALL_LIMITS)
    exited = supervise(tmp_path / "b", [Attempt(exit=ExitStatus(code=1)), success()], *STALL_LIMITS)

    def per_attempt(run: Run) -> list[str]:
        return [k for k in run.kinds() if k in ("attempt_started", "attempt_exited", "teardown", "backoff")]

    assert per_attempt(stalled) == per_attempt(exited)
    assert stalled.history().attempts[0].action is Action.restart


@pytest.mark.parametrize("step", ["prepare", "launch", "wait", "teardown", "sleep"])
def test_a_stop_signal_at_any_step_tears_down_what_runs_and_exits_143(tmp_path: Path, step: str) -> None:
    sigterm = int(signal.SIGTERM)
    run = supervise(
        tmp_path,
        [weight_sync_failure(), success()],
        signal_at={step: sigterm} if step != "sleep" else None,
        signal_on_sleep=sigterm if step == "sleep" else None,
    )
    assert run.code is ExitCode.INTERRUPTED_SIGTERM
    assert len(run.backend.launched) == (0 if step == "prepare" else 1)
    started, torn_down = len(run.events("attempt_started")), len(run.events("teardown"))
    assert torn_down == started, "every attempt that started was torn down"
    history = run.history()
    assert (history.outcome, history.exit_code) == ("interrupted_sigterm", 143)
    assert all(a.ended for a in history.attempts)
    if step in ("launch", "wait"):
        assert (history.attempts[0].rule, history.attempts[0].action) == ("interrupted", Action.fail)
        assert run.events("signal_received")[0]["signal"] == "SIGTERM"
    assert run.backend.calls[-1] == "close"


def test_a_run_stopped_by_a_signal_is_continued_without_spending_its_budget(tmp_path: Path) -> None:
    """A preemption or a requeue sends SIGTERM: the supervisor started again on the run directory continues the
    run, and the attempt the signal ended is neither a restart nor a crash-loop failure."""
    sigterm = int(signal.SIGTERM)
    stopped = supervise(tmp_path, [weight_sync_failure()], "restart.max_restarts=1", signal_at={"wait": sigterm})
    assert stopped.code is ExitCode.INTERRUPTED_SIGTERM
    history = stopped.history()
    assert (history.state, history.outcome) == (RunState.STOPPED, "interrupted_sigterm")
    assert "outcome: interrupted_sigterm (exit 143)" in stopped.console

    continued = supervise(
        tmp_path,
        [weight_sync_failure(), success()],
        "restart.max_restarts=1",
    )
    assert continued.code is ExitCode.DONE, continued.console
    history = continued.history()
    assert [a.rule for a in history.attempts] == ["interrupted", "weight-sync-failure", "success"]
    assert (history.restarts_used, history.supervisor_starts) == (1, 2)
    assert (history.state, history.outcome, history.exit_code) == (RunState.FINISHED, "done", 0)


def test_a_restarted_supervisor_counts_the_attempt_it_lost_and_continues_the_budget(tmp_path: Path) -> None:
    def left_in_flight(run_dir: RunDirectory, checkpoints: Path) -> None:
        history = RunHistory(run_id="continued", supervisor_starts=1, state=RunState.ATTEMPT_RUNNING)
        history.attempts.append(AttemptRecord(1, 1.0, None, ended_at=2.0, exit_code=75, action=Action.restart))
        history.attempts.append(AttemptRecord(2, 3.0, 2))
        run_dir.save_history(history)
        write_step(checkpoints, 2, world_size=1, payload=4)
        write_step(checkpoints, 4, world_size=1, payload=4)

    run = supervise(tmp_path, [success()], "restart.max_restarts=2", prepare_run_dir=left_in_flight)
    assert run.code is ExitCode.DONE
    history = run.history()
    assert [a.number for a in history.attempts] == [1, 2, 3]
    assert (history.attempts[1].rule, history.attempts[1].reached_step) == ("supervisor-restarted", 4)
    assert history.supervisor_starts == 2
    assert run.backend.calls[:2] == ["stale_processes", "prepare"]
    assert run.events("attempt_started")[0]["resume_step"] == 4
    assert not run.clock.sleeps, "the time the supervisor was gone counts as the backoff"


def test_a_lost_attempt_that_spends_the_budget_stops_the_run(tmp_path: Path) -> None:
    def left_in_flight(run_dir: RunDirectory, checkpoints: Path) -> None:
        history = RunHistory(run_id="spent", supervisor_starts=1, state=RunState.ATTEMPT_RUNNING)
        history.attempts.append(AttemptRecord(1, 1.0, None))
        run_dir.save_history(history)

    run = supervise(tmp_path, [], "restart.max_restarts=0", prepare_run_dir=left_in_flight)
    assert run.code is ExitCode.BUDGET_EXHAUSTED
    assert not run.backend.launched


def test_an_attempt_that_cannot_be_fenced_stops_the_run_with_exit_6(tmp_path: Path) -> None:
    stuck = Attempt(exit=ExitStatus(code=75), record=WEIGHT_SYNC, fence_problems=("actor Stubborn still alive",))
    run = supervise(tmp_path, [stuck, success()])
    assert run.code is ExitCode.ENVIRONMENT_FAILURE
    assert len(run.backend.launched) == 1
    assert run.events("teardown")[0]["fenced"] is False
    assert run.events("run_finished")[0]["reason"] == "actor Stubborn still alive"


def test_a_cluster_that_cannot_start_exits_6_before_any_attempt(tmp_path: Path) -> None:
    run = supervise(tmp_path, [success()], cluster_fails=True)
    assert run.code is ExitCode.ENVIRONMENT_FAILURE
    assert not run.backend.launched
    assert "ports taken" in run.events("run_finished")[0]["reason"]


def test_each_attempt_gets_the_contracts_variables(tmp_path: Path) -> None:
    run = supervise(tmp_path, [success()], "+job.env.MY_VAR=1")
    env = run.backend.launched[0].env
    assert env["MY_VAR"] == "1"
    assert env["VERL_SUPERVISOR_ATTEMPT"] == "1"
    assert env["VERL_SUPERVISOR_ERROR_FILE"].endswith("attempts/1/error.json")
    assert env["VERL_SUPERVISOR_HEARTBEAT_TOKEN"] == "fake-token"
    assert "fake-token" not in (tmp_path / "run" / "events.jsonl").read_text(), "the token is a secret"


def test_an_attempt_gets_the_longest_save_its_predecessors_timed(tmp_path: Path) -> None:
    """The emergency save's deadline before the relaunched job has timed a save of its own: from the earlier
    attempts' saves, not the 600 s default (finding 2 of the emergency save's review)."""
    saves = tuple(
        (1.0 + i, HeartbeatKind.CHECKPOINT_SAVED, {"step": step, "duration_s": seconds})
        for i, (step, seconds) in enumerate([(2, 4.25), (4, 7.5)])
    )
    first = Attempt(exit=ExitStatus(code=75), record=WEIGHT_SYNC, beats=saves, runs_s=60.0)
    run = supervise(tmp_path, [first, success()])
    assert run.code is ExitCode.DONE
    # Said in the answers to the job's beats, not in its environment: a standby driver started during attempt 1
    # would otherwise carry a value its attempt's later saves change, and be discarded at the relaunch.
    assert run.backend.past_save_at_launch == [None, 7.5], "the first attempt has no earlier saves"
    assert not any("PAST_SAVE" in name for launched in run.backend.launched for name in launched.env)


# --- checkpoints: layouts the supervisor cannot judge, rotation, resume verified -----------------------------------


def test_a_checkpoint_in_an_unknown_layout_stops_the_run_before_anything_is_touched(tmp_path: Path) -> None:
    def titan_newest(run_dir: RunDirectory, checkpoints: Path) -> None:
        write_step(checkpoints, 2, world_size=1, payload=4)
        (checkpoints / "global_step_4" / "step-4").mkdir(parents=True)

    run = supervise(tmp_path, [success()], prepare_run_dir=titan_newest)
    assert run.code is ExitCode.UNKNOWN_CHECKPOINT_LAYOUT
    assert run.kinds() == ["run_started", "checkpoints_unjudgeable", "run_finished"]
    assert "global_step_4" in run.events("run_finished")[0]["reason"]
    checkpoints = run.run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["global_step_2", "global_step_4"]


def test_the_runs_keep_limit_is_applied_across_attempts(tmp_path: Path) -> None:
    run = supervise(
        tmp_path,
        [weight_sync_failure(saves=(1, 2, 3)), weight_sync_failure(saves=(4, 5)), success(saves=(6,))],
        user_args=("trainer.max_actor_ckpt_to_keep=2",),
    )
    assert run.code is ExitCode.DONE
    rotated = [(e["step"], e["role"], e["removed"]) for e in run.events("checkpoint_rotated")]
    assert rotated == [(1, "actor", True), (2, "actor", True), (3, "actor", True)]
    checkpoints = run.run_dir / "checkpoints"
    assert sorted(p.parent.name for p in checkpoints.glob("global_step_*/actor")) == [
        "global_step_4",
        "global_step_5",
        "global_step_6",
    ]
    assert (checkpoints / "global_step_1" / "data.pt").exists(), "verl removes the role folder, not the step"


def test_without_a_keep_limit_nothing_is_removed(tmp_path: Path) -> None:
    run = supervise(tmp_path, [weight_sync_failure(saves=(1, 2, 3)), success()])
    assert run.code is ExitCode.DONE
    assert run.events("checkpoint_rotated") == []


def resumed(first_steps: tuple[int, ...], then_exit: ExitStatus | None = None) -> Attempt:
    beats = tuple(
        (1.0 + i, HeartbeatKind.SYNC_BEGIN, {"step": s, "backend": "fake"}) for i, s in enumerate(first_steps)
    )
    return Attempt(exit=then_exit, beats=beats, runs_s=60.0)


def test_a_resume_that_is_honoured_is_verified_from_the_first_syncs(tmp_path: Path) -> None:
    run = supervise(tmp_path, [weight_sync_failure(saves=(2,)), resumed((2, 3), then_exit=ExitStatus(code=0))])
    assert run.code is ExitCode.DONE
    assert [(e["resume_step"], e["first_step"]) for e in run.events("resume_verified")] == [(2, 3)]


@pytest.mark.parametrize(
    ("syncs", "seen"),
    [((0, 1), 0), ((2, 4), 4), ((5,), 5)],
    ids=["started-over", "skipped-a-step", "loaded-another-folder"],
)
def test_a_resume_that_is_not_honoured_stops_the_attempt_at_once(tmp_path: Path, syncs: tuple, seen: int) -> None:
    run = supervise(tmp_path, [weight_sync_failure(saves=(2,)), resumed(syncs)])
    assert run.code is ExitCode.RESUME_NOT_HONOURED
    mismatch = run.events("resume_mismatch")[0]
    assert (mismatch["attempt"], mismatch["resume_step"], mismatch["seen_step"]) == (2, 2, seen)
    exited = run.events("attempt_exited")[1]
    assert (exited["rule"], exited["action"], exited["exit_code"]) == ("resume-mismatch", "fail", None)
    assert exited["record"]["source"] == "supervisor-resume-check"
    assert run.kinds()[-3:] == ["attempt_exited", "teardown", "run_finished"]
    assert exited["duration_s"] <= len(syncs) + 1, "stopped at the mismatch, not when the job would have ended"
    assert "global_step_2" in run.events("run_finished")[0]["reason"]


def test_resume_verification_can_be_turned_off(tmp_path: Path) -> None:
    attempts = [weight_sync_failure(saves=(2,)), resumed((0, 1), then_exit=ExitStatus(code=0))]
    run = supervise(tmp_path, attempts, "checkpoints.verify_resume=false")
    assert run.code is ExitCode.DONE
    assert run.events("resume_mismatch") == []


def test_a_driver_slow_to_die_after_its_error_record_is_torn_down_after_the_grace(tmp_path: Path) -> None:
    """The launcher posts the record before its driver exits; a driver that then takes long to die (rollout
    engines) is not waited for: the attempt ends record_grace_s after the record, judged by it."""
    record_beat = (3.0, HeartbeatKind.ERROR_RECORD, {"record": WEIGHT_SYNC.to_dict()})
    dying = Attempt(exit=ExitStatus(code=75), runs_s=600.0, beats=(record_beat,), saves=(2,))
    run = supervise(tmp_path, [dying, success()], "teardown.record_grace_s=2")
    assert run.code is ExitCode.DONE
    received = run.events("error_record_received")[0]
    assert (received["attempt"], received["phase"], received["global_step"]) == (1, "update_weights", 3)
    exited = run.events("attempt_exited")[0]
    assert (exited["rule"], exited["action"], exited["exit_code"]) == ("weight-sync-failure", "restart", None)
    assert exited["duration_s"] == pytest.approx(5.0, abs=1.0), "3 s to the record, then 2 s of grace"
    assert exited["record"]["source"] == "launcher"


def test_a_driver_that_exits_within_the_grace_is_judged_by_its_exit_and_record(tmp_path: Path) -> None:
    record_beat = (3.0, HeartbeatKind.ERROR_RECORD, {"record": WEIGHT_SYNC.to_dict()})
    exits = Attempt(exit=ExitStatus(code=75), runs_s=3.5, beats=(record_beat,), saves=(2,))
    run = supervise(tmp_path, [exits, success()], "teardown.record_grace_s=2")
    exited = run.events("attempt_exited")[0]
    assert (exited["rule"], exited["exit_code"]) == ("weight-sync-failure", 75)
    assert exited["duration_s"] == pytest.approx(3.5, abs=0.5)


def test_the_next_attempts_driver_is_started_once_the_attempt_has_synced_with_its_exact_environment(
    tmp_path: Path,
) -> None:
    """The standby is asked for after the first weight sync (not during the start-up it would compete with), once
    per attempt, with the very environment the relaunch then gets: what makes the backend's fit check pass."""
    synced_then_failed = Attempt(exit=ExitStatus(code=75), record=WEIGHT_SYNC, saves=(2,), beats=sync_beats(3))
    run = supervise(tmp_path, [synced_then_failed, success()])
    assert run.code is ExitCode.DONE
    (asked_at, spec), *_ = run.backend.standbys
    assert len(run.backend.standbys) == 1, "attempt 2 never synced: no standby asked for attempt 3"
    assert asked_at >= 1.0, "not before the first sync's end (1 s after launch)"
    relaunch = run.backend.launched[1]
    assert (spec.attempt, spec.env, spec.cwd) == (2, relaunch.env, relaunch.cwd)
    assert spec.argv[:3] == relaunch.argv[:3], "its job module comes from the running attempt's command"
    calls = run.backend.calls
    assert calls.index("start_standby") < calls.index("teardown"), "ahead: while attempt 1 still ran"


@pytest.mark.parametrize(
    "overrides", [("restart.warm_standby=false",), ("restart.max_restarts=0",)], ids=["off", "no-restart-left"]
)
def test_no_standby_when_turned_off_or_no_restart_can_come(tmp_path: Path, overrides: tuple[str, ...]) -> None:
    synced = Attempt(exit=ExitStatus(code=0), saves=(6,), beats=sync_beats(3))
    run = supervise(tmp_path, [synced], *overrides)
    assert run.code is ExitCode.DONE
    assert run.backend.standbys == []


def full_volume_under(monkeypatch: pytest.MonkeyPatch, free_bytes: int) -> None:
    """The checkpoint folder's volume, as the loop measures it, with ``free_bytes`` left."""
    monkeypatch.setattr(folder, "volume_of", lambda path: Volume("/ckpt", "/dev/nvme1n1", 100 << 30, free_bytes))


def test_a_failed_attempt_on_a_volume_that_cannot_hold_the_next_save_stops_the_run_with_exit_3(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    full_volume_under(monkeypatch, 0)
    torch_on_a_full_disk = Attempt(exit=ExitStatus(code=1), saves=(2,), output="unexpected pos 128 vs 0\n")
    run = supervise(tmp_path, [torch_on_a_full_disk, success()])
    assert run.code is ExitCode.JOB_FAILED
    assert len(run.backend.launched) == 1, "no attempt is launched into the full disk"
    (exited,) = run.events("attempt_exited")
    assert (exited["rule"], exited["action"]) == ("disk-full", "fail")
    assert exited["reason"].startswith("the checkpoint disk is full: the volume /ckpt (/dev/nvme1n1) holding ")
    assert run.history().attempts[0].rule is SupervisorRule.DISK_FULL


def test_a_launch_onto_a_volume_low_on_room_is_warned_of(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    full_volume_under(monkeypatch, 1024)

    def a_saved_step(run_dir: RunDirectory, checkpoints: Path) -> None:
        write_step(checkpoints, 2, world_size=1, payload=4096)

    run = supervise(tmp_path, [success()], prepare_run_dir=a_saved_step)
    assert run.code is ExitCode.DONE, "a warning, not a verdict: the job did not fail"
    (low,) = run.events("checkpoint_space_low")
    assert low["free_bytes"] == 1024
    assert low["newest_step_bytes"] > 4096
    assert "WARNING: the next checkpoint may not fit: the volume /ckpt (/dev/nvme1n1)" in run.console
    assert run.kinds().index("checkpoint_space_low") < run.kinds().index("attempt_started")
