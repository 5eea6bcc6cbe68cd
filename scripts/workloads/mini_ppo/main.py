"""The mini-PPO job's driver, a Hydra app with the command-line contract of ``python -m verl.trainer.main_ppo``.

    python -m verl_hooks.launch -m mini_ppo.main trainer.total_training_steps=6 \\
        trainer.default_local_dir=/tmp/ckpt trainer.resume_mode=auto rollout.backend=cpu_gloo

As verl's driver it starts (or joins) Ray, runs the trainer in a ``TaskRunner`` actor and waits for it with no
timeout; a failure in the actor re-raises here, and the launcher turns it into an exit code and an error record.
The driver itself never imports torch or verl (the trainer does, in the actor): that saves seconds per attempt.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import hydra
import ray
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from mini_ppo.schema import SCHEMA_NAME, MiniPPOConfig, ray_init_kwargs, validate, with_absolute_paths

ConfigStore.instance().store(name=SCHEMA_NAME, node=MiniPPOConfig)


@ray.remote(num_cpus=1)
class TaskRunner:
    """Runs the trainer inside the cluster, as verl's ``TaskRunner`` does: the driver only waits for it."""

    def run(self, config: MiniPPOConfig) -> dict[str, Any]:
        from mini_ppo.trainer import run_trainer

        # A plain dict back: unpickling the report's class would make the driver import torch and verl.
        return dataclasses.asdict(run_trainer(config))


def to_job_config(cfg: DictConfig, cwd: str) -> MiniPPOConfig:
    """The composed config as the job's typed, validated values, paths resolved against the driver's ``cwd``."""
    config = OmegaConf.to_object(cfg)
    assert isinstance(config, MiniPPOConfig)
    validate(config)
    return with_absolute_paths(config, cwd)


def run(config: MiniPPOConfig) -> dict[str, Any]:
    if not ray.is_initialized():
        ray.init(**ray_init_kwargs(config, os.cpu_count() or 1))
    runner = TaskRunner.remote()
    report = ray.get(runner.run.remote(config))
    print(
        f"mini_ppo: done at global step {report['global_step']} ({report['steps_run']} steps run), "
        f"weights sha256 {report['weights_sha256']}",
        flush=True,
    )
    return report


@hydra.main(config_path="config", config_name="mini_ppo", version_base=None)
def main(cfg: DictConfig) -> None:
    run(to_job_config(cfg, os.getcwd()))


if __name__ == "__main__":
    main()
