"""What a step of this run must contain: from the job's checkpoint markers, the user's overrides, the folders.

In order of trust: the newest marker the job's checkpoint callback wrote (verl's resolved configuration, as the
trainer saw it); then the Hydra overrides the user gave the job (for runs without the callback, such as verl's
legacy trainer); then what the step folders themselves show (a run whose steps hold ``critic/`` uses a critic,
so a step without one cannot be resumed: verl would fail to load it).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from supervisor.checkpoints.steps import CRITIC_DIR, TRANSFER_QUEUE_DIR, step_folders
from verl_hooks.contract import CheckpointFacts, read_checkpoint_marker

_OVERRIDE_RE = re.compile(r"\+{0,2}([A-Za-z0-9_.]+)=(.*)")

_INT_KEYS = {
    "trainer.max_actor_ckpt_to_keep": "max_actor_ckpt_to_keep",
    "trainer.max_critic_ckpt_to_keep": "max_critic_ckpt_to_keep",
}
_STR_KEYS = {"actor_rollout_ref.actor.strategy": "actor_strategy", "critic.strategy": "critic_strategy"}
_LIST_KEYS = {
    "actor_rollout_ref.actor.checkpoint.save_contents": "actor_save_contents",
    "critic.checkpoint.save_contents": "critic_save_contents",
}


def facts_from_overrides(args: Sequence[str]) -> CheckpointFacts:
    """The facts the job's Hydra overrides state outright (the last one of a key wins, as in Hydra).

    Key names are verl 0.9.1's (``verl/trainer/config/ppo_trainer.yaml``: ``trainer.max_actor_ckpt_to_keep``
    line 220, ``max_critic_ckpt_to_keep`` line 223; the actor's ``checkpoint`` section for ``save_contents`` and
    ``async_save``). ``trainer.remove_previous_ckpt_in_save=true`` keeps one of each, as ``_save_checkpoint`` does.
    """
    values: dict[str, object] = {}
    remove_previous = False
    for arg in args:
        match = _OVERRIDE_RE.fullmatch(arg)
        if not match:
            continue
        key, raw = match[1], match[2].strip().strip("'\"")
        if key in _INT_KEYS:
            values[_INT_KEYS[key]] = int(raw) if raw.isdigit() else None
        elif key in _STR_KEYS:
            values[_STR_KEYS[key]] = None if raw in ("null", "") else raw
        elif key in _LIST_KEYS and raw.startswith("[") and raw.endswith("]"):
            items = [item.strip().strip("'\"") for item in raw[1:-1].split(",")]
            values[_LIST_KEYS[key]] = tuple(item for item in items if item)
        elif key == "actor_rollout_ref.actor.checkpoint.async_save":
            values["async_save"] = raw.lower() == "true"
        elif key == "trainer.remove_previous_ckpt_in_save":
            remove_previous = raw.lower() == "true"
    if remove_previous:
        values.update(max_actor_ckpt_to_keep=1, max_critic_ckpt_to_keep=1)
    return CheckpointFacts(**values)  # type: ignore[arg-type]


def newest_marker_facts(root: Path) -> CheckpointFacts | None:
    """The facts in the newest readable marker under ``root``: the job's latest word on its configuration."""
    for _, folder in reversed(step_folders(root)):
        try:
            marker = read_checkpoint_marker(folder) if folder.is_dir() else None
        except ValueError:
            continue
        if marker is not None:
            return marker.facts
    return None


def run_facts(root: Path, overrides: CheckpointFacts | None = None) -> CheckpointFacts:
    """Everything known about what this run's steps contain: markers over overrides over the folders."""
    facts = overrides or CheckpointFacts()
    marker_facts = newest_marker_facts(root)
    if marker_facts is not None:
        facts = marker_facts.merged_over(facts)
    folders = [folder for _, folder in step_folders(root) if folder.is_dir()]
    if facts.critic is None and any((folder / CRITIC_DIR).is_dir() for folder in folders):
        facts = replace(facts, critic=True)
    if facts.transfer_queue is None and any((folder / TRANSFER_QUEUE_DIR).is_dir() for folder in folders):
        facts = replace(facts, transfer_queue=True)
    return facts
