"""What the guard does once it stops waiting for verl's weight sync, from a table: ``verl_hooks.sync_verdict`` is a
pure function of what the wait saw. The guard carrying the verdicts out on verl's own manager:
tests/verl_hooks/e2e/ (verl's manager, real Ray workers)."""

from __future__ import annotations

import pytest

from verl_hooks.deadline import Deadline
from verl_hooks.errors import WeightSyncFatalError, WeightSyncTimeout
from verl_hooks.phases import SyncPhase
from verl_hooks.sync_verdict import Failed, PassOn, Synced, Verdict, judge, stop_here

DEADLINE = Deadline(30.0, adaptive=False, reason="VERL_HOOKS_SYNC_TIMEOUT_S")
BROKEN = RuntimeError("NCCL error: unhandled system error")
INNER = WeightSyncFatalError.from_failure(
    BROKEN, phase=SyncPhase.ABORT, global_step=3, backend="nccl", elapsed_s=0.5, cleanup=[], hang=False
)
CTRL_C = KeyboardInterrupt()

CASES = [
    # finished, error -> verdict
    ("returned", (True, None), Synced()),
    ("raised: clean up, record, raise", (True, BROKEN), Failed(BROKEN, hang=False)),
    ("an inner guarded sync's error: passed on as it is", (True, INNER), PassOn(INNER)),
    ("not an Exception: passed on", (True, CTRL_C), PassOn(CTRL_C)),
]


@pytest.mark.parametrize(("seen", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_judge(seen: tuple, expected: Verdict) -> None:
    finished, error = seen
    assert judge(finished, error, DEADLINE, SyncPhase.UPDATE_WEIGHTS) == expected


@pytest.mark.parametrize(
    ("stop_requested", "trainer_can_save", "stop"),
    [(False, False, False), (False, True, False), (True, False, False), (True, True, True)],
    ids=["no-stop-asked", "no-stop-asked-a-trainer-could-save", "stop-asked-no-trainer-to-save-it", "the-safe-point"],
)
def test_a_synced_step_is_the_safe_point_of_a_stop_only_with_a_trainer_to_save_it(
    stop_requested: bool, trainer_can_save: bool, stop: bool
) -> None:
    assert stop_here(stop_requested, trainer_can_save) is stop


def test_the_deadline_passed_is_a_hang_named_by_its_phase_and_limit() -> None:
    verdict = judge(False, None, DEADLINE, SyncPhase.BUILD_PROCESS_GROUP)
    assert isinstance(verdict, Failed)
    assert verdict.hang
    assert isinstance(verdict.primary, WeightSyncTimeout)
    assert str(verdict.primary) == (
        "weight sync did not finish within 30 s (VERL_HOOKS_SYNC_TIMEOUT_S); stuck in phase 'build_process_group'"
    )
