"""Names in verl's checkpoint layouts, and verl's rules about them. Pure: no torch, no verl, no I/O.

A step folder, in the order verl's V1 trainer writes it (``trainer_base.py`` ``_save_checkpoint``)::

    {default_local_dir}/global_step_{N}/actor/...           the policy, in the role layout below
                                        critic/...          the value model (trainer.use_critic), same layout
                                        data.pt             data iterator state
                                        transfer_queue/     TransferQueue's state (trainer_mode other than sync)
    {default_local_dir}/latest_checkpointed_iteration.txt   "N", written after the step
    {default_local_dir}/final.json                          this job's own: the result

A role folder in verl's FSDP layout (``fsdp_checkpoint_manager.py``)::

    model_world_size_{W}_rank_{R}.pt         the model's state_dict
    optim_world_size_{W}_rank_{R}.pt         the optimizer's state_dict
    extra_state_world_size_{W}_rank_{R}.pt   {"lr_scheduler", "rng"}
    fsdp_config.json                         {"FSDP_version", "world_size"}, rank 0, after its shards

A role folder in verl's Megatron layout v2 (``megatron_checkpoint_manager.py``), each ``dist_ckpt/`` in
Megatron-core's ``torch_dist`` format::

    model/dist_ckpt/__{R}_0.distcp, .metadata, common.pt, metadata.json      {"model": state_dict}
    optimizer/dist_ckpt/...                                                   {"optimizer": state_dict}
    extra/dist_ckpt/...                                                       {"rng_state": ...}
    transformer_config.json                                                   rank 0
    ckpt_contents.json                                                        the manifest, rank 0, last

``transfer_queue/`` as TransferQueue 0.1.x's ``save_checkpoint`` writes it: ``controller_state.pkl``,
``storage_units/`` and ``metadata.json`` into ``transfer_queue.tmp/``, then renamed into place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STEP_PREFIX = "global_step_"
ACTOR_DIR = "actor"
CRITIC_DIR = "critic"
"""verl's ``str(Role.Critic)``."""
FSDP_CONFIG_FILE = "fsdp_config.json"
DATA_FILE = "data.pt"
TRACKER_FILE = "latest_checkpointed_iteration.txt"
FINAL_FILE = "final.json"

MEGATRON_MANIFEST = "ckpt_contents.json"
MEGATRON_MANIFEST_SCHEMA_VERSION = 2
TRANSFORMER_CONFIG_FILE = "transformer_config.json"
DIST_CKPT_CONTENTS = ("model", "optimizer", "extra")
"""verl's ``save_contents``, in its save order: each gets ``{content}/dist_ckpt/``."""
DIST_CKPT_METADATA = ".metadata"
DIST_CKPT_COMMON = "common.pt"
DIST_CKPT_CONFIG = "metadata.json"
"""Megatron-core writes it last (``save_config``): without it a folder is no distributed checkpoint."""

TRANSFER_QUEUE_DIR = "transfer_queue"
TRANSFER_QUEUE_CONTROLLER_FILE = "controller_state.pkl"
TRANSFER_QUEUE_METADATA_FILE = "metadata.json"
TRANSFER_QUEUE_STORAGE_DIR = "storage_units"
TRANSFER_QUEUE_STORAGE_INFO_FILE = "su_info.json"


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


def dist_ckpt_dir(role_dir: str | os.PathLike[str], content: str) -> Path:
    """``{role}/{content}/dist_ckpt``, as verl's ``get_{model,optimizer,extra}_dist_checkpoint_path``."""
    return Path(role_dir) / content / "dist_ckpt"


def dist_ckpt_shard(folder: str | os.PathLike[str], rank: int) -> Path:
    """One rank's file in a ``torch_dist`` checkpoint (Megatron-core names it ``__{rank}_{writer}.distcp``)."""
    return Path(folder) / f"__{rank}_0.distcp"


def transfer_queue_tmp(final: str | os.PathLike[str]) -> Path:
    """Where TransferQueue's ``save_checkpoint`` writes before renaming into place: ``<name>.tmp`` beside it."""
    path = Path(final)
    return path.parent / f"{path.name}.tmp"


_DIST_CKPT_DESCRIPTIONS = {
    "model": "Megatron dist_checkpointing shards for model weights (or PEFT adapter shards when mbridge is enabled).",
    "optimizer": "Megatron dist_checkpointing shards for the optimizer state (includes lr_scheduler when present).",
    "extra": "Megatron dist_checkpointing shards for extra state (rng_state).",
}


def megatron_manifest(*, role: str, arch: str, global_step: int, world_size: int) -> dict[str, Any]:
    """``ckpt_contents.json`` as verl 0.9.1's ``MegatronCheckpointManager._build_checkpoint_manifest`` composes it
    for ``save_contents=[model, optimizer, extra]`` with dist checkpointing, no bridge, no PEFT and no lr
    scheduler (mini-PPO has none, so verl would list no ``lr_scheduler`` entry)."""
    model, optimizer, extra = (f"{content}/dist_ckpt" for content in DIST_CKPT_CONTENTS)
    contents = {
        "model": {"path": model, "format": "megatron_dist_checkpoint", "backend": "dist_checkpointing"},
        "optimizer": {"path": optimizer, "format": "megatron_dist_checkpoint"},
        "rng_state": {"path": extra, "format": "megatron_dist_checkpoint", "key": "rng_state"},
        "transformer_config": {"path": TRANSFORMER_CONFIG_FILE, "format": "json"},
    }
    return {
        "schema_version": MEGATRON_MANIFEST_SCHEMA_VERSION,
        "framework": "megatron",
        "role": role,
        "arch": arch,
        "global_step": int(global_step),
        "world_size": world_size,
        "backend": {"has_bridge": False, "use_dist_checkpointing": True, "peft": False},
        "save_contents": list(DIST_CKPT_CONTENTS),
        "contents": contents,
        "directories": {f"{content}/dist_ckpt": _DIST_CKPT_DESCRIPTIONS[content] for content in DIST_CKPT_CONTENTS},
        "saved_any_dist_ckpt": True,
    }


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
