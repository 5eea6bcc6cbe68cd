"""verl 0.9.1 Megatron step folders (layout v2), file by file in verl's save order.

verl's Megatron checkpoint manager cannot run here (it imports megatron-core at module level), so this fixture is
built from its code rather than by it: ``verl/utils/checkpoint/megatron_checkpoint_manager.py``
``save_checkpoint`` (lines 1173-1303) schedules the ``dist_checkpointing`` saves model → optimizer → extra
(lines 1265-1271), then rank 0's HF config and the bridge's HF weights (lines 1273-1283), then
``transformer_config.json`` (lines 1285-1287), then ``_finalize_save`` (lines 1103-1148) writes ``ckpt_contents.json``
through ``.tmp`` + ``os.replace`` (lines 609-637) and, with ``async_save``, the tracker. The manifest's content is
``_build_checkpoint_manifest`` (lines 475-607). Inside each ``dist_ckpt/`` the files are Megatron-core's
``torch_dist`` format: one ``__{rank}_0.distcp`` per rank, ``.metadata``, ``common.pt``, then ``metadata.json``.
The trainer then writes ``data.pt`` and, in async modes, ``transfer_queue/`` (``trainer_base.py`` lines
996-1008), and the tracker last (lines 1021-1025) unless ``async_save``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

Write = Callable[[Path], None]


@dataclass(frozen=True)
class FileWrite:
    """One file of a step, relative to the step folder, and how verl's code fills it."""

    path: str
    write: Write


def _bytes(data: bytes) -> Write:
    return lambda path: path.write_bytes(data)


def _json(payload: dict) -> Write:
    return lambda path: path.write_text(json.dumps(payload, indent=2, sort_keys=True))


def _torch(payload: object) -> Write:
    return lambda path: torch.save(payload, path)


def _dist_ckpt(folder: str, world_size: int) -> list[FileWrite]:
    files = [FileWrite(f"{folder}/__{rank}_0.distcp", _bytes(b"shard" * 16)) for rank in range(world_size)]
    files += [
        FileWrite(f"{folder}/.metadata", _bytes(b"torch-dcp-metadata")),
        FileWrite(f"{folder}/common.pt", _torch({"content_metadata": {}})),
        FileWrite(f"{folder}/metadata.json", _json({"sharded_backend": "torch_dist", "sharded_backend_version": 1})),
    ]
    return files


def manifest(step: int, world_size: int, *, role: str = "actor", hf: bool = False) -> dict:
    """``_build_checkpoint_manifest`` for ``save_contents=[model, optimizer, extra]`` with dist checkpointing (the
    default), or with a bridge writing the model in HF format (``hf``)."""
    contents: dict[str, dict] = {}
    directories: dict[str, str] = {}
    if hf:
        contents["model"] = {"path": "model/huggingface", "format": "huggingface", "backend": "mbridge"}
        contents["hf_config"] = {"path": "model/huggingface", "format": "huggingface"}
        directories["model/huggingface"] = "HuggingFace-format artifacts written via mbridge"
    else:
        contents["model"] = {"path": "model/dist_ckpt", "format": "megatron_dist_checkpoint"}
        directories["model/dist_ckpt"] = "Megatron dist_checkpointing shards for model weights"
    contents["optimizer"] = {"path": "optimizer/dist_ckpt", "format": "megatron_dist_checkpoint"}
    contents["lr_scheduler"] = {
        "path": "optimizer/dist_ckpt",
        "format": "megatron_dist_checkpoint",
        "key": "lr_scheduler",
    }
    contents["rng_state"] = {"path": "extra/dist_ckpt", "format": "megatron_dist_checkpoint", "key": "rng_state"}
    contents["transformer_config"] = {"path": "transformer_config.json", "format": "json"}
    directories["optimizer/dist_ckpt"] = "Megatron dist_checkpointing shards for the optimizer state"
    directories["extra/dist_ckpt"] = "Megatron dist_checkpointing shards for extra state (rng_state)."
    return {
        "schema_version": 2,
        "framework": "megatron",
        "role": role,
        "arch": "Qwen2ForCausalLM",
        "global_step": step,
        "world_size": world_size,
        "backend": {"has_bridge": hf, "use_dist_checkpointing": not hf, "peft": False},
        "save_contents": ["model", "optimizer", "extra"],
        "contents": contents,
        "directories": directories,
        "saved_any_dist_ckpt": True,
    }


def role_writes(role: str, step: int, world_size: int, *, hf: bool = False) -> list[FileWrite]:
    """The files of one role folder, in the order verl's Megatron manager writes them."""
    files = [] if hf else _dist_ckpt(f"{role}/model/dist_ckpt", world_size)
    files += _dist_ckpt(f"{role}/optimizer/dist_ckpt", world_size)
    files += _dist_ckpt(f"{role}/extra/dist_ckpt", world_size)
    if hf:
        files += [
            FileWrite(f"{role}/model/huggingface/config.json", _json({"architectures": ["Qwen2ForCausalLM"]})),
            FileWrite(f"{role}/model/huggingface/model.safetensors", _bytes(b"safetensors" * 8)),
        ]
    files.append(FileWrite(f"{role}/transformer_config.json", _json({"num_layers": 2, "hidden_size": 16})))
    files.append(FileWrite(f"{role}/ckpt_contents.json", _json(manifest(step, world_size, role=role, hf=hf))))
    return files


def step_writes(
    step: int, world_size: int = 2, *, critic: bool = False, hf: bool = False, transfer_queue: bool = False
) -> list[FileWrite]:
    """Every file of a Megatron step, in the V1 trainer's order (actor, critic, data.pt, transfer_queue/)."""
    files = role_writes("actor", step, world_size, hf=hf)
    if critic:
        files += role_writes("critic", step, world_size, hf=hf)
    files.append(FileWrite("data.pt", _torch({"epoch": 0, "batches_seen": step})))
    if transfer_queue:
        # TransferQueue writes into transfer_queue.tmp/ and renames it into place (transfer_queue/interface.py).
        files.append(FileWrite("transfer_queue.tmp/controller_state.pkl", _bytes(b"controller")))
        files.append(FileWrite("transfer_queue.tmp/metadata.json", _json({"storage_saved": True})))
    return files


def write_files(folder: Path, files: list[FileWrite]) -> Path:
    for item in files:
        path = folder / item.path
        path.parent.mkdir(parents=True, exist_ok=True)
        item.write(path)
    return folder


def finish_transfer_queue(folder: Path) -> None:
    """TransferQueue's rename of ``transfer_queue.tmp`` into place, the last act of its save."""
    (folder / "transfer_queue.tmp").rename(folder / "transfer_queue")


def write_megatron_step(root: Path, step: int, world_size: int = 2, **options: bool) -> Path:
    """A complete Megatron step folder (the transfer queue, when asked for, renamed into place)."""
    folder = write_files(root / f"global_step_{step}", step_writes(step, world_size, **options))
    if options.get("transfer_queue"):
        finish_transfer_queue(folder)
    return folder
