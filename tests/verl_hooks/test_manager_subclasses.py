"""Managers of the user's own: a subclass of verl's CheckpointEngineManager that overrides update_weights is guarded
like verl's (whether it existed before the guard was installed or is defined after), or refused by name when it
cannot be; it is never silently unguarded."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import pytest
from verl.checkpoint_engine.base import CheckpointEngineManager

from verl_hooks import installer
from verl_hooks.errors import IncompatibleVerlError, WeightSyncFatalError, WeightSyncTimeout
from verl_hooks.settings import HookSettings


class DefinedBefore(CheckpointEngineManager):
    """A manager of the user's defined before the guard is installed (the legacy trainer's
    actor_rollout_ref.rollout.checkpoint_manager_class)."""

    async def update_weights(self, global_steps=None):
        await asyncio.sleep(3600)  # a hang in the user's own sync


@pytest.fixture
def guard() -> Iterator[None]:
    installer.install(HookSettings(sync_timeout_s=0.5, cancel_grace_s=0.1, hard_exit_grace_s=0))
    yield
    installer.uninstall()


def forget_refused_classes() -> None:
    """A class whose definition failed, or one the guard would refuse, lingers in the base's __subclasses__
    until collected; an install later in this process would refuse it."""
    gc.collect()
    assert all(installer_accepts(sub) for sub in CheckpointEngineManager.__subclasses__())


def installer_accepts(cls: type) -> bool:
    from verl_hooks.compat import subclass_update_weights

    try:
        if "update_weights" in cls.__dict__:
            subclass_update_weights(cls)
    except IncompatibleVerlError:
        return False
    return True


def bare(cls: type) -> CheckpointEngineManager:
    """An instance without verl's constructor (it needs Ray workers): the guard only reads ``backend``."""
    manager = object.__new__(cls)
    manager.backend = "custom"
    return manager


def test_an_override_defined_before_installing_is_guarded(guard) -> None:
    assert installer.is_guarded(DefinedBefore)
    with pytest.raises(WeightSyncFatalError) as raised:
        bare(DefinedBefore).update_weights(global_steps=4)
    assert raised.value.hang
    assert isinstance(raised.value.__cause__, WeightSyncTimeout)
    assert raised.value.global_step == 4


def test_an_override_defined_after_installing_is_guarded(guard) -> None:
    class DefinedAfter(CheckpointEngineManager):
        def update_weights(self, global_steps=None):  # a blocking one, run on the guard's thread
            raise RuntimeError(f"the user's sync failed at {global_steps}")

    assert installer.is_guarded(DefinedAfter)
    with pytest.raises(WeightSyncFatalError) as raised:
        bare(DefinedAfter).update_weights(global_steps=7)
    assert not raised.value.hang
    assert "the user's sync failed at 7" in raised.value.message


def test_an_override_the_guard_cannot_call_is_refused_by_name(guard) -> None:
    with pytest.raises(IncompatibleVerlError) as refused:

        class Renamed(CheckpointEngineManager):
            async def update_weights(self, step):
                return {}

    message = str(refused.value)
    del refused  # its traceback holds the half-made class
    assert "Renamed.update_weights(self, step)" in message
    forget_refused_classes()


def test_uninstall_restores_the_users_own_methods(guard) -> None:
    original = DefinedBefore.__dict__["update_weights"].__verl_hooks_original__
    installer.uninstall()
    assert DefinedBefore.__dict__["update_weights"] is original
    assert not installer.is_guarded(CheckpointEngineManager)

    class Later(CheckpointEngineManager):
        async def update_weights(self, step):  # no guard installed: no refusal either
            return {}

    assert not installer.is_guarded(Later)
    del Later
    forget_refused_classes()


class CallsSuper(CheckpointEngineManager):
    """An override that adds to verl's sync rather than replacing it."""

    async def update_weights(self, global_steps=None):
        assert isinstance(self, CallsSuper), "the user's body gets the manager itself"
        return await super().update_weights(global_steps)


def test_an_override_calling_verls_sync_keeps_one_typed_failure(guard) -> None:
    manager = bare(CallsSuper)
    manager.actor_wg = None  # verl's body fails on it at once: the inner guard types it, the outer keeps it
    with pytest.raises(WeightSyncFatalError) as raised:
        manager.update_weights(global_steps=2)
    assert not isinstance(raised.value.__cause__, WeightSyncFatalError), "not wrapped twice"
    assert raised.value.global_step == 2
