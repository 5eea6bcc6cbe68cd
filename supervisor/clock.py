"""Where the supervisor gets the time and waits; tests substitute a fake one, so that a deadline of minutes is
a test of milliseconds."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Clock:
    now: Callable[[], float] = time.time
    """Wall-clock seconds (records, events)."""
    monotonic: Callable[[], float] = time.monotonic
    """For durations, deadlines and the watchdog."""
    sleep: Callable[[float], None] = time.sleep
