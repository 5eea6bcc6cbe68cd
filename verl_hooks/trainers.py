"""The emergency save's hook on verl's trainers: around ``fit``, and timing ``_save_checkpoint``.

A ``WeightSyncFatalError`` (or the guard's ``StopRequested``) raised by a sync inside ``fit`` passes through the
hook before it leaves ``fit``: there the trainer still holds the step's state and its worker groups, TransferQueue
and trackers are open (``TaskRunnerV1.run`` closes them in its ``finally``, verl/trainer/main_ppo.py:150-163). The
hook saves the step through the trainer's own ``_save_checkpoint`` when ``verl_hooks.emergency.decide`` says so,
writes what it did into the error, and lets the error go on.

Hooked: verl's V1 ``PPOTrainer`` (every ``trainer.v1.trainer_mode``: the modes are subclasses that keep its
``fit``), verl's legacy ``RayPPOTrainer``, and the job's own trainers named in ``VERL_HOOKS_TRAINER_CLASSES``
(``module:Class``, with verl's shape: ``fit``, ``_save_checkpoint``, ``global_steps``, ``config``,
``actor_rollout_wg``).
Not saved: verl's separation, one-step-off-policy and fully-async trainers (``NO_EMERGENCY_SAVE``), which do not
save before the sync; their ``fit`` only writes into a failure's error that the save was skipped, and why.
Megatron ``async_save`` is skipped by ``decide``.

verl's own ``fit`` and ``_save_checkpoint`` are checked like ``update_weights`` (``verl_hooks.compat``): their
bodies' fingerprints must be ones the save order above was read from, or the hook refuses loudly.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import signal
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

from verl_hooks import heartbeat
from verl_hooks.compat import installed_verl_version, update_weights_fingerprint
from verl_hooks.contract import (
    ENV_ALLOW_UNVERIFIED_VERL,
    ENV_TRAINER_CLASSES,
    EmergencyCheckpoint,
    EmergencyStatus,
    EmergencyTrigger,
    HeartbeatKind,
)
from verl_hooks.emergency import checkpoint_the_step, fitting, note_save_duration
from verl_hooks.errors import (
    IncompatibleVerlError,
    find_step_failure_checkpoint,
    find_stop_request,
    find_weight_sync_error,
    note_step_failure_checkpoint,
)
from verl_hooks.faults import FaultAction, FaultSpec, StepPoint, fire_blocking
from verl_hooks.phases import MULTI_PHASE_ORDER, SyncPhase
from verl_hooks.settings import unverified_verl_allowed
from verl_hooks.step_progress import TRACKED_MARK, TRAINER_CALLS, fitting_in_this_thread, trainer_call
from verl_hooks.trainer_side import TrainerSide

logger = logging.getLogger(__name__)

_MARK = "__verl_hooks_trainer__"

V1_MODULE = "verl.trainer.ppo.v1.trainer_base"
LEGACY_MODULE = "verl.trainer.ppo.ray_trainer"

# Fingerprints (verl_hooks.compat.update_weights_fingerprint) of the trainer methods whose order of save, sync and
# increment the emergency save relies on, read from verl 0.9.1 (trainer_base.py fit 412-531, _save_checkpoint
# 948-1029; ray_trainer.py fit 1405-1810, _save_checkpoint 983-1060) and verl 0.9.0, whose V1 _save_checkpoint
# differs only in a TransferQueue capability check and no checkpoint callback, and whose legacy fit only in
# the profiler's finish command: the same order.
VERIFIED_TRAINER_METHODS: dict[tuple[str, str], dict[str, frozenset[str]]] = {
    (V1_MODULE, "PPOTrainer"): {
        "fit": frozenset({"2baac965946158cfe78016366b8b729057bdfa37b4904715b284171d692dc5e2"}),
        "_save_checkpoint": frozenset(
            {
                "2145ceb088ec87acb7697d60250b2abed4993a372b8b2f8526168c5c913836de",  # 0.9.1
                "8afd31cf2c61a659169de5e5bcc4a8ad13b44c6bd48325ca236d3f8d5cd663ff",  # 0.9.0
            }
        ),
    },
    (LEGACY_MODULE, "RayPPOTrainer"): {
        "fit": frozenset(
            {
                "c454413e564b258ab44158f6a069a6e29a0b4709619ac8f379be6f6a8681a6c6",  # 0.9.1
                "60e4c15b89facb8ecde1dc7b012982a115ecaa2d3fb1a13610e4098f38e4c55e",  # 0.9.0
            }
        ),
        "_save_checkpoint": frozenset({"a3eb07c6c3dd71aedc07a26aa507ed3513997fee861ebac3b9b0568578c52958"}),
    },
}
# verl's trainers whose order is not "save, then sync": a failed sync finds no state a periodic save would write.
NO_EMERGENCY_SAVE: dict[tuple[str, str], str] = {
    ("verl.experimental.separation.ray_trainer", "SeparateRayPPOTrainer"): (
        "verl's separation trainer syncs before it saves (separation/ray_trainer.py:372, then 376)"
    ),
    ("verl.experimental.fully_async_policy.fully_async_trainer", "FullyAsyncTrainer"): (
        "verl's fully-async trainer syncs before it saves (fully_async_policy/fully_async_trainer.py:594, then 599)"
    ),
    ("verl.experimental.one_step_off_policy.ray_trainer", "OneStepOffRayTrainer"): (
        "verl's one-step-off-policy trainer syncs for the next step while it trains (one_step_off_policy/"
        "ray_trainer.py:376 and 399): no step's state is whole at a sync"
    ),
}
# verl's legacy trainer neither updates the actor nor saves in its critic warm-up steps (ray_trainer.py:1684-1686);
# the V1 trainer saves them like any step (trainer_base.py:481, the warm-up only skips the actor update at 608).
_SKIPS_CRITIC_WARMUP = {(LEGACY_MODULE, "RayPPOTrainer")}


def check_verl_trainer(cls: type, module: str) -> None:
    """Refuse (``IncompatibleVerlError``) a verl trainer whose ``fit`` or ``_save_checkpoint`` is not one the
    emergency save was verified against, unless the user opts in (``VERL_HOOKS_ALLOW_UNVERIFIED_VERL=1``)."""
    problems = []
    for name, known in VERIFIED_TRAINER_METHODS[(module, cls.__name__)].items():
        method = cls.__dict__.get(name)
        fingerprint = update_weights_fingerprint(method) if callable(method) else None
        if fingerprint not in known:
            problems.append(f"{cls.__name__}.{name} (fingerprint {fingerprint or 'unavailable'})")
    if not problems:
        return
    if unverified_verl_allowed():
        logger.warning(
            "verl_hooks hooks the emergency save on unverified %s of verl %s because %s=1",
            ", ".join(problems),
            installed_verl_version(),
            ENV_ALLOW_UNVERIFIED_VERL,
        )
        return
    raise IncompatibleVerlError(
        f"verl_hooks cannot hook the emergency save on the installed verl {installed_verl_version()}: "
        f"{', '.join(problems)} differ from the verl 0.9.1 code whose order of save, weight sync and step increment "
        f"it relies on. Set {ENV_ALLOW_UNVERIFIED_VERL}=1 to hook it anyway, at your own risk, or install verl 0.9.1."
    )


def is_hooked(cls: type) -> bool:
    return bool(getattr(cls.__dict__.get("fit"), _MARK, False))


# Where the faults of a step fire (``verl_hooks.faults.StepPoint``): verl's trainer methods of these names, the
# first the class has. Generation: V1 ``_submit_batch_to_rollout`` (trainer_base.py:1496, the batch drawn at 1471),
# legacy ``_get_gen_batch`` (ray_trainer.py:1484, the batch drawn at 1466); reward: ``_compute_reward_colocate``
# (trainer_base.py:1529, ray_trainer.py:1564; a V1 run with reward-loop workers computes its rewards inside the
# generation instead); train: ``_update_actor`` (trainer_base.py:1827, ray_trainer.py:1327).
STEP_FAULT_METHODS: dict[StepPoint, tuple[str, ...]] = {
    StepPoint.GENERATE: ("_submit_batch_to_rollout", "_get_gen_batch"),
    StepPoint.REWARD: ("_compute_reward_colocate",),
    StepPoint.TRAIN: ("_update_actor",),
}


def _sigkill_self(_actor: Any) -> None:
    """Run inside a Ray actor by ``__ray_call__``: its process dies at once, as on an OOM kill or a segfault."""
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_actor_process(handle: Any) -> None:
    handle.__ray_call__.remote(_sigkill_self)


def _first_rollout_server(trainer: Any) -> Any:
    """verl's ``CheckpointEngineManager.replicas`` (checkpoint_engine/base.py), each ``RolloutReplica`` with its
    server actors (``servers``)."""
    replicas = getattr(getattr(trainer, "checkpoint_manager", None), "replicas", None) or []
    servers = getattr(replicas[0], "servers", None) if replicas else None
    if not servers:
        raise RuntimeError("verl_hooks: generate:exit found no rollout server to kill (checkpoint_manager.replicas)")
    return servers[0]


def _fire_step_fault(trainer: Any, point: StepPoint, spec: FaultSpec, step: int | None, call: Callable[[], Any]) -> Any:
    """Carry out ``spec`` at ``point`` around ``call`` (the trainer method's own body)."""
    if spec.action is FaultAction.EXIT and point is StepPoint.GENERATE:
        _kill_actor_process(_first_rollout_server(trainer))
        return call()  # the generation meets the dead server, as it would
    if spec.action is FaultAction.EXIT and point is StepPoint.TRAIN:
        _kill_actor_process(trainer.actor_rollout_wg.workers[0])
        return call()
    if spec.action is FaultAction.RAISE and point is StepPoint.TRAIN:
        call()  # the workers ran the update; a rank's failure reaches the trainer (fire_blocking raises below)
    fire_blocking(spec, step)  # raise, hang or exit here; orphan goes on
    return call()


def _wrap_step_method(cls: type, name: str, state: Any, point: StepPoint | None) -> None:
    original = cls.__dict__.get(name) or getattr(cls, name)
    tracked = name in TRAINER_CALLS

    @functools.wraps(original)
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        step = getattr(self, "global_steps", None)
        spec = state.faults.take(point, step) if point is not None else None

        def body() -> Any:
            if spec is None:
                return original(self, *args, **kwargs)
            return _fire_step_fault(self, point, spec, step, lambda: original(self, *args, **kwargs))

        if not tracked:
            return body()
        with trainer_call(self, name):  # an injected failure of a trainer task counts as the task's own
            return body()

    method.__verl_hooks_original__ = cls.__dict__.get(name)  # type: ignore[attr-defined]
    if tracked:
        setattr(method, TRACKED_MARK, True)
    setattr(cls, name, method)


def _step_methods(cls: type) -> dict[str, StepPoint | None]:
    """The methods of ``cls`` to wrap: every trainer call, and the first method of each fault point."""
    methods: dict[str, StepPoint | None] = {name: None for name in TRAINER_CALLS if callable(getattr(cls, name, None))}
    for point, names in STEP_FAULT_METHODS.items():
        found = next((name for name in names if callable(getattr(cls, name, None))), None)
        if found is not None:
            methods[found] = point
    return methods


def hook_trainer(cls: type, state: Any, *, skips_critic_warmup: bool = False) -> None:
    """Wrap ``cls.fit``, ``cls._save_checkpoint`` and the step's trainer calls and fault points; ``state`` gives
    the current settings and faults (``verl_hooks.installer``'s, which tests may change after the class is
    hooked)."""
    if is_hooked(cls):
        return
    for name in ("fit", "_save_checkpoint"):
        if not callable(getattr(cls, name, None)):
            raise IncompatibleVerlError(
                f"verl_hooks cannot hook the emergency save on {cls.__module__}.{cls.__qualname__}: it has no {name}"
            )
    original_fit = cls.__dict__.get("fit") or cls.fit
    original_save = cls.__dict__.get("_save_checkpoint") or cls._save_checkpoint

    @functools.wraps(original_fit)
    def fit(self: Any, *args: Any, **kwargs: Any) -> Any:
        with fitting(), fitting_in_this_thread(self):
            try:
                return original_fit(self, *args, **kwargs)
            except BaseException as exc:
                _checkpoint_after(self, exc, state, skips_critic_warmup)
                raise

    @functools.wraps(original_save)
    def _save_checkpoint(self: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.monotonic()
        result = original_save(self, *args, **kwargs)
        duration = time.monotonic() - started
        note_save_duration(self, duration)
        heartbeat.beat(HeartbeatKind.CHECKPOINT_SAVED, step=getattr(self, "global_steps", None), duration_s=duration)
        return result

    wrapped = _step_methods(cls)
    for name, point in wrapped.items():
        _wrap_step_method(cls, name, state, point)
    setattr(fit, _MARK, True)
    fit.__verl_hooks_original__ = cls.__dict__.get("fit")  # type: ignore[attr-defined]
    fit.__verl_hooks_wrapped__ = tuple(wrapped)  # type: ignore[attr-defined]
    _save_checkpoint.__verl_hooks_original__ = cls.__dict__.get("_save_checkpoint")  # type: ignore[attr-defined]
    cls.fit = fit
    cls._save_checkpoint = _save_checkpoint
    logger.info("verl_hooks: emergency save hooked on %s.%s", cls.__module__, cls.__qualname__)


def user_class(member: Any) -> Any:
    """The class itself, also for one decorated with ``@ray.remote`` (verl's fully-async trainer): Ray's actor
    class keeps it as ``__ray_actor_class__``, and the actor's own class inherits from it."""
    return getattr(member, "__ray_actor_class__", member)


def mark_unsaved(cls: type, reason: str) -> None:
    """Wrap ``cls.fit`` (a coroutine function or not) so that a failed sync leaving it says the emergency save was
    skipped, and why."""
    original = cls.__dict__.get("fit")
    if original is None or is_hooked(cls):
        return

    def note(self: Any, exc: BaseException) -> None:
        error = find_weight_sync_error(exc)
        if error is not None and error.emergency_checkpoint is None:
            step = getattr(self, "global_steps", None)
            skipped = EmergencyCheckpoint(EmergencyStatus.SKIPPED, EmergencyTrigger.SYNC_FAILURE, step, reason)
            error.emergency_checkpoint = skipped.to_dict()

    if inspect.iscoroutinefunction(original):

        @functools.wraps(original)
        async def fit(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return await original(self, *args, **kwargs)
            except BaseException as exc:
                note(self, exc)
                raise

    else:

        @functools.wraps(original)
        def fit(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return original(self, *args, **kwargs)
            except BaseException as exc:
                note(self, exc)
                raise

    setattr(fit, _MARK, True)
    fit.__verl_hooks_original__ = original  # type: ignore[attr-defined]
    cls.fit = fit


def unhook_trainer(cls: type) -> None:
    if not is_hooked(cls):
        return
    for name in ("fit", "_save_checkpoint", *getattr(cls.__dict__["fit"], "__verl_hooks_wrapped__", ())):
        member = cls.__dict__.get(name)
        if member is None or not hasattr(member, "__verl_hooks_original__"):
            continue
        original = member.__verl_hooks_original__
        if original is None:
            delattr(cls, name)
        else:
            setattr(cls, name, original)


def _touched_rollout_weights(phase: Any) -> bool:
    """The sync had begun writing the rollout's weights: the naive call, or update_weights and what follows it."""
    try:
        phase = SyncPhase(phase)
    except ValueError:
        return True  # unknown: assume the worst
    if phase is SyncPhase.NAIVE:
        return True
    return phase in MULTI_PHASE_ORDER and MULTI_PHASE_ORDER.index(phase) >= MULTI_PHASE_ORDER.index(
        SyncPhase.UPDATE_WEIGHTS
    )


def _checkpoint_after(trainer: Any, exc: BaseException, state: Any, skips_critic_warmup: bool) -> None:
    """Save (or skip, saying why) the step the trainer last completed, for a failed sync, a stop request or any
    other failure that escaped ``fit``; the outcome goes into the error, which goes on. Never raises: the job's
    failure must reach the supervisor whatever happens."""
    fatal = find_weight_sync_error(exc)
    stop = None if fatal is not None else find_stop_request(exc)
    error = fatal or stop
    if error is not None and error.emergency_checkpoint is not None:
        return  # an inner fit (a subclass calling super().fit) has dealt with it
    if error is None and (not isinstance(exc, Exception) or find_step_failure_checkpoint(exc) is not None):
        return  # a KeyboardInterrupt or SystemExit is a stop, not a failure; or an inner fit dealt with it
    touched = False
    if fatal is not None:
        trigger, sync_step = EmergencyTrigger.SYNC_FAILURE, fatal.global_step
        side = TrainerSide.from_dict(fatal.trainer_side) or TrainerSide(False, "the guard did not judge it")
        touched = _touched_rollout_weights(fatal.phase)
    elif stop is not None:
        trigger, sync_step, side = EmergencyTrigger.STOP_REQUEST, stop.global_step, None
    else:
        trigger, sync_step, side = EmergencyTrigger.STEP_FAILURE, None, None
    try:
        outcome = checkpoint_the_step(
            trainer,
            trigger,
            sync_step,
            side,
            state.settings,
            state.faults,
            skips_critic_warmup=skips_critic_warmup,
            rollout_weights_touched=touched,
        ).to_dict()
    except Exception as exc2:  # a bug here must not mask the job's own failure
        logger.exception("verl_hooks: the emergency save failed unexpectedly")
        outcome = {
            "status": "failed",
            "trigger": trigger.value,
            "step": getattr(trainer, "global_steps", None),
            "reason": f"{type(exc2).__name__}: {exc2}",
        }
    if error is not None:
        error.emergency_checkpoint = outcome
    else:
        note_step_failure_checkpoint(exc, outcome)
    summary = EmergencyCheckpoint.from_dict(outcome)
    print(f"verl_hooks: emergency checkpoint: {summary.summary() if summary else outcome}", flush=True)


# --- what is hooked where ------------------------------------------------------------------------------------


def verl_trainer_patches(state: Any) -> dict[str, Callable[[ModuleType], None]]:
    """The verl modules whose trainers get the hook, each with the function that hooks them once imported."""

    def patch(module: ModuleType) -> None:
        for (module_name, class_name), _ in VERIFIED_TRAINER_METHODS.items():
            if module_name != module.__name__:
                continue
            cls = getattr(module, class_name)
            if is_hooked(cls):
                continue
            check_verl_trainer(cls, module_name)
            hook_trainer(cls, state, skips_critic_warmup=(module_name, class_name) in _SKIPS_CRITIC_WARMUP)

    def mark(module: ModuleType) -> None:
        for (module_name, class_name), reason in NO_EMERGENCY_SAVE.items():
            if module_name == module.__name__:
                mark_unsaved(user_class(getattr(module, class_name)), reason)

    return {V1_MODULE: patch, LEGACY_MODULE: patch, **{module: mark for module, _ in NO_EMERGENCY_SAVE}}


def user_trainer_patches(names: tuple[str, ...], state: Any) -> dict[str, Callable[[ModuleType], None]]:
    """``module:Class`` names of the job's own verl-shaped trainers, grouped by module."""
    by_module: dict[str, list[str]] = {}
    for name in names:
        module, _, cls = name.partition(":")
        by_module.setdefault(module, []).append(cls)

    def patch(module: ModuleType) -> None:
        for class_name in by_module[module.__name__]:
            cls = user_class(getattr(module, class_name, None))
            if not isinstance(cls, type):
                raise IncompatibleVerlError(f"{ENV_TRAINER_CLASSES}: {module.__name__} has no class {class_name}")
            hook_trainer(cls, state)

    return dict.fromkeys(by_module, patch)


def unhook_all(names: tuple[str, ...]) -> None:
    """Undo every hook on the trainers of modules already imported (for tests)."""
    import sys

    for module_name, class_name in [*VERIFIED_TRAINER_METHODS, *NO_EMERGENCY_SAVE]:
        module = sys.modules.get(module_name)
        if module is not None:
            unhook_trainer(user_class(getattr(module, class_name)))
    for name in names:
        module_name, _, class_name = name.partition(":")
        module = sys.modules.get(module_name)
        cls = user_class(getattr(module, class_name, None)) if module is not None else None
        if isinstance(cls, type):
            unhook_trainer(cls)
