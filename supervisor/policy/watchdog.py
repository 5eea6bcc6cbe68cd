"""Stall detection: a pure function of the heartbeats an attempt has sent and the time.

Progress is a heartbeat from the weight-sync guard (the contract's ``PROGRESS_KINDS``): verl syncs weights every
step, so their absence for longer than a step can take means the
training loop is stuck. Before the first completed sync a longer allowance applies (model loading, the first
rollout). With ``adaptive`` on, once a few steps have been seen the limit becomes a multiple of the slowest
recent step, never below a floor and never above the fixed limit, as the best training launchers do: a job
whose steps take 30 s is declared stalled long before a fixed one-hour limit would. ``alive`` beats from the
driver tell a frozen process (SIGSTOP, a wedged host) from a stuck loop.

The watchdog arms only once the attempt has sent a heartbeat: a job launched without ``verl_hooks.launch``
sends none and is left to its own exit.

While the trainer makes an emergency save (``save_begin`` .. ``save_end``), silence is allowed until the save's
own deadline, which the beat carries, plus ``SAVE_EXIT_MARGIN_S``: the job gives up on the save at its deadline
by itself, and the supervisor never tears it down in the middle of it.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from supervisor.config import WatchdogConfig
from supervisor.job.beat import Heartbeat
from verl_hooks.contract import PROGRESS_KINDS, HeartbeatKind

SAVE_EXIT_MARGIN_S = 30.0
"""Past its deadline the job abandons the save, records the failure and exits: the time that takes."""


class StallKind(str, Enum):
    JOB_STALL = "job_stall"
    """No progress, and no weight sync in flight: stuck in generation, training, a reward call..."""
    WEIGHT_SYNC_HANG = "weight_sync_hang"
    """No progress while a weight sync is in flight (the guard's own deadline has not ended it)."""
    DRIVER_FROZEN = "driver_frozen"
    """The driver's alive beats stopped: the process is frozen or gone without exiting."""
    EMERGENCY_SAVE_OVERRUN = "emergency_save_overrun"
    """The trainer's emergency save went on past its deadline, and the job did not end by itself."""


@dataclass(frozen=True)
class Stall:
    kind: StallKind
    silent_s: float
    """Seconds since the heartbeat that counted (progress, or the driver's alive beat)."""
    limit_s: float
    last_step: int | None
    phase: str | None
    heartbeat_ages_s: dict[str, float]
    reason: str

    def event_fields(self) -> dict[str, Any]:
        """Every field as the stall_detected event writes it (``kind`` as ``stall_kind``, its value)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        kind = fields.pop("kind")
        return {**fields, "stall_kind": kind.value, "silent_s": round(self.silent_s, 3)}


@dataclass
class ProgressState:
    """What one attempt's heartbeats say; fed by ``observe``, read by ``check``."""

    started_at: float
    armed: bool = False
    last_progress_at: float | None = None
    last_alive_at: float | None = None
    last_sync_end_at: float | None = None
    last_step: int | None = None
    in_flight_phase: str | None = None
    saving_step: int | None = None
    """The step of an emergency save under way (``save_begin`` seen, ``save_end`` not yet)."""
    saving_since: float | None = None
    saving_until: float | None = None
    """When that save's deadline, plus ``SAVE_EXIT_MARGIN_S``, runs out."""
    step_intervals_s: deque[float] = field(default_factory=lambda: deque(maxlen=16))
    last_seen: dict[str, float] = field(default_factory=dict)

    def observe(self, beat: Heartbeat) -> None:
        if beat.kind is None:
            return  # a kind this supervisor does not know (a newer job): no evidence either way
        self.armed = True
        self.last_seen[beat.kind.value] = beat.received_at
        if beat.kind is HeartbeatKind.ALIVE:
            self.last_alive_at = beat.received_at
            return
        if beat.kind is HeartbeatKind.SAVE_BEGIN:
            deadline = beat.fields.get("deadline_s")
            limit = float(deadline) if isinstance(deadline, int | float) and not isinstance(deadline, bool) else 0.0
            self.saving_step, self.saving_since = beat.step, beat.received_at
            self.saving_until = beat.received_at + limit + SAVE_EXIT_MARGIN_S
            return
        if beat.kind is HeartbeatKind.SAVE_END:
            self.saving_step = self.saving_since = self.saving_until = None
            self.last_progress_at = beat.received_at  # the job is on its way out: judge its silence afresh
            return
        if beat.kind not in PROGRESS_KINDS:
            return
        self.last_progress_at = beat.received_at
        if beat.step is not None:
            self.last_step = beat.step
        if beat.kind is HeartbeatKind.SYNC_BEGIN:
            self.in_flight_phase = "begin"
        elif beat.kind is HeartbeatKind.SYNC_PHASE:
            self.in_flight_phase = beat.phase
        else:
            self.in_flight_phase = None
        if beat.kind is HeartbeatKind.SYNC_END:
            if self.last_sync_end_at is not None:
                self.step_intervals_s.append(beat.received_at - self.last_sync_end_at)
            self.last_sync_end_at = beat.received_at


def progress_limit_s(state: ProgressState, config: WatchdogConfig) -> float:
    """How long the attempt may go without progress at this point."""
    if state.last_sync_end_at is None:
        return config.startup_timeout_s
    if config.adaptive and len(state.step_intervals_s) >= config.adaptive_min_steps:
        adaptive = config.adaptive_multiple * max(state.step_intervals_s)
        return min(config.step_timeout_s, max(config.adaptive_floor_s, adaptive))
    return config.step_timeout_s


def check(state: ProgressState, config: WatchdogConfig, now: float) -> Stall | None:
    """A stall if the attempt has gone quiet for longer than it may; None otherwise."""
    if not config.enabled or not state.armed:
        return None
    ages = {kind: round(now - at, 3) for kind, at in sorted(state.last_seen.items())}
    if state.last_alive_at is not None and now - state.last_alive_at > config.driver_timeout_s:
        silent = now - state.last_alive_at
        return Stall(
            StallKind.DRIVER_FROZEN,
            silent,
            config.driver_timeout_s,
            state.last_step,
            state.in_flight_phase,
            ages,
            f"no alive heartbeat from the driver for {silent:.0f} s (watchdog.driver_timeout_s="
            f"{config.driver_timeout_s:g}): the driver is frozen",
        )
    if state.saving_until is not None and state.saving_since is not None:
        if now <= state.saving_until:
            return None
        return Stall(
            StallKind.EMERGENCY_SAVE_OVERRUN,
            now - state.saving_since,
            state.saving_until - state.saving_since,
            state.last_step,
            None,
            ages,
            f"the emergency save of step {state.saving_step} went past its deadline and the job did not end",
        )
    limit = progress_limit_s(state, config)
    since = state.last_progress_at if state.last_progress_at is not None else state.started_at
    silent = now - since
    if silent <= limit:
        return None
    if state.in_flight_phase is not None:
        kind = StallKind.WEIGHT_SYNC_HANG
        where = f"a weight sync in phase '{state.in_flight_phase}' at step {state.last_step}"
    else:
        kind = StallKind.JOB_STALL
        where = "the job" if state.last_step is None else f"the job after the weight sync of step {state.last_step}"
    before = "before its first weight sync" if state.last_sync_end_at is None else "without progress"
    return Stall(
        kind,
        silent,
        limit,
        state.last_step,
        state.in_flight_phase,
        ages,
        f"{where} made no progress for {silent:.0f} s ({before}; limit {limit:.0f} s)",
    )
