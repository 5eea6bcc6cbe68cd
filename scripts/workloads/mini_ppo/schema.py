"""The mini-PPO job's configuration: a Hydra structured-config schema with verl's trainer keys.

``config/mini_ppo.yaml`` is composed against these dataclasses, so a misspelled key (``trainer.total_trainin_steps``)
or a wrong type is a Hydra error before anything starts, which ``verl_hooks.launch`` turns into exit 78.
``validate`` adds what types cannot say and raises OmegaConf's ``ValidationError`` for the same reason: a bad value
is a configuration error that no restart can fix. The job's code receives a resolved ``MiniPPOConfig``, never a
DictConfig, and reads no environment.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from omegaconf.errors import ValidationError

from mini_ppo.layout import check_resume_path

SCHEMA_NAME = "mini_ppo_schema"


class ResumeMode(str, Enum):
    """verl's ``trainer.resume_mode``. (Members are lowercase: OmegaConf matches YAML by name.)"""

    auto = "auto"
    """Resume from the step the tracker names; start from scratch when there is none."""
    disable = "disable"
    """Always start from scratch."""
    resume_path = "resume_path"
    """Resume from ``trainer.resume_from_path``, a ``global_step_N`` folder."""


class SyncBackend(str, Enum):
    """The checkpoint-engine backend of the weight sync."""

    naive = "naive"
    """verl's colocated path: the trainer's own workers serve the rollout, one blocking in-process copy."""
    cpu_gloo = "cpu_gloo"
    """verl's multi-phase path: standalone replicas, weights broadcast over a gloo group built per sync."""


class CheckpointLayout(str, Enum):
    """Which of verl's checkpoint managers the job imitates; each value is the verl strategy
    (``actor_rollout_ref.actor.strategy``, ``critic.strategy``) whose manager writes that layout."""

    fsdp = "fsdp"
    """``FSDPCheckpointManager``: per-rank ``model_``/``optim_``/``extra_state_world_size_W_rank_R.pt``."""
    megatron = "megatron"
    """``MegatronCheckpointManager``, layout v2: ``model/``, ``optimizer/``, ``extra/`` dist checkpoints, then
    ``transformer_config.json``, then the ``ckpt_contents.json`` manifest."""


class TrainerMode(str, Enum):
    """verl's ``trainer.v1.trainer_mode``. Here it only decides the checkpoint, as in verl's ``_save_checkpoint``:
    every mode but ``sync`` also saves TransferQueue's state; mini-PPO's dataflow stays synchronous."""

    sync = "sync"
    colocate_async = "colocate_async"
    separate_async = "separate_async"


@dataclass
class TrainerConfig:
    total_training_steps: int = 6
    save_freq: int = 2
    """Save on multiples of this and on the last step; 0 or less never saves (verl's default is -1)."""
    default_local_dir: str = "checkpoints/mini_ppo"
    """Relative paths are taken against the driver's working directory, as verl does."""
    resume_mode: ResumeMode = ResumeMode.auto
    resume_from_path: str | None = None
    max_actor_ckpt_to_keep: int | None = None
    """Keep at most this many step folders' ``actor/`` (null or 0: keep all), rotated as verl rotates them."""
    max_critic_ckpt_to_keep: int | None = None
    """The same for ``critic/``."""
    checkpoint_layout: CheckpointLayout = CheckpointLayout.fsdp
    """The layout of each role folder: verl's FSDP one or its Megatron one (the training is the same)."""
    use_critic: bool = False
    """Train a value model beside the policy (colocated in the trainer's workers, as verl colocates roles) and
    checkpoint it in ``critic/``. Its values do not enter the policy's advantages, so the policy trains the
    same bits with or without it."""
    trainer_mode: TrainerMode = TrainerMode.sync
    """verl's ``trainer.v1.trainer_mode``; any mode but ``sync`` saves ``transfer_queue/`` in each step."""
    # Named, not imported, as verl names it: the job imports nothing of verl_hooks.
    checkpoint_callback_class: str | None = "verl_hooks.checkpoint_callback.SupervisorCheckpointCallback"
    """verl's: a ``CheckpointCallback`` subclass whose ``on_save`` runs after each save (null: none). The default
    writes the supervisor's checkpoint marker."""
    n_workers: int = 2
    """The trainer's data-parallel world size: Ray workers in verl's ``RayWorkerGroup``."""
    extra_step_time_s: float = 0.0
    """Sleep this long after each step, to emulate a larger model's step time in tests and demos; the training
    work is real either way."""
    project_name: str = "mini_ppo"
    experiment_name: str = "demo"
    logger: list[str] = field(default_factory=list)
    """verl's ``trainer.logger``: the experiment trackers (``console``, ``tensorboard``, ``mlflow``, ``wandb``...)
    that verl's own ``Tracking`` opens, as verl's trainer does; empty: none."""
    progress_file: str | None = None
    """Append one JSON line per event (start, step, done) with a Unix timestamp: the job's own timestamps, for
    the recovery benchmark."""


@dataclass
class DataConfig:
    batch_size: int = 64
    dataset_size: int = 512


@dataclass
class ModelConfig:
    obs_dim: int = 16
    hidden_dim: int = 64
    num_actions: int = 8


@dataclass
class ActorUpdateConfig:
    lr: float = 0.01
    clip_ratio: float = 0.2


@dataclass
class RolloutReplicasConfig:
    num_replicas: int | None = None
    """Rollout replicas; null means one per trainer rank (the only layout the naive backend allows)."""
    backend: SyncBackend = SyncBackend.naive
    bucket_megabytes: int = 1


def _default_ray_init() -> dict[str, Any]:
    # Without RAY_ADDRESS, start a private local cluster rather than join whichever one this machine ran last.
    return {"address": "${oc.env:RAY_ADDRESS,local}", "num_cpus": None}


@dataclass
class RayKwargs:
    ray_init: dict[str, Any] = field(default_factory=_default_ray_init)
    """Keyword arguments of ``ray.init`` (null values are left out), as verl's ``ray_kwargs.ray_init``."""


@dataclass
class MiniPPOConfig:
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    actor: ActorUpdateConfig = field(default_factory=ActorUpdateConfig)
    rollout: RolloutReplicasConfig = field(default_factory=RolloutReplicasConfig)
    seed: int = 1
    ray_kwargs: RayKwargs = field(default_factory=RayKwargs)

    @property
    def num_replicas(self) -> int:
        return self.trainer.n_workers if self.rollout.num_replicas is None else self.rollout.num_replicas

    @property
    def logical_cpus_needed(self) -> int:
        """Ray CPUs the job's actors ask for: the TaskRunner, one per trainer rank, one per standalone replica."""
        standalone = 0 if self.rollout.backend is SyncBackend.naive else self.num_replicas
        return 1 + self.trainer.n_workers + standalone


def validate(config: MiniPPOConfig) -> None:
    """Checks the types cannot express; raises OmegaConf's ``ValidationError`` naming the key."""

    def require(ok: bool, message: str) -> None:
        if not ok:
            raise ValidationError(message)

    trainer, data = config.trainer, config.data
    require(trainer.total_training_steps >= 1, "trainer.total_training_steps must be >= 1")
    require(trainer.n_workers >= 1, "trainer.n_workers must be >= 1")
    require(trainer.extra_step_time_s >= 0, "trainer.extra_step_time_s must be >= 0")
    require(
        trainer.max_actor_ckpt_to_keep is None or trainer.max_actor_ckpt_to_keep >= 0,
        "trainer.max_actor_ckpt_to_keep must be null or >= 0",
    )
    require(
        trainer.max_critic_ckpt_to_keep is None or trainer.max_critic_ckpt_to_keep >= 0,
        "trainer.max_critic_ckpt_to_keep must be null or >= 0",
    )
    require(data.dataset_size >= 1, "data.dataset_size must be >= 1")
    require(1 <= data.batch_size <= data.dataset_size, "data.batch_size must be in 1..data.dataset_size")
    require(min(config.model.obs_dim, config.model.hidden_dim) >= 1, "model sizes must be >= 1")
    require(config.model.num_actions >= 2, "model.num_actions must be >= 2")
    require(config.actor.lr > 0, "actor.lr must be > 0")
    require(config.actor.clip_ratio > 0, "actor.clip_ratio must be > 0")
    require(config.rollout.bucket_megabytes >= 1, "rollout.bucket_megabytes must be >= 1")
    require(config.num_replicas >= 1, "rollout.num_replicas must be >= 1")
    require(
        config.rollout.backend is not SyncBackend.naive or config.num_replicas == trainer.n_workers,
        "rollout.backend=naive serves the rollout from the trainer's workers: rollout.num_replicas must be null "
        "or equal to trainer.n_workers",
    )
    if trainer.resume_mode is ResumeMode.resume_path:
        try:
            check_resume_path(trainer.resume_from_path)
        except ValueError as exc:
            raise ValidationError(str(exc)) from None


def with_absolute_paths(config: MiniPPOConfig, cwd: str) -> MiniPPOConfig:
    """The config with its paths made absolute against the driver's ``cwd``: the job's Ray actors have working
    directories of their own, and verl means the driver's."""
    trainer = config.trainer
    resume, progress = trainer.resume_from_path, trainer.progress_file
    trainer = dataclasses.replace(
        trainer,
        default_local_dir=os.path.join(cwd, trainer.default_local_dir),
        resume_from_path=os.path.join(cwd, resume) if isinstance(resume, str) else resume,
        progress_file=os.path.join(cwd, progress) if isinstance(progress, str) else progress,
    )
    return dataclasses.replace(config, trainer=trainer)


def ray_init_kwargs(config: MiniPPOConfig, cpu_count: int) -> dict[str, Any]:
    """``ray.init``'s arguments. A cluster of the job's own gets at least the logical CPUs its actors ask for:
    they are mostly idle, and on a 2-core machine Ray would otherwise never place them all."""
    kwargs = {key: value for key, value in config.ray_kwargs.ray_init.items() if value is not None}
    if kwargs.get("address") == "local" and "num_cpus" not in kwargs:
        kwargs["num_cpus"] = max(cpu_count, config.logical_cpus_needed)
    return kwargs
