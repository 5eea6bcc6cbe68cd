"""Installing the guard into a process: now if verl's checkpoint engine is imported, else when it is (and the
trackers' continuation, ``verl_hooks.trackers``, the same way).

Patching on import keeps ``install()`` cheap: it runs as Ray's ``worker_process_setup_hook`` in every worker
process of a job, and most of them (rollout workers, reward workers) never import verl's checkpoint engine,
which takes seconds to import.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import logging
import sys
import threading
from collections.abc import Callable, Coroutine
from types import ModuleType
from typing import Any

from verl_hooks import heartbeat
from verl_hooks.compat import original_update_weights, subclass_update_weights
from verl_hooks.faults import FaultPlan
from verl_hooks.guard import GUARD_MARK, run_guarded_sync
from verl_hooks.settings import HookSettings, chained_setup_hook
from verl_hooks.trackers import TRACKING_MODULE, patch_tracking, unpatch_tracking
from verl_hooks.trainers import unhook_all, user_trainer_patches, verl_trainer_patches

logger = logging.getLogger(__name__)

TARGET_MODULE = "verl.checkpoint_engine.base"


def fault_plan(settings: HookSettings) -> FaultPlan:
    return FaultPlan(settings.faults, settings.attempt, settings.fault_log, settings.fault_ledger)


class _HookState:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.settings = HookSettings()
        self.faults = FaultPlan((), 1)
        self.finder: _PatchOnImport | None = None
        self.pending: set[str] = set()
        """verl modules not imported yet, patched when they are."""
        self.chained_hook_done = False

    def configure(self, settings: HookSettings) -> None:
        with self.lock:
            if settings != self.settings:
                self.settings = settings
                self.faults = fault_plan(settings)


_state = _HookState()


def install(settings: HookSettings | None = None) -> None:
    """Install the weight-sync guard in this process. Idempotent; safe to call from several places.

    Also the entry point for Ray's ``worker_process_setup_hook`` ("verl_hooks.install"): with no argument the
    settings come from the environment (``VERL_HOOKS_*``, ``VERL_SUPERVISOR_ATTEMPT``). Raises
    ``HookSettingsError`` for settings it cannot understand, and ``IncompatibleVerlError`` (now or when verl's
    checkpoint engine is imported) for a verl whose manager it was not written for.
    """
    resolved = settings if settings is not None else HookSettings.from_env()
    heartbeat.enable_stack_dumps()
    with _state.lock:
        _state.configure(resolved)
        for name, patch in _patches().items():
            module = sys.modules.get(name)
            if module is not None:
                patch(module)
            else:
                _state.pending.add(name)
        if _state.pending and _state.finder is None:
            _state.finder = _PatchOnImport()
            sys.meta_path.insert(0, _state.finder)
    _run_chained_setup_hook()


def _patches() -> dict[str, Callable[[ModuleType], None]]:
    """What is patched in which module, as soon as the module is imported: the manager, the trackers, and the
    trainers that get the emergency save (verl's, and the job's own named in ``VERL_HOOKS_TRAINER_CLASSES``)."""
    return {
        TARGET_MODULE: _patch,
        TRACKING_MODULE: patch_tracking,
        **verl_trainer_patches(_state),
        **user_trainer_patches(_state.settings.trainer_classes, _state),
    }


def rearm_faults() -> None:
    """Let every planned fault fire again (each fires once per process; those a ledger records stay spent); for
    tests and chaos tools."""
    with _state.lock:
        _state.faults = fault_plan(_state.settings)


def is_guarded(manager_cls: type) -> bool:
    return bool(getattr(manager_cls.__dict__.get("update_weights"), GUARD_MARK, False))


def _guard(cls: type, original: Callable[..., Coroutine[Any, Any, Any]], *, verls_own: bool = True) -> None:
    """Replace ``cls.update_weights`` with the guarded call of ``original``."""
    from verl.utils.ray_utils import auto_await

    async def update_weights(self: Any, global_steps: int | None = None) -> Any:
        settings, faults = _state.settings, _state.faults
        return await run_guarded_sync(self, original, global_steps, settings, faults, through_view=verls_own)

    update_weights.__doc__ = (
        f"{original.__doc__ or ''}\n\nGuarded by verl_hooks: any failure, or a sync longer than its deadline, "
        "runs a bounded best-effort rollout resume and raises WeightSyncFatalError."
    )
    update_weights.__qualname__ = original.__qualname__
    update_weights.__module__ = original.__module__
    # verl's own auto_await keeps both calling conventions: run to completion from sync code, awaitable from a
    # coroutine (the fully-async trainer awaits it).
    guarded = auto_await(update_weights)
    setattr(guarded, GUARD_MARK, True)
    guarded.__verl_hooks_original__ = cls.__dict__["update_weights"]
    cls.update_weights = guarded


def _guard_subclass(cls: type) -> None:
    """A manager of the user's own that overrides ``update_weights`` (verl's legacy trainer takes one through
    ``actor_rollout_ref.rollout.checkpoint_manager_class``) is guarded as well: its body runs under the same
    deadline, typed failure and cleanup (of the phases it enters through verl's methods)."""
    if "update_weights" in cls.__dict__ and not is_guarded(cls):
        _guard(cls, subclass_update_weights(cls), verls_own=False)
        logger.info("verl_hooks: weight-sync guard installed on %s.%s", cls.__module__, cls.__qualname__)


def _all_subclasses(cls: type) -> list[type]:
    found, todo = [], list(cls.__subclasses__())
    while todo:
        sub = todo.pop()
        found.append(sub)
        todo.extend(sub.__subclasses__())
    return found


def _patch(module: ModuleType) -> None:
    manager_cls = module.CheckpointEngineManager
    if is_guarded(manager_cls):
        return
    original = original_update_weights(manager_cls)
    subclasses = _all_subclasses(manager_cls)
    for sub in subclasses:
        if "update_weights" in sub.__dict__:
            subclass_update_weights(sub)  # refuse before patching anything: nothing is left half-guarded
    _guard(manager_cls, original)
    for sub in subclasses:
        _guard_subclass(sub)

    def guard_new_subclasses(cls: type, **kwargs: Any) -> None:
        super(manager_cls, cls).__init_subclass__(**kwargs)
        _guard_subclass(cls)  # an override that cannot be guarded fails the class's definition, naming it

    manager_cls.__init_subclass__ = classmethod(guard_new_subclasses)  # type: ignore[method-assign]
    logger.info(
        "verl_hooks: weight-sync guard installed (deadline %g s, faults: %s)",
        _state.settings.sync_timeout_s,
        ", ".join(map(str, _state.settings.faults)) or "none",
    )


def uninstall() -> None:
    """Restore verl's own ``update_weights`` and stop patching on import (for tests)."""
    with _state.lock:
        if _state.finder is not None:
            sys.meta_path.remove(_state.finder)
            _state.finder = None
        _state.pending.clear()
        unpatch_tracking(sys.modules.get(TRACKING_MODULE))
        unhook_all(_state.settings.trainer_classes)
        module = sys.modules.get(TARGET_MODULE)
        if module is not None and is_guarded(module.CheckpointEngineManager):
            cls = module.CheckpointEngineManager
            for guarded in [cls, *_all_subclasses(cls)]:
                if is_guarded(guarded):
                    guarded.update_weights = guarded.__dict__["update_weights"].__verl_hooks_original__
            if "__init_subclass__" in cls.__dict__:
                del cls.__init_subclass__


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches the manager right after ``verl.checkpoint_engine.base`` executes, whoever imports it."""

    def find_spec(self, fullname: str, path: Any, target: ModuleType | None = None) -> Any:
        if fullname not in _state.pending:
            return None
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            if finder is self or find_spec is None:
                continue
            spec = find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is None:
                    return None
                spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader) -> None:
        self._inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        with _state.lock:
            _patches()[module.__name__](module)
            _state.pending.discard(module.__name__)
            if not _state.pending:
                if _state.finder is not None and _state.finder in sys.meta_path:
                    sys.meta_path.remove(_state.finder)
                _state.finder = None


def _run_chained_setup_hook() -> None:
    """Run the job's own worker_process_setup_hook, which the launcher moved aside to put ours in its place."""
    target = chained_setup_hook()
    with _state.lock:
        if not target or _state.chained_hook_done:
            return
        _state.chained_hook_done = True
    module_name, _, func_name = target.rpartition(".")
    getattr(importlib.import_module(module_name), func_name)()
