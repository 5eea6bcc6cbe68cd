"""What a preemption notice means for the attempt in flight: pure functions of what Ray says it drains.

A notice is Ray draining a node that holds the attempt's actors or placement-group bundles, a drain the
supervisor did not ask for itself (``nodes.exclude`` drains nodes too, after failures). Ray keeps a live node's
drain reason to itself (``supervisor.mechanisms.ray_drain``), so the reason is inferred the way Ray Train's own
preemption watcher does (ray/train/v2/_internal/execution/preemption.py: every drain of its nodes): Ray accepts
an ``IDLE_TERMINATION`` drain only on a node where nothing runs, so a drain of a node that holds the attempt's
work is a preemption. A drain of any other node is ignored (and said once).

On a notice the job is asked to save the step it is at, at its next safe point (the save-on-stop channel: right
after its next successful weight sync), within the drain's deadline less a margin; or, when the step and the
save it would need cannot fit before the deadline, the attempt is ended at once (what it would train until the
node dies is lost either way, and the relaunch starts sooner).
"""

from __future__ import annotations

import statistics
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from supervisor.config import PreemptionConfig


@dataclass(frozen=True)
class Drain:
    """A node Ray is draining."""

    node_id: str
    deadline_ms: int
    """When the node goes, in ms since the epoch (0: no deadline was given)."""


@dataclass(frozen=True)
class Sorted:
    """The drains seen in one read, sorted."""

    notices: tuple[Drain, ...] = ()
    """Drains of nodes that hold the attempt's work: preemption notices."""
    ignored: tuple[tuple[Drain, str], ...] = ()
    """Other drains, each with why it is not a notice."""


NOT_THE_ATTEMPTS = "the attempt holds nothing there"
OUR_OWN = "drained by the supervisor itself (nodes.exclude)"


def sort_drains(draining: Mapping[str, int], holding: Collection[str], own: Collection[str]) -> Sorted:
    """``draining``: node id to deadline (ms, 0: none) as Ray lists them; ``holding``: the nodes with the
    attempt's actors or bundles; ``own``: the nodes the supervisor drained itself."""
    notices, ignored = [], []
    for node_id, deadline_ms in sorted(draining.items()):
        drain = Drain(node_id, deadline_ms)
        if node_id in own:
            ignored.append((drain, OUR_OWN))
        elif node_id in holding:
            notices.append(drain)
        else:
            ignored.append((drain, NOT_THE_ATTEMPTS))
    return Sorted(tuple(notices), tuple(ignored))


def earliest_deadline_ms(drains: Iterable[Drain]) -> int | None:
    """The first deadline among the drains (None: none gave one); several nodes going together go at the first."""
    deadlines = [drain.deadline_ms for drain in drains if drain.deadline_ms > 0]
    return min(deadlines) if deadlines else None


def save_window_s(drains: Iterable[Drain], now_ms: int, config: PreemptionConfig) -> float:
    """How long the job may take to save before the attempt is torn down: until the earliest deadline less
    ``margin_s``, or ``wait_without_deadline_s`` when no drain gave a deadline."""
    deadline_ms = earliest_deadline_ms(drains)
    if deadline_ms is None:
        return config.wait_without_deadline_s
    return max(0.0, (deadline_ms - now_ms) / 1000.0 - config.margin_s)


@dataclass(frozen=True)
class AskToSave:
    """Ask the job to save at its next safe point, and wait at most ``window_s`` for it to end."""

    window_s: float


@dataclass(frozen=True)
class EndNow:
    """Tear the attempt down at once: no save can be had before the node goes."""

    reason: str


Response = AskToSave | EndNow


def respond(
    window_s: float, step_s: float | None, save_s: float | None, can_ask: bool, saving: bool = False
) -> Response:
    """What to do on a notice. ``step_s``: the attempt's typical step (None: not timed yet); ``save_s``: the
    run's longest save (None: none timed); ``can_ask``: the job has a channel to hear the request on;
    ``saving``: the job is in a save already (its emergency save after a failure, or the periodic save), whose
    end is waited for within the window whatever the estimate says."""
    if not can_ask:
        return EndNow("the job has no heartbeat channel to be asked to save on")
    if window_s <= 0:
        return EndNow("the drain's deadline, less preemption.margin_s, has passed")
    if saving or step_s is None or save_s is None:
        return AskToSave(window_s)
    needed_s = step_s + save_s
    if needed_s > window_s:
        return EndNow(
            f"a step and a save need about {needed_s:.0f} s (a step {step_s:.0f} s, the longest save "
            f"{save_s:.0f} s), more than the {window_s:.0f} s left before the deadline less preemption.margin_s"
        )
    return AskToSave(window_s)


def typical_step_s(intervals_s: Iterable[float]) -> float | None:
    """The attempt's step time, from the intervals between its weight syncs (None: fewer than two syncs)."""
    intervals = list(intervals_s)
    return statistics.median(intervals) if intervals else None


def describe_nodes(drains: Iterable[Drain], names: Mapping[str, str]) -> str:
    """``host/node`` of each drain, for a message."""
    return ", ".join(f"{names.get(d.node_id) or '?'}/{d.node_id[:8]}" for d in drains)
