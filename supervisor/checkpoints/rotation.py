"""Apply the run's own checkpoint limits across attempts, as verl applies them within one.

verl rotates checkpoints in its checkpoint manager's memory (``verl/utils/checkpoint/checkpoint_manager.py``,
``ensure_checkpoint_capacity`` / ``register_checkpoint``, lines 166-194): the list of saved paths starts empty in
every process, so after a restart the steps of earlier attempts are never rotated out and a long run with
restarts fills its disk. When the user set ``trainer.max_actor_ckpt_to_keep`` / ``max_critic_ckpt_to_keep``, the
supervisor removes what verl would have: the role folder (``global_step_N/actor``, ``critic``; verl removes the
path it saved to, not the step folder) of complete steps beyond the limit, newest kept. Never the step being
resumed from or anything newer, never an incomplete step, never a set-aside folder; without a limit, nothing.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from supervisor.checkpoints.steps import ACTOR_DIR, CRITIC_DIR, CheckpointInfo
from verl_hooks.contract import CheckpointFacts


@dataclass(frozen=True)
class Removal:
    """One role folder the run's limit says to remove."""

    step: int
    role: str
    path: Path
    limit: int


def plan_rotation(
    infos: Sequence[CheckpointInfo],
    facts: CheckpointFacts,
    resume_step: int | None,
    unproven: frozenset[int] = frozenset(),
) -> list[Removal]:
    """The role folders to remove before resuming from ``resume_step``. Pure: touches no file.

    ``unproven``: steps an emergency save wrote that no attempt has resumed from and verified yet. They neither
    count against the limits nor are removed, so the newest periodic step survives until the emergency step
    after it has been loaded and shown sound: a save made in a failing job is not trusted alone."""
    if resume_step is None:
        return []
    kept = [info for info in infos if info.complete and info.step <= resume_step and info.step not in unproven]
    removals: list[Removal] = []
    for role, limit in ((ACTOR_DIR, facts.max_actor_ckpt_to_keep), (CRITIC_DIR, facts.max_critic_ckpt_to_keep)):
        if not limit or limit < 1:
            continue
        holding = sorted((info for info in kept if (info.path / role).is_dir()), key=lambda info: info.step)
        removals += [
            Removal(info.step, role, info.path / role, limit) for info in holding[: max(0, len(holding) - limit)]
        ]
    return sorted(removals, key=lambda removal: (removal.step, removal.role))


def remove(removal: Removal) -> None:
    """Removes one planned role folder; raises ``OSError`` when it cannot be removed entirely."""
    shutil.rmtree(removal.path)
