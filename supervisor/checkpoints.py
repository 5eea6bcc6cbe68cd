"""Find the newest complete verl trainer checkpoint to resume from, and move incomplete ones out of the way.

verl 0.9.1 (FSDP) writes a step as ``{root}/global_step_{N}/`` holding ``actor/`` (and ``critic/`` when a critic
is used) with one ``model_``, ``optim_`` and ``extra_state_world_size_{W}_rank_{R}.pt`` per rank, then ``data.pt``
(the dataloader state), and last of all ``{root}/latest_checkpointed_iteration.txt`` with a plain write. None of
this is atomic: a crash leaves a newest folder with missing ranks, empty or truncated archives or no ``data.pt``,
and the tracker may be missing, garbage, name a folder that rotation already deleted, or lag behind. So the
folders themselves are the truth and the tracker is only a hint.

Every ``.pt`` is a ``torch.save`` zip archive. It is checked as a zip (its central directory and its pickle
member) and never unpickled: ``torch.load`` would be slow for multi-GB shards and can run arbitrary code.
Light on imports on purpose: the supervisor inspects checkpoints without importing torch, Ray or verl.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import struct
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path

logger = logging.getLogger(__name__)

TRACKER_FILE = "latest_checkpointed_iteration.txt"
"""verl's tracker file in the checkpoint root, naming the last step it finished saving."""

DATA_FILE = "data.pt"
"""The dataloader state verl saves at the top of every step folder, after the actor and critic shards."""

ROLE_DIRS = ("actor", "critic")
"""Sub-folders holding per-rank shards; ``actor`` is required, ``critic`` is checked only when present."""

SHARD_KINDS = ("model", "optim", "extra_state")
"""The three per-rank files verl's FSDP checkpoint manager writes with its default ``save_contents``."""

# Only the canonical spelling verl itself produces (``global_step_{int}``): verl opens ``global_step_{N}`` by
# formatting the integer, so ``global_step_06`` could never be resumed and is ignored like any other name.
_STEP_DIR_RE = re.compile(r"global_step_(0|[1-9][0-9]*)")
_SHARD_RE = re.compile(r"(model|optim|extra_state)_world_size_(0|[1-9][0-9]*)_rank_(0|[1-9][0-9]*)\.pt")
_PICKLE_MEMBER_RE = re.compile(r"[^/]+/data\.pkl")
_TRACKER_MAX_BYTES = 4096  # a step number is a few bytes; anything longer is garbage and need not be read whole


class CheckpointProblem(str, Enum):
    """Why a step folder cannot be resumed from. The values go into JSON reports as they are."""

    NOT_A_DIRECTORY = "not_a_directory"
    MISSING_ACTOR_DIR = "missing_actor_dir"
    NO_RANK_FILES = "no_rank_files"
    MISSING_RANK_FILE = "missing_rank_file"
    MIXED_WORLD_SIZES = "mixed_world_sizes"
    RANK_OUT_OF_RANGE = "rank_out_of_range"
    MISSING_DATA = "missing_data"
    EMPTY_FILE = "empty_file"
    CORRUPT_ARCHIVE = "corrupt_archive"
    UNREADABLE = "unreadable"


class VerifyLevel(str, Enum):
    """How hard to look at each ``.pt`` archive.

    ``STRUCTURE`` reads the zip's central directory and its small ``data.pkl`` member (CRC-checked), never the
    tensor payload, so it stays cheap for multi-GB shards; it catches empty, truncated and non-zip files.
    ``CRC`` additionally reads every member and checks its CRC-32, which also catches damage inside tensor data
    (a bit flip, a hole) at the cost of reading the whole checkpoint.
    """

    structure = "structure"
    crc = "crc"


@dataclass(frozen=True)
class CheckpointInfo:
    """What inspecting one ``global_step_N`` folder found.

    ``world_size`` is the actor's, when its shard names agree on one. ``problems`` is empty for a complete
    folder; each entry reads ``"<problem value>: <step folder>/<file>"`` plus an optional ``(detail)``.
    """

    step: int
    path: Path
    world_size: int | None
    problems: tuple[str, ...]

    @property
    def complete(self) -> bool:
        """A folder with no problems is one verl can resume from."""
        return not self.problems

    @property
    def problem_kinds(self) -> frozenset[CheckpointProblem]:
        """The distinct kinds of problem found, for callers that branch on them rather than on text."""
        return frozenset(CheckpointProblem(text.partition(":")[0]) for text in self.problems)


@dataclass(frozen=True)
class TrackerHint:
    """The step named in ``latest_checkpointed_iteration.txt``, or why none could be read from it."""

    step: int | None
    problem: str | None = None


@dataclass(frozen=True)
class ResumeChoice:
    """The outcome of choosing a checkpoint: what to resume from and what to move out of the way first.

    ``set_aside`` lists the incomplete folders newer than ``checkpoint`` (all incomplete folders when there is
    no complete one), which the caller renames with :func:`set_aside` so that neither verl nor a later scan
    trips over them. ``notes`` explains the choice in words for the supervisor's log and report.
    """

    checkpoint: CheckpointInfo | None
    set_aside: tuple[CheckpointInfo, ...]
    notes: tuple[str, ...]


def _problem(kind: CheckpointProblem, path: Path, base: Path, detail: str | None = None) -> str:
    """Formats one problem so that it names both the kind (first, for :attr:`problem_kinds`) and the file."""
    try:
        shown = path.relative_to(base).as_posix()
    except ValueError:
        shown = str(path)
    text = f"{kind.value}: {shown}"
    return f"{text} ({detail})" if detail else text


def _archive_problem(path: Path, verify: VerifyLevel) -> tuple[CheckpointProblem, str] | None:
    """Checks that ``path`` is a non-empty torch.save zip archive; returns the problem and a detail, or None."""
    try:
        if not path.is_file():
            return CheckpointProblem.CORRUPT_ARCHIVE, "not a regular file"
        size = path.stat().st_size
        if size == 0:
            return CheckpointProblem.EMPTY_FILE, "0 bytes"
        with zipfile.ZipFile(path) as archive:
            return _zip_problem(archive, size, verify)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, struct.error, NotImplementedError) as e:
        return CheckpointProblem.CORRUPT_ARCHIVE, f"{type(e).__name__}: {e}"
    except OSError as e:
        return CheckpointProblem.UNREADABLE, f"{type(e).__name__}: {e}"


def _zip_problem(archive: zipfile.ZipFile, size: int, verify: VerifyLevel) -> tuple[CheckpointProblem, str] | None:
    """The checks on an opened archive; zip errors propagate to :func:`_archive_problem`."""
    members = archive.infolist()
    pickles = [m for m in members if _PICKLE_MEMBER_RE.fullmatch(m.filename)]
    if len(pickles) != 1:
        return CheckpointProblem.CORRUPT_ARCHIVE, f"{len(pickles)} '*/data.pkl' members, not a torch.save archive"
    beyond = [m.filename for m in members if m.header_offset + m.compress_size > size]
    if beyond:
        return CheckpointProblem.CORRUPT_ARCHIVE, f"member {beyond[0]!r} extends past the end of the file"
    archive.read(pickles[0])  # small; reading it to the end checks its local header and CRC-32
    if verify is VerifyLevel.crc:
        bad = archive.testzip()
        if bad is not None:
            return CheckpointProblem.CORRUPT_ARCHIVE, f"bad CRC-32 in member {bad!r}"
    return None


def _inspect_role(role_dir: Path, base: Path, verify: VerifyLevel) -> tuple[int | None, list[str]]:
    """Checks one ``actor/`` or ``critic/`` folder: every rank's three shards, one world size, sound archives."""
    try:
        entries = sorted(role_dir.iterdir())
    except OSError as e:
        return None, [_problem(CheckpointProblem.UNREADABLE, role_dir, base, f"{type(e).__name__}: {e}")]
    shards: dict[tuple[str, int, int], Path] = {}
    for entry in entries:
        match = _SHARD_RE.fullmatch(entry.name)
        if match:
            shards[(match[1], int(match[2]), int(match[3]))] = entry
    if not shards:
        return None, [_problem(CheckpointProblem.NO_RANK_FILES, role_dir, base, "no *_world_size_W_rank_R.pt")]

    problems = _rank_problems(role_dir, base, shards)
    for path in shards.values():
        found = _archive_problem(path, verify)
        if found is not None:
            problems.append(_problem(found[0], path, base, found[1]))
    world_sizes = {w for _, w, _ in shards}
    return (next(iter(world_sizes)) if len(world_sizes) == 1 else None), problems


def _rank_problems(role_dir: Path, base: Path, shards: dict[tuple[str, int, int], Path]) -> list[str]:
    """Problems of the set of shard names alone: world sizes that disagree, ranks missing or out of range."""
    world_sizes = sorted({w for _, w, _ in shards})
    if len(world_sizes) > 1:
        return [_problem(CheckpointProblem.MIXED_WORLD_SIZES, role_dir, base, f"world sizes {world_sizes}")]
    world_size = world_sizes[0]
    problems = [
        _problem(CheckpointProblem.RANK_OUT_OF_RANGE, path, base, f"rank {rank} >= world size {world_size}")
        for (_, _, rank), path in sorted(shards.items())
        if rank >= world_size
    ]
    for kind, rank in itertools.product(SHARD_KINDS, range(world_size)):
        if (kind, world_size, rank) not in shards:
            missing = role_dir / f"{kind}_world_size_{world_size}_rank_{rank}.pt"
            problems.append(_problem(CheckpointProblem.MISSING_RANK_FILE, missing, base))
    return problems


def parse_step(name: str) -> int | None:
    """The step of a folder named exactly ``global_step_<digits>`` as verl writes it, else None."""
    match = _STEP_DIR_RE.fullmatch(name)
    return int(match[1]) if match else None


def inspect_checkpoint(folder: Path, *, verify: VerifyLevel = VerifyLevel.structure) -> CheckpointInfo:
    """Inspects one ``global_step_N`` folder and lists everything that keeps verl from resuming from it.

    Never raises for a damaged folder (that is what it is looking for); raises ``ValueError`` only when the
    folder's name is not a step folder's, since the step number comes from the name.
    """
    folder = Path(folder)
    step = parse_step(folder.name)
    if step is None:
        raise ValueError(f"{folder} is not named global_step_<N>")
    base = folder.parent
    if not folder.is_dir():
        detail = "exists but is not a directory" if folder.exists() else "does not exist"
        return CheckpointInfo(step, folder, None, (_problem(CheckpointProblem.NOT_A_DIRECTORY, folder, base, detail),))

    problems: list[str] = []
    actor = folder / "actor"
    world_size: int | None = None
    if actor.is_dir():
        world_size, found = _inspect_role(actor, base, verify)
        problems += found
    else:
        problems.append(_problem(CheckpointProblem.MISSING_ACTOR_DIR, actor, base))
    for role in ROLE_DIRS[1:]:
        if (folder / role).exists():
            problems += _inspect_role(folder / role, base, verify)[1]
    problems += _data_problems(folder / DATA_FILE, base, verify)
    return CheckpointInfo(step, folder, world_size, tuple(problems))


def _data_problems(data: Path, base: Path, verify: VerifyLevel) -> list[str]:
    if not data.exists():
        return [_problem(CheckpointProblem.MISSING_DATA, data, base)]
    found = _archive_problem(data, verify)
    return [] if found is None else [_problem(found[0], data, base, found[1])]


def scan_checkpoints(root: Path, *, verify: VerifyLevel = VerifyLevel.structure) -> list[CheckpointInfo]:
    """Inspects every ``global_step_<N>`` entry under ``root``, sorted by step ascending.

    Anything else (set-aside ``global_step_N.incomplete-...`` folders, ``global_step_x``, the tracker) is ignored.
    A missing root means no checkpoint was ever written and gives an empty list.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    steps = sorted((step, entry) for entry in root.iterdir() if (step := parse_step(entry.name)) is not None)
    return [inspect_checkpoint(entry, verify=verify) for _, entry in steps]


def read_tracker(root: Path) -> TrackerHint:
    """Reads verl's ``latest_checkpointed_iteration.txt`` the way verl does (an integer, whitespace allowed).

    Only non-negative integers count: a crash during verl's plain write can leave the file empty or partial.
    """
    path = Path(root) / TRACKER_FILE
    try:
        with path.open("rb") as f:
            raw = f.read(_TRACKER_MAX_BYTES + 1)
    except FileNotFoundError:
        return TrackerHint(None, f"missing: {path}")
    except OSError as e:
        return TrackerHint(None, f"unreadable: {path} ({type(e).__name__}: {e})")
    if len(raw) > _TRACKER_MAX_BYTES:
        return TrackerHint(None, f"not an integer: {path} holds more than {_TRACKER_MAX_BYTES} bytes")
    text = raw.decode("ascii", errors="replace").strip()
    if not re.fullmatch(r"[0-9]+", text):
        return TrackerHint(None, f"not an integer: {path} holds {text[:40]!r}")
    return TrackerHint(int(text))


def _first_problem(info: CheckpointInfo) -> str:
    if not info.problems:
        return "no problems"
    more = len(info.problems) - 1
    return info.problems[0] + (f" (+{more} more)" if more else "")


def _tracker_notes(infos: Sequence[CheckpointInfo], tracker: TrackerHint, chosen: CheckpointInfo | None) -> list[str]:
    """What the tracker says against what the folders say; it never changes the choice."""
    if tracker.step is None:
        return [f"tracker ignored: {tracker.problem or 'no step'}"]
    step = tracker.step
    named = [info for info in infos if info.step == step]
    if not named:
        return [f"tracker names step {step} but global_step_{step} is missing"]
    if not any(info.complete for info in named):
        return [f"tracker names step {step} but global_step_{step} is incomplete"]
    if chosen is not None and step < chosen.step:
        return [f"tracker says {step} but {chosen.step} is complete and newer"]
    return [f"tracker agrees: step {step}"]


def choose_resume_checkpoint(infos: Sequence[CheckpointInfo], tracker: TrackerHint) -> ResumeChoice:
    """Picks the newest complete checkpoint, whatever the tracker says. Pure: touches no file.

    Incomplete folders newer than the choice are returned for setting aside (every incomplete folder when none
    is complete, so that a fresh start does not trip over them); older incomplete ones, typically steps whose
    ``actor/`` verl's rotation already deleted, are left alone and only mentioned. Note that verl's
    ``resume_mode=auto`` follows the tracker, so the caller must make verl resume from the chosen step (rewrite
    the tracker or pass ``resume_from_path``) whenever a tracker note says it disagrees.
    """
    ordered = sorted(infos, key=lambda info: info.step)
    chosen = next((info for info in reversed(ordered) if info.complete), None)
    newer = tuple(info for info in ordered if not info.complete and (chosen is None or info.step > chosen.step))
    older = [info for info in ordered if not info.complete and chosen is not None and info.step <= chosen.step]

    notes = [_choice_note(ordered, chosen)]
    notes += [f"{info.path.name} is incomplete and newer: set aside ({_first_problem(info)})" for info in newer]
    notes += [f"{info.path.name} is incomplete but older: left in place ({_first_problem(info)})" for info in older]
    notes += _tracker_notes(ordered, tracker, chosen)
    return ResumeChoice(chosen, newer, tuple(notes))


def _choice_note(ordered: Sequence[CheckpointInfo], chosen: CheckpointInfo | None) -> str:
    if chosen is not None:
        return f"resume from {chosen.path.name} (step {chosen.step}, world size {chosen.world_size})"
    if not ordered:
        return "no checkpoint folders found: start from scratch"
    return f"no complete checkpoint among {len(ordered)} folder(s): start from scratch"


def _utc_stamp(now: datetime | None) -> str:
    """``20261123T211900Z`` for ``now`` (default: the current time); a naive ``now`` is taken to be UTC."""
    moment = datetime.now(timezone.utc) if now is None else now
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def _candidates(folder: Path, stamp: str) -> Iterable[Path]:
    base = f"{folder.name}.incomplete-{stamp}"
    yield folder.with_name(base)
    for n in itertools.count(1):
        yield folder.with_name(f"{base}-{n}")


def set_aside(info: CheckpointInfo, *, now: datetime | None = None) -> Path:
    """Renames ``global_step_N`` to ``global_step_N.incomplete-<UTC stamp>[-k]`` beside it; never deletes.

    The new name no longer matches ``global_step_<N>``, so neither :func:`scan_checkpoints` nor verl's tracker
    lookup sees it, while every byte stays available for a post-mortem. ``os.rename`` is atomic on one
    filesystem: the folder is either fully under its old name or fully under the new one. Returns the new path.
    """
    if info.complete:
        logger.warning("setting aside %s although it looks complete", info.path)
    for target in _candidates(info.path, _utc_stamp(now)):
        if target.exists() or target.is_symlink():
            continue
        try:
            os.rename(info.path, target)
        except (FileExistsError, IsADirectoryError, NotADirectoryError) as e:
            logger.debug("%s appeared meanwhile (%s); trying the next name", target, e)
            continue
        except OSError:
            if target.exists():  # e.g. ENOTEMPTY: another process took this name between the check and the rename
                continue
            raise
        logger.info("set aside %s as %s: %s", info.path, target.name, _first_problem(info))
        return target
    raise AssertionError("unreachable: the candidate names never run out")
