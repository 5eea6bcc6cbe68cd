"""One heartbeat as the supervisor received it: a plain value, read by the watchdog's policy and the loop, and
queued by the heartbeat server (``supervisor.job.heartbeats``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from verl_hooks.contract import HeartbeatKind


@dataclass(frozen=True)
class Heartbeat:
    kind: HeartbeatKind | None
    """None: a kind this supervisor does not know."""
    attempt: int | None
    received_at: float
    """``time.monotonic()`` on the supervisor when the beat arrived (the watchdog's clock)."""
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def step(self) -> int | None:
        return self.fields.get("step")

    @property
    def phase(self) -> str | None:
        return self.fields.get("phase")
