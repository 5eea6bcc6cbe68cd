"""SIGINT and SIGTERM to the supervisor: how the loop learns of them without being cut off mid-step.

A signal is raised as ``Interrupted`` only while the loop waits (``raising``: on the job, in the backoff); at any
other moment it is noted and acted on at the loop's next step (``check``), so that a launch, a teardown or a
state file is never left half-done (``deferred``). A second signal cuts short the wait for a save before the stop.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

from supervisor.policy.restart import STOP_SIGNALS


class Interrupted(Exception):
    """A stop signal arrived while the supervisor waited."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    def __init__(self) -> None:
        self.signum: int | None = None
        """The first stop signal received (None: none yet)."""
        self.repeated = False
        """A second one arrived."""
        self._interruptible = False

    @contextlib.contextmanager
    def handled(self) -> Iterator[None]:
        """Handle the stop signals while the block runs; the previous handlers come back after it."""
        previous: dict[int, Callable[..., Any] | int | None] = {s: signal.getsignal(s) for s in STOP_SIGNALS}
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._on_signal)
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def check(self) -> None:
        """Raise ``Interrupted`` if a stop signal arrived: the loop's next step is the stop."""
        if self.signum is not None:
            raise Interrupted(self.signum)

    @contextlib.contextmanager
    def raising(self) -> Iterator[None]:
        """A wait that a stop signal ends at once."""
        self.check()
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """A step no signal may cut short (inside a wait too)."""
        interruptible, self._interruptible = self._interruptible, False
        try:
            yield
        finally:
            self._interruptible = interruptible

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
        else:
            self.repeated = True
        if self._interruptible:
            self._interruptible = False
            raise Interrupted(signum)
