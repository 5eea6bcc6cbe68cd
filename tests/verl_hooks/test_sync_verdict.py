"""What the guard does once it stops waiting for verl's weight sync, from a table: ``verl_hooks.sync_verdict`` is a
pure function of what the wait saw. The guard carrying the verdicts out on verl's own manager:
tests/verl_hooks/e2e/ (verl's manager, real Ray workers)."""

from __future__ import annotations

import pytest

from verl_hooks.deadline import Deadline
from verl_hooks.errors import WeightSyncFatalError, WeightSyncTimeout
from verl_hooks.phases import SyncPhase
from verl_hooks.sync_verdict import Failed, PassOn, Synced, Verdict, judge

DEADLINE = Deadline(30.0, adaptive=False, reason="VERL_HOOKS_SYNC_TIMEOUT_S")
BROKEN = RuntimeError("NCCL error: unhandled system error")
INNER = WeightSyncFatalError.from_failure(
    BROKEN, phase=SyncPhase.ABORT, global_step=3, backend="nccl", elapsed_s=0.5, cleanup=[], hang=False
)
CTRL_C = KeyboardInterrupt()

CASES = [
    # finished, error, stop requested, a trainer can save -> verdict
    ("returned", (True, None, False, False), Synced(stop=False)),
    ("returned, stop asked, a hooked fit can save: the safe point", (True, None, True, True), Synced(stop=True)),
    ("returned, stop asked, no hooked fit to save it: go on", (True, None, True, False), Synced(stop=False)),
    ("raised: clean up, record, raise", (True, BROKEN, False, False), Failed(BROKEN, hang=False)),
    ("raised with a stop asked: the failure wins", (True, BROKEN, True, True), Failed(BROKEN, hang=False)),
    ("an inner guarded sync's error: passed on as it is", (True, INNER, False, False), PassOn(INNER)),
    ("not an Exception: passed on", (True, CTRL_C, False, False), PassOn(CTRL_C)),
]


@pytest.mark.parametrize(("seen", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_judge(seen: tuple, expected: Verdict) -> None:
    finished, error, stop_requested, trainer_can_save = seen
    verdict = judge(finished, error, DEADLINE, SyncPhase.UPDATE_WEIGHTS, stop_requested, trainer_can_save)
    assert verdict == expected


def test_the_deadline_passed_is_a_hang_named_by_its_phase_and_limit() -> None:
    verdict = judge(False, None, DEADLINE, SyncPhase.BUILD_PROCESS_GROUP, stop_requested=True, trainer_can_save=True)
    assert isinstance(verdict, Failed)
    assert verdict.hang
    assert isinstance(verdict.primary, WeightSyncTimeout)
    assert str(verdict.primary) == (
        "weight sync did not finish within 30 s (VERL_HOOKS_SYNC_TIMEOUT_S); stuck in phase 'build_process_group'"
    )
