"""The guard's decisions and data, without Ray: cleanup plans, fault specs, settings, errors and records."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
from typing import Any

import psutil
import pytest
from ray import cloudpickle

from supervisor.mechanisms.processes import wait_for
from verl_hooks.contract import ErrorRecord, RecordSource, read_record, write_record
from verl_hooks.errors import (
    CleanupOutcome,
    CleanupStatus,
    HookSettingsError,
    InjectedFault,
    WeightSyncFatalError,
    WeightSyncTimeout,
    find_weight_sync_error,
)
from verl_hooks.faults import FaultAction, FaultPlan, FaultSpec, StepPoint, fire_blocking, parse_fault_specs
from verl_hooks.installer import fault_plan
from verl_hooks.phases import MULTI_PHASE_ORDER, CleanupStep, SyncPhase, plan_cleanup
from verl_hooks.record import record_for_exception
from verl_hooks.settings import HookSettings

P = SyncPhase
C = CleanupStep


def _failed_in(phase: SyncPhase) -> tuple[list[SyncPhase], set[SyncPhase]]:
    """Phases entered and completed when a multi-phase sync fails inside ``phase``."""
    index = MULTI_PHASE_ORDER.index(phase)
    return list(MULTI_PHASE_ORDER[: index + 1]), set(MULTI_PHASE_ORDER[:index])


@pytest.mark.parametrize(
    ("failed", "expected"),
    [
        (P.ABORT, [C.RESUME_GENERATION]),
        (P.RELEASE_KV_CACHE, [C.RESUME_KV_CACHE, C.RESUME_GENERATION]),
        (P.BUILD_PROCESS_GROUP, [C.FINALIZE_ENGINES, C.RESUME_KV_CACHE, C.RESUME_GENERATION]),
        (P.UPDATE_WEIGHTS, [C.FINALIZE_ENGINES, C.RESUME_KV_CACHE, C.RESUME_GENERATION]),
        (P.FINALIZE, [C.FINALIZE_ENGINES, C.RESUME_KV_CACHE, C.RESUME_GENERATION]),
        (P.RESUME_KV_CACHE, [C.RESUME_KV_CACHE, C.RESUME_GENERATION]),
        (P.RESUME_GENERATION, [C.RESUME_GENERATION]),
    ],
)
def test_cleanup_plan_for_each_multi_phase_failure(failed: SyncPhase, expected: list[CleanupStep]) -> None:
    entered, completed = _failed_in(failed)
    assert plan_cleanup(entered, completed) == expected


def test_cleanup_plan_for_naive_failure_wakes_the_rollout() -> None:
    assert plan_cleanup([P.NAIVE], set()) == [C.WAKE_UP]


def test_nothing_to_clean_when_every_phase_completed() -> None:
    assert plan_cleanup(list(MULTI_PHASE_ORDER), set(MULTI_PHASE_ORDER)) == []


def test_an_abandoned_sync_starts_no_further_phase() -> None:
    """A ray.get that returns after the guard gave up must not go on into the next phase (pushing weights into a
    rollout the cleanup already resumed)."""
    from verl_hooks.guard import PhaseTracker, _SyncContext

    sync = _SyncContext(PhaseTracker(), FaultPlan((), attempt=1), global_step=3, backend="nccl")
    sync.enter_blocking(P.BUILD_PROCESS_GROUP)
    sync.abandoned.set()
    with pytest.raises(WeightSyncTimeout, match="abandoned this weight sync; phase 'update_weights' not started"):
        sync.enter_blocking(P.UPDATE_WEIGHTS)
    assert sync.tracker.entered == [P.BUILD_PROCESS_GROUP]


class _TrainerGroup:
    """The trainer's worker group as verl's build_process_group calls it: notes what was submitted."""

    world_size = 2

    def __init__(self) -> None:
        self.submitted: list[str] = []

    def execute_checkpoint_engine(self, methods: list[str], *args, **kwargs) -> list[str]:
        self.submitted.append(methods[0])
        return [f"ref-{methods[0]}-{rank}" for rank in range(len(methods))]


@pytest.mark.parametrize("method", ["prepare", "init_process_group", "finalize"])
def test_an_abandoned_sync_starts_no_trainer_task_after_the_verdict(method: str) -> None:
    """Finding 3 of the emergency save's review: a ``prepare`` that returns after the guard gave up must not go on
    to submit ``init_process_group`` on the trainer's ranks while the emergency save runs there."""
    from verl_hooks.guard import PhaseTracker, _ActorGroupView, _SyncContext

    sync = _SyncContext(PhaseTracker(), FaultPlan((), attempt=1), global_step=3, backend="nccl")
    group = _TrainerGroup()
    view = _ActorGroupView(group, sync)
    assert view.execute_checkpoint_engine([method] * 2) == [f"ref-{method}-0", f"ref-{method}-1"]
    sync.abandoned.set()
    with pytest.raises(WeightSyncTimeout, match="abandoned this weight sync"):
        view.execute_checkpoint_engine([method] * 2)
    assert group.submitted == [method], "nothing submitted after the verdict"
    assert len(sync.trainer_tasks.refs) == 2, "what was submitted before is still judged"


def test_fault_specs_parse_every_part() -> None:
    specs = parse_fault_specs("update_weights:raise@3#1, abort:hang, naive:exit#2")
    assert specs == (
        FaultSpec(P.UPDATE_WEIGHTS, FaultAction.RAISE, step=3, attempt=1),
        FaultSpec(P.ABORT, FaultAction.HANG),
        FaultSpec(P.NAIVE, FaultAction.EXIT, attempt=2),
    )
    assert [str(s) for s in specs] == ["update_weights:raise@3#1", "abort:hang", "naive:exit#2"]


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("update_weight:raise", "unknown phase 'update_weight'"),
        ("update_weights:explode", "unknown action 'explode'"),
        ("update_weights", "cannot parse 'update_weights'"),
        ("update_weights:raise@x", "cannot parse"),
        ("update_weights:raise#0", "numbered from 1"),
        ("unknown:raise", "unknown phase"),
    ],
)
def test_bad_fault_specs_are_clear_errors(text: str, complaint: str) -> None:
    with pytest.raises(HookSettingsError, match=complaint):
        parse_fault_specs(text)


def test_empty_fault_spec_means_no_faults() -> None:
    assert parse_fault_specs("") == ()
    assert parse_fault_specs(None) == ()


def test_fault_fires_once_on_its_step_and_attempt_only() -> None:
    spec = FaultSpec(P.FINALIZE, FaultAction.RAISE, step=3, attempt=1)
    on_attempt_2 = FaultPlan((spec,), attempt=2)
    assert on_attempt_2.take(P.FINALIZE, 3) is None
    plan = FaultPlan((spec,), attempt=1)
    assert plan.take(P.FINALIZE, 2) is None
    assert plan.take(P.ABORT, 3) is None
    assert plan.take(P.FINALIZE, 3) == spec
    assert plan.take(P.FINALIZE, 3) is None


def test_a_fault_in_a_ledger_fires_once_per_run_whichever_attempt_reaches_its_step(tmp_path) -> None:
    ledger = str(tmp_path / "ledger.jsonl")
    raise_at_5, hang_at_8 = parse_fault_specs("update_weights:raise@5,update_weights:hang@8")
    first = FaultPlan((raise_at_5, hang_at_8), attempt=1, ledger_path=ledger)
    assert first.take(P.UPDATE_WEIGHTS, 5) == raise_at_5
    # The next attempt (another process) resumes before step 5 and trains it again: the raise is spent, but the
    # hang at step 8, which no process reached, still fires.
    second = FaultPlan((raise_at_5, hang_at_8), attempt=2, ledger_path=ledger)
    assert second.take(P.UPDATE_WEIGHTS, 5) is None
    assert second.take(P.UPDATE_WEIGHTS, 8) == hang_at_8
    third = FaultPlan((raise_at_5, hang_at_8), attempt=3, ledger_path=ledger)
    assert third.take(P.UPDATE_WEIGHTS, 5) is None
    assert third.take(P.UPDATE_WEIGHTS, 8) is None
    lines = [json.loads(line) for line in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    assert [(e["spec"], e["step"], e["attempt"]) for e in lines] == [
        ("update_weights:raise@5", 5, 1),
        ("update_weights:hang@8", 8, 2),
    ]


def test_without_a_ledger_each_process_fires_the_fault_again() -> None:
    (spec,) = parse_fault_specs("update_weights:raise@5")
    assert FaultPlan((spec,), attempt=1).take(P.UPDATE_WEIGHTS, 5) == spec
    assert FaultPlan((spec,), attempt=2).take(P.UPDATE_WEIGHTS, 5) == spec


def test_the_ledger_records_a_fault_on_disk_before_it_fires(tmp_path) -> None:
    """``exit`` SIGKILLs the process as it fires: the record must already be there for the next attempt."""
    ledger = tmp_path / "ledger.jsonl"
    (spec,) = parse_fault_specs("reward:exit@4")
    spec_fired = FaultPlan((spec,), attempt=1, ledger_path=str(ledger)).take(StepPoint.REWARD, 4)
    assert spec_fired == spec
    assert json.loads(ledger.read_text())["spec"] == "reward:exit@4", "written before take() handed it out"


def test_an_unusable_ledger_fires_nothing(tmp_path, caplog) -> None:
    (spec,) = parse_fault_specs("update_weights:raise@5")
    plan = FaultPlan((spec,), attempt=1, ledger_path=str(tmp_path / "missing" / "ledger.jsonl"))
    assert plan.take(P.UPDATE_WEIGHTS, 5) is None
    assert "not fired" in caplog.text


def _take_from_a_process_of_its_own(ledger: str, start: Any, results: Any) -> None:
    (spec,) = parse_fault_specs("update_weights:raise@5")
    start.wait()
    results.put(FaultPlan((spec,), attempt=1, ledger_path=ledger).take(P.UPDATE_WEIGHTS, 5) is not None)


def test_processes_racing_for_a_ledgered_fault_fire_it_once(tmp_path) -> None:
    context = multiprocessing.get_context("fork")
    start, results = context.Event(), context.Queue()
    ledger = str(tmp_path / "ledger.jsonl")
    processes = [
        context.Process(target=_take_from_a_process_of_its_own, args=(ledger, start, results)) for _ in range(8)
    ]
    for process in processes:
        process.start()
    start.set()
    fired = [results.get(timeout=30) for _ in processes]
    for process in processes:
        process.join(10)
    assert sorted(fired) == [False] * 7 + [True]
    assert len((tmp_path / "ledger.jsonl").read_text().splitlines()) == 1


def test_an_orphan_fault_leaves_a_helper_without_marker_or_parent_and_lets_the_sync_go_on(
    tmp_path, monkeypatch
) -> None:
    log = tmp_path / "faults.jsonl"
    monkeypatch.setenv("VERL_HOOKS_FAULT_LOG", str(log))
    monkeypatch.setenv("VERL_SUPERVISOR_RUN_ID", "the-run")
    (spec,) = parse_fault_specs("update_weights:orphan@3#1")
    fire_blocking(spec, 3)  # returns: the sync is not failed
    assert wait_for(lambda: log.exists() and log.read_text().strip(), 10)
    helper = psutil.Process(json.loads(log.read_text().splitlines()[0])["orphan_pid"])
    try:
        assert helper.ppid() != os.getpid(), "its parent exited: it is nobody's descendant"
        assert os.getsid(helper.pid) == helper.pid, "a session of its own"
        assert "VERL_SUPERVISOR_RUN_ID" not in helper.environ(), "no marker"
    finally:
        helper.kill()


def test_settings_come_from_the_environment() -> None:
    settings = HookSettings.from_env(
        {
            "VERL_HOOKS_SYNC_TIMEOUT_S": "12.5",
            "VERL_HOOKS_CLEANUP_STEP_TIMEOUT_S": "3",
            "VERL_HOOKS_FAULTS": "abort:raise#2",
            "VERL_SUPERVISOR_ATTEMPT": "2",
            "VERL_SUPERVISOR_ERROR_FILE": "/tmp/x.json",
            "VERL_HOOKS_FAULT_LEDGER": "/tmp/ledger.jsonl",
        }
    )
    assert settings.sync_timeout_s == 12.5
    assert settings.cleanup_step_timeout_s == 3
    assert settings.faults == (FaultSpec(P.ABORT, FaultAction.RAISE, attempt=2),)
    assert settings.attempt == 2
    assert settings.error_file == "/tmp/x.json"
    assert settings.fault_ledger == "/tmp/ledger.jsonl"
    assert fault_plan(settings).ledger_path == "/tmp/ledger.jsonl", "the installed plan keeps to the ledger"
    assert HookSettings.from_env({}) == HookSettings()


@pytest.mark.parametrize(
    "environ",
    [
        {"VERL_HOOKS_SYNC_TIMEOUT_S": "soon"},
        {"VERL_HOOKS_SYNC_TIMEOUT_S": "0"},
        {"VERL_SUPERVISOR_ATTEMPT": "first"},
        {"VERL_SUPERVISOR_ATTEMPT": "0"},
        {"VERL_HOOKS_FAULTS": "abort"},
    ],
)
def test_bad_settings_are_refused(environ: dict[str, str]) -> None:
    with pytest.raises(HookSettingsError):
        HookSettings.from_env(environ)


def _fatal() -> WeightSyncFatalError:
    try:
        try:
            raise InjectedFault("boom in update")
        except InjectedFault as cause:
            raise WeightSyncFatalError.from_failure(
                cause,
                phase=P.UPDATE_WEIGHTS,
                global_step=7,
                backend="cpu_gloo",
                elapsed_s=1.5,
                cleanup=[
                    CleanupOutcome("finalize_engines", CleanupStatus.OK, 0.1),
                    CleanupOutcome("resume_kv_cache", CleanupStatus.TIMED_OUT, 3.0, "did not finish within 3 s"),
                ],
                hang=False,
            ) from cause
    except WeightSyncFatalError as fatal:
        return fatal
    raise AssertionError("unreachable")


@pytest.mark.parametrize("dumps", [pickle.dumps, cloudpickle.dumps])
def test_fatal_error_keeps_every_field_through_pickling(dumps) -> None:
    original = _fatal()
    copy = pickle.loads(dumps(original))
    assert type(copy) is WeightSyncFatalError
    assert copy.to_dict() == original.to_dict()
    assert copy.phase is P.UPDATE_WEIGHTS
    assert copy.cleanup[1].status is CleanupStatus.TIMED_OUT
    assert "InjectedFault: boom in update" in copy.cause_traceback
    assert "resume_kv_cache" in str(copy)


def test_a_step_failures_emergency_outcome_reaches_the_drivers_record_through_ray() -> None:
    """What the trainer hook notes on a failure outside the sync (in the TaskRunner actor) travels on the exception
    to the driver, wrapped as Ray wraps it, into the error record (the slow e2e: test_emergency_checkpoint.py)."""
    from ray.exceptions import RayTaskError

    from verl_hooks.errors import find_step_failure_checkpoint, note_step_failure_checkpoint

    failure = ValueError("the reward function raised")
    outcome = {"status": "saved", "trigger": "step_failure", "step": 4, "failed_step": 5, "reason": None}
    note_step_failure_checkpoint(failure, outcome)
    wrapped = RayTaskError("TaskRunner.run", "Traceback ...", failure).as_instanceof_cause()
    at_driver = pickle.loads(cloudpickle.dumps(wrapped))  # Ray's serializer for errors is cloudpickle

    assert find_step_failure_checkpoint(at_driver) == outcome
    record = record_for_exception(at_driver, exit_code=1, source=RecordSource.LAUNCHER)
    assert record.error_type == "ValueError"
    assert (record.emergency_checkpoint, record.global_step) == (outcome, 5)


def test_fatal_error_is_found_through_wrappers_and_chains() -> None:
    fatal = _fatal()

    class Wrapper(RuntimeError):
        def __init__(self, cause: BaseException) -> None:
            super().__init__("wrapped")
            self.cause = cause

    with pytest.raises(RuntimeError) as outer:
        raise RuntimeError("driver side") from Wrapper(fatal)
    assert find_weight_sync_error(outer.value) is fatal
    assert find_weight_sync_error(ValueError("unrelated")) is None


def test_record_for_weight_sync_error_has_its_fields(tmp_path) -> None:
    record = record_for_exception(_fatal(), exit_code=75, source=RecordSource.LAUNCHER, attempt=2)
    assert record.error_type == "verl_hooks.errors.WeightSyncFatalError"
    assert (record.phase, record.global_step, record.backend, record.hang) == ("update_weights", 7, "cpu_gloo", False)
    assert [o["status"] for o in record.cleanup] == ["ok", "timed_out"]
    assert "boom in update" in record.traceback
    path = tmp_path / "error.json"
    assert write_record(path, record)
    data = json.loads(path.read_text())
    assert data["schema_version"] == 1
    assert data["exit_code"] == 75
    assert read_record(path) == record


def test_record_for_other_failures_names_the_root_cause() -> None:
    try:
        try:
            raise KeyError("missing")
        except KeyError as inner:
            raise RuntimeError("outer") from inner
    except RuntimeError as exc:
        record = record_for_exception(exc, exit_code=1, source=RecordSource.LAUNCHER)
    assert record.error_type == "KeyError"
    assert record.phase is None, "not a weight-sync failure"


def test_first_record_wins(tmp_path) -> None:
    path = tmp_path / "error.json"
    first = ErrorRecord(error_type="A", message="first", source=RecordSource.GUARD_BACKSTOP)
    second = ErrorRecord(error_type="B", message="second", source=RecordSource.LAUNCHER)
    assert write_record(path, first)
    assert not write_record(path, second)
    assert read_record(path).message == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["error.json"]


@pytest.mark.parametrize("content", ["not json", json.dumps({"schema_version": 99, "error_type": "X"}), "[]"])
def test_unreadable_records_are_ignored(tmp_path, content: str) -> None:
    path = tmp_path / "error.json"
    path.write_text(content)
    assert read_record(path) is None
    assert read_record(tmp_path / "absent.json") is None
