"""The preemption benchmark's figures, read from a job's progress lines (the runs are the script's business)."""

from __future__ import annotations

import pytest

from tests.conftest import loaded_script


@pytest.fixture(scope="module")
def bench():
    with loaded_script("bench_preemption") as module:
        yield module


def steps(first: int, last: int, start_ts: float, pid: int) -> list[dict]:
    return [{"event": "step", "step": s, "ts": start_ts + (s - first), "pid": pid} for s in range(first, last + 1)]


def test_a_job_saved_on_the_notice_redoes_nothing_and_loses_the_relaunch(bench) -> None:
    # Steps 1-8 a second apart; the drain at 7.5; the job saved step 9 (its sync done, not logged) and resumed at it.
    progress = [{"event": "start", "step": 0, "ts": 0.0, "pid": 1}, *steps(1, 8, 1.0, 1)]
    progress += [{"event": "start", "step": 9, "ts": 20.0, "pid": 2}, *steps(10, 12, 21.0, 2)]
    progress.append({"event": "done", "step": 12, "ts": 24.0, "pid": 2})
    figures = bench.recovery_metrics(progress, drained_at=7.5)
    assert figures["steps_redone"] == 0
    assert figures["step_before_relaunch"] == 8
    assert figures["resumed_at_step"] == 9
    assert figures["time_lost_s"] == 12.0  # step 8 first logged at 8, the relaunch back past it at 20
    assert figures["drain_to_back_s"] == 12.5
    assert bench.training_span(progress) == 24.0


def test_a_job_that_trains_until_the_node_dies_redoes_the_steps_since_its_save(bench) -> None:
    # Drained at 7.5, trained on to step 12, died; resumed from the save at 10 and trained 11 and 12 again.
    progress = [{"event": "start", "step": 0, "ts": 0.0, "pid": 1}, *steps(1, 12, 1.0, 1)]
    progress += [{"event": "start", "step": 10, "ts": 30.0, "pid": 2}, *steps(11, 14, 31.0, 2)]
    figures = bench.recovery_metrics(progress, drained_at=7.5)
    assert figures["steps_redone"] == 2
    assert figures["time_lost_s"] == 20.0  # step 12 first logged at 12, logged again at 32
    assert figures["drain_to_back_s"] == 24.5
    assert bench.step_time(progress) == 1.0


def test_a_run_not_relaunched_after_the_drain_lost_nothing(bench) -> None:
    progress = [{"event": "start", "step": 0, "ts": 0.0, "pid": 1}, *steps(1, 5, 1.0, 1)]
    assert bench.recovery_metrics(progress, drained_at=2.5) == {
        "relaunched": False,
        "steps_redone": 0,
        "time_lost_s": 0.0,
        "drain_to_back_s": None,
    }
