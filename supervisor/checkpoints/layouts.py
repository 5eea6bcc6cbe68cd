"""What one role folder (``global_step_N/actor`` or ``critic``) must hold, for each layout verl 0.9.1 writes.

Each rule follows the save order of verl's own checkpoint manager, so that a crash after any file of it reads as
incomplete until the layout's completion point:

- **FSDP** (``verl/utils/checkpoint/fsdp_checkpoint_manager.py``, ``save_checkpoint``, lines 272-476): every rank
  writes ``model_``, ``optim_`` and ``extra_state_world_size_{W}_rank_{R}.pt`` for the kinds in ``save_contents``
  (lines 316-362); rank 0 then writes ``huggingface/`` (config, tokenizer) and ``fsdp_config.json`` with the world
  size (lines 364-417); with ``hf_model`` rank 0 writes the full weights into ``huggingface/`` after a barrier
  (lines 419-474). No single file marks the end, so every piece ``save_contents`` asks for is checked.
- **Megatron, layout v2** (``megatron_checkpoint_manager.py``, ``save_checkpoint`` lines 1173-1303, manifest lines
  461-637): ``model/``, ``optimizer/`` and ``extra/`` each hold a ``dist_ckpt/``, ``transformer_config.json`` sits
  at the root, and rank 0 writes ``ckpt_contents.json`` last (tmp + ``os.replace``), after asynchronous writes
  too (``_finalize_save``, lines 1103-1148): the manifest is the completion point, and the pieces it lists are
  checked to be there.
- Megatron layout v1 (``dist_ckpt/`` at the root) is refused by verl 0.9.1 itself (``_raise_for_old_layout``,
  lines 651-682), and anything else (TorchTitan's own checkpointer, ...) is a layout this module does not know:
  both are reported as ``unknown_layout`` and never guessed at.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from supervisor.checkpoints.archives import VerifyLevel, archive_problem
from supervisor.checkpoints.problems import CheckpointProblem, problem

DEFAULT_SAVE_CONTENTS = ("model", "optimizer", "extra")
"""verl's default ``checkpoint.save_contents`` (``checkpoint_manager.py`` lines 55-56)."""

SHARD_KINDS = {"model": "model", "optimizer": "optim", "extra": "extra_state"}
"""``save_contents`` entry → the per-rank file prefix the FSDP manager writes for it (lines 316-318)."""

FSDP_CONFIG = "fsdp_config.json"
HF_DIR = "huggingface"
MEGATRON_MANIFEST = "ckpt_contents.json"
MEGATRON_SCHEMA_VERSION = 2
DIST_CKPT_DONE = "metadata.json"
"""Megatron-core's ``dist_checkpointing.save`` writes ``metadata.json`` after the shards (its finalize step)."""

_SHARD_RE = re.compile(r"(model|optim|extra_state)_world_size_(0|[1-9][0-9]*)_rank_(0|[1-9][0-9]*)\.pt")
_HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_HF_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class Layout(str, Enum):
    """How a role folder is laid out."""

    FSDP = "fsdp"
    MEGATRON = "megatron"
    MEGATRON_V1 = "megatron_v1"
    EMPTY = "empty"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class RoleVerdict:
    layout: Layout
    world_size: int | None
    problems: tuple[str, ...]


def layout_of_strategy(strategy: str | None) -> Layout | None:
    """The layout verl's checkpoint manager for ``*.strategy`` writes; None when the strategy is not known."""
    if strategy is None:
        return None
    if strategy in ("fsdp", "fsdp2"):
        return Layout.FSDP
    if strategy == "megatron":
        return Layout.MEGATRON
    return Layout.UNKNOWN


def detect_layout(role_dir: Path) -> Layout:
    """The layout the files in ``role_dir`` show, for runs whose configuration the supervisor does not know."""
    names = {entry.name for entry in role_dir.iterdir() if not entry.name.startswith(".")}
    if not names:
        return Layout.EMPTY
    if MEGATRON_MANIFEST in names or "transformer_config.json" in names or names & {"model", "optimizer", "extra"}:
        return Layout.MEGATRON
    if "dist_ckpt" in names:
        return Layout.MEGATRON_V1
    if FSDP_CONFIG in names or HF_DIR in names or any(_SHARD_RE.fullmatch(name) for name in names):
        return Layout.FSDP
    return Layout.UNKNOWN


def inspect_role(
    role_dir: Path,
    base: Path,
    *,
    step: int,
    strategy: str | None = None,
    save_contents: Sequence[str] | None = None,
    verify: VerifyLevel = VerifyLevel.structure,
) -> RoleVerdict:
    """Checks one role folder against the layout its strategy (or, unknown, its files) says verl wrote."""
    try:
        detected = detect_layout(role_dir)
    except OSError as e:
        return RoleVerdict(Layout.UNKNOWN, None, (problem(CheckpointProblem.UNREADABLE, role_dir, base, str(e)),))
    layout = layout_of_strategy(strategy) or detected
    if detected is Layout.EMPTY:
        detail = "verl created it but wrote nothing into it"
        return RoleVerdict(layout, None, (problem(CheckpointProblem.EMPTY_ROLE_DIR, role_dir, base, detail),))
    if layout is Layout.FSDP:
        return _inspect_fsdp(role_dir, base, save_contents, verify)
    if layout is Layout.MEGATRON:
        return _inspect_megatron(role_dir, base, step)
    if layout is Layout.MEGATRON_V1:
        detail = "Megatron layout v1 (dist_ckpt/ at the root), which verl 0.9.1 refuses to load"
    elif strategy is not None:
        detail = f"strategy {strategy!r}: a layout the supervisor does not know"
    else:
        detail = f"holds {', '.join(_sample(role_dir))}: neither verl's FSDP nor its Megatron layout"
    return RoleVerdict(layout, None, (problem(CheckpointProblem.UNKNOWN_LAYOUT, role_dir, base, detail),))


def _sample(folder: Path, limit: int = 4) -> list[str]:
    names = sorted(entry.name + ("/" if entry.is_dir() else "") for entry in folder.iterdir())
    return names[:limit] + ([f"... ({len(names) - limit} more)"] if len(names) > limit else [])


# --- FSDP --------------------------------------------------------------------------------------------------------


def _inspect_fsdp(role_dir: Path, base: Path, save_contents: Sequence[str] | None, verify: VerifyLevel) -> RoleVerdict:
    shards: dict[tuple[str, int, int], Path] = {}
    for entry in sorted(role_dir.iterdir()):
        match = _SHARD_RE.fullmatch(entry.name)
        if match:
            shards[(match[1], int(match[2]), int(match[3]))] = entry
    if save_contents is not None:
        kinds = [SHARD_KINDS[c] for c in save_contents if c in SHARD_KINDS]
    else:  # not told: every kind some rank wrote must be there for every rank, and something must be there
        kinds = [k for k in SHARD_KINDS.values() if any(kind == k for kind, _, _ in shards)]
        if not kinds and not _has_hf_weights_started(role_dir):
            kinds = list(SHARD_KINDS.values())
    problems: list[str] = []
    config_world_size, config_problems = _fsdp_config(role_dir, base)
    problems += config_problems
    world_sizes = sorted({w for _, w, _ in shards} | ({config_world_size} if config_world_size else set()))
    if len(world_sizes) > 1:
        detail = f"world sizes {world_sizes} in shard names and {FSDP_CONFIG}"
        problems.append(problem(CheckpointProblem.MIXED_WORLD_SIZES, role_dir, base, detail))
        return RoleVerdict(Layout.FSDP, None, tuple(problems))
    world_size = world_sizes[0] if world_sizes else None
    if kinds and not shards:
        problems.append(problem(CheckpointProblem.NO_RANK_FILES, role_dir, base, "no *_world_size_W_rank_R.pt"))
    elif kinds and world_size is not None:
        problems += _rank_problems(role_dir, base, shards, kinds, world_size)
    for path in shards.values():
        found = archive_problem(path, verify)
        if found is not None:
            problems.append(problem(found[0], path, base, found[1]))
    wants_hf = "hf_model" in save_contents if save_contents is not None else _has_hf_weights_started(role_dir)
    if wants_hf:
        problems += hf_weights_problems(role_dir / HF_DIR, base, "save_contents has hf_model")
    return RoleVerdict(Layout.FSDP, world_size, tuple(problems))


def _fsdp_config(role_dir: Path, base: Path) -> tuple[int | None, list[str]]:
    """The world size in rank 0's ``fsdp_config.json``, written after its shards and ``huggingface/``."""
    path = role_dir / FSDP_CONFIG
    if not path.exists():
        return None, [problem(CheckpointProblem.MISSING_FILE, path, base, "rank 0 writes it after its shards")]
    data, trouble = read_json(path, base)
    if trouble:
        return None, [trouble]
    world_size = data.get("world_size") if isinstance(data, dict) else None
    if not isinstance(world_size, int) or world_size < 1:
        return None, [problem(CheckpointProblem.CORRUPT_JSON, path, base, f"world_size is {world_size!r}")]
    return world_size, []


def _rank_problems(
    role_dir: Path, base: Path, shards: dict[tuple[str, int, int], Path], kinds: Sequence[str], world_size: int
) -> list[str]:
    problems = [
        problem(CheckpointProblem.RANK_OUT_OF_RANGE, path, base, f"rank {rank} >= world size {world_size}")
        for (_, _, rank), path in sorted(shards.items())
        if rank >= world_size
    ]
    for kind, rank in itertools.product(kinds, range(world_size)):
        if (kind, world_size, rank) not in shards:
            missing = role_dir / f"{kind}_world_size_{world_size}_rank_{rank}.pt"
            problems.append(problem(CheckpointProblem.MISSING_RANK_FILE, missing, base))
    return problems


def _has_hf_weights_started(role_dir: Path) -> bool:
    hf = role_dir / HF_DIR
    return hf.is_dir() and any(
        entry.name.endswith((".safetensors", ".bin")) or entry.name in _HF_INDEXES for entry in hf.iterdir()
    )


def hf_weights_problems(hf_dir: Path, base: Path, why: str) -> list[str]:
    """Full HuggingFace weights in ``hf_dir``: one weights file, or an index and every shard it names."""
    for name in _HF_WEIGHTS:
        if (hf_dir / name).is_file():
            size = (hf_dir / name).stat().st_size
            return [] if size else [problem(CheckpointProblem.EMPTY_FILE, hf_dir / name, base, "0 bytes")]
    for name in _HF_INDEXES:
        if (hf_dir / name).is_file():
            return _hf_index_problems(hf_dir / name, base)
    return [problem(CheckpointProblem.MISSING_FILE, hf_dir / _HF_WEIGHTS[0], base, f"no HF weights; {why}")]


def _hf_index_problems(index: Path, base: Path) -> list[str]:
    data, trouble = read_json(index, base)
    if trouble:
        return [trouble]
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        return [problem(CheckpointProblem.CORRUPT_JSON, index, base, "no weight_map")]
    return [
        problem(CheckpointProblem.MISSING_FILE, index.parent / name, base, f"named by {index.name}")
        for name in sorted(set(map(str, weight_map.values())))
        if not (index.parent / name).is_file()
    ]


# --- Megatron ------------------------------------------------------------------------------------------------------


def _inspect_megatron(role_dir: Path, base: Path, step: int) -> RoleVerdict:
    manifest_path = role_dir / MEGATRON_MANIFEST
    if not manifest_path.exists():
        detail = "rank 0 writes it last, after every (also asynchronous) write"
        return RoleVerdict(
            Layout.MEGATRON, None, (problem(CheckpointProblem.MISSING_MANIFEST, manifest_path, base, detail),)
        )
    manifest, trouble = read_json(manifest_path, base)
    if trouble:
        return RoleVerdict(Layout.MEGATRON, None, (trouble,))
    if not isinstance(manifest, dict) or manifest.get("schema_version") != MEGATRON_SCHEMA_VERSION:
        version = manifest.get("schema_version") if isinstance(manifest, dict) else None
        detail = f"manifest schema_version {version!r}; verl 0.9.1 writes {MEGATRON_SCHEMA_VERSION}"
        return RoleVerdict(
            Layout.UNKNOWN, None, (problem(CheckpointProblem.UNKNOWN_LAYOUT, manifest_path, base, detail),)
        )
    problems: list[str] = []
    if manifest.get("global_step") != step:
        detail = f"the manifest names step {manifest.get('global_step')!r}"
        problems.append(problem(CheckpointProblem.MARKER_MISMATCH, manifest_path, base, detail))
    problems += _manifest_content_problems(role_dir, base, manifest)
    world_size = manifest.get("world_size")
    return RoleVerdict(Layout.MEGATRON, world_size if isinstance(world_size, int) else None, tuple(problems))


def _manifest_content_problems(role_dir: Path, base: Path, manifest: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    for rel in sorted(manifest.get("directories") or {}):
        folder = role_dir / rel
        if not folder.is_dir() or not any(folder.iterdir()):
            problems.append(problem(CheckpointProblem.MISSING_CONTENT, folder, base, "listed in the manifest"))
    checked: set[tuple[str, str]] = set()
    for name, entry in sorted((manifest.get("contents") or {}).items()):
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            continue
        key = (entry["path"], str(entry.get("format")))
        if key in checked:
            continue
        checked.add(key)
        problems += _content_problems(role_dir / entry["path"], base, name, entry)
    return problems


def _content_problems(path: Path, base: Path, name: str, entry: dict[str, Any]) -> list[str]:
    fmt = entry.get("format")
    if fmt == "megatron_dist_checkpoint":
        if not (path / DIST_CKPT_DONE).is_file():
            detail = f"{name}: no {DIST_CKPT_DONE}, which dist_checkpointing writes last"
            return [problem(CheckpointProblem.MISSING_CONTENT, path, base, detail)]
        return []
    if fmt == "json":
        if not path.is_file():
            return [problem(CheckpointProblem.MISSING_CONTENT, path, base, f"{name}: listed in the manifest")]
        trouble = read_json(path, base)[1]
        return [trouble] if trouble else []
    if fmt == "huggingface" and name in ("model", "hf_model"):
        return hf_weights_problems(path, base, f"the manifest lists {name} in HF format")
    if fmt == "huggingface" and not path.is_dir():
        return [problem(CheckpointProblem.MISSING_CONTENT, path, base, f"{name}: listed in the manifest")]
    return []


def read_json(path: Path, base: Path) -> tuple[Any, str | None]:
    """The parsed JSON of ``path``, or the problem that keeps it from being read."""
    try:
        return json.loads(path.read_text()), None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, problem(CheckpointProblem.CORRUPT_JSON, path, base, f"{type(e).__name__}: {e}")
    except OSError as e:
        return None, problem(CheckpointProblem.UNREADABLE, path, base, f"{type(e).__name__}: {e}")
