"""The checkpoint callback verl calls after each save: built by verl's own builder, run on step folders that verl's
own ``FSDPCheckpointManager`` wrote, writing the marker the supervisor reads."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from verl.trainer.ppo.checkpoint_callback import CheckpointCallback, build_checkpoint_callback

from tests.verl_fixtures import StepSpec, write_fsdp_steps
from verl_hooks.checkpoint_callback import (
    VERL_DEFAULT_SAVE_CONTENTS,
    SupervisorCheckpointCallback,
    checkpoint_facts,
    step_files,
)
from verl_hooks.contract import (
    CHECKPOINT_CALLBACK_CLASS,
    CHECKPOINT_MARKER,
    ENV_CHAINED_CHECKPOINT_CALLBACK,
    CheckpointFacts,
    read_checkpoint_marker,
)

# --- verl-made step folders, written once for the module ---


@pytest.fixture(scope="module")
def verl_steps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("verl-steps")
    specs = {
        "plain": StepSpec(root / "plain", 1),
        "critic_hf": StepSpec(root / "critic_hf", 2, save_contents=("model", "hf_model"), critic=True),
        **{f"rotated_{step}": StepSpec(root / "rotated", step, max_ckpt_to_keep=2) for step in (1, 2, 3)},
    }
    write_fsdp_steps(list(specs.values()))
    return {name: spec.step_dir for name, spec in specs.items()}


def test_the_fixture_folders_are_verls_layout_and_rotation(verl_steps: dict[str, Path]) -> None:
    shards = {f"actor/{kind}_world_size_1_rank_0.pt" for kind in ("model", "optim", "extra_state")}
    assert set(files_on_disk(verl_steps["plain"])) == {
        *shards,
        "actor/fsdp_config.json",
        "actor/huggingface/config.json",
        "data.pt",
    }
    critic_hf = set(files_on_disk(verl_steps["critic_hf"]))
    assert {"actor/huggingface/model.safetensors", "critic/huggingface/model.safetensors"} <= critic_hf
    assert "actor/optim_world_size_1_rank_0.pt" not in critic_hf
    rotated = verl_steps["rotated_3"].parent
    assert [step for step in (1, 2, 3) if (rotated / f"global_step_{step}" / "actor").is_dir()] == [2, 3]
    assert (rotated / "global_step_1" / "data.pt").is_file(), "verl's rotation leaves data.pt behind"
    assert (rotated / "latest_checkpointed_iteration.txt").read_text() == "3"


@pytest.fixture
def step_dir(verl_steps: dict[str, Path], tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    """A private copy of a verl-made step folder (``plain`` unless the test is parametrized with another)."""
    name = getattr(request, "param", "plain")
    source = verl_steps[name]
    copy = tmp_path / "checkpoints" / source.name
    shutil.copytree(source, copy)
    return copy


def files_on_disk(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def verl_config(**trainer: Any) -> Any:
    return OmegaConf.create({"trainer": {"checkpoint_callback_class": CHECKPOINT_CALLBACK_CLASS, **trainer}})


def a_trainer(**attributes: Any) -> SimpleNamespace:
    """What the callback reads of verl's trainer instance (``PPOTrainer``'s attributes)."""
    return SimpleNamespace(**{"use_critic": False, "trainer_mode": "sync", **attributes})


# --- built by verl ---


def test_verls_builder_returns_our_callback_under_the_contracts_name() -> None:
    callback = build_checkpoint_callback(verl_config())
    assert type(callback) is SupervisorCheckpointCallback
    assert f"{SupervisorCheckpointCallback.__module__}.{SupervisorCheckpointCallback.__qualname__}" == (
        CHECKPOINT_CALLBACK_CLASS
    )
    assert callback.chained is None


# --- the marker ---


@pytest.mark.parametrize("step_dir", ["plain", "critic_hf"], indirect=True)
def test_the_marker_lists_exactly_the_files_verl_wrote(step_dir: Path) -> None:
    expected = files_on_disk(step_dir)
    assert "actor/model_world_size_1_rank_0.pt" in expected
    assert "data.pt" in expected
    callback = build_checkpoint_callback(verl_config())
    callback.on_save(trainer=a_trainer(), global_step=7, checkpoint_dir=str(step_dir), async_save=False)

    marker = read_checkpoint_marker(step_dir)
    assert marker is not None
    assert (marker.step, marker.durable, marker.facts.async_save) == (7, True, False)
    assert marker.files == expected
    assert all(size > 0 for size in marker.files.values())
    assert sorted(p.name for p in step_dir.iterdir() if p.name.startswith(".")) == [], "no temporary file left"


def test_a_second_save_of_the_same_step_does_not_list_the_first_marker(step_dir: Path) -> None:
    callback = build_checkpoint_callback(verl_config())
    for _ in range(2):
        callback.on_save(trainer=a_trainer(), global_step=1, checkpoint_dir=str(step_dir))
    marker = read_checkpoint_marker(step_dir)
    assert marker is not None
    assert CHECKPOINT_MARKER not in marker.files
    assert marker.files == {k: v for k, v in files_on_disk(step_dir).items() if k != CHECKPOINT_MARKER}
    (step_dir / f".{CHECKPOINT_MARKER}.leftover").write_text("x")
    assert f".{CHECKPOINT_MARKER}.leftover" not in step_files(step_dir)


def test_an_async_save_is_not_durable(step_dir: Path) -> None:
    callback = build_checkpoint_callback(verl_config())
    callback.on_save(trainer=a_trainer(), global_step=1, checkpoint_dir=str(step_dir), async_save=True)
    marker = read_checkpoint_marker(step_dir)
    assert marker is not None
    assert (marker.durable, marker.facts.async_save) == (False, True)


def test_a_marker_that_cannot_be_written_costs_a_warning_not_the_run(
    step_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    callback = build_checkpoint_callback(verl_config())
    # The marker's place is taken (this runs as root too, where file modes would not stop a write).
    (step_dir / CHECKPOINT_MARKER).mkdir()
    with caplog.at_level(logging.WARNING, logger="verl_hooks.checkpoint_callback"):
        callback.on_save(trainer=a_trainer(), global_step=1, checkpoint_dir=str(step_dir))
        callback.on_save(trainer=a_trainer(), global_step=1, checkpoint_dir=str(tmp_path / "never_made"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert all("could not write the supervisor's checkpoint marker" in w for w in warnings)
    assert (step_dir / CHECKPOINT_MARKER).is_dir()
    assert [p.name for p in step_dir.iterdir() if p.name.startswith(".")] == []


# --- the facts ---

VERL_CONFIG_DIR = Path(__import__("verl.trainer.main_ppo").trainer.main_ppo.__file__).parent / "config"


def verls_composed_config(*overrides: str) -> Any:
    """verl's own ``ppo_trainer`` config with ``overrides``, resolved as its ``TaskRunner`` resolves it."""
    with initialize_config_dir(config_dir=str(VERL_CONFIG_DIR), version_base=None):
        config = compose("ppo_trainer", overrides=list(overrides))
    return config


@pytest.fixture(scope="module")
def verl_ppo_config() -> Any:
    return verls_composed_config(
        "critic.enable=true",
        "actor_rollout_ref.actor.checkpoint.save_contents=[model,hf_model]",
        "critic.checkpoint.save_contents=null",
        "trainer.max_actor_ckpt_to_keep=3",
        "trainer.max_critic_ckpt_to_keep=2",
    )


def test_facts_come_from_verls_own_config(verl_ppo_config: Any) -> None:
    facts = checkpoint_facts(verl_ppo_config, None)
    assert facts == CheckpointFacts(
        actor_strategy="fsdp",
        actor_save_contents=("model", "hf_model"),
        critic=True,
        critic_strategy="fsdp",
        critic_save_contents=VERL_DEFAULT_SAVE_CONTENTS,
        async_save=False,
        transfer_queue=False,
        max_actor_ckpt_to_keep=3,
        max_critic_ckpt_to_keep=2,
    )


def test_what_the_trainer_decided_outranks_the_config(verl_ppo_config: Any) -> None:
    facts = checkpoint_facts(verl_ppo_config, a_trainer(use_critic=False, trainer_mode="colocate_async"))
    assert (facts.critic, facts.critic_strategy, facts.critic_save_contents) == (False, None, None)
    assert facts.transfer_queue is True


def test_remove_previous_ckpt_in_save_keeps_one_of_each(verl_ppo_config: Any) -> None:
    config = verl_ppo_config.copy()
    OmegaConf.set_struct(config, False)
    config.trainer.remove_previous_ckpt_in_save = True
    facts = checkpoint_facts(config, a_trainer())
    assert (facts.max_actor_ckpt_to_keep, facts.max_critic_ckpt_to_keep) == (1, 1)


def test_on_save_records_the_facts_with_the_saves_own_async_flag(step_dir: Path, verl_ppo_config: Any) -> None:
    callback = SupervisorCheckpointCallback(config=verl_ppo_config)
    callback.on_save(trainer=a_trainer(use_critic=True), global_step=1, checkpoint_dir=str(step_dir), async_save=True)
    marker = read_checkpoint_marker(step_dir)
    assert marker is not None
    assert marker.facts == CheckpointFacts(**{**vars(checkpoint_facts(verl_ppo_config, None)), "async_save": True})


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({}, CheckpointFacts()),
        # An actor section without a checkpoint one: verl's manager falls back to its default contents.
        (
            {"actor_rollout_ref": {"actor": {"strategy": "megatron"}}, "trainer": {"v1": {"trainer_mode": "sync"}}},
            CheckpointFacts(
                actor_strategy="megatron", actor_save_contents=VERL_DEFAULT_SAVE_CONTENTS, transfer_queue=False
            ),
        ),
        (
            {"trainer": {"max_critic_ckpt_to_keep": 0, "max_actor_ckpt_to_keep": "3"}},
            CheckpointFacts(max_actor_ckpt_to_keep=3, max_critic_ckpt_to_keep=0),
        ),
        ({"critic": {"enable": False, "strategy": "fsdp2"}}, CheckpointFacts(critic=False)),
        ({"actor_rollout_ref": None, "critic": "fsdp", "trainer": []}, CheckpointFacts()),
    ],
    ids=["empty", "no-checkpoint-section", "keep-limits", "critic-disabled", "odd-shapes"],
)
def test_facts_tolerate_configs_that_lack_verls_keys(config: Any, expected: CheckpointFacts) -> None:
    assert checkpoint_facts(config, None) == expected
    assert checkpoint_facts(OmegaConf.create(config), None) == expected


def test_facts_tolerate_omegaconfs_missing_values_and_broken_interpolations() -> None:
    config = OmegaConf.create(
        {
            "actor_rollout_ref": {"actor": {"strategy": "???", "checkpoint": {"save_contents": "???"}}},
            "trainer": {"max_actor_ckpt_to_keep": "${oc.env:NO_SUCH_VARIABLE_HERE}", "max_critic_ckpt_to_keep": 2},
        }
    )
    assert checkpoint_facts(config, None) == CheckpointFacts(
        actor_save_contents=VERL_DEFAULT_SAVE_CONTENTS, max_critic_ckpt_to_keep=2
    )
    assert checkpoint_facts(None, None) == CheckpointFacts()


# --- a user's own callback, chained ---


class RecordingCallback(CheckpointCallback):
    calls: ClassVar[list[dict[str, Any]]] = []

    def on_save(self, trainer, global_step: int, checkpoint_dir: str, async_save: bool = False, **kwargs) -> None:
        marker_there = (Path(checkpoint_dir) / CHECKPOINT_MARKER).exists()
        self.calls.append(
            {
                "config": self.config,
                "trainer": trainer,
                "global_step": global_step,
                "checkpoint_dir": checkpoint_dir,
                "async_save": async_save,
                "kwargs": kwargs,
                "marker_there": marker_there,
            }
        )


class UploadFailed(RuntimeError):
    pass


class FailingCallback(CheckpointCallback):
    def on_save(self, trainer, global_step: int, checkpoint_dir: str, async_save: bool = False, **kwargs) -> None:
        raise UploadFailed("the upload of the checkpoint failed")


@pytest.fixture
def chained(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    def chain(cls: type) -> None:
        monkeypatch.setenv(ENV_CHAINED_CHECKPOINT_CALLBACK, f"{cls.__module__}.{cls.__qualname__}")

    RecordingCallback.calls.clear()
    yield chain
    RecordingCallback.calls.clear()


def test_a_users_callback_runs_first_with_the_same_arguments(step_dir: Path, chained: Any) -> None:
    chained(RecordingCallback)
    config = verl_config()
    callback = build_checkpoint_callback(config)
    assert isinstance(callback.chained, RecordingCallback)
    trainer = a_trainer()
    callback.on_save(trainer=trainer, global_step=3, checkpoint_dir=str(step_dir), async_save=False, extra="x")
    [call] = RecordingCallback.calls
    assert call == {
        "config": config,
        "trainer": trainer,
        "global_step": 3,
        "checkpoint_dir": str(step_dir),
        "async_save": False,
        "kwargs": {"extra": "x"},
        "marker_there": False,
    }
    assert read_checkpoint_marker(step_dir) is not None, "then the marker"


def test_a_users_callback_that_raises_aborts_the_save_without_a_marker(step_dir: Path, chained: Any) -> None:
    chained(FailingCallback)
    callback = build_checkpoint_callback(verl_config())
    with pytest.raises(UploadFailed):
        callback.on_save(trainer=a_trainer(), global_step=1, checkpoint_dir=str(step_dir))
    assert read_checkpoint_marker(step_dir) is None


def test_a_chained_name_that_does_not_load_fails_when_verl_builds_the_callback(chained: Any, monkeypatch) -> None:
    monkeypatch.setenv(ENV_CHAINED_CHECKPOINT_CALLBACK, "no_such_package.Callback")
    with pytest.raises(ImportError, match="no_such_package"):
        build_checkpoint_callback(verl_config())


def test_ours_chained_behind_ours_is_not_run_twice(chained: Any) -> None:
    chained(SupervisorCheckpointCallback)
    assert build_checkpoint_callback(verl_config()).chained is None
