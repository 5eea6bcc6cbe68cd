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
