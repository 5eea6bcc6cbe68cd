"""The guard refuses a verl whose CheckpointEngineManager differs from the one it was written for."""

from __future__ import annotations

import pytest
from verl.checkpoint_engine.base import CheckpointEngineManager
from verl.utils.ray_utils import auto_await

from verl_hooks.compat import installed_verl_version, original_update_weights
from verl_hooks.errors import IncompatibleVerlError


def test_installed_verl_manager_is_accepted() -> None:
    raw = original_update_weights(CheckpointEngineManager)
    assert raw.__name__ == "update_weights"
    assert installed_verl_version() == "0.9.1"


def _manager_like(**overrides):
    """A subclass of the real manager with some members replaced, as a future verl might have them."""
    return type("ChangedManager", (CheckpointEngineManager,), overrides)


@auto_await
async def _renamed_step_update(self, global_steps=None):
    await self.pause_everything()


@auto_await
async def _extra_arg_update(self, global_steps=None, validate=False):
    return await CheckpointEngineManager.update_weights.__wrapped__(self, global_steps)


def _plain_update(self, global_steps=None):
    return {}


@pytest.mark.parametrize(
    ("overrides", "complaint"),
    [
        ({"update_weights": _plain_update}, "not an async function wrapped by"),
        ({"update_weights": _extra_arg_update}, "is not (self, global_steps=None)"),
        ({"update_weights": _renamed_step_update}, "no longer uses"),
        ({"build_process_group": lambda self, rollout, timeout: None}, "build_process_group"),
        ({"resume_kv_cache_replicas": None}, "resume_kv_cache_replicas is missing"),
    ],
)
def test_changed_manager_is_refused_naming_the_version(overrides, complaint) -> None:
    changed = _manager_like(**overrides)
    with pytest.raises(IncompatibleVerlError) as error:
        original_update_weights(changed)
    message = str(error.value)
    assert complaint in message
    assert "installed verl 0.9.1" in message
    assert "Refusing to patch" in message


def test_install_refuses_a_changed_manager_and_leaves_it_unpatched() -> None:
    """The patch step itself refuses (as it would on import of a changed verl): nothing is half-patched."""
    from types import SimpleNamespace

    from verl_hooks.installer import _patch, is_guarded

    changed = _manager_like(update_weights=_extra_arg_update)
    with pytest.raises(IncompatibleVerlError, match="Refusing to patch"):
        _patch(SimpleNamespace(CheckpointEngineManager=changed))
    assert not is_guarded(changed)
    assert changed.__dict__["update_weights"] is _extra_arg_update
