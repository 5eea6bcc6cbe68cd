"""A user's own verl checkpoint callback, for the job runs that chain one behind the supervisor's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from verl.trainer.ppo.checkpoint_callback import CheckpointCallback

from verl_hooks.contract import CHECKPOINT_MARKER

CALLS_FILE = "user_callback_calls.jsonl"
"""Written beside the step folders (in ``default_local_dir``), so that no step's file list changes."""


class RecordingCallback(CheckpointCallback):
    """Appends each call, and whether the supervisor's marker was already there, to ``CALLS_FILE``."""

    def on_save(
        self, trainer: Any, global_step: int, checkpoint_dir: str, async_save: bool = False, **kwargs: Any
    ) -> None:
        step_dir = Path(checkpoint_dir)
        call = {
            "global_step": global_step,
            "checkpoint_dir": checkpoint_dir,
            "async_save": async_save,
            "marker_there": (step_dir / CHECKPOINT_MARKER).exists(),
            "has_config": self.config is not None,
        }
        with open(step_dir.parent / CALLS_FILE, "a") as f:
            f.write(json.dumps(call) + "\n")
