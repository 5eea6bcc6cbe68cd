"""A full checkpoint disk is a verdict, not a crash: every relaunch would fail at its next save, and each would
leave one more incomplete step set aside on the full volume. Pure functions of what was measured
(``supervisor.mechanisms.volume``)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from supervisor.mechanisms.volume import Volume
from supervisor.outcomes import Action, SupervisorRule
from supervisor.policy.rules import Classification

OUT_OF_SPACE_MARKS = ("No space left on device", "[Errno 28]", "Disk quota exceeded", "[Errno 122]")
"""How a job's error says that a write found no room (ENOSPC, EDQUOT), in Python's and the C library's words."""

MIN_FREE_BYTES = 64 << 20
"""Before any step is saved, below this much free space a volume counts as full."""


@dataclass(frozen=True)
class CheckpointSpace:
    """The checkpoint folder's volume, and what needs room on it."""

    checkpoints_dir: str
    volume: Volume
    newest_step_bytes: int | None
    """What the newest complete step takes (None: there is none): the next save needs about as much."""
    set_aside_bytes: int = 0
    set_aside_count: int = 0
    """Incomplete steps on it: set aside already, or to be at the next start (a save the full disk cut short)."""
    run_logs_bytes: int | None = None
    """What the run directory's own logs take (attempt logs, Ray's logs) when they are on the same volume."""

    @property
    def needed_bytes(self) -> int:
        """What the next save needs: about what the newest complete step takes."""
        return self.newest_step_bytes if self.newest_step_bytes is not None else MIN_FREE_BYTES

    def describe(self) -> str:
        volume = self.volume
        said = (
            f"the volume {volume.mount} ({volume.device}) holding {self.checkpoints_dir} has {_size(volume.free_bytes)}"
            f" free of {_size(volume.total_bytes)}"
        )
        if self.newest_step_bytes is not None:
            said += f"; the newest complete step takes {_size(self.newest_step_bytes)}"
        if self.set_aside_count:
            said += f"; {self.set_aside_count} incomplete steps on it hold {_size(self.set_aside_bytes)}"
        if self.run_logs_bytes is not None:
            said += f"; the run directory's logs on it take {_size(self.run_logs_bytes)}"
        return said


def out_of_space(texts: Iterable[str | None]) -> bool:
    """Whether the attempt's error (its record, its output) says a write found no room."""
    return any(mark in text for text in texts if text for mark in OUT_OF_SPACE_MARKS)


def disk_full(texts: Iterable[str | None], space: CheckpointSpace) -> Classification | None:
    """The verdict on a failed attempt whose checkpoint volume has less free than the next save needs: every
    relaunch would fail at its next save, whatever this attempt died of (torch.save on a full disk says only
    "file write failed"; ``texts``, the job's error, add that it found no room when they say so). None while
    the volume has room: an error about another volume is the rules' to judge."""
    if space.volume.free_bytes >= space.needed_bytes:
        return None
    said = " (the job's error says it found no room)" if out_of_space(texts) else ""
    spare = " (the incomplete steps can go)" if space.set_aside_count else ""
    return Classification(
        Action.fail,
        SupervisorRule.DISK_FULL,
        f"the checkpoint disk is full{said}: {space.describe()}. Every relaunch would fail at its next save; the "
        f"last complete step is kept. Free space on {space.volume.mount}{spare}, then run the supervisor again "
        f"on this run directory",
    )


def space_warning(space: CheckpointSpace) -> str | None:
    """Before a launch: the next save may not fit (less free than the newest complete step takes)."""
    if space.newest_step_bytes is None or space.volume.free_bytes >= space.newest_step_bytes:
        return None
    return f"the next checkpoint may not fit: {space.describe()}"


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024:
            return f"{value:.1f} {unit}"
    return f"{value / 1024:.1f} TiB"
