"""Classification with the shipped rules, and restart decisions: pure functions, table-driven."""

from __future__ import annotations

import json
import random
import signal
import traceback
from pathlib import Path

import pytest

from supervisor.cli import compose_config, to_supervisor_config
from supervisor.config import RestartConfig
from supervisor.outcomes import Action, ExitCode, ExitStatus, SupervisorRule
from supervisor.policy.repeats import normalise
from supervisor.policy.restart import (
    Restart,
    StartFrom,
    Stop,
    after_attempt,
    after_cluster_failure,
    after_interrupt,
    after_teardown,
    backoff_s,
    choose_start,
    lost_attempt,
)
from supervisor.policy.rules import AttemptEvidence, Classification, classify
from supervisor.run.history import AttemptRecord, RunHistory
from verl_hooks.contract import ErrorRecord, JobExitCode, RecordSource


class Extreme(random.Random):
    """A random source that always draws the low or the high end of a range."""

    def __init__(self, high: bool) -> None:
        super().__init__(0)
        self.high = high

    def uniform(self, a: float, b: float) -> float:
        return b if self.high else a


NO_JITTER = Extreme(high=False)


def decide(history: RunHistory, classification: Classification, policy: RestartConfig):
    return after_attempt(history, classification, policy, NO_JITTER)


@pytest.fixture(scope="module")
def shipped():
    """The rules and default action as conf/supervisor.yaml ships them."""
    return to_supervisor_config(compose_config(["run_dir=/tmp/unused"]))


def _record(error_type: str, phase: str | None = None) -> ErrorRecord:
    return ErrorRecord(error_type=error_type, message="m", source=RecordSource.LAUNCHER, phase=phase, global_step=3)


@pytest.mark.parametrize(
    ("evidence", "action", "rule"),
    [
        (AttemptEvidence(ExitStatus(code=0)), Action.done, "success"),
        (
            AttemptEvidence(ExitStatus(code=75), _record("verl_hooks.errors.WeightSyncFatalError", "finalize")),
            Action.restart,
            "weight-sync-failure",
        ),
        (AttemptEvidence(ExitStatus(code=75)), Action.restart, "weight-sync-exit-code"),
        (
            # The guard's backstop wrote the record in a worker; the driver then died of the lost actor.
            AttemptEvidence(ExitStatus(code=1), _record("verl_hooks.errors.WeightSyncFatalError", "update_weights")),
            Action.restart,
            "weight-sync-failure",
        ),
        (AttemptEvidence(ExitStatus(code=78), _record("hydra.errors.ConfigCompositionException")), Action.fail, None),
        (AttemptEvidence(ExitStatus(code=1), _record("omegaconf.errors.ConfigKeyError")), Action.fail, None),
        (AttemptEvidence(ExitStatus(code=2)), Action.fail, "usage-error"),
        (AttemptEvidence(ExitStatus(signal=9)), Action.restart, "killed-by-signal"),
        (AttemptEvidence(ExitStatus(signal=15)), Action.restart, "killed-by-signal"),
        (
            AttemptEvidence(
                ExitStatus(code=1), None, "omegaconf.errors.ConfigAttributeError: Key 'lr' is not in struct"
            ),
            Action.fail,
            "hydra-error-in-output",
        ),
        (
            AttemptEvidence(ExitStatus(code=1), _record("ray.exceptions.ActorDiedError")),
            Action.restart,
            "ray-worker-lost",
        ),
        (
            AttemptEvidence(ExitStatus(code=1), _record("ray.exceptions.ActorUnavailableError")),
            Action.restart,
            "ray-worker-lost",
        ),
        (
            AttemptEvidence(ExitStatus(code=1), _record("ray.exceptions.NodeDiedError")),
            Action.restart,
            "ray-worker-lost",
        ),
        (AttemptEvidence(ExitStatus(code=1), _record("RuntimeError")), Action.restart, "default"),
        (AttemptEvidence(ExitStatus(code=137)), Action.restart, "default"),
    ],
)
def test_shipped_rules(shipped, evidence: AttemptEvidence, action: Action, rule: str | None) -> None:
    result = classify(evidence, shipped.rules, shipped.default_action)
    assert result.action is action
    if rule is not None:
        assert result.rule == rule


def _verl_config_error(*overrides: str) -> BaseException:
    """What verl's own checks raise for ``overrides`` of its ppo_trainer config (composing it instantiates verl's
    worker config dataclasses, whose checks run too), as its TaskRunner would after start-up."""
    import verl.trainer.main_ppo
    from hydra import compose, initialize_config_dir
    from verl.utils.config import validate_config

    config_dir = Path(verl.trainer.main_ppo.__file__).parent / "config"
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base=None):
            config = compose("ppo_trainer", overrides=list(overrides))
        validate_config(config, use_reference_policy=False, use_critic=False)
    except Exception as exc:  # whatever verl raises is the evidence
        return exc
    raise AssertionError(f"verl accepted {overrides}")


@pytest.mark.parametrize(
    "overrides",
    [
        ("data.train_batch_size=3", "trainer.n_gpus_per_node=2"),
        ("actor_rollout_ref.actor.ppo_micro_batch_size=2", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2"),
    ],
    ids=["batch-not-divisible", "both-micro-batch-sizes"],
)
def test_verls_own_configuration_errors_after_start_up_are_not_restarted(shipped, overrides) -> None:
    """The driver sees them wrapped in Ray's RayTaskError (no error type of verl's to match): its output names them."""
    exc = _verl_config_error(*overrides)
    output = "".join(traceback.format_exception(exc))
    evidence = AttemptEvidence(ExitStatus(code=1), _record("ray.exceptions.RayTaskError"), output)
    result = classify(evidence, shipped.rules, shipped.default_action)
    assert (result.action, result.rule) == (Action.fail, "verl-config-error")


def test_an_out_of_memory_is_named_and_restarted(shipped) -> None:
    import torch

    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79 GiB")
    output = "".join(traceback.format_exception(oom))
    result = classify(AttemptEvidence(ExitStatus(code=1), None, output), shipped.rules, shipped.default_action)
    assert (result.action, result.rule) == (Action.restart, "out-of-memory")


def test_first_matching_rule_wins_and_all_criteria_must_hold(shipped) -> None:
    from supervisor.config import RuleConfig

    rules = [
        RuleConfig(name="finalize-hang", action=Action.fail, error_type="WeightSyncFatalError", phases=["finalize"]),
        *shipped.rules,
    ]
    in_finalize = AttemptEvidence(ExitStatus(code=75), _record("verl_hooks.errors.WeightSyncFatalError", "finalize"))
    in_update = AttemptEvidence(ExitStatus(code=75), _record("verl_hooks.errors.WeightSyncFatalError", "abort"))
    assert classify(in_finalize, rules, Action.restart).rule == "finalize-hang"
    assert classify(in_update, rules, Action.restart).rule == "weight-sync-failure"


@pytest.mark.parametrize(
    ("evidence", "action", "rule"),
    [
        (AttemptEvidence(ExitStatus(code=0)), Action.done, SupervisorRule.CLEAN_EXIT),
        (AttemptEvidence(ExitStatus(code=0), stalled=True), Action.restart, SupervisorRule.DEFAULT),
        (AttemptEvidence(ExitStatus(code=0), _record("RuntimeError")), Action.restart, SupervisorRule.DEFAULT),
        (AttemptEvidence(None), Action.restart, SupervisorRule.DEFAULT),
        (AttemptEvidence(ExitStatus(code=1)), Action.restart, SupervisorRule.DEFAULT),
    ],
)
def test_a_clean_exit_no_rule_matched_is_done_whatever_the_default(evidence, action, rule) -> None:
    """Rules that replace the built-in ones may leave exit 0 out: a job that says it finished is not restarted."""
    from supervisor.config import RuleConfig

    only_mine = [RuleConfig(name="x", action=Action.restart, phases=["update_weights"])]
    result = classify(evidence, only_mine, Action.restart)
    assert (result.action, result.rule) == (action, rule)


def _history(*attempts: tuple[int | None, int | None, str]) -> RunHistory:
    """Attempts as (resumed_from_step, reached_step, action)."""
    history = RunHistory(run_id="r")
    for number, (resumed, reached, action) in enumerate(attempts, start=1):
        history.attempts.append(
            AttemptRecord(number, 0.0, resumed, ended_at=1.0, action=Action(action), reached_step=reached)
        )
    return history


RESTART = Classification(Action.restart, SupervisorRule.DEFAULT, "exit 1")
POLICY = RestartConfig(max_restarts=3, max_failures_without_progress=3, backoff_jitter_s=0.0)


@pytest.mark.parametrize(
    ("history", "expected"),
    [
        (_history((None, 2, "restart")), Restart),
        (_history((None, 2, "restart"), (2, 4, "restart"), (4, 6, "restart")), Restart),
        (
            _history((None, 2, "restart"), (2, 4, "restart"), (4, 6, "restart"), (6, 8, "restart")),
            ExitCode.BUDGET_EXHAUSTED,
        ),
        (_history((None, None, "restart"), (None, None, "restart"), (None, None, "restart")), ExitCode.CRASH_LOOP),
        (_history((None, 2, "restart"), (2, 2, "restart"), (2, 2, "restart")), Restart),
        (_history((None, 2, "restart"), (2, 2, "restart"), (2, 2, "restart"), (2, 2, "restart")), ExitCode.CRASH_LOOP),
    ],
)
def test_restart_decisions(history: RunHistory, expected) -> None:
    decision = decide(history, RESTART, POLICY)
    if expected is Restart:
        assert isinstance(decision, Restart)
    else:
        assert isinstance(decision, Stop)
        assert decision.exit_code is expected


@pytest.mark.parametrize("rule", [SupervisorRule.SUPERVISOR_RESTARTED, SupervisorRule.INTERRUPTED])
def test_attempts_the_supervisors_death_or_a_stop_signal_ended_are_no_crash_loop(rule: SupervisorRule) -> None:
    """They say nothing of the job: passed over by the crash-loop guard (a lost attempt still spends budget)."""
    history = _history((None, 2, "restart"), (2, 2, "restart"), (2, 2, "restart"), (2, 2, "restart"))
    history.attempts[2].rule = rule
    assert history.failures_without_progress() == 2
    assert isinstance(decide(history, RESTART, RestartConfig(max_restarts=9, max_failures_without_progress=3)), Restart)
    assert history.restarts_used == (3 if rule is SupervisorRule.SUPERVISOR_RESTARTED else 2)


@pytest.mark.parametrize("name", ["interrupted", "supervisor-restarted"])
def test_a_configured_rule_named_like_a_verdict_is_only_a_name(name: str) -> None:
    """Only the supervisor's own verdict counts as one: a string equal to its name does not (config.validate
    refuses such names; a history read back from state.json parses them into the verdict)."""
    history = _history((None, 2, "restart"), (2, 2, "restart"), (2, 2, "restart"))
    history.attempts[1].rule = name
    assert not history.attempts[1].interrupted
    assert not history.attempts[1].lost
    back = RunHistory.from_dict(json.loads(json.dumps(history.to_dict())))
    assert back.attempts[1].rule is SupervisorRule(name)


def test_done_and_fail_stop_at_once() -> None:
    history = _history((None, None, "done"))
    assert decide(history, Classification(Action.done, "success", "exit 0"), POLICY) == Stop(
        ExitCode.DONE, "the job finished: exit 0"
    )
    decision = decide(history, Classification(Action.fail, "configuration-error", "exit 78"), POLICY)
    assert isinstance(decision, Stop)
    assert decision.exit_code is ExitCode.JOB_FAILED


def test_no_restarts_allowed() -> None:
    decision = decide(_history((None, 2, "restart")), RESTART, RestartConfig(max_restarts=0))
    assert isinstance(decision, Stop)
    assert decision.exit_code is ExitCode.BUDGET_EXHAUSTED
    assert "0 of 0 restarts used" in decision.reason


@pytest.mark.parametrize(
    ("failures", "low", "high"), [(0, 1.0, 1.5), (1, 1.0, 1.5), (2, 2.0, 2.5), (3, 4.0, 4.5), (9, 10.0, 10.0)]
)
def test_backoff_is_exponential_with_jitter_and_capped(failures: int, low: float, high: float) -> None:
    policy = RestartConfig(backoff_initial_s=1.0, backoff_multiplier=2.0, backoff_max_s=10.0, backoff_jitter_s=0.5)
    assert backoff_s(failures, policy, Extreme(high=False)) == low
    assert backoff_s(failures, policy, Extreme(high=True)) == high


def test_no_backoff_right_after_progress_then_it_grows_again() -> None:
    policy = RestartConfig(backoff_initial_s=1.0, backoff_jitter_s=0.0, max_failures_without_progress=9)
    stuck = decide(_history((None, 2, "restart"), (2, 2, "restart"), (2, 2, "restart")), RESTART, policy)
    progressing = decide(_history((None, 2, "restart"), (2, 2, "restart"), (2, 4, "restart")), RESTART, policy)
    assert isinstance(stuck, Restart)
    assert isinstance(progressing, Restart)
    assert stuck.delay_s == 2.0
    assert progressing.delay_s == 0.0, "the last attempt advanced the checkpoint: restart at once"
    waiting = RestartConfig(backoff_initial_s=1.0, backoff_jitter_s=0.0, backoff_after_progress=True)
    again = decide(_history((None, 2, "restart"), (2, 2, "restart"), (2, 4, "restart")), RESTART, waiting)
    assert isinstance(again, Restart)
    assert again.delay_s == 1.0, "restart.backoff_after_progress=true: the backoff restarts from its initial value"


def test_start_from_the_valid_checkpoint_or_fresh_or_refuse() -> None:
    fresh = RunHistory(run_id="r")
    assert choose_start(4, "/c/global_step_4", fresh) == StartFrom("/c/global_step_4", 4)
    assert choose_start(None, None, fresh) == StartFrom(None, None)
    had_one = RunHistory(run_id="r", newest_checkpoint_step=6)
    refused = choose_start(None, None, had_one)
    assert isinstance(refused, Stop)
    assert refused.exit_code is ExitCode.CRASH_LOOP
    assert refused.outcome_name == "no_valid_checkpoint"
    assert "global_step_6" in refused.reason


def test_the_other_ways_a_run_ends_are_decisions_too() -> None:
    assert after_teardown(True, ()) is None
    failed = after_teardown(False, ("actor Stubborn on node 1 still alive",))
    assert failed == Stop(ExitCode.ENVIRONMENT_FAILURE, "actor Stubborn on node 1 still alive")
    assert after_interrupt(signal.SIGINT).exit_code is ExitCode.INTERRUPTED_SIGINT
    assert after_interrupt(signal.SIGTERM) == Stop(ExitCode.INTERRUPTED_SIGTERM, "interrupted by SIGTERM")
    assert after_cluster_failure("port taken").exit_code is ExitCode.ENVIRONMENT_FAILURE
    lost = lost_attempt()
    assert (lost.action, lost.rule) == (Action.restart, "supervisor-restarted")


def test_shipped_rules_name_the_launchers_exit_codes(shipped) -> None:
    """conf/supervisor.yaml spells exit codes as numbers; they must be the contract's."""
    codes = {rule.name: rule.exit_codes for rule in shipped.rules if rule.exit_codes}
    assert codes == {
        "success": [JobExitCode.SUCCESS],
        "weight-sync-exit-code": [JobExitCode.WEIGHT_SYNC_FATAL],
        "configuration-error": [JobExitCode.CONFIG_ERROR],
        "usage-error": [JobExitCode.USAGE],
    }


def test_resume_check_answers_once_from_the_first_two_distinct_steps() -> None:
    from supervisor.policy.resume import MismatchedResume, ResumeCheck, VerifiedResume

    check = ResumeCheck(4)
    assert [check.observe(s) for s in (None, 4, 4)] == [None, None, None], "repeats and unnumbered syncs wait"
    assert check.observe(5) == VerifiedResume(4, 5)
    assert check.observe(9) is None, "answered already"
    wrong = ResumeCheck(4).observe(1)
    assert isinstance(wrong, MismatchedResume)
    assert wrong.seen_step == 1
    assert "first weight sync" in wrong.reason


def _failed(
    number: int,
    resumed: int | None,
    reached: int | None,
    *,
    step: int | None = 3,
    message: str = "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.15 GiB total) at 0x7f3a2c000000",
    error_type: str | None = "torch.OutOfMemoryError",
    phase: str | None = None,
    rule: SupervisorRule | str = "oom",
) -> AttemptRecord:
    record = AttemptRecord(number, 0.0, resumed, reached_step=reached, error_type=error_type, phase=phase)
    record.judge(1.0, Action.restart, rule, "failed")
    record.error_message, record.failed_at_step = message, step
    return record


def _run(*attempts: AttemptRecord) -> RunHistory:
    return RunHistory(run_id="r", attempts=list(attempts))


GENEROUS = RestartConfig(max_restarts=9, max_failures_without_progress=9, backoff_jitter_s=0.0)
SAME_AGAIN = _failed(2, 2, 2, message="CUDA out of memory. Tried to allocate 2.00 GiB (GPU 1; 79.15 GiB total) at 0x55")


def test_the_same_failure_at_the_same_step_from_where_the_last_one_left_stops_with_exit_3() -> None:
    history = _run(_failed(1, None, 2), SAME_AGAIN)
    stop = decide(history, RESTART, GENEROUS)
    assert isinstance(stop, Stop)
    assert (stop.exit_code, stop.outcome_name) == (ExitCode.JOB_FAILED, "repeated_failure")
    assert "attempts 1 and 2 both failed with OutOfMemoryError at global step 3" in stop.reason
    assert "after resuming from global_step_2" in stop.reason
    assert "attempts/1/error.json, attempts/2/error.json" in stop.reason
    assert "restart.stop_on_repeated_failure=false" in stop.reason


def test_the_key_turns_the_judgement_off() -> None:
    off = RestartConfig(max_restarts=9, max_failures_without_progress=9, stop_on_repeated_failure=False)
    assert isinstance(decide(_run(_failed(1, None, 2), SAME_AGAIN), RESTART, off), Restart)


@pytest.mark.parametrize(
    ("second", "why"),
    [
        (_failed(2, 2, 4, step=5), "another step"),
        (_failed(2, 2, 2, error_type="builtins.ValueError"), "another error type"),
        (_failed(2, 2, 2, phase="update_weights"), "another phase"),
        (_failed(2, 2, 2, message="NaN in the reward"), "another message"),
        (_failed(2, 0, 2), "another starting point than where the first left off"),
        (_failed(2, 2, 4), "the second saved a newer step than it resumed from"),
        (_failed(2, 2, 2, error_type=None), "no error record"),
        (_failed(2, 2, 2, step=None), "no known step"),
    ],
)
def test_a_failure_that_differs_is_restarted(second: AttemptRecord, why: str) -> None:
    assert isinstance(decide(_run(_failed(1, None, 2), second), RESTART, GENEROUS), Restart), why


def test_attempts_the_supervisors_death_or_a_stop_signal_ended_are_passed_over() -> None:
    interrupted = _failed(2, 2, 2, rule=SupervisorRule.INTERRUPTED, message="stopped")
    history = _run(_failed(1, None, 2), interrupted, _failed(3, 2, 2))
    stop = decide(history, RESTART, GENEROUS)
    assert isinstance(stop, Stop)
    assert "attempts 1 and 3" in stop.reason


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("worker pid=1234 on 10.0.0.7:6379 died", "worker pid=98 on 10.0.0.9:6380 died"),
        ("actor 3f2a9c1be0d44e5f8a7b lost", "actor 9d8e7f6a5b4c3d2e1f0a lost"),
        ("failed  in\nattempt 1", "failed in attempt 2"),
    ],
)
def test_numbers_ids_and_spacing_do_not_make_two_messages_differ(first: str, second: str) -> None:
    assert normalise(first) == normalise(second)
    assert normalise("NaN in the loss") != normalise("NaN in the reward")
