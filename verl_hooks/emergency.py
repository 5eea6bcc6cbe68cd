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

import asyncio
import contextlib
import dataclasses
import logging
import os
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from verl_hooks import heartbeat, trainer_side
from verl_hooks.config_view import select
from verl_hooks.contract import EmergencyCheckpoint, EmergencyStatus, EmergencyTrigger, HeartbeatKind
from verl_hooks.faults import FaultPlan, SavePoint, fire_blocking
from verl_hooks.settings import HookSettings
from verl_hooks.step_progress import ProgressView, is_tracked, synced_data_state, view_of
from verl_hooks.trainer_side import TrainerSide

logger = logging.getLogger(__name__)

DEADLINE_MULTIPLE = 3.0
"""Once the job has timed its own periodic saves, the emergency save may take this many times the slowest."""
DEADLINE_FLOOR_S = 60.0
"""...but never less than this: a page cache flushing, a slow shared file system, on an otherwise fast save."""


ASYNC_TRAINER_MODES_NOTE = (
    "saves TransferQueue's in-flight rollouts with each step (verl/trainer/ppo/v1/trainer_base.py:1001-1008)"
)


LORA_MERGED_NOTE = (
    "LoRA adapters are merged into the base weights while the sync streams them (actor_rollout_ref.model.lora."
    "merge): a sync that failed part-way may leave them merged until its generator is closed "
    "(workers/engine/fsdp/transformer_impl.py:1063-1086, utils/fsdp_utils.py:1091-1098), and the save would "
    "write the merged weights as the base"
)


@dataclass(frozen=True)
class SaveFacts:
    trigger: EmergencyTrigger
    enabled: bool
    trainer_step: int | None
    """``trainer.global_steps``: the step the trainer is working on (verl increments it after the step's sync)."""
    sync_step: int | None
    """The ``global_steps`` the failing (or last) sync was called with; None for verl's validation syncs."""
    trainer_side: TrainerSide | None
    """None for a stop request: it comes right after a sync that succeeded, with nothing in flight."""
    save_freq: int | None
    async_save: bool
    critic_warmup: int | None
    """``trainer.critic_warmup`` where the trainer never saves its warm-up steps (verl's legacy trainer); else None."""
    saved_steps: frozenset[int]
    """The steps with a ``global_step_N`` folder on disk: saved before the sync, or resumed from."""
    trainer_mode: str | None = None
    """verl's ``trainer.v1.trainer_mode`` (None: a trainer without modes, which saves no rollout data)."""
    rollout_weights_touched: bool = False
    """The failing sync started copying weights into the rollout (``naive`` or ``update_weights`` entered)."""
    lora_merged_for_sync: bool = False
    """LoRA adapters are merged into the base weights while the sync streams them
    (``actor_rollout_ref.model.lora.merge`` with a LoRA rank)."""
    progress: ProgressView | None = None
    """For a failure outside the sync: what the trainer did since its last synced step."""
    expected_updates: Mapping[str, int] = field(default_factory=dict)
    """The updates one whole step of this trainer runs (``_update_critic``, ``_update_actor``: how many of each)."""
    updates_tracked: bool = True
    """The trainer's update methods are the hooked ones: an update cannot have run unseen."""
    unanswering_workers: tuple[str, ...] = ()
    """For a failure outside the sync: trainer workers that did not answer a probe (a dead or wedged rank)."""

    @property
    def saves_rollout_data(self) -> bool:
        return self.trainer_mode not in (None, "sync")


@dataclass(frozen=True)
class Save:
    step: int
    rewind: bool = False
    """The step before the one the trainer is at: saved with the dataloader's state of its sync and its number."""


@dataclass(frozen=True)
class Skip:
    reason: str


def _updates_text(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{name} x{count}" for name, count in sorted(counts.items()) if count) or "none"


def _step_failure_target(facts: SaveFacts) -> Save | Skip:
    """Which step a failure outside the sync leaves whole in the trainer, if any."""
    step, progress = facts.trainer_step, facts.progress
    if facts.saves_rollout_data:
        return Skip(
            f"trainer mode {facts.trainer_mode} {ASYNC_TRAINER_MODES_NOTE}: only sync mode is saved after a "
            "failure outside the weight sync"
        )
    if progress is None or step is None:
        return Skip("the trainer's progress through its step was not followed (not inside a hooked fit)")
    if progress.raised:
        return Skip(f"trainer task(s) raised ({', '.join(progress.raised)}): a worker may be left inside a collective")
    if progress.in_flight:
        return Skip(f"trainer call(s) still running ({', '.join(progress.in_flight)})")
    if facts.unanswering_workers:
        return Skip(f"trainer worker(s) not answering: {', '.join(facts.unanswering_workers)}")
    synced = progress.synced_step
    if synced is None:
        return Skip(f"no step was synced in this process before the failure at step {step}")
    if synced == step:
        return Save(step)  # failed after its own sync: validation, metrics, logging
    if synced != step - 1:
        return Skip(f"the trainer is at step {step} but the last step it synced is {synced}")
    started = progress.updates(progress.started)
    finished = progress.updates(progress.finished)
    if not started:
        if not facts.updates_tracked:
            return Skip(
                "the trainer's updates run outside verl's _update_actor/_update_critic, where they cannot "
                f"be seen: whether step {step}'s began is unknown"
            )
        if not progress.has_data_state:
            return Skip(f"the dataloader's state at step {synced}'s sync was not captured")
        return Save(synced, rewind=True)
    expected = {name: count for name, count in facts.expected_updates.items() if count}
    if expected and dict(finished) == expected:
        return Save(step)  # every update of the step finished: what a periodic save of it writes
    return Skip(
        f"step {step}'s updates were part done ({_updates_text(finished)} of {_updates_text(expected)}): the "
        f"trainer holds neither step {synced} nor step {step}"
    )


def _sync_target(facts: SaveFacts) -> Save | Skip:
    step = facts.trainer_step
    if facts.sync_step is not None and facts.sync_step != step:
        return Skip(f"the sync was for step {facts.sync_step} while the trainer is at step {step}")
    if facts.trainer_side is not None and not facts.trainer_side.idle:
        return Skip(f"the trainer side is not idle: {facts.trainer_side.reason}")
    if facts.trigger is EmergencyTrigger.SYNC_FAILURE and facts.saves_rollout_data and facts.rollout_weights_touched:
        # The cleanup resumes generation on half-written weights; the save would store what they generate.
        return Skip(
            f"trainer mode {facts.trainer_mode} {ASYNC_TRAINER_MODES_NOTE}, and the failed sync had begun "
            "writing the rollout's weights: those rollouts come from half-written weights"
        )
    if facts.trigger is EmergencyTrigger.SYNC_FAILURE and facts.lora_merged_for_sync and facts.rollout_weights_touched:
        return Skip(LORA_MERGED_NOTE)
    return Save(step) if step is not None else Skip("no training step has finished yet")


def decide(facts: SaveFacts) -> Save | Skip:
    if not facts.enabled:
        return Skip("turned off (restart.emergency_save=false / VERL_HOOKS_EMERGENCY_SAVE=0)")
    if facts.save_freq is not None and facts.save_freq <= 0:
        return Skip("the run saves no checkpoints (trainer.save_freq <= 0)")
    if facts.async_save:
        return Skip("asynchronous saves (checkpoint.async_save): verl writes their tracker later, out of our sight")
    if facts.trainer_step is None or facts.trainer_step <= 0:
        return Skip("no training step has finished yet")
    target = _step_failure_target(facts) if facts.trigger is EmergencyTrigger.STEP_FAILURE else _sync_target(facts)
    if isinstance(target, Skip):
        return target
    if target.step <= 0:
        return Skip("no training step has finished yet")
    if facts.critic_warmup is not None and facts.critic_warmup > target.step:
        return Skip(f"step {target.step} is a critic warm-up step, which verl's trainer never saves")
    if target.step in facts.saved_steps:
        return Skip(f"step {target.step} is already saved")
    return target


def deadline_s(save_durations_s: list[float], timeout_s: float, past_save_s: float | None = None) -> float:
    """The emergency save's deadline: from the job's own saves when it has timed any (this process's, else the
    run's earlier attempts'), else ``timeout_s``."""
    durations = save_durations_s or ([past_save_s] if past_save_s is not None and past_save_s > 0 else [])
    if not durations:
        return timeout_s
    return min(timeout_s, max(DEADLINE_FLOOR_S, DEADLINE_MULTIPLE * max(durations)))


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


def saved_steps(root: Any) -> frozenset[int]:
    """The N of every ``global_step_N`` folder under ``root`` (a set-aside ``global_step_N.incomplete-...`` is not
    one)."""
    if not isinstance(root, str) or not os.path.isdir(root):
        return frozenset()
    steps = set()
    for entry in os.scandir(root):
        number = entry.name.removeprefix("global_step_")
        if entry.name.startswith("global_step_") and number.isdigit() and entry.is_dir():
            steps.add(int(number))
    return frozenset(steps)


def expected_updates(trainer: Any, step: int | None) -> dict[str, int]:
    """What one whole step of a verl trainer updates: the critic when it has one (``use_critic``), the actor once
    the critic's warm-up is over (``critic_warmup <= global_steps``: trainer_base.py:608, ray_trainer.py:1688),
    each ``parameter_sync_step`` times in V1 (trainer_base.py:543-546; the legacy trainer has none: once)."""
    config = getattr(trainer, "config", None)
    times = _int(getattr(trainer, "parameter_sync_step", None)) or 1
    warmup = _int(select(config, "trainer.critic_warmup")) or 0
    updates = {"_update_critic": times if getattr(trainer, "use_critic", False) is True else 0}
    updates["_update_actor"] = times if step is not None and warmup <= step else 0
    return updates


def lora_merged_for_sync(config: Any) -> bool:
    """verl merges LoRA into the base weights for the sync when ``lora.merge`` is set and LoRA is on (a rank > 0,
    under either of verl's keys: ``model.lora_rank`` or ``model.lora.rank``; transformer_impl.py:996-1014)."""
    model = "actor_rollout_ref.model"
    rank = max(_int(select(config, f"{model}.lora_rank")) or 0, _int(select(config, f"{model}.lora.rank")) or 0)
    return rank > 0 and select(config, f"{model}.lora.merge") is True


def unanswering_workers(trainer: Any, wait_s: float) -> tuple[str, ...]:
    """The trainer's workers (actor and critic groups) that do not answer within ``wait_s``: a process killed or
    wedged while the step failed elsewhere. Probed on a thread of its own, whose event loop awaits the refs."""
    named = []
    for group_name in ("actor_rollout_wg", "critic_wg"):
        workers = getattr(getattr(trainer, group_name, None), "workers", None) or []
        named += [(f"{group_name} rank {rank}", worker) for rank, worker in enumerate(workers)]
    if not named:
        return ()
    found: list[str] = []

    def probe() -> None:
        dead = asyncio.run(trainer_side.unanswering([worker for _, worker in named], wait_s))
        found.extend(named[int(rank.removeprefix("rank "))][0] for rank in dead)

    prober = threading.Thread(target=probe, name="verl-hooks-worker-probe", daemon=True)
    prober.start()
    prober.join(wait_s + 5.0)
    return tuple(found) if not prober.is_alive() else tuple(name for name, _ in named)


def _updates_tracked(trainer: Any) -> bool:
    return all(
        is_tracked(getattr(type(trainer), name, None))
        for name in ("_update_actor", "_update_critic")
        if callable(getattr(type(trainer), name, None))
    )


def facts_of(
    trainer: Any,
    trigger: EmergencyTrigger,
    sync_step: int | None,
    side: TrainerSide | None,
    settings: HookSettings,
    *,
    skips_critic_warmup: bool,
    rollout_weights_touched: bool = False,
) -> SaveFacts:
    """Read the facts off the trainer and its config (verl's keys: ``trainer.save_freq``,
    ``trainer.default_local_dir``, ``trainer.critic_warmup``, ``actor_rollout_ref.actor.checkpoint.async_save``;
    the V1 trainer's ``trainer_mode``, trainer_base.py:129)."""
    config = getattr(trainer, "config", None)
    step = _int(getattr(trainer, "global_steps", None))
    mode = getattr(trainer, "trainer_mode", None)
    step_failure = trigger is EmergencyTrigger.STEP_FAILURE
    return SaveFacts(
        trigger=trigger,
        enabled=settings.emergency_save,
        trainer_step=step,
        sync_step=sync_step,
        trainer_side=side,
        save_freq=_int(select(config, "trainer.save_freq")),
        async_save=select(config, "actor_rollout_ref.actor.checkpoint.async_save") is True,
        critic_warmup=_int(select(config, "trainer.critic_warmup")) if skips_critic_warmup else None,
        saved_steps=saved_steps(select(config, "trainer.default_local_dir")),
        trainer_mode=mode if isinstance(mode, str) else None,
        rollout_weights_touched=rollout_weights_touched,
        lora_merged_for_sync=lora_merged_for_sync(config),
        progress=view_of(trainer) if step_failure else None,
        expected_updates=expected_updates(trainer, step),
        updates_tracked=_updates_tracked(trainer),
        unanswering_workers=(
            unanswering_workers(trainer, settings.trainer_idle_wait_s)
            if trigger is EmergencyTrigger.STEP_FAILURE
            else ()
        ),
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


class _DataStateAt:
    """Stands in for the trainer's dataloader during a rewound save: its state is the one captured at the saved
    step's sync, before the next step drew its batch (verl's ``_save_checkpoint`` reads ``state_dict()``,
    trainer_base.py:999, ray_trainer.py:1034)."""

    def __init__(self, loader: Any, state: Any) -> None:
        self._loader = loader
        self._state = state

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)

    def state_dict(self) -> Any:
        return self._state


@contextlib.contextmanager
def _rewound(trainer: Any, step: int, data_state: Any) -> Iterator[None]:
    """The trainer seen as it was at ``step``'s sync: its step number and its dataloader's state then (instance
    attributes shadowed for the save, as verl's trainers set them: ``self.global_steps``, ``self.train_dataloader``)."""
    before = {name: trainer.__dict__.get(name) for name in ("global_steps", "train_dataloader")}
    trainer.global_steps = step
    trainer.train_dataloader = _DataStateAt(before["train_dataloader"], data_state)
    try:
        yield
    finally:
        for name, value in before.items():
            setattr(trainer, name, value)


def rollout_to_sleep(trainer: Any, limit_s: float) -> str | None:
    """verl's own saves run with a colocated rollout asleep (V1 ``on_sample_end``, trainer_sync.py:40-42; legacy
    ray_trainer.py:1514), its weights and KV cache off the GPUs onto which the FSDP save loads the parameters
    (workers/engine/fsdp/transformer_impl.py:882-886); a failure leaves them awake (generating, or woken by the
    sync's cleanup). Put them to sleep as verl does, within ``limit_s``: None when done or not colocated (a
    standalone rollout has GPUs of its own), else what went wrong."""
    manager = getattr(trainer, "checkpoint_manager", None)
    if manager is None or str(getattr(manager, "backend", "")) != "naive":
        return None
    outcome: dict[str, BaseException | None] = {}

    def run() -> None:
        try:
            manager.sleep_replicas()  # verl's auto_await: run to completion on this thread's own loop
        except BaseException as exc:  # noqa: BLE001 - reported to the waiting caller
            outcome["error"] = exc
        else:
            outcome["error"] = None

    sleeper = threading.Thread(target=run, name="verl-hooks-sleep-replicas", daemon=True)
    sleeper.start()
    sleeper.join(limit_s)
    if sleeper.is_alive():
        return f"sleep_replicas did not return within {limit_s:g} s"
    error = outcome.get("error")
    return None if error is None else f"sleep_replicas failed: {type(error).__name__}: {error}"


_NOT_REWOUND = object()


def save_step(
    trainer: Any,
    step: int,
    trigger: EmergencyTrigger,
    limit_s: float,
    faults: FaultPlan,
    data_state: Any = _NOT_REWOUND,
) -> EmergencyCheckpoint:
    """Run ``trainer._save_checkpoint()`` for ``step`` in a thread, waiting at most ``limit_s``; never raises.
    With ``data_state``, the trainer is rewound to ``step`` (the one before it is at) for the save."""
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
        if data_state is not _NOT_REWOUND:
            stack.enter_context(_rewound(trainer, step, data_state))
        saver.start()
        saver.join(limit_s)
        if saver.is_alive():
            # The save goes on in its thread until the job ends: what it reads must stay as it was given.
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
    rollout_weights_touched: bool = False,
) -> EmergencyCheckpoint:
    """Decide, then save or skip; the outcome says which and why. Never raises."""
    facts = facts_of(
        trainer,
        trigger,
        sync_step,
        side,
        settings,
        skips_critic_warmup=skips_critic_warmup,
        rollout_weights_touched=rollout_weights_touched,
    )
    failed_step = facts.trainer_step if trigger is EmergencyTrigger.STEP_FAILURE else None
    decision = decide(facts)
    if isinstance(decision, Skip):
        logger.warning("verl_hooks: emergency save at step %s skipped: %s", facts.trainer_step, decision.reason)
        step = None if failed_step is not None else facts.trainer_step
        return EmergencyCheckpoint(EmergencyStatus.SKIPPED, trigger, step, decision.reason, failed_step=failed_step)
    asleep = rollout_to_sleep(trainer, settings.cleanup_step_timeout_s)
    if asleep is not None:
        reason = f"the colocated rollout could not be put to sleep for the save, as verl's own saves have it: {asleep}"
        logger.warning("verl_hooks: emergency save of step %d skipped: %s", decision.step, reason)
        return EmergencyCheckpoint(EmergencyStatus.SKIPPED, trigger, decision.step, reason, failed_step=failed_step)
    limit = deadline_s(save_durations(trainer), settings.emergency_save_timeout_s, heartbeat.past_save_s())
    data_state = synced_data_state(trainer) if decision.rewind else _NOT_REWOUND
    result = save_step(trainer, decision.step, trigger, limit, faults, data_state)
    if failed_step is not None:
        result = dataclasses.replace(result, failed_step=failed_step)
    logger.warning("verl_hooks: emergency checkpoint: %s", result.summary())
    return result
