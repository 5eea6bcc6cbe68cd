"""The job's Hydra configuration: verl's keys, typed, validated at the edge; bad ones exit 78 before Ray starts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

import mini_ppo.main as job_main
from mini_ppo.schema import (
    CheckpointLayout,
    MiniPPOConfig,
    ResumeMode,
    SyncBackend,
    TrainerMode,
    ray_init_kwargs,
    validate,
    with_absolute_paths,
)
from tests.mini_ppo.harness import run_job
from verl_hooks.contract import read_record

CONFIG_DIR = Path(job_main.__file__).parent / "config"


def composed(*overrides: str) -> MiniPPOConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose("mini_ppo", overrides=list(overrides))
    return job_main.to_job_config(cfg, cwd="/work/dir")


def test_the_yaml_says_what_the_schema_defaults_say(monkeypatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = composed()
    expected = with_absolute_paths(MiniPPOConfig(), "/work/dir")
    expected.ray_kwargs.ray_init["address"] = "local"
    assert config == expected
    assert config.trainer.default_local_dir == "/work/dir/checkpoints/mini_ppo"


def test_ray_address_comes_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert composed().ray_kwargs.ray_init["address"] == "10.0.0.1:6379"


def test_verls_trainer_keys_are_accepted() -> None:
    config = composed(
        "trainer.total_training_steps=9",
        "trainer.save_freq=3",
        "trainer.default_local_dir=/abs/ckpt",
        "trainer.resume_mode=resume_path",
        "trainer.resume_from_path=rel/global_step_3",
        "trainer.max_actor_ckpt_to_keep=1",
        "trainer.max_critic_ckpt_to_keep=2",
        "trainer.checkpoint_layout=megatron",
        "trainer.use_critic=true",
        "trainer.trainer_mode=separate_async",
        "rollout.backend=cpu_gloo",
        "rollout.num_replicas=3",
        # What the supervisor's verl preset adds: ray.init keywords are open, as in verl.
        "+ray_kwargs.ray_init.runtime_env.worker_process_setup_hook=verl_hooks.install",
    )
    trainer = config.trainer
    assert (trainer.total_training_steps, trainer.save_freq, trainer.max_actor_ckpt_to_keep) == (9, 3, 1)
    assert (trainer.max_critic_ckpt_to_keep, trainer.use_critic) == (2, True)
    assert (trainer.checkpoint_layout, trainer.trainer_mode) == (CheckpointLayout.megatron, TrainerMode.separate_async)
    assert trainer.resume_mode is ResumeMode.resume_path
    assert trainer.default_local_dir == "/abs/ckpt", "absolute paths are kept"
    assert trainer.resume_from_path == "/work/dir/rel/global_step_3", "relative ones are the driver's cwd's"
    assert (config.rollout.backend, config.num_replicas) == (SyncBackend.cpu_gloo, 3)
    assert config.ray_kwargs.ray_init["runtime_env"] == {"worker_process_setup_hook": "verl_hooks.install"}


@pytest.mark.parametrize(
    "override",
    [
        "trainer.total_trainin_steps=3",
        "trainer.resume_mode=sometimes",
        "data.batch_size=many",
        "model.obs_dim=null",
        "trainer.checkpoint_layout=deepspeed",
        "trainer.trainer_mode=fully_async",
        "trainer.use_critic=sometimes",
    ],
)
def test_typos_and_wrong_types_are_hydra_errors(override: str) -> None:
    with pytest.raises((ConfigCompositionException, ValidationError)):
        composed(override)


def valid(**changes: dict) -> MiniPPOConfig:
    config = MiniPPOConfig()
    for section, values in changes.items():
        setattr(config, section, dataclasses.replace(getattr(config, section), **values))
    return config


@pytest.mark.parametrize(
    ("changes", "complaint"),
    [
        ({"trainer": {"total_training_steps": 0}}, "total_training_steps"),
        ({"trainer": {"n_workers": 0}}, "n_workers"),
        ({"trainer": {"max_actor_ckpt_to_keep": -1}}, "max_actor_ckpt_to_keep"),
        ({"trainer": {"max_critic_ckpt_to_keep": -1}}, "max_critic_ckpt_to_keep"),
        ({"data": {"batch_size": 513}}, "batch_size"),
        ({"rollout": {"num_replicas": 3}}, "rollout.num_replicas must be null or equal to trainer.n_workers"),
        ({"trainer": {"resume_mode": ResumeMode.resume_path}}, "must name a global_step_N"),
        ({"trainer": {"resume_mode": ResumeMode.resume_path, "resume_from_path": "/c/step_4"}}, "global_step_N"),
    ],
)
def test_values_types_cannot_rule_out_are_validated(changes: dict, complaint: str) -> None:
    with pytest.raises(ValidationError, match=complaint):
        validate(valid(**changes))


def test_standalone_replicas_may_differ_in_number_from_trainer_ranks() -> None:
    validate(valid(rollout={"backend": SyncBackend.cpu_gloo, "num_replicas": 3}))


def test_a_cluster_of_the_jobs_own_has_cpus_for_all_its_actors() -> None:
    naive = MiniPPOConfig()
    naive.ray_kwargs.ray_init["address"] = "local"
    assert ray_init_kwargs(naive, cpu_count=2) == {"address": "local", "num_cpus": 3}
    assert ray_init_kwargs(naive, cpu_count=64) == {"address": "local", "num_cpus": 64}
    gloo = valid(rollout={"backend": SyncBackend.cpu_gloo, "num_replicas": 3})
    gloo.ray_kwargs.ray_init.update(address="local", num_cpus=4)
    assert ray_init_kwargs(gloo, cpu_count=2) == {"address": "local", "num_cpus": 4}, "an explicit count is kept"
    joined = MiniPPOConfig()
    joined.ray_kwargs.ray_init["address"] = "10.0.0.1:6379"
    assert ray_init_kwargs(joined, cpu_count=2) == {"address": "10.0.0.1:6379"}, "Ray refuses num_cpus when joining"


def test_the_job_module_resolves_config_from_its_package() -> None:
    """Hydra finds the YAML next to the job's modules, wherever the package ``mini_ppo`` is imported from."""
    assert (CONFIG_DIR / "mini_ppo.yaml").is_file()
    assert OmegaConf.load(CONFIG_DIR / "mini_ppo.yaml").defaults[0] == "mini_ppo_schema"


# --- through the launcher: configuration errors exit 78 before any Ray start ---


@pytest.mark.parametrize(
    ("override", "complaint"),
    [
        ("trainer.total_trainin_steps=3", "Key 'total_trainin_steps' not in 'TrainerConfig'"),
        ("trainer.resume_mode=resume_path", "must name a global_step_N checkpoint folder"),
    ],
)
def test_config_errors_exit_78_with_a_record(tmp_path: Path, override: str, complaint: str) -> None:
    run = run_job(None, tmp_path / "ckpt", override, timeout_s=60)
    assert run.returncode == 78, run.output[-3000:]
    assert complaint in run.output
    assert read_record(run.error_file).exit_code == 78
    assert not (tmp_path / "ckpt").exists()
