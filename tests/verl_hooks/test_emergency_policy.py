"""The emergency save's decisions, as tables: whether to save the step (``verl_hooks.emergency.decide``), its
deadline, and whether the trainer side of a failed sync is idle (``verl_hooks.trainer_side.judge``). No processes."""

from __future__ import annotations

import dataclasses

import pytest

from verl_hooks.contract import EmergencyCheckpoint, EmergencyStatus, EmergencyTrigger
from verl_hooks.emergency import (
    ASYNC_TRAINER_MODES_NOTE,
    DEADLINE_FLOOR_S,
    DEADLINE_MULTIPLE,
    LORA_MERGED_NOTE,
    SaveFacts,
    Skip,
    deadline_s,
    decide,
    lora_merged_for_sync,
)
from verl_hooks.emergency import Save as SaveStep
from verl_hooks.step_progress import ProgressView
from verl_hooks.trainer_side import TrainerSide, judge

HALF_WRITTEN = (
    f"trainer mode separate_async {ASYNC_TRAINER_MODES_NOTE}, and the failed sync had begun writing the rollout's "
    "weights: those rollouts come from half-written weights"
)
ASYNC_MODE = (
    f"trainer mode colocate_async {ASYNC_TRAINER_MODES_NOTE}: only sync mode is saved after a failure outside the "
    "weight sync"
)

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
    critic_warmup=None,
    saved_steps=frozenset({3}),
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
        ({"critic_warmup": 6}, Skip("step 5 is a critic warm-up step, which verl's trainer never saves")),
        ({"critic_warmup": 5}, SaveStep(5)),
        ({"saved_steps": frozenset({3, 5})}, Skip("step 5 is already saved")),
        ({"trainer_side": BUSY}, Skip(f"the trainer side is not idle: {BUSY.reason}")),
        # Finding 1: an async trainer mode saves TransferQueue's rollouts, which the cleanup let the rollout
        # generate from the half-written weights once the sync had begun writing them.
        ({"trainer_mode": "separate_async", "rollout_weights_touched": True}, Skip(HALF_WRITTEN)),
        ({"trainer_mode": "separate_async", "rollout_weights_touched": False}, SaveStep(5)),
        ({"trainer_mode": "sync", "rollout_weights_touched": True}, SaveStep(5)),
        # Finding 6: LoRA merged into the base weights for the sync, which failed while streaming them.
        ({"lora_merged_for_sync": True, "rollout_weights_touched": True}, Skip(LORA_MERGED_NOTE)),
        ({"lora_merged_for_sync": True, "rollout_weights_touched": False}, SaveStep(5)),
    ],
)
def test_decide(changes: dict, expected: SaveStep | Skip) -> None:
    assert decide(dataclasses.replace(DUE, **changes)) == expected


# A failure outside the sync at step 5 (generation, reward, data, validation), the trainer's last synced step 4.
BEFORE_UPDATES = ProgressView(
    synced_step=4, has_data_state=True, started=("_compute_old_log_prob",), finished=("_compute_old_log_prob",)
)
STEP_FAILURE = dataclasses.replace(
    DUE,
    trigger=EmergencyTrigger.STEP_FAILURE,
    sync_step=None,
    trainer_side=None,
    progress=BEFORE_UPDATES,
    expected_updates={"_update_critic": 1, "_update_actor": 1},
)
BOTH = ("_update_critic", "_update_actor")


def progress(**changes) -> ProgressView:
    return dataclasses.replace(BEFORE_UPDATES, **changes)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        # Before any update of step 5: step 4, with the dataloader as it was at step 4's sync.
        ({}, SaveStep(4, rewind=True)),
        ({"progress": progress(started=(), finished=())}, SaveStep(4, rewind=True)),
        # After its own sync (validation, metrics, logging): step 5 as it is.
        ({"progress": progress(synced_step=5, started=(), finished=())}, SaveStep(5)),
        # Every update of step 5 finished (a failure in the periodic save, or before the sync): step 5.
        ({"progress": progress(started=BOTH, finished=BOTH)}, SaveStep(5)),
        (
            {"progress": progress(started=BOTH, finished=BOTH), "saved_steps": frozenset({3, 5})},
            Skip("step 5 is already saved"),
        ),
        # In between: one update done, the other not begun.
        (
            {"progress": progress(started=("_update_critic",), finished=("_update_critic",))},
            Skip(
                "step 5's updates were part done (_update_critic x1 of _update_actor x1, _update_critic x1): the "
                "trainer holds neither step 4 nor step 5"
            ),
        ),
        # V1's parameter_sync_step: two rounds of updates per step, one done.
        (
            {
                "progress": progress(started=BOTH, finished=BOTH),
                "expected_updates": {"_update_critic": 2, "_update_actor": 2},
            },
            Skip(
                "step 5's updates were part done (_update_actor x1, _update_critic x1 of _update_actor x2, "
                "_update_critic x2): the trainer holds neither step 4 nor step 5"
            ),
        ),
        # A trainer task that raised, or one still running: never saved over.
        (
            {"progress": progress(raised=("_compute_old_log_prob",))},
            Skip("trainer task(s) raised (_compute_old_log_prob): a worker may be left inside a collective"),
        ),
        (
            {"progress": progress(started=("_update_actor",), finished=(), raised=("_update_actor",))},
            Skip("trainer task(s) raised (_update_actor): a worker may be left inside a collective"),
        ),
        ({"progress": progress(in_flight=("_update_actor",))}, Skip("trainer call(s) still running (_update_actor)")),
        # A trainer worker killed or wedged while the step failed elsewhere (a colocated replica's process).
        (
            {"unanswering_workers": ("actor_rollout_wg rank 1",)},
            Skip("trainer worker(s) not answering: actor_rollout_wg rank 1"),
        ),
        # What cannot be known is not saved.
        (
            {"progress": progress(synced_step=None)},
            Skip("no step was synced in this process before the failure at step 5"),
        ),
        ({"progress": progress(synced_step=3)}, Skip("the trainer is at step 5 but the last step it synced is 3")),
        (
            {"progress": progress(has_data_state=False)},
            Skip("the dataloader's state at step 4's sync was not captured"),
        ),
        (
            {"progress": None},
            Skip("the trainer's progress through its step was not followed (not inside a hooked fit)"),
        ),
        (
            {"updates_tracked": False},
            Skip(
                "the trainer's updates run outside verl's _update_actor/_update_critic, where they cannot be seen: "
                "whether step 5's began is unknown"
            ),
        ),
        # The step before is on disk already, or is a warm-up step the legacy trainer never saves.
        ({"saved_steps": frozenset({4})}, Skip("step 4 is already saved")),
        ({"critic_warmup": 5}, Skip("step 4 is a critic warm-up step, which verl's trainer never saves")),
        ({"trainer_step": 1, "progress": progress(synced_step=0)}, Skip("no training step has finished yet")),
        # Async trainer modes store the rollout's in-flight data with the step: not saved after such failures.
        ({"trainer_mode": "colocate_async"}, Skip(ASYNC_MODE)),
        ({"trainer_mode": "sync"}, SaveStep(4, rewind=True)),
        ({"enabled": False}, Skip("turned off (restart.emergency_save=false / VERL_HOOKS_EMERGENCY_SAVE=0)")),
    ],
)
def test_decide_after_a_failure_outside_the_sync(changes: dict, expected: SaveStep | Skip) -> None:
    assert decide(dataclasses.replace(STEP_FAILURE, **changes)) == expected


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
    ("durations", "past_s", "expected"),
    [
        # Before the first periodic save after a restart: the earlier attempts' slowest save, not 600 s.
        ([], 40.0, DEADLINE_MULTIPLE * 40.0),
        ([], 1.0, DEADLINE_FLOOR_S),
        ([], None, 600.0),  # a first attempt that has timed no save: the documented default
        ([], 0.0, 600.0),
        ([50.0], 1.0, DEADLINE_MULTIPLE * 50.0),  # this process's own saves come first
    ],
)
def test_the_deadline_comes_from_earlier_attempts_saves_before_this_ones(durations, past_s, expected) -> None:
    assert deadline_s(durations, 600.0, past_s) == expected


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


def test_a_trainer_task_that_raised_is_never_idle() -> None:
    """Finding 2: a raised task has settled, but its peers may have collectives queued (verl's NCCL engine)."""
    side = judge(4, 0, [], [], workers=2, waited_s=1.0, raised=["RuntimeError: rank 0 failed to send"])
    assert side.idle is False
    assert side.reason.startswith("1 of 4 trainer task(s) of the sync raised (RuntimeError: rank 0 failed to send)")


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


@pytest.mark.parametrize(
    ("model", "merged"),
    [
        ({"lora_rank": 8, "lora": {"merge": True, "rank": 0}}, True),
        ({"lora_rank": 0, "lora": {"merge": True, "rank": 16}}, True),
        ({"lora_rank": 8, "lora": {"merge": False, "rank": 0}}, False),  # adapters synced apart: base untouched
        ({"lora_rank": 0, "lora": {"merge": True, "rank": 0}}, False),  # no LoRA at all
        ({}, False),
    ],
)
def test_lora_merged_for_the_sync_is_read_from_verls_keys(model: dict, merged: bool) -> None:
    from omegaconf import OmegaConf

    assert lora_merged_for_sync(OmegaConf.create({"actor_rollout_ref": {"model": model}})) is merged
