"""Judge each ``global_step_N`` folder: complete (verl can resume from it) or not, and why.

A step, in verl 0.9.1's save order (V1 trainer ``verl/trainer/ppo/v1/trainer_base.py`` ``_save_checkpoint``, lines
948-1030; the legacy ``ray_trainer.py`` ``_save_checkpoint``, lines 983-1052, is the same without the last two):
``actor/``, ``critic/`` when the trainer uses a critic, ``data.pt`` (the dataloader), ``transfer_queue/`` when
the trainer is not in ``sync`` mode (written as ``transfer_queue.tmp`` and renamed), the tracker file, then the
checkpoint callback, whose marker (``verl_hooks.contract.CHECKPOINT_MARKER``) lists every file with its size.
None of it is atomic, so the folders themselves are the truth and the tracker only a hint.

A step with a durable marker is checked against the marker exactly: the job said which files make the step.
Without one (the legacy trainer, an older run) the layout rules of :mod:`supervisor.checkpoints.layouts` decide,
told what the run's configuration says (:class:`~verl_hooks.contract.CheckpointFacts`) where it is known.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from supervisor.checkpoints.archives import VerifyLevel, archive_problem
from supervisor.checkpoints.layouts import inspect_role, layout_of_strategy
from supervisor.checkpoints.problems import CheckpointProblem, problem, problem_kind
from verl_hooks.contract import CHECKPOINT_MARKER, CheckpointFacts, CheckpointMarker, read_checkpoint_marker

DATA_FILE = "data.pt"
"""The dataloader state verl saves at the top of every step folder, after the actor and critic shards."""
ACTOR_DIR = "actor"
CRITIC_DIR = "critic"
TRANSFER_QUEUE_DIR = "transfer_queue"
TRANSFER_QUEUE_TMP = "transfer_queue.tmp"
TRANSFER_QUEUE_FILES = ("controller_state.pkl", "metadata.json")
"""What TransferQueue 0.1.x's ``save_checkpoint`` puts in the folder before renaming it into place."""

_KNOWN_STEP_ENTRIES = {ACTOR_DIR, CRITIC_DIR, DATA_FILE, TRANSFER_QUEUE_DIR, TRANSFER_QUEUE_TMP, CHECKPOINT_MARKER}

# Only the canonical spelling verl itself produces (``global_step_{int}``): verl opens ``global_step_{N}`` by
# formatting the integer, so ``global_step_06`` could never be resumed and is ignored like any other name.
_STEP_DIR_RE = re.compile(r"global_step_(0|[1-9][0-9]*)")


@dataclass(frozen=True)
class CheckpointInfo:
    """What inspecting one ``global_step_N`` folder found.

    ``world_size`` is the actor's, when its files agree on one. ``problems`` is empty for a complete folder; each
    entry reads ``"<problem value>: <step folder>/<file>"`` plus an optional ``(detail)``. ``layout`` names the
    actor's layout (``fsdp``, ``megatron``, ...) and ``marker`` whether the job's checkpoint marker decided.
    """

    step: int
    path: Path
    world_size: int | None
    problems: tuple[str, ...]
    layout: str | None = None
    marker: bool = False

    @property
    def complete(self) -> bool:
        """A folder with no problems is one verl can resume from."""
        return not self.problems

    @property
    def problem_kinds(self) -> frozenset[CheckpointProblem]:
        """The distinct kinds of problem found, for callers that branch on them rather than on text."""
        return frozenset(problem_kind(text) for text in self.problems)

    @property
    def unjudgeable(self) -> bool:
        """Its layout is one the supervisor does not know: neither resumed from nor set aside."""
        return CheckpointProblem.UNKNOWN_LAYOUT in self.problem_kinds


def parse_step(name: str) -> int | None:
    """The step of a folder named exactly ``global_step_<digits>`` as verl writes it, else None."""
    match = _STEP_DIR_RE.fullmatch(name)
    return int(match[1]) if match else None


def step_folders(root: Path) -> list[tuple[int, Path]]:
    """Every ``global_step_<N>`` entry under ``root``, by step; set-aside folders and the tracker are not."""
    if not root.is_dir():
        return []
    return sorted((step, entry) for entry in root.iterdir() if (step := parse_step(entry.name)) is not None)


def inspect_checkpoint(
    folder: Path, *, verify: VerifyLevel = VerifyLevel.structure, facts: CheckpointFacts | None = None
) -> CheckpointInfo:
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
        return CheckpointInfo(step, folder, None, (problem(CheckpointProblem.NOT_A_DIRECTORY, folder, base, detail),))
    facts = facts or CheckpointFacts()
    try:
        marker = read_checkpoint_marker(folder)
    except ValueError as e:
        trouble = problem(CheckpointProblem.CORRUPT_JSON, folder / CHECKPOINT_MARKER, base, str(e).split(": ", 1)[-1])
        return CheckpointInfo(step, folder, None, (trouble,))
    if marker is not None:
        facts = marker.facts.merged_over(facts)
    layout = layout_of_strategy(facts.actor_strategy)
    if marker is not None and marker.durable:
        problems = _marker_problems(folder, base, step, marker, verify) + _transfer_queue_problems(folder, base, facts)
        return CheckpointInfo(step, folder, None, tuple(problems), layout.value if layout else None, marker=True)
    world_size, problems, layout_name = _layout_problems(folder, base, step, facts, verify)
    if marker is not None:  # an asynchronous save: what was there at on_save must still be, and the layout done
        problems = _marker_problems(folder, base, step, marker, verify, sizes=False) + problems
    return CheckpointInfo(step, folder, world_size, tuple(problems), layout_name, marker=marker is not None)


def _layout_problems(
    folder: Path, base: Path, step: int, facts: CheckpointFacts, verify: VerifyLevel
) -> tuple[int | None, list[str], str | None]:
    problems: list[str] = []
    roles = {
        ACTOR_DIR: (facts.actor_strategy, facts.actor_save_contents),
        CRITIC_DIR: (facts.critic_strategy, facts.critic_save_contents),
    }
    verdicts = {
        role: inspect_role(folder / role, base, step=step, strategy=strategy, save_contents=contents, verify=verify)
        for role, (strategy, contents) in roles.items()
        # a critic/ that is not a folder is judged (unreadable); an actor/ that is not one counts as missing
        if ((folder / role).is_dir() if role == ACTOR_DIR else (folder / role).exists())
    }
    actor = verdicts.get(ACTOR_DIR)
    if actor is None:
        problems.append(_missing_actor(folder, base))
    if CRITIC_DIR not in verdicts and facts.critic:
        problems.append(
            problem(CheckpointProblem.MISSING_CRITIC_DIR, folder / CRITIC_DIR, base, "the run uses a critic")
        )
    for verdict in verdicts.values():
        problems += verdict.problems
    world_size = actor.world_size if actor else None
    layout = actor.layout.value if actor else None
    problems += _data_problems(folder / DATA_FILE, base, verify)
    problems += _transfer_queue_problems(folder, base, facts)
    return world_size, problems, layout


def _missing_actor(folder: Path, base: Path) -> str:
    """No ``actor/``: rotated out or never written, unless the folder holds files of a layout not known here
    (e.g. TorchTitan's checkpointer writes ``step-N/`` beside verl's names)."""
    strangers = sorted(entry.name for entry in folder.iterdir() if entry.name not in _KNOWN_STEP_ENTRIES)
    strangers = [name for name in strangers if not name.startswith(".")]
    if strangers:
        detail = f"no actor/ but {', '.join(strangers[:4])}: a layout the supervisor does not know"
        return problem(CheckpointProblem.UNKNOWN_LAYOUT, folder, base, detail)
    return problem(CheckpointProblem.MISSING_ACTOR_DIR, folder / ACTOR_DIR, base)


def _data_problems(data: Path, base: Path, verify: VerifyLevel) -> list[str]:
    if not data.exists():
        return [problem(CheckpointProblem.MISSING_DATA, data, base)]
    found = archive_problem(data, verify)
    return [] if found is None else [problem(found[0], data, base, found[1])]


def _transfer_queue_problems(folder: Path, base: Path, facts: CheckpointFacts) -> list[str]:
    tmp, final = folder / TRANSFER_QUEUE_TMP, folder / TRANSFER_QUEUE_DIR
    if tmp.exists():
        detail = "TransferQueue's save was cut before its rename; verl writes the tracker only after it"
        return [problem(CheckpointProblem.TRANSFER_QUEUE_IN_FLIGHT, tmp, base, detail)]
    if not final.exists():
        if facts.transfer_queue:
            detail = "the trainer runs in an async mode, which saves in-flight prompts there"
            return [problem(CheckpointProblem.MISSING_TRANSFER_QUEUE, final, base, detail)]
        return []
    return [
        problem(CheckpointProblem.MISSING_FILE, final / name, base, "TransferQueue writes it before the rename")
        for name in TRANSFER_QUEUE_FILES
        if not (final / name).is_file()
    ]


def _marker_problems(
    folder: Path, base: Path, step: int, marker: CheckpointMarker, verify: VerifyLevel, *, sizes: bool = True
) -> list[str]:
    """Every file the marker lists is there, with its size (``sizes``), and its ``.pt`` archives are whole."""
    marker_path = folder / CHECKPOINT_MARKER
    if marker.step != step:
        return [problem(CheckpointProblem.MARKER_MISMATCH, marker_path, base, f"it names step {marker.step}")]
    problems: list[str] = []
    for name, size in sorted(marker.files.items()):
        path = folder / name
        if ".." in Path(name).parts or Path(name).is_absolute():
            problems.append(problem(CheckpointProblem.MARKER_MISMATCH, marker_path, base, f"lists {name!r}"))
        elif not path.is_file():
            problems.append(problem(CheckpointProblem.MARKER_MISMATCH, path, base, "listed in the marker, absent"))
        elif sizes and path.stat().st_size != size:
            detail = f"{path.stat().st_size} bytes, the marker says {size}"
            problems.append(problem(CheckpointProblem.MARKER_MISMATCH, path, base, detail))
        elif sizes and path.suffix == ".pt":
            found = archive_problem(path, verify)
            if found is not None:
                problems.append(problem(found[0], path, base, found[1]))
    return problems
