"""verl's checkpoint callback that tells the supervisor what each saved step holds.

verl 0.9.1's V1 trainer builds ``trainer.checkpoint_callback_class`` once (``build_checkpoint_callback``,
``verl/trainer/ppo/checkpoint_callback.py:66``, from ``PPOTrainer.__init__``, ``verl/trainer/ppo/v1/
trainer_base.py:122``) in its ``TaskRunner`` actor, and calls its ``on_save`` at the end of every
``_save_checkpoint`` (``trainer_base.py:1014`` for an async save, ``:1027`` after the tracker otherwise). The
``verl_ppo`` preset names ``SupervisorCheckpointCallback`` there; ``verl_hooks.launch`` moves a callback the user
named into ``$VERL_HOOKS_CHAINED_CHECKPOINT_CALLBACK``, and this one runs it first.

Each ``on_save`` writes ``verl_supervisor_checkpoint.json`` into the step folder (``verl_hooks.contract``): every
file of the folder with its size, and the facts of the job's configuration that say what a step must contain. A
marker that cannot be written costs a warning, never the training run: the supervisor then judges the step by the
layout alone, as it does for steps saved without this callback. verl's legacy trainer (``trainer.use_v1=false``,
``verl/trainer/ppo/ray_trainer.py``) never calls a checkpoint callback, so its steps carry no marker.

Imported only inside the job, where verl is installed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from verl.trainer.ppo.checkpoint_callback import CheckpointCallback
from verl.utils.import_utils import load_class_from_fqn

from verl_hooks.config_view import ABSENT as _ABSENT
from verl_hooks.config_view import get as _get
from verl_hooks.config_view import is_section as _is_section
from verl_hooks.config_view import select as _select
from verl_hooks.contract import (
    CHECKPOINT_CALLBACK_CLASS,
    CHECKPOINT_MARKER,
    CheckpointFacts,
    CheckpointMarker,
    write_checkpoint_marker,
)
from verl_hooks.settings import chained_checkpoint_callback

logger = logging.getLogger(__name__)

# verl's manager saves these when checkpoint.save_contents is null (verl/utils/checkpoint/checkpoint_manager.py:56-57).
VERL_DEFAULT_SAVE_CONTENTS = ("model", "optimizer", "extra")


def _str_or_none(value: Any) -> str | None:
    return str(value) if value is not None and value is not _ABSENT else None


def _int_or_none(value: Any) -> int | None:
    if value is None or value is _ABSENT or isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _save_contents(role: Any) -> tuple[str, ...] | None:
    """``<role>.checkpoint.save_contents`` as verl's manager reads it; None when the role has no section here."""
    if not _is_section(role):
        return None
    contents = _select(role, "checkpoint.save_contents")
    if contents is None or contents is _ABSENT:
        # verl hands the manager <role>.checkpoint (or nothing) and the manager falls back to its default.
        return VERL_DEFAULT_SAVE_CONTENTS
    if isinstance(contents, str):
        return (contents,)
    try:
        return tuple(str(item) for item in contents)
    except TypeError:
        return None


def checkpoint_facts(config: Any, trainer: Any = None) -> CheckpointFacts:
    """What a step of this run must contain, from verl's config (a DictConfig, a dict, or a verl-shaped
    dataclass) and the trainer instance; None for every fact the config does not give."""
    actor = _select(config, "actor_rollout_ref.actor")
    critic_section = _get(config, "critic")
    trainer_section = _get(config, "trainer")

    # The trainer decides with verl's need_critic (trainer_base.py:123); critic.enable is its explicit form.
    use_critic = getattr(trainer, "use_critic", None) if trainer is not None else None
    if not isinstance(use_critic, bool):
        enable = _get(critic_section, "enable")
        use_critic = enable if isinstance(enable, bool) else None

    # transfer_queue/ is saved iff trainer_mode != "sync" (trainer_base.py:1004), trainer_mode being
    # config.trainer.v1.trainer_mode (trainer_base.py:129). A trainer that has neither is not verl's V1 one.
    mode = getattr(trainer, "trainer_mode", None) if trainer is not None else None
    if mode is None:
        mode = _str_or_none(_select(trainer_section, "v1.trainer_mode"))
    transfer_queue = None if mode is None else str(mode) != "sync"

    async_save = _select(actor, "checkpoint.async_save")

    # trainer_base.py:958-969: the deprecated remove_previous_ckpt_in_save forces 1 for both roles. verl's rotation
    # treats null and anything below 1 alike, as "keep all" (checkpoint_manager.py:174); the values go out as set.
    if _get(trainer_section, "remove_previous_ckpt_in_save") is True:
        max_actor, max_critic = 1, 1
    else:
        max_actor = _int_or_none(_get(trainer_section, "max_actor_ckpt_to_keep"))
        max_critic = _int_or_none(_get(trainer_section, "max_critic_ckpt_to_keep"))

    critic_known = use_critic is not False
    return CheckpointFacts(
        actor_strategy=_str_or_none(_get(actor, "strategy")),
        actor_save_contents=_save_contents(actor),
        critic=use_critic,
        critic_strategy=_str_or_none(_get(critic_section, "strategy")) if critic_known else None,
        critic_save_contents=_save_contents(critic_section) if critic_known else None,
        async_save=async_save if isinstance(async_save, bool) else None,
        transfer_queue=transfer_queue,
        max_actor_ckpt_to_keep=max_actor,
        max_critic_ckpt_to_keep=max_critic,
    )


def step_files(step_dir: str | os.PathLike[str]) -> dict[str, int]:
    """Every regular file under ``step_dir`` (``/``-separated path relative to it → size in bytes), but the
    marker and its temporary files. Symbolic links are neither listed nor followed: verl writes none."""
    root = Path(step_dir)
    files: dict[str, int] = {}
    for folder, dirnames, filenames in os.walk(root):
        here = Path(folder)
        if here == root:
            dirnames[:] = [name for name in dirnames if not _is_marker(name)]
            filenames = [name for name in filenames if not _is_marker(name)]
        for name in filenames:
            path = here / name
            try:
                info = path.lstat()
            except FileNotFoundError:
                continue
            if stat.S_ISREG(info.st_mode):
                files[path.relative_to(root).as_posix()] = info.st_size
    return dict(sorted(files.items()))


def _is_marker(name: str) -> bool:
    # write_checkpoint_marker's temporary file is ".<marker>.<random>".
    return name == CHECKPOINT_MARKER or name.startswith(f".{CHECKPOINT_MARKER}.")


def chained_callback(config: Any, environ: Mapping[str, str] | None = None) -> CheckpointCallback | None:
    """The user's own callback that ``verl_hooks.launch`` set aside, built as verl builds one
    (``checkpoint_callback.py:78-80``); None when there is none."""
    fqn = chained_checkpoint_callback(environ)
    if not fqn or fqn == CHECKPOINT_CALLBACK_CLASS:
        return None
    callback_cls = load_class_from_fqn(fqn, "CheckpointCallback")
    if isinstance(callback_cls, type) and issubclass(callback_cls, SupervisorCheckpointCallback):
        logger.warning("%s names %s, which already writes the marker: not chained", fqn, CHECKPOINT_CALLBACK_CLASS)
        return None
    return callback_cls(config=config)


class SupervisorCheckpointCallback(CheckpointCallback):
    """Runs the user's own callback, if any, then writes the supervisor's marker into the step folder."""

    def __init__(self, config: Any = None) -> None:
        super().__init__(config=config)
        # Built here, as verl builds the configured callback at trainer init: a bad class name fails the job
        # before it trains, not at the first save.
        self.chained = chained_callback(config)

    def on_save(
        self,
        trainer: Any,
        global_step: int,
        checkpoint_dir: str,
        async_save: bool = False,
        **kwargs: Any,
    ) -> None:
        if self.chained is not None:
            # The user's durability hooks first; their failure aborts training as verl documents, with no marker.
            self.chained.on_save(
                trainer=trainer, global_step=global_step, checkpoint_dir=checkpoint_dir, async_save=async_save, **kwargs
            )
        self.write_marker(trainer, global_step, checkpoint_dir, async_save)

    def write_marker(self, trainer: Any, global_step: int, checkpoint_dir: str, async_save: bool) -> Path | None:
        """Write the marker; returns its path, or None (with a warning) when it could not be written."""
        try:
            # What verl did for this save outranks what the config says it would do.
            facts = dataclasses.replace(checkpoint_facts(self.config, trainer), async_save=bool(async_save))
            marker = CheckpointMarker(
                step=int(global_step), files=step_files(checkpoint_dir), durable=not async_save, facts=facts
            )
            return write_checkpoint_marker(checkpoint_dir, marker)
        except Exception as exc:  # noqa: BLE001 - the checkpoint itself is saved; only the supervisor's hint is lost
            logger.warning(
                "could not write the supervisor's checkpoint marker into %s (%s: %s); the supervisor will judge "
                "this step by its files alone",
                checkpoint_dir,
                type(exc).__name__,
                exc,
            )
            return None
