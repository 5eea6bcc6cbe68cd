"""Did the attempt really resume from the checkpoint the supervisor chose? Judged from its weight syncs. Pure.

verl sets ``global_steps`` from the folder it loads (``trainer_base.py`` ``_load_checkpoint``, line 876; the
legacy ``ray_trainer.py``, line 1083), pushes those weights into the rollout before it generates (V1
``trainer_sync.py`` ``on_init_end``, line 33; ``trainer_separate_async.py`` line 226; ``ray_trainer.py`` line
1430), then trains from ``global_steps + 1`` (``trainer_base.py`` line 454). So after a relaunch from
``global_step_N`` the first weight sync must carry N (the rollout serves the restored policy), and the next
step synced must be N+1. Anything else means verl ignored the path, loaded another folder, or started over.
verl's fully-async trainer numbers its syncs by parameter version instead: turn
``checkpoints.verify_resume`` off for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class VerifiedResume:
    resumed_step: int
    first_step: int


@dataclass(frozen=True)
class MismatchedResume:
    resumed_step: int
    seen_step: int
    reason: str


@dataclass
class ResumeCheck:
    """Feed it the step of each ``sync_begin`` in order; it answers once, then stays silent."""

    resumed_step: int
    _steps: list[int] = field(default_factory=list)
    _answered: bool = False

    def observe(self, step: int | None) -> VerifiedResume | MismatchedResume | None:
        if self._answered or step is None or (self._steps and step == self._steps[-1]):
            return None  # a step's own syncs repeat its number (verl's validation with a colocated reward model)
        self._steps.append(step)
        expected = self.resumed_step if len(self._steps) == 1 else self.resumed_step + 1
        if step != expected:
            self._answered = True
            what = "first weight sync" if len(self._steps) == 1 else "first training step"
            reason = (
                f"relaunched from global_step_{self.resumed_step}, but its {what} carried step {step}, not "
                f"{expected}: the job did not resume from the checkpoint the supervisor chose"
            )
            return MismatchedResume(self.resumed_step, step, reason)
        if len(self._steps) == 2:
            self._answered = True
            return VerifiedResume(self.resumed_step, step)
        return None
