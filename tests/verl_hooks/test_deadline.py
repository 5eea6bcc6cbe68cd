"""The guard's deadline: fixed until the run's own syncs say how long a sync takes, then a multiple of them."""

from __future__ import annotations

import pytest

from verl_hooks.deadline import SyncDeadlines
from verl_hooks.settings import HookSettings


def test_the_first_sync_and_too_few_syncs_keep_the_fixed_limit() -> None:
    deadlines = SyncDeadlines(fixed_s=600.0, multiple=5.0, floor_s=10.0, min_syncs=2)
    assert deadlines.current().seconds == 600.0
    deadlines.record(120.0)  # the first sync builds the process groups: it does not count
    deadlines.record(3.0)
    assert (deadlines.current().seconds, deadlines.current().adaptive) == (600.0, False)
    deadlines.record(4.0)
    deadline = deadlines.current()
    assert (deadline.seconds, deadline.adaptive) == (20.0, True), "5 x the slowest recent sync"
    assert "5 x the slowest of the last 2 syncs" in deadline.reason


@pytest.mark.parametrize(("durations", "expected"), [((0.01, 0.02), 10.0), ((200.0, 150.0), 600.0)])
def test_the_adaptive_limit_stays_between_the_floor_and_the_fixed_limit(durations, expected: float) -> None:
    deadlines = SyncDeadlines(fixed_s=600.0, multiple=5.0, floor_s=10.0)
    for duration in (1.0, *durations):
        deadlines.record(duration)
    assert deadlines.current().seconds == expected


def test_only_recent_syncs_count_and_it_can_be_turned_off() -> None:
    deadlines = SyncDeadlines(fixed_s=600.0, multiple=2.0, floor_s=1.0, window=2)
    for duration in (1.0, 50.0, 3.0, 4.0):
        deadlines.record(duration)
    assert deadlines.current().seconds == 8.0, "the slow sync has left the window"
    off = SyncDeadlines(fixed_s=600.0, adaptive=False)
    for duration in (1.0, 2.0, 3.0):
        off.record(duration)
    assert off.current().seconds == 600.0


@pytest.mark.parametrize(("verl_init_s", "first_s"), [(600.0, 630.0), (60.0, 600.0), (None, 600.0)])
def test_the_first_sync_outlasts_verls_own_process_group_init_timeout(verl_init_s, first_s: float) -> None:
    """verl PR #7045 bounds the first process-group init (VERL_CKPT_ENGINE_INIT_TIMEOUT_S) and raises
    CheckpointEngineInitError, which names the hang: the guard's first sync waits for it; later syncs do not."""
    deadlines = SyncDeadlines(fixed_s=600.0, floor_s=10.0, verl_init_timeout_s=verl_init_s)
    first = deadlines.current()
    assert first.seconds == first_s
    if first_s > 600.0:
        assert "VERL_CKPT_ENGINE_INIT_TIMEOUT_S=600 s + 30 s" in first.reason
    deadlines.record(120.0)
    assert deadlines.current().seconds == 600.0
    env = {} if verl_init_s is None else {"VERL_CKPT_ENGINE_INIT_TIMEOUT_S": str(verl_init_s)}
    assert HookSettings.from_env(env).verl_init_timeout_s == verl_init_s


def test_settings_from_the_environment() -> None:
    env = {
        "VERL_HOOKS_SYNC_ADAPTIVE": "off",
        "VERL_HOOKS_SYNC_ADAPTIVE_MULTIPLE": "3",
        "VERL_HOOKS_SYNC_ADAPTIVE_FLOOR_S": "30",
    }
    settings = HookSettings.from_env(env)
    assert (settings.sync_adaptive, settings.sync_adaptive_multiple, settings.sync_adaptive_floor_s) == (
        False,
        3.0,
        30.0,
    )
    assert HookSettings.from_env({}).sync_adaptive is True


def test_a_cause_raised_in_a_ray_worker_is_typed_by_its_own_class() -> None:
    """verl raises CheckpointEngineInitError (PR #7045) in the engine's init_process_group, on a Ray worker; the
    manager sees RayTaskError(CheckpointEngineInitError). The error record names the class verl raised."""
    from ray.exceptions import RayTaskError

    from verl_hooks.errors import WeightSyncFatalError
    from verl_hooks.phases import SyncPhase

    class CheckpointEngineInitError(RuntimeError):
        """Stands for verl's (verl/checkpoint_engine/_group_init.py in PR #7045, not in a verl release yet)."""

    original = CheckpointEngineInitError("first process-group init did not finish in 600 s (see #6967)")
    wrapped = RayTaskError("init_process_group", "Traceback ...", original).as_instanceof_cause()
    fatal = WeightSyncFatalError.from_failure(
        wrapped,
        phase=SyncPhase.BUILD_PROCESS_GROUP,
        global_step=0,
        backend="nccl",
        elapsed_s=600.0,
        cleanup=[],
        hang=False,
    )
    assert fatal.cause_type is not None
    assert fatal.cause_type.endswith("CheckpointEngineInitError")
    assert "RayTaskError" not in fatal.cause_type
    assert fatal.phase is SyncPhase.BUILD_PROCESS_GROUP
