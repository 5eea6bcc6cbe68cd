"""How long a weight sync may take before it counts as hung: fixed at first, then from the run's own syncs. Pure.

A fixed deadline must be generous (a large model's first sync also builds process groups, over a slow fabric),
so a hang costs the full ten minutes however fast the run's syncs are. Like the supervisor's watchdog for steps,
the guard learns: once a few syncs have finished after the first one (which sets the process groups up), the
deadline is a multiple of the slowest recent one, never below a floor and never above the fixed limit.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

VERL_INIT_MARGIN_S = 30.0
"""How much longer than verl's own process-group init timeout the guard's first sync waits."""


@dataclass(frozen=True)
class Deadline:
    seconds: float
    adaptive: bool
    reason: str
    """Which limit applied, in words for the error message."""


@dataclass
class SyncDeadlines:
    """The deadlines of one manager's syncs. ``record`` each successful sync's duration, in order."""

    fixed_s: float
    adaptive: bool = True
    multiple: float = 5.0
    floor_s: float = 60.0
    min_syncs: int = 2
    """Successful syncs after the first one before the deadline adapts."""
    window: int = 8
    verl_init_timeout_s: float | None = None
    """verl's own bound on building the first process group (``VERL_CKPT_ENGINE_INIT_TIMEOUT_S``, verl PR #7045):
    the first sync then waits that long plus ``VERL_INIT_MARGIN_S``, so that verl's ``CheckpointEngineInitError``,
    which names the hang, comes first."""
    _durations: deque[float] = field(default_factory=deque, repr=False)
    _syncs: int = 0

    @property
    def shape(self) -> tuple[float, bool, float, float, int, int, float | None]:
        return (
            self.fixed_s,
            self.adaptive,
            self.multiple,
            self.floor_s,
            self.min_syncs,
            self.window,
            self.verl_init_timeout_s,
        )

    def record(self, duration_s: float) -> None:
        self._syncs += 1
        if self._syncs == 1:
            return  # the first sync builds the process groups: not what the next ones cost
        self._durations.append(duration_s)
        while len(self._durations) > self.window:
            self._durations.popleft()

    def current(self) -> Deadline:
        fixed = Deadline(self.fixed_s, False, f"the fixed limit VERL_HOOKS_SYNC_TIMEOUT_S={self.fixed_s:g} s")
        if self._syncs == 0 and self.verl_init_timeout_s is not None:
            first = self.verl_init_timeout_s + VERL_INIT_MARGIN_S
            if first > self.fixed_s:
                reason = (
                    f"the first sync's limit: verl's VERL_CKPT_ENGINE_INIT_TIMEOUT_S={self.verl_init_timeout_s:g} s "
                    f"+ {VERL_INIT_MARGIN_S:g} s, so that verl's own error comes first"
                )
                return Deadline(first, False, reason)
        if not self.adaptive or len(self._durations) < self.min_syncs:
            return fixed
        slowest = max(self._durations)
        seconds = min(self.fixed_s, max(self.floor_s, self.multiple * slowest))
        if seconds >= self.fixed_s:
            return fixed
        reason = (
            f"the adaptive limit: {self.multiple:g} x the slowest of the last {len(self._durations)} syncs "
            f"({slowest:.2f} s), at least {self.floor_s:g} s"
        )
        return Deadline(seconds, True, reason)
