"""The guard refuses a verl whose CheckpointEngineManager differs from the one it was written for."""

from __future__ import annotations

import pytest
from verl.checkpoint_engine.base import CheckpointEngineManager
from verl.utils.ray_utils import auto_await

from verl_hooks.compat import (
    ENV_ALLOW_UNVERIFIED_VERL,
    VERIFIED_UPDATE_WEIGHTS,
    installed_verl_version,
    original_update_weights,
    update_weights_fingerprint,
)
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


@auto_await
async def _reordered_update(self, global_steps=None):
    """Every name verl's body uses, with its signature, but the phases in another order: the shape checks pass."""
    if self.backend == "naive":
        return await self.actor_wg.update_weights(global_steps)
    await self.resume_generation_replicas()
    await self.resume_kv_cache_replicas()
    await self.build_process_group(None)
    await self.actor_wg.execute_checkpoint_engine(["finalize"])
    await self.release_kv_cache_replicas()
    await self.abort_replicas()


def test_the_installed_verls_update_weights_body_is_a_verified_one() -> None:
    fingerprint = update_weights_fingerprint(CheckpointEngineManager.update_weights.__wrapped__)
    assert fingerprint in VERIFIED_UPDATE_WEIGHTS
    assert "0.9.1" in VERIFIED_UPDATE_WEIGHTS[fingerprint]


def test_a_body_of_the_right_shape_but_unverified_is_refused_unless_the_user_opts_in(monkeypatch, caplog) -> None:
    changed = _manager_like(update_weights=_reordered_update)
    monkeypatch.delenv(ENV_ALLOW_UNVERIFIED_VERL, raising=False)
    with pytest.raises(IncompatibleVerlError) as error:
        original_update_weights(changed)
    fingerprint = update_weights_fingerprint(_reordered_update.__wrapped__)
    assert fingerprint is not None
    assert fingerprint not in VERIFIED_UPDATE_WEIGHTS
    assert f"fingerprint {fingerprint}" in str(error.value)
    assert f"{ENV_ALLOW_UNVERIFIED_VERL}=1" in str(error.value)
    assert "installed verl 0.9.1" in str(error.value)

    monkeypatch.setenv(ENV_ALLOW_UNVERIFIED_VERL, "1")
    with caplog.at_level("WARNING", logger="verl_hooks.compat"):
        assert original_update_weights(changed) is _reordered_update.__wrapped__
    assert "unverified update_weights body" in caplog.text


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


def test_the_fingerprint_ignores_the_fields_a_python_version_adds() -> None:
    """Python 3.12's ast gives every function ``type_params=[]``; 3.11's has no such field: the same body must
    have one fingerprint (the compatibility matrix's Python 3.12 run refused verl 0.9.1 before)."""
    import ast

    from verl_hooks.compat import _canonical

    tree = ast.parse("async def f(self, global_steps=None):\n    return await g(global_steps)\n").body[0]
    before = _canonical(tree)
    tree.type_params = []  # as 3.12 parses it
    assert _canonical(tree) == before
    tree.decorator_list = [ast.Name("d")]
    assert _canonical(tree) != before, "a field with content still counts"
