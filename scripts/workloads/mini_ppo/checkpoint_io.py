"""Checkpoint I/O in verl's layouts (see ``layout``), written and resumed with verl's semantics.

Every file is a ``torch.save`` or ``open().write`` in the order verl's own manager writes it, so a crash can cut a
save between any two of them and rotation happens before the tracker moves: the same windows for a crash to leave
a partial checkpoint as verl's trainers have, which is what the supervisor's checkpoint validation is for.
The checkpoint managers are verl ``BaseCheckpointManager``s, so rotation (``max_*_ckpt_to_keep``) and the RNG
state are verl's own code, including the fact that the list of checkpoints to rotate lives in memory only: a
restarted job never deletes what an earlier attempt saved. Both layouts carry the same payload (model state,
optimizer state, RNG state), so a run trains the same bits whichever it writes.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from verl.utils.checkpoint.checkpoint_manager import (
    BaseCheckpointManager,
    find_latest_ckpt_path,
    get_checkpoint_tracker_filename,
)

from mini_ppo.layout import (
    DATA_FILE,
    DIST_CKPT_COMMON,
    DIST_CKPT_CONFIG,
    DIST_CKPT_CONTENTS,
    DIST_CKPT_METADATA,
    FINAL_FILE,
    FSDP_CONFIG_FILE,
    MEGATRON_MANIFEST,
    TRANSFER_QUEUE_CONTROLLER_FILE,
    TRANSFER_QUEUE_METADATA_FILE,
    TRANSFER_QUEUE_STORAGE_DIR,
    TRANSFER_QUEUE_STORAGE_INFO_FILE,
    TRANSFORMER_CONFIG_FILE,
    check_resume_path,
    dist_ckpt_dir,
    dist_ckpt_shard,
    megatron_manifest,
    shard_files,
    step_of,
    transfer_queue_tmp,
)
from mini_ppo.schema import CheckpointLayout, ResumeMode


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
    critic_sha256: str | None = None
    """The value model's digest when the run trains one (``trainer.use_critic``)."""

    def write(self, default_local_dir: str | os.PathLike[str]) -> Path:
        path = Path(default_local_dir) / FINAL_FILE
        write_json_atomic(path, asdict(self))
        return path


@dataclass(frozen=True)
class RoleState:
    """What a role's checkpoint holds in every layout: the payload verl's managers save for
    ``save_contents=[model, optimizer, extra]`` (mini-PPO has no lr scheduler)."""

    model: dict[str, Any]
    optimizer: dict[str, Any]
    rng: dict[str, Any] | None


class MiniCheckpointManager(BaseCheckpointManager):
    """Saves and loads one trainer rank's model, optimizer and RNG state in verl's FSDP layout, as verl's
    ``FSDPCheckpointManager`` does (without its HuggingFace extras: there is no HF model here). Needs
    torch.distributed initialised. Subclasses write another layout by overriding the two folder methods."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().__init__(model, optimizer)

    # verl 0.9.0 has no CPU platform: on a host without a GPU its get_device_name() is "cuda", and its
    # get_rng_state / load_rng_state (verl/utils/checkpoint/checkpoint_manager.py:197-215 in 0.9.0) call CUDA after
    # the CPU parts and fail. verl 0.9.1 asks is_device_available() first. verl's own code runs wherever it can;
    # where it cannot, this CPU workload keeps what verl 0.9.1 keeps on such a host: the CPU, numpy and random states.
    @staticmethod
    def get_rng_state() -> dict[str, Any]:
        try:
            return BaseCheckpointManager.get_rng_state()
        except (AssertionError, RuntimeError):  # "Torch not compiled with CUDA enabled", no device
            return {"cpu": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate()}

    @staticmethod
    def load_rng_state(rng_state: dict[str, Any]) -> None:
        try:
            BaseCheckpointManager.load_rng_state(rng_state)
        except (AssertionError, RuntimeError, KeyError):  # the CPU parts are set before verl 0.9.0 asks CUDA
            torch.set_rng_state(rng_state["cpu"])
            np.random.set_state(rng_state["numpy"])
            random.setstate(rng_state["random"])

    def save_checkpoint(
        self, local_path: str, hdfs_path: str | None = None, global_step: int = 0, max_ckpt_to_keep: int | None = None
    ) -> None:
        self.previous_global_step = global_step
        if self.rank == 0:
            # Deletes the oldest role folders before the new one exists, as verl does (keep >= 2).
            self.ensure_checkpoint_capacity(max_ckpt_to_keep)
        os.makedirs(local_path, exist_ok=True)
        dist.barrier()
        self.write_role_folder(Path(local_path), global_step)
        dist.barrier()
        if self.rank == 0:
            self.register_checkpoint(local_path, max_ckpt_to_keep)

    def load_checkpoint(
        self, local_path: str, hdfs_path: str | None = None, del_local_after_load: bool = False
    ) -> None:
        state = self.read_role_folder(Path(local_path))
        self.model.load_state_dict(state.model)
        self.optimizer.load_state_dict(state.optimizer)
        if state.rng is not None:
            self.load_rng_state(state.rng)
        dist.barrier()

    def write_role_folder(self, folder: Path, global_step: int) -> None:
        files = shard_files(folder, self.world_size, self.rank)
        torch.save(self.model.state_dict(), files.model)
        torch.save(self.optimizer.state_dict(), files.optim)
        torch.save({"lr_scheduler": None, "rng": self.get_rng_state()}, files.extra_state)
        if self.rank == 0:
            # verl's rank 0 writes fsdp_config.json after its shards (fsdp_checkpoint_manager.py lines 409-416).
            write_json_atomic(folder / FSDP_CONFIG_FILE, {"FSDP_version": 1, "world_size": self.world_size})

    def read_role_folder(self, folder: Path) -> RoleState:
        files = shard_files(folder, self.world_size, self.rank)
        extra = torch.load(files.extra_state, weights_only=False)
        return RoleState(
            model=torch.load(files.model, weights_only=False),
            optimizer=torch.load(files.optim, weights_only=False),
            rng=extra.get("rng"),
        )


class MiniMegatronCheckpointManager(MiniCheckpointManager):
    """The same payload in verl's Megatron layout v2, in the order ``MegatronCheckpointManager.save_checkpoint``
    (``megatron_checkpoint_manager.py`` lines 1173-1303) writes it: one ``dist_checkpointing`` save per content,
    model → optimizer → extra, each a collective whose coordinator finishes with ``metadata.json``; then rank 0's
    ``transformer_config.json``; then ``_finalize_save``: rank 0's ``ckpt_contents.json`` through ``.tmp`` +
    ``os.replace``, written last so that its presence means the whole save is done.

    Megatron-core cannot run here, so each ``dist_ckpt/`` holds what its ``torch_dist`` format would, in its
    names: each rank's own state in ``__{rank}_0.distcp`` (data-parallel ranks hold the whole replicated model,
    as the FSDP layout's per-rank files do), ``.metadata`` and ``common.pt`` from the coordinator."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        role: str,
        arch: str,
        transformer_config: dict[str, Any],
    ) -> None:
        super().__init__(model, optimizer)
        self.role = role
        self.arch = arch
        self.transformer_config = transformer_config

    def write_role_folder(self, folder: Path, global_step: int) -> None:
        states = {
            "model": {"model": self.model.state_dict()},
            "optimizer": {"optimizer": self.optimizer.state_dict()},
            "extra": {"rng_state": self.get_rng_state()},
        }
        for content in DIST_CKPT_CONTENTS:
            self._save_dist_ckpt(dist_ckpt_dir(folder, content), content, states[content])
        if self.rank == 0:
            # _save_transformer_config: a plain write by rank 0 (lines 1042-1056).
            with open(folder / TRANSFORMER_CONFIG_FILE, "w") as f:
                json.dump(self.transformer_config, f, indent=2)
        dist.barrier()
        if self.rank == 0:
            self._write_manifest(folder, global_step)

    def _save_dist_ckpt(self, folder: Path, content: str, state: dict[str, Any]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(state, dist_ckpt_shard(folder, self.rank))
        # The coordinator writes the global metadata once every rank's shard is down, and metadata.json last.
        dist.barrier()
        if self.rank == 0:
            shards = [dist_ckpt_shard(folder, rank).name for rank in range(self.world_size)]
            # A pickle, as torch.distributed.checkpoint writes its Metadata (torch.save refuses the name anyway).
            with open(folder / DIST_CKPT_METADATA, "wb") as f:
                pickle.dump({"world_size": self.world_size, "shards": shards}, f)
            torch.save({"content_metadata": {"role": self.role, "content": content}}, folder / DIST_CKPT_COMMON)
            config = {
                "sharded_backend": "torch_dist",
                "sharded_backend_version": 1,
                "common_backend": "torch",
                "common_backend_version": 1,
            }
            with open(folder / DIST_CKPT_CONFIG, "w") as f:
                json.dump(config, f)
        dist.barrier()

    def _write_manifest(self, folder: Path, global_step: int) -> None:
        """``_write_checkpoint_manifest`` (lines 609-637): tmp file, fsync, ``os.replace``."""
        manifest = megatron_manifest(
            role=self.role, arch=self.arch, global_step=global_step, world_size=self.world_size
        )
        path = folder / MEGATRON_MANIFEST
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def read_role_folder(self, folder: Path) -> RoleState:
        """As verl's ``load_checkpoint``: each content from its fixed ``dist_ckpt/`` (verl does not need the
        manifest to load), refusing layout v1 and a folder that is no finished distributed checkpoint."""
        if not any((folder / content).is_dir() for content in DIST_CKPT_CONTENTS) and (folder / "dist_ckpt").is_dir():
            raise RuntimeError(f"Detected deprecated Megatron checkpoint layout (legacy dist_ckpt/ under {folder})")
        loaded = {content: self._load_dist_ckpt(dist_ckpt_dir(folder, content)) for content in DIST_CKPT_CONTENTS}
        return RoleState(
            model=loaded["model"]["model"],
            optimizer=loaded["optimizer"]["optimizer"],
            rng=loaded["extra"].get("rng_state"),
        )

    def _load_dist_ckpt(self, folder: Path) -> dict[str, Any]:
        if not (folder / DIST_CKPT_CONFIG).is_file():
            # Megatron-core's load raises CheckpointingException for a folder without it.
            raise FileNotFoundError(f"{folder} is not a distributed checkpoint: no {DIST_CKPT_CONFIG}")
        with open(folder / DIST_CKPT_METADATA, "rb") as f:
            metadata = pickle.load(f)
        if metadata["world_size"] != self.world_size:
            raise ValueError(f"{folder} was saved by {metadata['world_size']} ranks; this run has {self.world_size}")
        return torch.load(dist_ckpt_shard(folder, self.rank), weights_only=False)


def checkpoint_manager(
    layout: CheckpointLayout | str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    role: str,
    arch: str,
    transformer_config: dict[str, Any],
) -> MiniCheckpointManager:
    """The manager of one role (``actor``, ``critic``) for the configured layout."""
    if CheckpointLayout(layout) is CheckpointLayout.megatron:
        return MiniMegatronCheckpointManager(
            model, optimizer, role=role, arch=arch, transformer_config=transformer_config
        )
    return MiniCheckpointManager(model, optimizer)


# --- TransferQueue ------------------------------------------------------------------------------------------------

_TQ_CONTROLLER_ID = "mini_ppo_controller"
_TQ_STORAGE_UNIT_ID = "mini_ppo_storage_0"


def empty_transfer_queue_state() -> dict[str, Any]:
    """The controller state TransferQueue's ``TransferQueueController.save_checkpoint`` pickles, for a queue with
    nothing in flight: mini-PPO's dataflow is synchronous, so at a save every prompt has been trained on."""
    return {
        "controller_id": _TQ_CONTROLLER_ID,
        "partitions": {},
        "index_manager": {
            "partition_to_indexes": {},
            "reusable_indexes": [],
            "global_index_counter": 0,
            "allocated_indexes": set(),
        },
        "sampler": {},
    }


def save_transfer_queue(checkpoint_dir: Path, user_metadata: dict[str, Any]) -> None:
    """TransferQueue 0.1.x's ``save_checkpoint(checkpoint_dir, metadata=...)`` (``transfer_queue/interface.py``)
    with its in-memory SimpleStorage backend, whose storage is always saved: everything goes into
    ``<dir>.tmp`` (controller state, storage units, ``metadata.json`` last), an older ``<dir>`` is removed, and
    the tmp folder is renamed into place."""
    tmp = transfer_queue_tmp(checkpoint_dir)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        with open(tmp / TRANSFER_QUEUE_CONTROLLER_FILE, "wb") as f:
            pickle.dump(empty_transfer_queue_state(), f, protocol=pickle.HIGHEST_PROTOCOL)
        units = tmp / TRANSFER_QUEUE_STORAGE_DIR
        units.mkdir()
        with open(units / f"su_0_{_TQ_STORAGE_UNIT_ID}.pkl", "wb") as f:
            pickle.dump({}, f, protocol=pickle.HIGHEST_PROTOCOL)
        with open(units / TRANSFER_QUEUE_STORAGE_INFO_FILE, "w") as f:
            json.dump([{"position": 0, "storage_unit_id": _TQ_STORAGE_UNIT_ID}], f)
        with open(tmp / TRANSFER_QUEUE_METADATA_FILE, "w") as f:
            json.dump({"storage_saved": True, "user_metadata": user_metadata}, f, indent=2)
        if checkpoint_dir.exists():
            shutil.rmtree(checkpoint_dir)
        tmp.rename(checkpoint_dir)
    except Exception:
        if tmp.exists():
            shutil.rmtree(tmp)
        raise


def load_transfer_queue(checkpoint_dir: Path, global_steps: int) -> dict[str, Any]:
    """TransferQueue's ``load_checkpoint``, plus the check verl leaves out: the state must be the one saved with
    the step being resumed (``user_metadata.global_steps``). Returns the controller state."""
    metadata_path = checkpoint_dir / TRANSFER_QUEUE_METADATA_FILE
    if not metadata_path.is_file():
        raise FileNotFoundError(f"{TRANSFER_QUEUE_METADATA_FILE} not found in {checkpoint_dir}")
    meta = json.loads(metadata_path.read_text())
    controller_path = checkpoint_dir / TRANSFER_QUEUE_CONTROLLER_FILE
    if not controller_path.is_file():
        raise FileNotFoundError(f"{TRANSFER_QUEUE_CONTROLLER_FILE} not found in {checkpoint_dir}")
    saved_steps = (meta.get("user_metadata") or {}).get("global_steps")
    if saved_steps != global_steps:
        raise ValueError(
            f"{checkpoint_dir} holds TransferQueue state of global step {saved_steps!r}, not of step {global_steps}"
        )
    if meta.get("storage_saved"):
        units = checkpoint_dir / TRANSFER_QUEUE_STORAGE_DIR
        for unit in json.loads((units / TRANSFER_QUEUE_STORAGE_INFO_FILE).read_text()):
            with open(units / f"su_{unit['position']}_{unit['storage_unit_id']}.pkl", "rb") as f:
                pickle.load(f)
    with open(controller_path, "rb") as f:
        return pickle.load(f)
