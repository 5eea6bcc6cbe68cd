"""The emergency save's decisions, as tables: whether to save the step (``verl_hooks.emergency.decide``), its
deadline, and whether the trainer side of a failed sync is idle (``verl_hooks.trainer_side.judge``). No processes."""

from __future__ import annotations

import dataclasses

import pytest

from verl_hooks.contract import EmergencyCheckpoint, EmergencyStatus, EmergencyTrigger
from verl_hooks.emergency import DEADLINE_FLOOR_S, DEADLINE_MULTIPLE, SaveFacts, Skip, deadline_s, decide
from verl_hooks.emergency import Save as SaveStep
from verl_hooks.trainer_side import TrainerSide, judge

IDLE = TrainerSide(True, "all 4 trainer task(s) of the sync finished; 2 trainer worker(s) answer")
BUSY = TrainerSide(False, "1 of 4 trainer task(s) of the sync still running 1 s after its cleanup")
DUE = SaveFacts(
    trigger=EmergencyTrigger.SYNC_FAILURE,
    enabled=True,
    trainer_step=5,
    sync_step=5,
    trainer_side=IDLE,
    save_freq=3,
    async_save=False,
    in_critic_warmup=False,
    already_saved=False,
)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, SaveStep(5)),
        ({"sync_step": None}, SaveStep(5)),  # verl's validation syncs carry no step; the trainer is still at 5
        ({"trigger": EmergencyTrigger.STOP_REQUEST, "trainer_side": None}, SaveStep(5)),
        ({"save_freq": None}, SaveStep(5)),  # a trainer whose config does not say: the run's files will
        ({"enabled": False}, Skip("turned off (restart.emergency_save=false / VERL_HOOKS_EMERGENCY_SAVE=0)")),
        ({"trainer_step": 0}, Skip("no training step has finished yet")),
        ({"trainer_step": None}, Skip("no training step has finished yet")),
        ({"sync_step": 4}, Skip("the sync was for step 4 while the trainer is at step 5")),
        ({"save_freq": 0}, Skip("the run saves no checkpoints (trainer.save_freq <= 0)")),
        ({"save_freq": -1}, Skip("the run saves no checkpoints (trainer.save_freq <= 0)")),
        (
            {"async_save": True},
            Skip("asynchronous saves (checkpoint.async_save): verl writes their tracker later, out of our sight"),
        ),
        ({"in_critic_warmup": True}, Skip("step 5 is a critic warm-up step, which verl's trainer never saves")),
        ({"already_saved": True}, Skip("step 5 is already saved")),
        ({"already_saved": True, "trainer_side": BUSY}, Skip("step 5 is already saved")),
        ({"trainer_side": BUSY}, Skip(f"the trainer side is not idle: {BUSY.reason}")),
    ],
)
def test_decide(changes: dict, expected: SaveStep | Skip) -> None:
    assert decide(dataclasses.replace(DUE, **changes)) == expected


@pytest.mark.parametrize(
    ("durations", "timeout_s", "expected"),
    [
        ([], 600.0, 600.0),  # nothing timed yet: the documented default
        ([0.1, 0.2], 600.0, DEADLINE_FLOOR_S),  # fast saves: the floor
        ([30.0, 100.0], 600.0, DEADLINE_MULTIPLE * 100.0),  # the slowest, times the multiple
        ([300.0], 600.0, 600.0),  # never above the limit
        ([0.1], 10.0, 10.0),  # a limit under the floor wins: the user asked for it
    ],
)
def test_the_deadline_comes_from_the_runs_own_saves(durations: list[float], timeout_s: float, expected: float) -> None:
    assert deadline_s(durations, timeout_s) == expected


@pytest.mark.parametrize(
    ("total", "running", "unseen", "dead", "idle", "says"),
    [
        (6, 0, [], [], True, "all 6 trainer task(s) of the sync finished; 2 trainer worker(s) answer"),
        (0, 0, [], [], True, "all 0 trainer task(s)"),  # failed before the trainer was asked anything
        (6, 2, [], [], False, "2 of 6 trainer task(s) of the sync still running 1 s after its cleanup"),
        (6, 0, [], ["rank 1"], False, "trainer worker(s) not answering: rank 1"),
        (6, 0, ["build_process_group"], [], False, "phase build_process_group ran the manager's own override"),
        (6, 3, ["build_process_group"], ["rank 0"], False, "phase build_process_group"),  # the first reason found
    ],
)
def test_judge_the_trainer_side(total, running, unseen, dead, idle: bool, says: str) -> None:
    side = judge(total, running, unseen, dead, workers=2, waited_s=1.0)
    assert side.idle is idle
    assert side.reason.startswith(says)
    assert TrainerSide.from_dict(side.to_dict()) == side


@pytest.mark.parametrize(
    ("checkpoint", "summary"),
    [
        (
            EmergencyCheckpoint(EmergencyStatus.SAVED, EmergencyTrigger.SYNC_FAILURE, 5, None, 2.04, 60),
            "saved step 5 in 2.0 s",
        ),
        (
            EmergencyCheckpoint(EmergencyStatus.SKIPPED, EmergencyTrigger.SYNC_FAILURE, 5, "step 5 is already saved"),
            "skipped: step 5 is already saved",
        ),
        (
            EmergencyCheckpoint(EmergencyStatus.FAILED, EmergencyTrigger.STOP_REQUEST, 4, "OSError: disk full", 1, 60),
            "saving step 4 failed: OSError: disk full",
        ),
        (
            EmergencyCheckpoint(EmergencyStatus.TIMED_OUT, EmergencyTrigger.SYNC_FAILURE, 5, "still saving", 10, 10),
            "step 5 not saved: the save was still running at its 10 s deadline",
        ),
    ],
)
def test_what_the_record_says_and_reads_back(checkpoint: EmergencyCheckpoint, summary: str) -> None:
    assert checkpoint.summary() == summary
    assert EmergencyCheckpoint.from_dict(checkpoint.to_dict()) == checkpoint


def test_a_newer_jobs_outcome_this_side_cannot_read_is_no_outcome() -> None:
    assert EmergencyCheckpoint.from_dict({"status": "deferred", "trigger": "sync_failure", "step": 5}) is None
    assert EmergencyCheckpoint.from_dict(None) is None
