"""Choose the checkpoint to resume from, and move incomplete ones out of the way (renamed, never deleted).

verl's tracker (``latest_checkpointed_iteration.txt``) is only a hint: it is written with a plain write after the
step (so a crash can leave it missing, empty or partial), rotation may have deleted the step it names, and with
``async_save`` the trainer does not write it at all. The step folders are the truth.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from supervisor.checkpoints.archives import VerifyLevel
from supervisor.checkpoints.facts import run_facts
from supervisor.checkpoints.steps import CheckpointInfo, inspect_checkpoint, step_folders
from verl_hooks.contract import CheckpointFacts

logger = logging.getLogger(__name__)

TRACKER_FILE = "latest_checkpointed_iteration.txt"
"""verl's tracker file in the checkpoint root, naming the last step it finished saving."""

_TRACKER_MAX_BYTES = 4096  # a step number is a few bytes; anything longer is garbage and need not be read whole


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
    trips over them. ``unjudgeable`` lists folders newer than ``checkpoint`` in a layout the supervisor does not
    know: while there is one, the caller must neither resume nor set anything aside. ``notes`` explains the choice
    in words for the supervisor's log and report.
    """

    checkpoint: CheckpointInfo | None
    set_aside: tuple[CheckpointInfo, ...]
    notes: tuple[str, ...]
    unjudgeable: tuple[CheckpointInfo, ...] = ()


def scan_checkpoints(
    root: Path, *, verify: VerifyLevel = VerifyLevel.structure, facts: CheckpointFacts | None = None
) -> list[CheckpointInfo]:
    """Inspects every ``global_step_<N>`` entry under ``root``, sorted by step ascending, each against what the
    run's steps must contain (:func:`~supervisor.checkpoints.facts.run_facts`, over ``facts`` given by the caller).

    Anything else (set-aside ``global_step_N.incomplete-...`` folders, ``global_step_x``, the tracker) is ignored.
    A missing root means no checkpoint was ever written and gives an empty list.
    """
    root = Path(root)
    known = run_facts(root, facts)
    return [inspect_checkpoint(entry, verify=verify, facts=known) for _, entry in step_folders(root)]


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
    newer = [info for info in ordered if not info.complete and (chosen is None or info.step > chosen.step)]
    unknown = tuple(info for info in newer if info.unjudgeable)
    older = [info for info in ordered if not info.complete and chosen is not None and info.step <= chosen.step]

    notes = [_choice_note(ordered, chosen)]
    notes += [
        f"{info.path.name} is in a layout the supervisor does not know ({_first_problem(info)})" for info in unknown
    ]
    if unknown:  # resuming from an older step, or setting these aside, would throw away what cannot be judged
        return ResumeChoice(None, (), tuple(notes), unknown)
    notes += [f"{info.path.name} is incomplete and newer: set aside ({_first_problem(info)})" for info in newer]
    notes += [f"{info.path.name} is incomplete but older: left in place ({_first_problem(info)})" for info in older]
    notes += _tracker_notes(ordered, tracker, chosen)
    return ResumeChoice(chosen, tuple(newer), tuple(notes))


def _choice_note(ordered: Sequence[CheckpointInfo], chosen: CheckpointInfo | None) -> str:
    if chosen is not None:
        how = "its checkpoint marker" if chosen.marker else f"{chosen.layout} layout, world size {chosen.world_size}"
        return f"resume from {chosen.path.name} (step {chosen.step}; judged by {how})"
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
