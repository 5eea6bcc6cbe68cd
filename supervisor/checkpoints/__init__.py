"""Find the newest complete verl checkpoint to resume from, in every layout verl 0.9.1 writes.

- :mod:`.steps` judges one ``global_step_N`` folder (by the job's marker, or by the layout rules);
- :mod:`.layouts` holds those rules for one role folder (FSDP, Megatron v2), each from verl's save order;
- :mod:`.facts` says what the run's steps must contain (markers, overrides, the folders);
- :mod:`.choice` picks the step to resume from and sets incomplete ones aside (renamed, never deleted);
- :mod:`.rotation` applies the run's own keep limits across attempts.

Light on imports on purpose: the supervisor inspects checkpoints without importing torch, Ray or verl.
"""

from supervisor.checkpoints.archives import VerifyLevel
from supervisor.checkpoints.choice import (
    TRACKER_FILE,
    ResumeChoice,
    TrackerHint,
    choose_resume_checkpoint,
    read_tracker,
    scan_checkpoints,
    set_aside,
)
from supervisor.checkpoints.facts import facts_from_overrides, run_facts
from supervisor.checkpoints.layouts import Layout
from supervisor.checkpoints.problems import CheckpointProblem
from supervisor.checkpoints.rotation import Removal, plan_rotation, remove
from supervisor.checkpoints.steps import DATA_FILE, CheckpointInfo, inspect_checkpoint, parse_step

__all__ = [
    "DATA_FILE",
    "TRACKER_FILE",
    "CheckpointInfo",
    "CheckpointProblem",
    "Layout",
    "Removal",
    "ResumeChoice",
    "TrackerHint",
    "VerifyLevel",
    "choose_resume_checkpoint",
    "facts_from_overrides",
    "inspect_checkpoint",
    "parse_step",
    "plan_rotation",
    "read_tracker",
    "remove",
    "run_facts",
    "scan_checkpoints",
    "set_aside",
]
