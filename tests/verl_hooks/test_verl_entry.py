"""verl's own entry point as users run it, through our launcher, as far as it goes on a machine without GPU: every
trainer module imports (the `verl` extra has what they need), and the preset composes with verl's Hydra config,
the hook in ray_init's runtime_env and the checkpoint callback in place."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT

# Every trainer that calls CheckpointEngineManager.update_weights in verl 0.9.1 (see the README's compatibility
# notes): the V1 trainer and its modes, the legacy trainer, the fully-async one.
TRAINER_MODULES = (
    "verl.trainer.main_ppo",
    "verl.trainer.ppo.v1.trainer_base",
    "verl.trainer.ppo.v1.trainer_sync",
    "verl.trainer.ppo.v1.trainer_separate_async",
    "verl.trainer.ppo.v1.trainer_colocate_async",
    "verl.trainer.ppo.ray_trainer",
    "verl.experimental.fully_async_policy.fully_async_trainer",
)


def test_every_trainer_module_of_verl_imports_with_the_verl_extra() -> None:
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\nprint('imported')"
    done = subprocess.run(
        [sys.executable, "-c", code, *TRAINER_MODULES], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("imported")


@pytest.mark.parametrize("users_callback", [None, "tests.mini_ppo.user_callback.RecordingCallback"])
def test_main_ppo_through_the_launcher_composes_the_preset(tmp_path: Path, users_callback: str | None) -> None:
    preset = yaml.safe_load((REPO_ROOT / "conf" / "job" / "verl_ppo.yaml").read_text())["job"]
    argv = [sys.executable if part == "{python}" else part for part in preset["argv"]]
    extra = [f"trainer.checkpoint_callback_class={users_callback}"] if users_callback else []
    args = [*preset["args"], *extra, f"trainer.default_local_dir={tmp_path}", "trainer.total_training_steps=3"]
    done = subprocess.run(
        [*argv, "--cfg", "job", *args], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    config = yaml.safe_load(done.stdout[done.stdout.index("data:") :])
    assert config["ray_kwargs"]["ray_init"]["runtime_env"]["worker_process_setup_hook"] == "verl_hooks.install"
    trainer = config["trainer"]
    assert trainer["checkpoint_callback_class"] == "verl_hooks.checkpoint_callback.SupervisorCheckpointCallback"
    assert (trainer["default_local_dir"], trainer["total_training_steps"]) == (str(tmp_path), 3)
