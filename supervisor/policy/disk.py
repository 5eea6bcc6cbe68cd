"""A full checkpoint disk is a verdict, not a crash: every relaunch would fail at its next save, and each would
leave one more incomplete step set aside on the full volume. Pure functions of what was measured
(``supervisor.mechanisms.volume``)."""

from __future__ import annotations

from collections.abc import Iterable

from supervisor.mechanisms.volume import CheckpointSpace
from supervisor.outcomes import Action, SupervisorRule
from supervisor.policy.rules import Classification

OUT_OF_SPACE_MARKS = ("No space left on device", "[Errno 28]", "Disk quota exceeded", "[Errno 122]")
"""How a job's error says that a write found no room (ENOSPC, EDQUOT), in Python's and the C library's words."""


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
