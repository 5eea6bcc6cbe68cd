"""The emergency save: the trainer saves the step it is at before a failed sync (or a stop) ends the job.

verl saves *before* it syncs: in the V1 trainer ``_save_checkpoint`` when due (verl/trainer/ppo/v1/trainer_base.py
481-485), then ``on_step_end`` → ``update_weights(self.global_steps)`` (487), ``global_steps += 1`` at 520; in the
legacy trainer save at ray_trainer.py 1704-1712, sync at 1716, increment at 1805. So when the sync of step N fails,
actor, critic, optimizer, scheduler, RNG and dataloader hold exactly what a periodic save at N writes, and saving
them through the trainer's own ``_save_checkpoint`` lets the relaunch resume at N with nothing redone.

``decide`` is pure: from the facts (the trigger, the trainer's step and the failing sync's, whether the trainer side
is idle, the save settings of the run, whether step N is on disk already) to ``Save`` or ``Skip(reason)``.
``save_step`` carries a save out: in a thread of its own, under a deadline, with verl's rotation off (verl rotates
before it writes, ``ensure_checkpoint_capacity``: with ``max_actor_ckpt_to_keep=1`` a save that dies half-way would
leave nothing to resume from; the supervisor applies the run's limits once the step is complete), announced to
the supervisor by heartbeats so that it does not tear the job down meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from verl_hooks import heartbeat
from verl_hooks.config_view import select
from verl_hooks.contract import EmergencyCheckpoint, EmergencyStatus, EmergencyTrigger, HeartbeatKind
from verl_hooks.faults import FaultPlan, SavePoint, fire_blocking
from verl_hooks.settings import HookSettings
from verl_hooks.trainer_side import TrainerSide

logger = logging.getLogger(__name__)

DEADLINE_MULTIPLE = 3.0
"""Once the job has timed its own periodic saves, the emergency save may take this many times the slowest."""
DEADLINE_FLOOR_S = 60.0
"""...but never less than this: a page cache flushing, a slow shared file system, on an otherwise fast save."""


@dataclass(frozen=True)
class SaveFacts:
    trigger: EmergencyTrigger
    enabled: bool
    trainer_step: int | None
    """``trainer.global_steps``: the step whose state the trainer holds (verl increments it after the sync)."""
    sync_step: int | None
    """The ``global_steps`` the failing (or last) sync was called with; None for verl's validation syncs."""
    trainer_side: TrainerSide | None
    """None for a stop request: it comes right after a sync that succeeded, with nothing in flight."""
    save_freq: int | None
    async_save: bool
    in_critic_warmup: bool
    """verl's legacy trainer neither updates the actor nor saves during its critic warm-up steps."""
    already_saved: bool
    """``global_step_N`` is on disk: saved before the sync, or the step this attempt resumed from."""


@dataclass(frozen=True)
class Save:
    step: int


@dataclass(frozen=True)
class Skip:
    reason: str


def decide(facts: SaveFacts) -> Save | Skip:
    step = facts.trainer_step
    if not facts.enabled:
        return Skip("turned off (restart.emergency_save=false / VERL_HOOKS_EMERGENCY_SAVE=0)")
    if step is None or step <= 0:
        return Skip("no training step has finished yet")
    if facts.sync_step is not None and facts.sync_step != step:
        return Skip(f"the sync was for step {facts.sync_step} while the trainer is at step {step}")
    if facts.save_freq is not None and facts.save_freq <= 0:
        return Skip("the run saves no checkpoints (trainer.save_freq <= 0)")
    if facts.async_save:
        return Skip("asynchronous saves (checkpoint.async_save): verl writes their tracker later, out of our sight")
    if facts.in_critic_warmup:
        return Skip(f"step {step} is a critic warm-up step, which verl's trainer never saves")
    if facts.already_saved:
        return Skip(f"step {step} is already saved")
    if facts.trainer_side is not None and not facts.trainer_side.idle:
        return Skip(f"the trainer side is not idle: {facts.trainer_side.reason}")
    return Save(step)


def deadline_s(save_durations_s: list[float], timeout_s: float) -> float:
    """The emergency save's deadline: from the job's own saves when it has timed any, else ``timeout_s``."""
    if not save_durations_s:
        return timeout_s
    return min(timeout_s, max(DEADLINE_FLOOR_S, DEADLINE_MULTIPLE * max(save_durations_s)))


# --- what the trainer hook knows of the trainers in this process ---------------------------------------------

_fitting = 0
_fitting_lock = threading.Lock()
# How long each periodic save of a trainer took, for its deadline; weakly held, as the trainer's own state.
_save_durations: weakref.WeakKeyDictionary[Any, list[float]] = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def fitting() -> Iterator[None]:
    """While a guarded trainer's ``fit`` runs: a stop request can be acted on (it has somewhere to save)."""
    global _fitting
    with _fitting_lock:
        _fitting += 1
    try:
        yield
    finally:
        with _fitting_lock:
            _fitting -= 1


def a_trainer_can_save() -> bool:
    with _fitting_lock:
        return _fitting > 0


def note_save_duration(trainer: Any, seconds: float) -> None:
    with contextlib.suppress(TypeError):  # a trainer that cannot be weakly referenced: its deadline stays fixed
        _save_durations.setdefault(trainer, []).append(seconds)


def save_durations(trainer: Any) -> list[float]:
    try:
        return list(_save_durations.get(trainer, []))
    except TypeError:
        return []


# --- the facts, from a verl-shaped trainer -------------------------------------------------------------------


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def facts_of(
    trainer: Any,
    trigger: EmergencyTrigger,
    sync_step: int | None,
    side: TrainerSide | None,
    settings: HookSettings,
    *,
    skips_critic_warmup: bool,
) -> SaveFacts:
    """Read the facts off the trainer and its config (verl's keys: ``trainer.save_freq``,
    ``trainer.default_local_dir``, ``trainer.critic_warmup``, ``actor_rollout_ref.actor.checkpoint.async_save``)."""
    config = getattr(trainer, "config", None)
    step = _int(getattr(trainer, "global_steps", None))
    root = select(config, "trainer.default_local_dir")
    warmup = _int(select(config, "trainer.critic_warmup"))
    return SaveFacts(
        trigger=trigger,
        enabled=settings.emergency_save,
        trainer_step=step,
        sync_step=sync_step,
        trainer_side=side,
        save_freq=_int(select(config, "trainer.save_freq")),
        async_save=select(config, "actor_rollout_ref.actor.checkpoint.async_save") is True,
        in_critic_warmup=skips_critic_warmup and step is not None and warmup is not None and warmup > step,
        already_saved=isinstance(root, str) and step is not None and (Path(root) / f"global_step_{step}").is_dir(),
    )


# --- carrying a save out -------------------------------------------------------------------------------------


class _EverySaveKept:
    """Stands in for a trainer's worker group during the emergency save: its ``save_checkpoint`` rotates nothing
    (verl's manager keeps every step when ``max_ckpt_to_keep`` is None, checkpoint_manager.py:174 and 189), and a
    planned ``emergency_save`` fault fires once the actor's part is written."""

    def __init__(self, worker_group: Any, after_save: Any = None) -> None:
        self._wg = worker_group
        self._after_save = after_save

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wg, name)

    def save_checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["max_ckpt_to_keep"] = None
        result = self._wg.save_checkpoint(*args, **kwargs)
        if self._after_save is not None:
            self._after_save()
        return result


@contextlib.contextmanager
def _rotation_off(trainer: Any, after_actor_save: Any) -> Iterator[None]:
    """verl's trainers save through ``actor_rollout_wg`` and ``critic_wg`` (trainer_base.py:978 and 991,
    ray_trainer.py:1013 and 1026); instance attributes shadow them for the save."""
    replaced = {}
    for name, hook in (("actor_rollout_wg", after_actor_save), ("critic_wg", None)):
        group = trainer.__dict__.get(name)
        if group is not None:
            replaced[name] = group
            setattr(trainer, name, _EverySaveKept(group, hook))
    try:
        yield
    finally:
        for name, group in replaced.items():
            setattr(trainer, name, group)


def save_step(
    trainer: Any, step: int, trigger: EmergencyTrigger, limit_s: float, faults: FaultPlan
) -> EmergencyCheckpoint:
    """Run ``trainer._save_checkpoint()`` for ``step`` in a thread, waiting at most ``limit_s``; never raises."""
    fault = faults.take(SavePoint.EMERGENCY_SAVE, step)

    def after_actor_save() -> None:
        if fault is not None:
            fire_blocking(fault, step)

    outcome: dict[str, BaseException | None] = {}

    def run() -> None:
        try:
            trainer._save_checkpoint()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting hook, which reports it
            outcome["error"] = exc
        else:
            outcome["error"] = None

    # Sent and taken before the save starts: the supervisor must know not to tear the job down meanwhile.
    heartbeat.send_now(HeartbeatKind.SAVE_BEGIN, step=step, trigger=trigger.value, deadline_s=limit_s)
    logger.warning("verl_hooks: emergency save of step %d (%s), deadline %g s", step, trigger.value, limit_s)
    started = time.monotonic()
    saver = threading.Thread(target=run, name="verl-hooks-emergency-save", daemon=True)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_rotation_off(trainer, after_actor_save))
        saver.start()
        saver.join(limit_s)
        if saver.is_alive():
            # The save goes on in its thread until the job ends: its worker groups must not start rotating then.
            stack.pop_all()
    elapsed = time.monotonic() - started
    if saver.is_alive():
        result = EmergencyCheckpoint(
            EmergencyStatus.TIMED_OUT, trigger, step, f"still saving after {limit_s:g} s", elapsed, limit_s
        )
    elif outcome.get("error") is not None:
        error = outcome["error"]
        reason = f"{type(error).__name__}: {error}"
        result = EmergencyCheckpoint(EmergencyStatus.FAILED, trigger, step, reason, elapsed, limit_s)
    else:
        result = EmergencyCheckpoint(EmergencyStatus.SAVED, trigger, step, None, elapsed, limit_s)
    heartbeat.send_now(
        HeartbeatKind.SAVE_END, step=step, trigger=trigger.value, status=result.status.value, elapsed_s=elapsed
    )
    return result


def checkpoint_the_step(
    trainer: Any,
    trigger: EmergencyTrigger,
    sync_step: int | None,
    side: TrainerSide | None,
    settings: HookSettings,
    faults: FaultPlan,
    *,
    skips_critic_warmup: bool,
) -> EmergencyCheckpoint:
    """Decide, then save or skip; the outcome says which and why. Never raises."""
    facts = facts_of(trainer, trigger, sync_step, side, settings, skips_critic_warmup=skips_critic_warmup)
    decision = decide(facts)
    if isinstance(decision, Skip):
        logger.warning("verl_hooks: emergency save of step %s skipped: %s", facts.trainer_step, decision.reason)
        return EmergencyCheckpoint(EmergencyStatus.SKIPPED, trigger, facts.trainer_step, decision.reason)
    limit = deadline_s(save_durations(trainer), settings.emergency_save_timeout_s)
    result = save_step(trainer, decision.step, trigger, limit, faults)
    logger.warning("verl_hooks: emergency checkpoint: %s", result.summary())
    return result
