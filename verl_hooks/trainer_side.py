"""Whether the trainer side of a failed weight sync is idle: the fact an emergency save of the step stands on.

Every checkpoint-engine backend couples the sync to the trainer's own collectives (``naive``: FSDP all-gathers and a
trainer-wide barrier, verl/workers/engine_workers.py:822; ``nccl``: every actor rank walks the weight generator),
and verl's save runs collectives too (verl/utils/checkpoint/fsdp_checkpoint_manager.py:300, 420, 473). verl's
trainer workers are async Ray actors (``async def update_weights``, engine_workers.py:728), so a save submitted
while a rank is still inside the sync would run beside it and hang or mis-pair the collectives. The guard's view
of the manager stands between verl's body and the trainer's worker group, so it sees every trainer task the sync
(and its cleanup) starts; the trainer side is idle when every one of them has finished and every trainer worker
answers, and none of them raised.

``judge`` decides from those facts and is pure; ``observe`` gathers them, awaiting ObjectRefs (no ``ray.get``, no
import of Ray: a dead worker's probe fails, a live one's returns).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from verl_hooks.contract import root_cause


@dataclass(frozen=True)
class TrainerSide:
    idle: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> TrainerSide | None:
        if not isinstance(data, dict) or not isinstance(data.get("idle"), bool):
            return None
        return cls(data["idle"], str(data.get("reason", "")))


class TrainerTasks:
    """The trainer-side tasks (ObjectRefs) a sync started, noted as the guard's views hand them out."""

    def __init__(self) -> None:
        self._refs: list[Any] = []
        self._opaque: list[str] = []
        self._lock = threading.Lock()

    def note(self, refs: Any) -> Any:
        """Note what a worker-group call returned (a list of refs, or one) and hand it back unchanged."""
        with self._lock:
            self._refs.extend(refs if isinstance(refs, list | tuple) else [refs])
        return refs

    def opaque(self, phase: str) -> None:
        """A phase ran code of the user's own (an override) whose trainer tasks the guard cannot see."""
        with self._lock:
            self._opaque.append(phase)

    @property
    def refs(self) -> list[Any]:
        with self._lock:
            return list(self._refs)

    @property
    def opaque_phases(self) -> list[str]:
        with self._lock:
            return list(self._opaque)


def judge(
    total: int,
    running: int,
    unseen_phases: Sequence[str],
    dead_workers: Collection[str],
    workers: int,
    waited_s: float,
    raised: Sequence[str] = (),
) -> TrainerSide:
    """Idle only when nothing says otherwise: no phase whose trainer tasks went unseen and did not finish, no
    task still running, none that raised, every worker alive.

    A task that raised has settled but is not done with its collectives: in verl's NCCL engine only rank 0 sends,
    the other ranks return with their all-gathers still queued on the GPU (checkpoint_engine/
    nccl_checkpoint_engine.py:327-332), so one rank's raise leaves its peers' work pending, and the save's first
    barrier (utils/checkpoint/fsdp_checkpoint_manager.py:300) would pair with it."""
    if unseen_phases:
        return TrainerSide(
            False,
            f"phase {', '.join(unseen_phases)} ran the manager's own override and did not finish: its trainer "
            "tasks could not be seen",
        )
    if running:
        return TrainerSide(
            False, f"{running} of {total} trainer task(s) of the sync still running {waited_s:g} s after its cleanup"
        )
    if raised:
        return TrainerSide(
            False,
            f"{len(raised)} of {total} trainer task(s) of the sync raised ({raised[0]}): their peers may still have "
            "collectives pending",
        )
    if dead_workers:
        return TrainerSide(False, f"trainer worker(s) not answering: {', '.join(sorted(dead_workers))}")
    return TrainerSide(True, f"all {total} trainer task(s) of the sync finished; {workers} trainer worker(s) answer")


async def _settle(awaitable: Any) -> BaseException | None:
    try:
        await awaitable
    except BaseException as exc:  # noqa: BLE001 - a failed task has finished all the same; the caller looks at it
        return exc
    return None


async def _settled_after(refs: Sequence[Any], wait_s: float) -> tuple[int, list[str]]:
    """How many of ``refs`` are still running after ``wait_s``, and the errors of those that raised."""
    if not refs:
        return 0, []
    tasks = [asyncio.ensure_future(_settle(ref)) for ref in refs]
    done, pending = await asyncio.wait(tasks, timeout=wait_s)
    for task in pending:
        task.cancel()  # stops waiting on the ref; the remote task itself is not touched
    errors = [root_cause(error) for error in (task.result() for task in done) if error is not None]
    raised = [f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}" for error in errors]
    return len(pending), raised


async def unanswering(workers: Sequence[Any], wait_s: float) -> list[str]:
    """Workers whose ``__ray_ready__`` (a method every Ray actor has) fails or does not return within ``wait_s``."""
    probes = {}
    for rank, worker in enumerate(workers):
        try:
            probes[rank] = asyncio.ensure_future(_settle(worker.__ray_ready__.remote()))
        except Exception:  # noqa: BLE001 - a handle that cannot even submit counts as not answering
            probes[rank] = None
    live = [p for p in probes.values() if p is not None]
    if live:
        await asyncio.wait(live, timeout=max(wait_s, 0.1))
    dead = []
    for rank, probe in probes.items():
        if probe is None or not probe.done() or probe.result() is not None:
            dead.append(f"rank {rank}")
            if probe is not None and not probe.done():
                probe.cancel()
    return dead


async def observe(tasks: TrainerTasks, completed_phases: Collection[str], actor_wg: Any, wait_s: float) -> TrainerSide:
    """Wait up to ``wait_s`` for the noted trainer tasks to finish, then ask every trainer worker to answer."""
    unseen = [phase for phase in tasks.opaque_phases if phase not in completed_phases]
    refs = tasks.refs
    running, raised = await _settled_after(refs, wait_s)
    workers = list(getattr(actor_wg, "workers", None) or [])
    dead = await unanswering(workers, wait_s) if not running and not unseen and not raised else []
    return judge(len(refs), running, unseen, dead, len(workers), wait_s, raised)
