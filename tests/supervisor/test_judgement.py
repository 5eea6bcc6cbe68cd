"""What the loop does after an attempt ended, from tables: every step of ``supervisor.policy.judgement`` from a
snapshot of what was observed, in milliseconds, with nothing started. The loop carrying the steps out, with the
fake backend: tests/supervisor/test_loop.py and test_nodes.py."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from supervisor.config import NodesConfig, PreemptionConfig, RestartConfig, RuleConfig
from supervisor.mechanisms.ray_state import NodeInfo
from supervisor.mechanisms.volume import CheckpointSpace, Volume
from supervisor.outcomes import Action, ExitCode, ExitStatus, SupervisorRule
from supervisor.policy.judgement import (
    AwaitCapacity,
    Capacity,
    Exclude,
    Fence,
    Observed,
    Preemption,
    ReadNodes,
    Record,
    Rules,
    Step,
    TearDown,
    describe,
    next_step,
)
from supervisor.policy.nodes import Exclusion, NodeFindings, NodeHealth
from supervisor.policy.restart import Restart, Stop
from supervisor.policy.rules import AttemptEvidence, Classification
from supervisor.run.history import AttemptRecord, RunHistory
from verl_hooks.contract import ErrorRecord, RecordSource

RULES = [
    RuleConfig(name="success", action=Action.done, exit_codes=[0]),
    RuleConfig(name="weight-sync-failure", action=Action.restart, error_type="WeightSyncFatalError"),
    RuleConfig(name="configuration-error", action=Action.fail, exit_codes=[78]),
]
RESTART = RestartConfig(max_restarts=3, backoff_initial_s=2.0, backoff_jitter_s=0.0)


def rules(replacement_wait_s: float = 300.0, **nodes: bool) -> Rules:
    return Rules(
        RULES, Action.restart, RESTART, NodesConfig(**nodes), PreemptionConfig(replacement_wait_s=replacement_wait_s)
    )


def sync_failure(exit_code: int = 75, message: str = "weight sync failed") -> AttemptEvidence:
    record = ErrorRecord(
        error_type="verl_hooks.errors.WeightSyncFatalError",
        message=message,
        source=RecordSource.LAUNCHER,
        phase="abort",
    )
    return AttemptEvidence(ExitStatus(code=exit_code), record, "")


def space(free_bytes: int, newest_bytes: int | None = 10 << 30) -> CheckpointSpace:
    return CheckpointSpace("/ckpt", Volume("/ckpt", "/dev/nvme1n1", 100 << 30, free_bytes), newest_bytes)


def history(*actions: str, reached: int | None = None) -> RunHistory:
    """The run so far: one attempt per action, the last the one being judged (its own action not set yet)."""
    run = RunHistory(run_id="r")
    for number, action in enumerate(actions, start=1):
        judged = Action(action) if number < len(actions) else None
        run.attempts.append(AttemptRecord(number, 0.0, None, ended_at=1.0, action=judged, reached_step=reached))
    return run


WORKER_A, WORKER_B, HEAD = "a" * 56, "b" * 56, "h" * 56
CLUSTER = (
    NodeInfo(HEAD, "head", is_head=True, resources={"CPU": 8.0}),
    NodeInfo(WORKER_A, "gpu-a", resources={"GPU": 8.0}),
    NodeInfo(WORKER_B, "gpu-b", resources={"GPU": 8.0}),
)
SICK_A = NodeHealth(WORKER_A, "gpu-a", ("GPU 3: 2 uncorrectable ECC error(s) since the last look",))
WELL_B = NodeHealth(WORKER_B, "gpu-b")
RESTARTING = Classification(Action.restart, "weight-sync-failure", "exit 75")
FENCED = Fence(True)


PREEMPTED_A = Preemption(frozenset({WORKER_A}), "Ray drained gpu-a/aaaaaaaa (a preemption notice); saved step 7")
STOPPED_FOR_IT = AttemptEvidence(ExitStatus(code=143), ErrorRecord("StopRequested", "stop", RecordSource.LAUNCHER), "")
PREEMPTED = Classification(Action.restart, SupervisorRule.PREEMPTED, PREEMPTED_A.reason)
HEALTHY = NodeFindings(
    (NodeHealth(WORKER_A, "gpu-a"), WELL_B), frozenset({WORKER_A, WORKER_B}), CLUSTER, (("GPU", 8.0),)
)


def preempted(**changes) -> Observed:
    """An attempt that saved and ended for a preemption notice of worker A, recorded, fenced, its nodes read."""
    base = Observed(
        STOPPED_FOR_IT,
        preemption=PREEMPTED_A,
        recorded=PREEMPTED,
        fence=FENCED,
        restart=Restart(0.0, "relaunching"),
        nodes=HEALTHY,
    )
    return replace(base, **changes)


def after_fence(**changes) -> Observed:
    """A failed attempt recorded and fenced, a restart decided, its nodes read (override what differs)."""
    base = Observed(
        sync_failure(),
        recorded=RESTARTING,
        fence=FENCED,
        restart=Restart(2.0, "restarting"),
        nodes=NodeFindings((SICK_A, WELL_B), frozenset({WORKER_A, WORKER_B}), CLUSTER, (("GPU", 8.0),)),
    )
    return replace(base, **changes)


CASES: list[tuple[str, Observed, RunHistory, Rules, Step]] = [
    # --- the verdict ---
    (
        "a resume not honoured outranks whatever the attempt died of",
        Observed(sync_failure(), mismatch="its first sync carried step 0, not 4"),
        history("restart"),
        rules(),
        Record(Classification(Action.fail, SupervisorRule.RESUME_MISMATCH, "its first sync carried step 0, not 4")),
    ),
    (
        "a failure on a volume without room for the next save is the disk's",
        Observed(sync_failure(message="[Errno 28] No space left on device"), space=space(free_bytes=1 << 30)),
        history("restart"),
        rules(),
        Record(Classification(Action.fail, SupervisorRule.DISK_FULL, "")),
    ),
    (
        "a clean exit on a full volume is done: the disk is not judged",
        Observed(AttemptEvidence(ExitStatus(code=0)), space=space(free_bytes=0)),
        history("restart"),
        rules(),
        Record(Classification(Action.done, "success", "")),
    ),
    (
        "with room on the volume the rules judge",
        Observed(sync_failure(), space=space(free_bytes=50 << 30)),
        history("restart"),
        rules(),
        Record(Classification(Action.restart, "weight-sync-failure", "")),
    ),
    (
        "no rule matched: default_action",
        Observed(AttemptEvidence(ExitStatus(code=1))),
        history("restart"),
        rules(),
        Record(Classification(Action.restart, SupervisorRule.DEFAULT, "")),
    ),
    (
        "a notice for the attempt's node: a preemption, whatever it exited with",
        Observed(STOPPED_FOR_IT, preemption=PREEMPTED_A),
        history("restart"),
        rules(),
        Record(PREEMPTED),
    ),
    (
        "a job that finished while its node was being drained is done",
        Observed(AttemptEvidence(ExitStatus(code=0)), preemption=PREEMPTED_A),
        history("restart"),
        rules(),
        Record(Classification(Action.done, "success", "")),
    ),
    (
        "a full checkpoint disk outranks the preemption: the relaunch could not save either",
        Observed(
            sync_failure(message="[Errno 28] No space left on device"),
            preemption=PREEMPTED_A,
            space=space(free_bytes=1 << 30),
        ),
        history("restart"),
        rules(),
        Record(Classification(Action.fail, SupervisorRule.DISK_FULL, "")),
    ),
    # --- the teardown ---
    ("recorded: tear down", Observed(sync_failure(), recorded=RESTARTING), history("restart"), rules(), TearDown()),
    (
        "a fence that failed stops the run, whatever the verdict",
        Observed(sync_failure(), recorded=RESTARTING, fence=Fence(False, ("ray::Worker[41] survived",))),
        history("restart"),
        rules(),
        Stop(ExitCode.ENVIRONMENT_FAILURE, "ray::Worker[41] survived"),
    ),
    # --- the restart policy ---
    (
        "done once fenced",
        Observed(
            AttemptEvidence(ExitStatus(code=0)), recorded=Classification(Action.done, "success", ""), fence=FENCED
        ),
        history("done"),
        rules(),
        Stop(ExitCode.DONE, ""),
    ),
    (
        "a failure the rules say a restart cannot fix",
        Observed(sync_failure(78), recorded=Classification(Action.fail, "configuration-error", ""), fence=FENCED),
        history("fail"),
        rules(),
        Stop(ExitCode.JOB_FAILED, ""),
    ),
    (
        "a restart decided: the nodes are read first",
        Observed(sync_failure(), recorded=RESTARTING, fence=FENCED),
        history("restart"),
        rules(),
        ReadNodes(Restart(2.0, "")),
    ),
    (
        "the budget spent",
        Observed(sync_failure(), recorded=RESTARTING, fence=FENCED),
        history("restart", "restart", "restart", "restart", "restart", reached=1),
        rules(),
        Stop(ExitCode.BUDGET_EXHAUSTED, ""),
    ),
    (
        "preempted: relaunched at once, whatever the budget says (a preemption is not the job's failure)",
        Observed(STOPPED_FOR_IT, preemption=PREEMPTED_A, recorded=PREEMPTED, fence=FENCED),
        history("restart", "restart", "restart", "restart", "restart", reached=1),
        rules(),
        ReadNodes(Restart(0.0, "")),
    ),
    # --- the nodes ---
    (
        "an unhealthy worker is drained",
        after_fence(),
        history("restart"),
        rules(),
        Exclude((Exclusion(WORKER_A, "gpu-a", ""),)),
    ),
    (
        "nodes.exclude=false: read, not drained",
        after_fence(),
        history("restart"),
        rules(exclude=False),
        Restart(2.0, ""),
    ),
    (
        "never the head",
        after_fence(
            nodes=NodeFindings(
                (NodeHealth(HEAD, "head", ("GPU 0: row remapping failed",)),), frozenset({HEAD}), CLUSTER
            )
        ),
        history("restart"),
        rules(),
        Restart(2.0, ""),
    ),
    (
        "drained already after an earlier attempt: not again",
        after_fence(drained_before=frozenset({WORKER_A})),
        history("restart"),
        rules(),
        Restart(2.0, ""),
    ),
    (
        "drained, and what is left holds the job",
        after_fence(drained=(Exclusion(WORKER_A, "gpu-a", "ECC"),)),
        history("restart"),
        rules(),
        Restart(2.0, ""),
    ),
    (
        "drained, and what is left cannot hold the job",
        after_fence(
            drained=(Exclusion(WORKER_A, "gpu-a", "ECC"),),
            nodes=replace(after_fence().nodes, demand=(("GPU", 16.0),)),
        ),
        history("restart"),
        rules(),
        Stop(ExitCode.NO_HEALTHY_CAPACITY, ""),
    ),
    (
        "Ray refused every drain: relaunch, the capacity is unchanged",
        after_fence(drained=(), nodes=replace(after_fence().nodes, demand=(("GPU", 16.0),))),
        history("restart"),
        rules(),
        Restart(2.0, ""),
    ),
    (
        "preempted, and the node left holds the job: relaunch",
        preempted(),
        history("restart"),
        rules(),
        Restart(0.0, ""),
    ),
    (
        "preempted, and the nodes left cannot hold the job: wait for a replacement",
        preempted(nodes=replace(HEALTHY, demand=(("GPU", 16.0),))),
        history("restart"),
        rules(),
        AwaitCapacity((("GPU", 16.0),), frozenset({WORKER_A}), 300.0),
    ),
    (
        "preempted, and nodes.exclude=false: the capacity is still waited for",
        preempted(nodes=replace(HEALTHY, demand=(("GPU", 16.0),))),
        history("restart"),
        rules(exclude=False),
        AwaitCapacity((("GPU", 16.0),), frozenset({WORKER_A}), 300.0),
    ),
    (
        "a node drained after an earlier attempt stays gone while the capacity is judged",
        preempted(nodes=replace(HEALTHY, demand=(("GPU", 8.0),)), drained_before=frozenset({WORKER_B})),
        history("restart"),
        rules(),
        AwaitCapacity((("GPU", 8.0),), frozenset({WORKER_A, WORKER_B}), 300.0),
    ),
    (
        "a replacement joined within the wait: relaunch",
        preempted(nodes=replace(HEALTHY, demand=(("GPU", 16.0),)), capacity=Capacity(True, 42.0)),
        history("restart"),
        rules(),
        Restart(0.0, ""),
    ),
    (
        "no replacement within the wait: stop with exit 9, resumable once nodes are added",
        preempted(nodes=replace(HEALTHY, demand=(("GPU", 16.0),)), capacity=Capacity(False, 300.0, (("GPU", 8.0),))),
        history("restart"),
        rules(),
        Stop(ExitCode.NO_HEALTHY_CAPACITY, "preemption.replacement_wait_s=300 s"),
    ),
    (
        "preemption.replacement_wait_s=0: stop at once",
        preempted(nodes=replace(HEALTHY, demand=(("GPU", 16.0),))),
        history("restart"),
        rules(replacement_wait_s=0.0),
        Stop(ExitCode.NO_HEALTHY_CAPACITY, "GPU 16 (8 short)"),
    ),
    (
        "the embedded cluster's one machine with a sick GPU: no healthy capacity",
        after_fence(nodes=NodeFindings((replace(SICK_A, node_id="local"),), frozenset({"local"}), single_machine=True)),
        history("restart"),
        rules(),
        Stop(ExitCode.NO_HEALTHY_CAPACITY, ""),
    ),
    (
        "the embedded cluster's one machine, healthy",
        after_fence(nodes=NodeFindings((NodeHealth("local", "me"),), frozenset({"local"}), single_machine=True)),
        history("restart"),
        rules(),
        Restart(2.0, ""),
    ),
]


def _same(step: Step, expected: Step) -> bool:
    """Equal in kind and in what decides; reasons are compared where the table gives one."""
    if type(step) is not type(expected):
        return False
    match expected:
        case Record(classification):
            got = step.classification  # type: ignore[union-attr]
            same_reason = not classification.reason or got.reason == classification.reason
            return (got.action, got.rule) == (classification.action, classification.rule) and same_reason
        case Stop(exit_code, reason):
            return step.exit_code is exit_code and (not reason or reason in step.reason)  # type: ignore[union-attr]
        case Restart(delay_s) | ReadNodes(Restart(delay_s)):
            restart = step if isinstance(step, Restart) else step.restart  # type: ignore[union-attr]
            return restart.delay_s == delay_s
        case Exclude(exclusions):
            return [e.node_id for e in step.exclusions] == [e.node_id for e in exclusions]  # type: ignore[union-attr]
    return step == expected


@pytest.mark.parametrize(("observed", "run", "config", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_next_step(observed: Observed, run: RunHistory, config: Rules, expected: Step) -> None:
    step = next_step(observed, run, config, random.Random(0))
    assert _same(step, expected), f"{describe(step)}: {step}"


def test_a_node_named_as_the_place_of_the_failure_twice_is_drained_though_healthy() -> None:
    run = history("restart", "restart")
    for attempt in run.attempts:
        attempt.failure_nodes = [WORKER_B]
    run.attempts[0].action = Action.restart
    found = NodeFindings((NodeHealth(WORKER_A, "gpu-a"), WELL_B), frozenset({WORKER_A, WORKER_B}), CLUSTER)
    step = next_step(after_fence(nodes=found), run, rules(), random.Random(0))
    assert isinstance(step, Exclude)
    assert [(e.node_id, e.reason) for e in step.exclusions] == [
        (WORKER_B, "the place of the failure of the last two attempts")
    ]


def test_the_backoffs_jitter_is_drawn_once_and_kept_while_the_nodes_are_judged() -> None:
    jittery = Rules(RULES, Action.restart, replace(RESTART, backoff_jitter_s=5.0), NodesConfig(), PreemptionConfig())
    observed = Observed(sync_failure(), recorded=RESTARTING, fence=FENCED)
    rng = random.Random(7)
    first = next_step(observed, history("restart"), jittery, rng)
    assert isinstance(first, ReadNodes)
    assert 2.0 <= first.restart.delay_s <= 7.0
    found = NodeFindings((WELL_B,), frozenset({WORKER_B}), CLUSTER)
    then = next_step(replace(observed, restart=first.restart, nodes=found), history("restart"), jittery, rng)
    assert then == first.restart
