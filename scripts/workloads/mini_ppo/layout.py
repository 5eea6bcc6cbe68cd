"""Names in verl's checkpoint layout, and verl's rules about them. Pure: no torch, no verl, no I/O.

{default_local_dir}/global_step_{N}/actor/model_world_size_{W}_rank_{R}.pt        policy state_dict
                                         optim_world_size_{W}_rank_{R}.pt         optimizer state_dict
                                         extra_state_world_size_{W}_rank_{R}.pt   {"lr_scheduler", "rng"}
{default_local_dir}/global_step_{N}/actor/fsdp_config.json                        {"FSDP_version", "world_size"}
{default_local_dir}/global_step_{N}/data.pt                                       data iterator state
{default_local_dir}/latest_checkpointed_iteration.txt                             "N", written last
{default_local_dir}/final.json                                                    this job's own: the result
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

STEP_PREFIX = "global_step_"
ACTOR_DIR = "actor"
FSDP_CONFIG_FILE = "fsdp_config.json"
DATA_FILE = "data.pt"
TRACKER_FILE = "latest_checkpointed_iteration.txt"
FINAL_FILE = "final.json"


@dataclass(frozen=True)
class ShardFiles:
    """One trainer rank's files in a step's ``actor/`` folder."""

    model: Path
    optim: Path
    extra_state: Path


def step_folder(root: str | os.PathLike[str], step: int) -> Path:
    return Path(root) / f"{STEP_PREFIX}{step}"


def shard_files(actor_dir: str | os.PathLike[str], world_size: int, rank: int) -> ShardFiles:
    suffix = f"world_size_{world_size}_rank_{rank}.pt"
    folder = Path(actor_dir)
    return ShardFiles(folder / f"model_{suffix}", folder / f"optim_{suffix}", folder / f"extra_state_{suffix}")


def check_resume_path(path: str | None) -> str:
    """verl's requirement on ``trainer.resume_from_path``; returns the path, raises ``ValueError`` with the reason."""
    if not isinstance(path, str) or STEP_PREFIX not in path:
        raise ValueError(
            f"trainer.resume_from_path must name a {STEP_PREFIX}N checkpoint folder when "
            f"trainer.resume_mode=resume_path, got {path!r}"
        )
    return path


def step_of(folder: str | os.PathLike[str]) -> int:
    """The step a checkpoint folder is for, parsed from its name as verl does (the text after the last prefix)."""
    return int(str(folder).split(STEP_PREFIX)[-1])


def should_save(step: int, save_freq: int, total_training_steps: int) -> bool:
    """verl's rule: only with a positive ``save_freq``, on its multiples and on the last step."""
    return save_freq > 0 and (step >= total_training_steps or step % save_freq == 0)
