"""Checkpoint I/O in verl's layout (see ``layout``), written and resumed with verl's semantics.

Every file is a plain ``torch.save`` or ``open().write``, nothing is atomic, and rotation happens before the
tracker moves: the same windows for a crash to leave a partial checkpoint as verl's FSDP trainer has, which is
what the supervisor's checkpoint validation is for. ``MiniCheckpointManager`` is a verl ``BaseCheckpointManager``,
so rotation (``max_actor_ckpt_to_keep``) and the RNG state are verl's own code, including the fact that the list
of checkpoints to rotate lives in memory only: a restarted job never deletes what an earlier attempt saved.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from verl.utils.checkpoint.checkpoint_manager import (
    BaseCheckpointManager,
    find_latest_ckpt_path,
    get_checkpoint_tracker_filename,
)

from mini_ppo.layout import DATA_FILE, FINAL_FILE, FSDP_CONFIG_FILE, check_resume_path, shard_files, step_of
from mini_ppo.schema import ResumeMode


@dataclass(frozen=True)
class ResumePoint:
    """Where a run starts: the checkpoint folder to load (None: from scratch) and the step it ends."""

    folder: Path | None
    step: int

    @classmethod
    def scratch(cls) -> ResumePoint:
        return cls(None, 0)


def resume_point(mode: ResumeMode, default_local_dir: str, resume_from_path: str | None) -> ResumePoint:
    """The checkpoint a run resumes from, decided as verl's ``RayPPOTrainer._load_checkpoint`` decides it.

    ``auto`` reads only the tracker, through verl's own ``find_latest_ckpt_path``: a missing tracker, or one that
    names a missing folder, means from scratch. Relative paths are taken against the working directory.
    """
    if mode is ResumeMode.disable:
        return ResumePoint.scratch()
    if mode is ResumeMode.auto:
        found = find_latest_ckpt_path(os.path.abspath(default_local_dir))
        return ResumePoint.scratch() if found is None else ResumePoint(Path(found), step_of(found))
    path = os.path.abspath(check_resume_path(resume_from_path))
    return ResumePoint(Path(path), step_of(path))


def save_data_state(step_dir: Path, state: dict[str, Any]) -> None:
    step_dir.mkdir(parents=True, exist_ok=True)
    torch.save(state, step_dir / DATA_FILE)


def load_data_state(step_dir: Path) -> dict[str, Any] | None:
    """The saved data iterator state, or None when the folder has none (verl then warns and starts the data over)."""
    path = step_dir / DATA_FILE
    return torch.load(path, weights_only=False) if path.exists() else None


def write_tracker(root: str | os.PathLike[str], step: int) -> None:
    """Point ``latest_checkpointed_iteration.txt`` at ``step``: a plain write, as verl does it."""
    with open(get_checkpoint_tracker_filename(str(root)), "w") as f:
        f.write(str(step))


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON so that a reader sees the old file or the whole new one, never a part (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        json.dump(payload, tmp, indent=2, sort_keys=True)
        tmp.write("\n")
        tmp.flush()
        os.fsync(tmp.fileno())
    os.replace(tmp.name, path)


@dataclass(frozen=True)
class FinalReport:
    """What a successful run writes to ``final.json``: enough to tell whether two runs ended the same."""

    global_step: int
    weights_sha256: str
    reward_mean: float | None
    """The last step's mean reward; None when this run did no step (it resumed from the last one)."""
    resumed_from_step: int | None
    steps_run: int

    def write(self, default_local_dir: str | os.PathLike[str]) -> Path:
        path = Path(default_local_dir) / FINAL_FILE
        write_json_atomic(path, asdict(self))
        return path


class MiniCheckpointManager(BaseCheckpointManager):
    """Saves and loads one trainer rank's model, optimizer and RNG state, as verl's FSDP checkpoint manager does
    (without its HuggingFace extras: there is no HF model here). Needs torch.distributed initialised."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().__init__(model, optimizer)

    def save_checkpoint(
        self, local_path: str, hdfs_path: str | None = None, global_step: int = 0, max_ckpt_to_keep: int | None = None
    ) -> None:
        self.previous_global_step = global_step
        if self.rank == 0:
            # Deletes the oldest actor folders before the new one exists, as verl does (keep >= 2).
            self.ensure_checkpoint_capacity(max_ckpt_to_keep)
        os.makedirs(local_path, exist_ok=True)
        dist.barrier()
        files = shard_files(local_path, self.world_size, self.rank)
        torch.save(self.model.state_dict(), files.model)
        torch.save(self.optimizer.state_dict(), files.optim)
        torch.save({"lr_scheduler": None, "rng": self.get_rng_state()}, files.extra_state)
        if self.rank == 0:
            # verl's rank 0 writes fsdp_config.json after its shards (fsdp_checkpoint_manager.py lines 409-416).
            write_json_atomic(Path(local_path) / FSDP_CONFIG_FILE, {"FSDP_version": 1, "world_size": self.world_size})
        dist.barrier()
        if self.rank == 0:
            self.register_checkpoint(local_path, max_ckpt_to_keep)

    def load_checkpoint(
        self, local_path: str, hdfs_path: str | None = None, del_local_after_load: bool = False
    ) -> None:
        files = shard_files(local_path, self.world_size, self.rank)
        self.model.load_state_dict(torch.load(files.model, weights_only=False))
        self.optimizer.load_state_dict(torch.load(files.optim, weights_only=False))
        extra = torch.load(files.extra_state, weights_only=False)
        if "rng" in extra:
            self.load_rng_state(extra["rng"])
        dist.barrier()
