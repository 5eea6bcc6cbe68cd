"""The fence's judgement, branch by branch, and its executor on a fake clock: milliseconds, nothing started.

The primitives the executor acts through (terminating processes, killing actors and removing placement groups
through the GCS, the state API, NVML, the node sweep) are proven against real processes and real Ray clusters
in their own tests and in tests/supervisor/e2e/test_existing_cluster.py.
"""

from __future__ import annotations

import dataclasses

import pytest

from supervisor.backends.base import Stopped, TeardownResult
from supervisor.backends.fence import AttemptView, FenceResult, fence, fence_rules
from supervisor.config import TeardownConfig
from supervisor.mechanisms.gpu_memory import GpuHolder, GpuMemoryCheck
from supervisor.mechanisms.node_probe import NodeScan, NodeSweep
from supervisor.mechanisms.processes import ProcessInfo
from supervisor.mechanisms.ray_kill import KillOutcome, KillResult
from supervisor.mechanisms.ray_state import LiveActor, LivePlacementGroup
from supervisor.policy.fence import (
    CheckGpus,
    CheckResources,
    Fenced,
    FenceRules,
    GiveUp,
    Kill,
    Remove,
    Seen,
    Sweep,
    Terminate,
    Tried,
    Wait,
    next_step,
)
from supervisor.run.events import EventLog, Teardown, read_events
from tests.supervisor.fakes import FakeClock

RULES = FenceRules(timeout_s=60, grace_s=2, reap_timeout_s=5)
WORKER = ProcessInfo(41, "ray::Worker", "ray::Worker")
ACTOR = LiveActor("a1" * 8, "Rollout", "ALIVE", 42, "n1" * 8, name="rollout_0")
GROUP = LivePlacementGroup("g1" * 9, "gen", "CREATED", "01000000", is_detached=True)
FREE = GpuMemoryCheck(devices=2)
HELD = GpuMemoryCheck(devices=2, holders=[GpuHolder(1, 41, 3072.0)])
CLEAN = NodeSweep(scans=[NodeScan("n2" * 8, "host2", gpu=FREE)])
DIRTY = NodeSweep(scans=[NodeScan("n2" * 8, "host2", survivors=[(51, "VllmWorker")], gpu=FREE)])
SWEPT = dataclasses.replace(RULES, sweep_nodes=True)
DONE = Seen(gpu=FREE)


@pytest.mark.parametrize(
    ("seen", "tried", "rules", "remaining_s", "step"),
    [
        pytest.param(Seen(processes=(WORKER,)), Tried(), RULES, 30, Terminate((41,), 2, 5), id="processes-terminated"),
        pytest.param(Seen(processes=(WORKER,)), Tried(), RULES, 1.5, Terminate((41,), 1.5, 0.1), id="grace-in-time"),
        pytest.param(Seen(actors=(ACTOR,)), Tried(), RULES, 30, Kill((ACTOR.actor_id,)), id="stray-actor-killed"),
        pytest.param(
            Seen(processes=(WORKER,), actors=(ACTOR,), groups=(GROUP,)),
            Tried(),
            RULES,
            30,
            Kill((ACTOR.actor_id,)),
            id="strays-before-processes",
        ),
        pytest.param(
            Seen(processes=(WORKER,), actors=(ACTOR,), groups=(GROUP,)),
            Tried(frozenset({ACTOR.actor_id})),
            RULES,
            30,
            Remove((GROUP.placement_group_id,)),
            id="then-the-groups",
        ),
        pytest.param(
            Seen(processes=(WORKER,), actors=(ACTOR,), groups=(GROUP,)),
            Tried(frozenset({ACTOR.actor_id, GROUP.placement_group_id})),
            RULES,
            30,
            Terminate((41,), 2, 5),
            id="a-process-that-outlives-sigkill-is-terminated-again-after",
        ),
        pytest.param(Seen(actors=(ACTOR,)), Tried(frozenset({ACTOR.actor_id})), RULES, 30, Wait(0.1), id="kill-once"),
        pytest.param(
            Seen(actors=(ACTOR,)),
            Tried(),
            dataclasses.replace(RULES, why_actors_stay="teardown.kill_stray_actors is off"),
            30,
            Wait(0.1),
            id="kill-off-waits",
        ),
        pytest.param(
            Seen(groups=(GROUP,)), Tried(), RULES, 30, Remove((GROUP.placement_group_id,)), id="group-removed"
        ),
        pytest.param(
            Seen(groups=(GROUP,)),
            Tried(),
            dataclasses.replace(RULES, why_groups_stay="off"),
            30,
            Wait(0.1),
            id="removal-off-waits",
        ),
        pytest.param(Seen(actors=None), Tried(), RULES, 30, Wait(0.1), id="state-api-silent-asked-again"),
        pytest.param(
            Seen(actors=(ACTOR,)), Tried(frozenset({ACTOR.actor_id})), RULES, 0.04, Wait(0.04), id="wait-in-time"
        ),
        pytest.param(
            Seen(), Tried(), dataclasses.replace(RULES, check_resources=True), 30, CheckResources(), id="resources"
        ),
        pytest.param(
            Seen(cluster_down=True),
            Tried(),
            dataclasses.replace(RULES, check_resources=True, sweep_nodes=True),
            30,
            CheckGpus(),
            id="a-cluster-down-holds-nothing",
        ),
        pytest.param(Seen(resources_held={}), Tried(), RULES, 30, CheckGpus(), id="gpus"),
        pytest.param(Seen(resources_held={"GPU": 1.0}, gpu=FREE), Tried(), RULES, 30, Wait(0.1), id="resources-held"),
        pytest.param(Seen(gpu=HELD), Tried(), RULES, 30, Wait(0.1), id="gpu-memory-held"),
        pytest.param(DONE, Tried(), RULES, 30, Fenced(), id="one-machine-fenced"),
        pytest.param(DONE, Tried(), SWEPT, 30, Sweep(30), id="nodes-swept-within-the-time-left"),
        pytest.param(DONE, Tried(), SWEPT, 2, Sweep(5), id="the-first-sweep-gets-its-minimum"),
        pytest.param(DONE, Tried(), SWEPT, -1, Sweep(5), id="the-first-sweep-even-past-the-deadline"),
        pytest.param(dataclasses.replace(DONE, nodes=DIRTY), Tried(), SWEPT, 30, Wait(0.1), id="dirty-wait"),
        pytest.param(dataclasses.replace(DONE, swept_before=DIRTY), Tried(), SWEPT, 30, Sweep(30), id="swept-again"),
        pytest.param(
            dataclasses.replace(DONE, swept_before=DIRTY),
            Tried(),
            SWEPT,
            3,
            GiveUp(
                (
                    "after 60 s, the sweep of the attempt's nodes found: node host2/n2n2n2n2: GPU free on 2 GPUs; "
                    "still alive VllmWorker[51]",
                )
            ),
            id="no-time-for-another-sweep",
        ),
        pytest.param(dataclasses.replace(DONE, nodes=CLEAN), Tried(), SWEPT, 30, Fenced(), id="nodes-clean"),
        pytest.param(dataclasses.replace(DONE, cluster_down=True), Tried(), SWEPT, 30, Fenced(), id="down-not-swept"),
    ],
)
def test_the_next_step(seen: Seen, tried: Tried, rules: FenceRules, remaining_s: float, step) -> None:
    assert next_step(seen, tried, rules, remaining_s) == step


@pytest.mark.parametrize(
    ("seen", "tried", "rules", "problem"),
    [
        pytest.param(
            Seen(processes=(WORKER,), actors=(ACTOR,)),
            Tried(frozenset({ACTOR.actor_id}), {ACTOR.actor_id: "GCS unavailable"}),
            RULES,
            "after 60 s, 1 processes, 1 Ray actors and 0 placement groups of the attempt are still alive: "
            "ray::Worker[41], actor Rollout rollout_0 on node n1n1n1n1n1n1 (kill failed: GCS unavailable)",
            id="named-with-why-the-kill-failed",
        ),
        pytest.param(
            Seen(groups=(GROUP,)),
            Tried(),
            dataclasses.replace(RULES, why_groups_stay="teardown.remove_stray_placement_groups is off"),
            "after 60 s, 0 processes, 0 Ray actors and 1 placement groups of the attempt are still alive: "
            "placement group gen (detached) CREATED; "
            "the placement groups were not removed: teardown.remove_stray_placement_groups is off",
            id="the-setting-that-kept-it",
        ),
        pytest.param(
            Seen(actors=None, groups=None),
            Tried(),
            RULES,
            "after 60 s, 0 processes, an unknown number of Ray actors and an unknown number of placement groups "
            "of the attempt are still alive: none identified (the state API did not answer)",
            id="state-api-silent-to-the-end",
        ),
        pytest.param(
            Seen(resources_held={"GPU": 2.0}, resource_holders="placement group gen of job 02000000", gpu=FREE),
            Tried(),
            RULES,
            "after 60 s, resources available before the attempt are still held: GPU 2; live placement groups: "
            "placement group gen of job 02000000 (teardown.wait_for_resources=false skips this check on a cluster "
            "shared with other jobs)",
            id="resources-and-who-holds-them",
        ),
        pytest.param(
            Seen(gpu=HELD),
            Tried(),
            RULES,
            "after 60 s, processes of the attempt still hold GPU memory: held: pid 41 on GPU 1, 3072 MB",
            id="gpu-memory",
        ),
        pytest.param(
            dataclasses.replace(DONE, swept_before=DIRTY),
            Tried(),
            SWEPT,
            "after 60 s, the sweep of the attempt's nodes found: node host2/n2n2n2n2: GPU free on 2 GPUs; "
            "still alive VllmWorker[51]",
            id="the-last-sweep-when-no-time-is-left-for-another",
        ),
        pytest.param(
            dataclasses.replace(DONE, nodes=DIRTY),
            Tried(),
            SWEPT,
            "after 60 s, the sweep of the attempt's nodes found: node host2/n2n2n2n2: GPU free on 2 GPUs; "
            "still alive VllmWorker[51]",
            id="a-node-still-holding",
        ),
    ],
)
def test_at_the_deadline_what_is_left_is_named(seen: Seen, tried: Tried, rules: FenceRules, problem: str) -> None:
    assert next_step(seen, tried, rules, 0.0) == GiveUp((problem,))


def test_gpu_memory_and_resources_held_at_the_deadline_are_both_named() -> None:
    step = next_step(Seen(resources_held={"GPU": 1.0}, gpu=HELD), Tried(), RULES, -1.0)
    assert isinstance(step, GiveUp)
    assert [p.split(":")[0] for p in step.problems] == [
        "after 60 s, processes of the attempt still hold GPU memory",
        "after 60 s, resources available before the attempt are still held",
    ]


@pytest.mark.parametrize(
    ("config", "gcs", "before", "sweeper", "expected"),
    [
        (TeardownConfig(), "gcs:1", {"GPU": 1.0}, None, {"check_resources": True}),
        (TeardownConfig(wait_for_resources=False), "gcs:1", {"GPU": 1.0}, None, {"check_resources": False}),
        (TeardownConfig(), "gcs:1", None, None, {"check_resources": False}),
        (
            TeardownConfig(kill_stray_actors=False),
            "gcs:1",
            None,
            None,
            {"why_actors_stay": "teardown.kill_stray_actors is off"},
        ),
        (TeardownConfig(), None, {"GPU": 1.0}, None, {"why_groups_stay": "no GCS address to remove them through"}),
        (TeardownConfig(), "gcs:1", None, lambda known, s: CLEAN, {"sweep_nodes": True}),
        (
            TeardownConfig(grace_s=10, straggler_grace_s=2, fence_timeout_s=30),
            None,
            None,
            None,
            {"grace_s": 2, "timeout_s": 30},
        ),
    ],
)
def test_the_rules_follow_the_settings_and_what_the_cluster_offers(config, gcs, before, sweeper, expected) -> None:
    view = AttemptView(leftovers=list, gcs_address=gcs, resources_before=before, sweeper=sweeper)
    rules = fence_rules(config, view)
    assert {key: getattr(rules, key) for key in expected} == expected


class FakeCluster:
    """An attempt's leftovers as the state API, the GCS and NVML report them, changing as the fence acts."""

    def __init__(self, clock: FakeClock, actors: list[LiveActor], dies_after_s: float, kill: KillResult) -> None:
        self.clock = clock
        self.actors = actors
        self.dies_after_s = dies_after_s
        self.kill_result = kill
        self.killed_at: float | None = None
        self.kills: list[tuple[str, ...]] = []

    def live_actors(self, job_id: str) -> list[LiveActor]:
        gone = self.killed_at is not None and self.clock.mono - self.killed_at >= self.dies_after_s
        return [] if gone else list(self.actors)

    def live_placement_groups(self, job_id: str | None = None) -> list[LivePlacementGroup]:
        return []

    def kill(self, ids: tuple[str, ...]) -> list[KillOutcome]:
        self.kills.append(ids)
        if self.kill_result is not KillResult.FAILED:
            self.killed_at = self.clock.mono
        return [
            KillOutcome(i, self.kill_result, "refused" if self.kill_result is KillResult.FAILED else "") for i in ids
        ]


def fence_over(cluster: FakeCluster, clock: FakeClock, timeout_s: float) -> TeardownResult:
    view = AttemptView(leftovers=list, ray_job_id="01000000", state=cluster, gcs_address="gcs:1")  # type: ignore[arg-type]
    view.kill_actors = cluster.kill  # type: ignore[method-assign]
    view.gpu_check = lambda pids: FREE
    started = clock.mono
    fenced = fence(view, fence_rules(TeardownConfig(fence_timeout_s=timeout_s), view), clock.clock())
    return TeardownResult.of(Stopped(), fenced, clock.mono - started)


def test_a_stray_actor_is_killed_once_and_the_fence_holds_when_it_is_dead() -> None:
    clock = FakeClock()
    cluster = FakeCluster(clock, [ACTOR], dies_after_s=0.5, kill=KillResult.KILLED)
    result = fence_over(cluster, clock, timeout_s=60)
    assert cluster.kills == [(ACTOR.actor_id,)]
    assert result.actors_killed == ("Rollout rollout_0",)
    assert (result.actors_alive, result.problems, result.fenced) == (0, (), True)
    assert 0.5 <= result.duration_s < 1.0, "it looked again every poll until the actor was dead"


def test_a_kill_the_gcs_refuses_is_named_and_the_fence_gives_up_on_time() -> None:
    clock = FakeClock()
    cluster = FakeCluster(clock, [ACTOR], dies_after_s=0.0, kill=KillResult.FAILED)
    result = fence_over(cluster, clock, timeout_s=3)
    assert cluster.kills == [(ACTOR.actor_id,)], "each id is asked once"
    assert result.fenced is False
    assert result.actors_alive == 1
    (problem,) = result.problems
    assert "(kill failed: refused)" in problem
    assert result.duration_s == pytest.approx(3.0, abs=0.11), "not a poll past teardown.fence_timeout_s"


def test_what_keeps_the_view_blind_fails_the_fence_even_when_nothing_is_seen() -> None:
    clock = FakeClock()
    view = AttemptView(leftovers=list, gpu_check=lambda pids: FREE, problems=("the Ray job is unknown",))
    fenced = fence(view, fence_rules(TeardownConfig(), view), clock.clock())
    assert fenced.problems == ("the Ray job is unknown",)
    assert TeardownResult.of(Stopped(), fenced, 0.0).fenced is False


def test_the_teardown_event_takes_every_field_of_the_result() -> None:
    result = TeardownResult.of(
        Stopped(terminated=(ProcessInfo(7, "python", "driver"),), problems=("did not stop",)),
        dataclasses.replace(
            fence(AttemptView(leftovers=list, gpu_check=lambda pids: FREE), RULES, FakeClock().clock()),
            killed=(WORKER,),
            ray_job_id="01000000",
        ),
        1.5,
    )
    line = Teardown(1, None, result.event_fields()).payload()
    assert (line["terminated"], line["killed"], line["ray_job_id"]) == (["python[7]"], ["ray::Worker[41]"], "01000000")
    assert (line["problems"], line["gpu_memory"], line["duration_s"]) == (["did not stop"], "free on 2 GPUs", 1.5)
    assert (line["fenced"], line["attempt"], line["reached_step"]) == (False, 1, None)


def test_a_field_added_to_the_fences_result_reaches_the_teardown_event_with_no_other_edit(tmp_path) -> None:
    """The event is derived from the result: a new field of ``FenceResult`` is written without a copy by hand."""
    grown = dataclasses.make_dataclass(
        "GrownFenceResult", [("disks_unmounted", tuple, ("/scratch",))], bases=(FenceResult,), frozen=True
    )
    fenced = fence(AttemptView(leftovers=list, gpu_check=lambda pids: FREE), RULES, FakeClock().clock())
    values = {f.name: getattr(fenced, f.name) for f in dataclasses.fields(FenceResult)}
    teardown = dataclasses.make_dataclass("GrownTeardown", [], bases=(TeardownResult, grown), frozen=True)
    result = teardown(**values, duration_s=0.5)
    log = EventLog(tmp_path / "events.jsonl", run_id="r", console=None)
    log.emit(Teardown(2, 10, result.event_fields()))
    (line,) = read_events(tmp_path / "events.jsonl")
    assert line["disks_unmounted"] == ["/scratch"]
    assert (line["event"], line["attempt"], line["reached_step"], line["fenced"]) == ("teardown", 2, 10, True)


class SilentState:
    """A state API that never answers (a dashboard restarting through the whole teardown)."""

    def __init__(self) -> None:
        self.asked = 0

    def live_actors(self, job_id: str) -> list[LiveActor]:
        self.asked += 1
        raise ConnectionRefusedError("connection refused")

    live_placement_groups = live_actors


def test_a_state_api_silent_through_the_teardown_is_asked_until_the_deadline_then_named() -> None:
    clock = FakeClock()
    state = SilentState()
    view = AttemptView(leftovers=list, ray_job_id="01000000", state=state, gpu_check=lambda pids: FREE)  # type: ignore[arg-type]
    fenced = fence(view, fence_rules(TeardownConfig(fence_timeout_s=2), view), clock.clock())
    assert state.asked > 10, "asked again at every look"
    (problem,) = fenced.problems
    assert "an unknown number of Ray actors" in problem
    assert "none identified (the state API did not answer)" in problem
    assert (fenced.actors_alive, fenced.placement_groups_alive) == (None, None)
    assert TeardownResult.of(Stopped(), fenced, 2.0).fenced is False
