"""Why a step folder cannot be resumed from, in words that name the file."""

from __future__ import annotations

from enum import Enum
from pathlib import Path


class CheckpointProblem(str, Enum):
    """Why a step folder cannot be resumed from. The values go into JSON reports as they are."""

    NOT_A_DIRECTORY = "not_a_directory"
    MISSING_ACTOR_DIR = "missing_actor_dir"
    MISSING_CRITIC_DIR = "missing_critic_dir"
    """The run uses a critic, and this step has no ``critic/`` (e.g. rotated out by ``max_critic_ckpt_to_keep``)."""
    NO_RANK_FILES = "no_rank_files"
    MISSING_RANK_FILE = "missing_rank_file"
    MIXED_WORLD_SIZES = "mixed_world_sizes"
    RANK_OUT_OF_RANGE = "rank_out_of_range"
    MISSING_FILE = "missing_file"
    """A file the layout writes before its completion point is absent (``fsdp_config.json``, HF weights, ...)."""
    MISSING_MANIFEST = "missing_manifest"
    """Megatron: ``ckpt_contents.json``, which rank 0 writes last (after asynchronous writes too), is absent."""
    MISSING_CONTENT = "missing_content"
    """Megatron: a piece the manifest lists is absent or unfinished."""
    MISSING_DATA = "missing_data"
    MISSING_TRANSFER_QUEUE = "missing_transfer_queue"
    TRANSFER_QUEUE_IN_FLIGHT = "transfer_queue_in_flight"
    """``transfer_queue.tmp`` is left: TransferQueue's save was cut before its rename into place."""
    MARKER_MISMATCH = "marker_mismatch"
    """A file the job's checkpoint marker lists is missing, resized, or the marker names another step."""
    EMPTY_FILE = "empty_file"
    CORRUPT_ARCHIVE = "corrupt_archive"
    CORRUPT_JSON = "corrupt_json"
    UNREADABLE = "unreadable"
    EMPTY_ROLE_DIR = "empty_role_dir"
    """The role folder exists but verl wrote nothing into it yet."""
    UNKNOWN_LAYOUT = "unknown_layout"
    """Files the supervisor cannot judge (a layout verl 0.9.1's FSDP and Megatron managers do not write)."""


def problem(kind: CheckpointProblem, path: Path, base: Path, detail: str | None = None) -> str:
    """Formats one problem so that it names both the kind (first, for ``problem_kinds``) and the file."""
    try:
        shown = path.relative_to(base).as_posix()
    except ValueError:
        shown = str(path)
    text = f"{kind.value}: {shown}"
    return f"{text} ({detail})" if detail else text


def problem_kind(text: str) -> CheckpointProblem:
    return CheckpointProblem(text.partition(":")[0])
