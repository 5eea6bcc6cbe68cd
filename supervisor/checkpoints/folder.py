"""The run's checkpoint folder as the loop uses it: what is in it, which step to resume from, the room left on
its volume, and the run's own keep limits. Reads and renames; removes only what ``max_*_ckpt_to_keep`` says.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from supervisor.checkpoints.archives import VerifyLevel
from supervisor.checkpoints.choice import ResumeChoice, choose_resume_checkpoint, read_tracker, scan_checkpoints
from supervisor.checkpoints.facts import run_facts
from supervisor.checkpoints.rotation import Removal, plan_rotation, remove
from supervisor.checkpoints.steps import CheckpointInfo
from supervisor.mechanisms.volume import CheckpointSpace, folder_bytes, run_logs_bytes, volume_of
from verl_hooks.contract import CheckpointFacts


@dataclass(frozen=True)
class Rotated:
    """One removal the rotation planned, and whether it was done (``problem`` says why not)."""

    removal: Removal
    problem: str | None = None


@dataclass(frozen=True)
class CheckpointFolder:
    root: Path
    verify: VerifyLevel
    facts: CheckpointFacts
    """What the user's overrides say the job's checkpoints hold; the job's own markers, when it writes them, win."""

    def scan(self) -> list[CheckpointInfo]:
        return scan_checkpoints(self.root, verify=self.verify, facts=self.facts)

    def choose(self, infos: Sequence[CheckpointInfo]) -> ResumeChoice:
        return choose_resume_checkpoint(infos, read_tracker(self.root))

    def newest_complete_step(self) -> int | None:
        complete = [info.step for info in self.scan() if info.complete]
        return max(complete) if complete else None

    def rotate(self, infos: Sequence[CheckpointInfo], resume_step: int, unproven: frozenset[int]) -> list[Rotated]:
        """Remove what the run's keep limits say is no longer kept; each removal that fails is named."""
        done = []
        for removal in plan_rotation(infos, run_facts(self.root, self.facts), resume_step, unproven):
            try:
                remove(removal)
            except OSError as e:
                done.append(Rotated(removal, f"{type(e).__name__}: {e}"))
            else:
                done.append(Rotated(removal))
        return done

    def space(self, run_dir: Path, newest: Path | None, incomplete: Sequence[Path] = ()) -> CheckpointSpace:
        """The volume and what needs room on it. ``incomplete``: step folders found incomplete and not set aside
        yet (a save the full disk cut short)."""
        root = self.root
        aside = [*sorted(root.glob("global_step_*.incomplete-*")), *incomplete] if root.is_dir() else []
        volume = volume_of(root)
        logs = run_logs_bytes(run_dir) if volume_of(run_dir).mount == volume.mount else None
        return CheckpointSpace(
            checkpoints_dir=str(root),
            volume=volume,
            newest_step_bytes=folder_bytes(newest) if newest is not None else None,
            set_aside_bytes=sum(folder_bytes(path) for path in aside),
            set_aside_count=len(aside),
            run_logs_bytes=logs,
        )

    def space_now(self, run_dir: Path) -> CheckpointSpace:
        """The space after an attempt: its newest complete step, and the steps it left incomplete."""
        infos = self.scan()
        complete = [info for info in infos if info.complete]
        newest = max(complete, key=lambda info: info.step).path if complete else None
        return self.space(run_dir, newest, [info.path for info in infos if not info.complete])
