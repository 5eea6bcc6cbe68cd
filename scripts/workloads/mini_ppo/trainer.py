"""The mini-PPO training loop, run inside a ``TaskRunner`` Ray actor as verl's ``RayPPOTrainer.fit`` is.

The loop has verl's shape and order, because that order is what the supervisor and the guard see: load the
checkpoint, sync the weights once, then per step generate on the rollout replicas, (naive) put the replicas to
sleep, update the critic (``trainer.use_critic``) and the actor, save when due, and sync the weights of the new
step to the rollout. Every random choice is seeded from (seed, step, ...) and every reduction has a fixed order, so
a run resumed from a checkpoint ends with the same bits as a run that was never interrupted.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import ray
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

try:  # verl 0.9.1+; verl 0.9.0 has no checkpoint callbacks, and its steps carry no marker
    from verl.trainer.ppo.checkpoint_callback import build_checkpoint_callback
except ModuleNotFoundError:
    build_checkpoint_callback = None

from mini_ppo.actor import ActorConfig
from mini_ppo.checkpoint_io import (
    FinalReport,
    ResumePoint,
    load_data_state,
    load_transfer_queue,
    resume_point,
    save_data_state,
    save_transfer_queue,
    write_tracker,
)
from mini_ppo.data import BatchIterator, derive_seed
from mini_ppo.layout import ACTOR_DIR, CRITIC_DIR, FINAL_FILE, TRANSFER_QUEUE_DIR, should_save, step_folder
from mini_ppo.model import BanditTask, PolicySpec
from mini_ppo.schema import MiniPPOConfig, SyncBackend, TrainerMode
from mini_ppo.topology import WeightSyncTopology, build_topology, with_backend


class WeightsDivergedError(RuntimeError):
    """The trainer's ranks, or the rollout and the trainer, hold different weights when they must not."""


@dataclass(frozen=True)
class StepResult:
    step: int
    reward_mean: float
    loss: float

    def line(self) -> str:
        return f"step {self.step}: reward_mean={self.reward_mean:.4f} loss={self.loss:+.3e}"


def actor_config(config: MiniPPOConfig) -> ActorConfig:
    """The trainer workers' config (``mini_ppo.actor``) from the job's."""
    model = config.model
    actor = ActorConfig(
        policy=PolicySpec(obs_dim=model.obs_dim, hidden_dim=model.hidden_dim, num_actions=model.num_actions),
        seed=config.seed,
        lr=config.actor.lr,
        clip_ratio=config.actor.clip_ratio,
        bucket_megabytes=config.rollout.bucket_megabytes,
        checkpoint_layout=config.trainer.checkpoint_layout.value,
        use_critic=config.trainer.use_critic,
    )
    return with_backend(actor, config.rollout.backend.value)


def normalised(rewards: torch.Tensor) -> torch.Tensor:
    """Advantages: rewards centred and scaled by their spread (GRPO-style, one group per batch)."""
    return (rewards - rewards.mean()) / (rewards.std(unbiased=False) + 1e-6)


def callback_config(config: MiniPPOConfig) -> DictConfig:
    """The job's config as verl hands it to its checkpoint callback: a DictConfig (verl's
    ``build_checkpoint_callback`` reads ``config.trainer.get(...)``, which a dataclass has not), with the verl
    keys whose meaning the job imitates under verl's names: the strategy whose checkpoint manager writes the
    layout, for the actor and the critic. (Whether there is a critic, and the trainer mode, verl's callback reads
    from the trainer, as ``use_critic`` and ``trainer_mode``.)"""
    cfg = OmegaConf.structured(config)
    strategy = config.trainer.checkpoint_layout.value  # each layout is named after its verl strategy
    with open_dict(cfg):
        cfg.actor_rollout_ref = {"actor": {"strategy": strategy}}
        cfg.critic = {"strategy": strategy}
    return cfg


class MiniPPOTrainer:
    """verl's ``RayPPOTrainer`` in miniature: the driver-side dataflow over the workers, replicas and weight sync.

    The data iterator, the task and the advantages live here; the policy and its optimizer live in the workers.
    """

    def __init__(self, config: MiniPPOConfig, topology: WeightSyncTopology) -> None:
        self.config = config
        self.topology = topology
        # What verl's V1 trainer knows of itself and a checkpoint callback may read (trainer_base.py:123 and :129):
        # whether it trains a critic, and its mode (all but "sync" save TransferQueue's state in the checkpoints).
        self.use_critic = config.trainer.use_critic
        self.trainer_mode = config.trainer.trainer_mode.value
        # verl's names for what its trainer saves through (trainer_base.py:328 and 321), which the emergency save
        # of verl_hooks reads as it reads verl's: the actor's worker group, and the critic's, which verl's trainer
        # gets from the colocated workers (see mini_ppo.actor).
        self.actor_rollout_wg = topology.actor_wg
        self.critic_wg = topology.actor_wg.spawn({"critic"})["critic"] if self.use_critic else None
        # verl's step counter: the step whose state the trainer holds, incremented once the step is done.
        self.global_steps = 0
        # Built with the trainer, as verl's PPOTrainer.__init__ does: a bad class name fails before training.
        self.checkpoint_callback = (
            build_checkpoint_callback(callback_config(config)) if build_checkpoint_callback is not None else None
        )
        spec = actor_config(config).policy
        self.task = BanditTask(spec, config.data.dataset_size, config.seed)
        # verl's names: the train dataloader whose state_dict() the save stores as data.pt (trainer_base.py:743 and
        # 999), and the weight-sync manager (trainer_base.py's checkpoint_manager).
        self.train_dataloader = BatchIterator(self.task.observations, config.data.batch_size, config.seed)
        self.checkpoint_manager = topology.manager
        self.root = config.trainer.default_local_dir

    @property
    def hybrid(self) -> bool:
        return self.config.rollout.backend is SyncBackend.naive

    def fit(self) -> FinalReport:
        # final.json says "this run finished": one left by an earlier run must not outlive a failure of this one.
        (Path(self.root) / FINAL_FILE).unlink(missing_ok=True)
        tracking = self.open_tracking()
        start = self.load_checkpoint()
        self.global_steps = start.step
        self.progress("start", start.step, resumed_from_step=None if start.folder is None else start.step)
        manager = self.checkpoint_manager
        if self.hybrid:
            # verl's colocated trainer puts the replicas to sleep at init; the first sync wakes them.
            manager.sleep_replicas()
        manager.update_weights(start.step)
        last: StepResult | None = None
        total = self.config.trainer.total_training_steps
        for step in range(start.step + 1, total + 1):
            self.global_steps = step
            last = self.train_step(step)
            if tracking is not None:
                # After the step's sync, as verl logs (ray_trainer.py:1802, after update_weights at :1716).
                tracking.log(data={"reward_mean": last.reward_mean, "loss": last.loss}, step=step)
            self.progress("step", step)
            print(last.line(), flush=True)
            if self.config.trainer.extra_step_time_s:
                time.sleep(self.config.trainer.extra_step_time_s)
        report = FinalReport(
            global_step=max(start.step, total),
            weights_sha256=self.check_rollout_has_trainer_weights(),
            reward_mean=None if last is None else last.reward_mean,
            resumed_from_step=None if start.folder is None else start.step,
            steps_run=max(0, total - start.step),
            critic_sha256=self.check_critic_ranks_agree() if self.critic_wg is not None else None,
        )
        report.write(self.root)
        if tracking is not None:
            tracking.finish()  # verl leaves it to Tracking.__del__ (tracking.py:222); here the run ends explicitly
        self.progress("done", report.global_step)
        return report

    def open_tracking(self):
        """verl's own experiment trackers, opened as ``RayPPOTrainer.fit`` opens them (ray_trainer.py:1419),
        before the checkpoint is loaded."""
        trainer = self.config.trainer
        if not trainer.logger:
            return None
        from verl.utils.tracking import Tracking

        return Tracking(
            project_name=trainer.project_name,
            experiment_name=trainer.experiment_name,
            default_backend=list(trainer.logger),
            config=OmegaConf.to_container(OmegaConf.structured(self.config), resolve=True, enum_to_str=True),
        )

    def progress(self, event: str, step: int, **fields: object) -> None:
        path = self.config.trainer.progress_file
        if path:
            line = {"ts": time.time(), "event": event, "step": step, "pid": os.getpid(), **fields}
            with open(path, "a") as f:
                f.write(json.dumps(line) + "\n")

    def train_step(self, step: int) -> StepResult:
        """One step in verl's order and under verl's method names (V1 ``_step_once``, trainer_base.py:556-612),
        which verl_hooks follows (the trainer calls) and injects faults at (generate, reward, train)."""
        obs = self.train_dataloader.next_batch()
        rollout = self._submit_batch_to_rollout(obs)
        if self.hybrid:
            self.checkpoint_manager.sleep_replicas()  # verl's on_sample_end (trainer_sync.py:40-42)
        rewards = self._compute_reward_colocate(obs, rollout["actions"])
        if self.critic_wg is not None:
            self._update_critic(obs, rewards)
        batch = {
            "obs": obs,
            "actions": rollout["actions"],
            "old_log_probs": rollout["log_probs"],
            "advantages": normalised(rewards),
        }
        metrics = self._update_actor(batch)
        trainer = self.config.trainer
        if should_save(step, trainer.save_freq, trainer.total_training_steps):
            self._save_checkpoint()
        self.checkpoint_manager.update_weights(self.global_steps)
        loss = sum(rank_metrics["actor/loss"] for rank_metrics in metrics) / len(metrics)
        return StepResult(step, float(rewards.mean()), loss)

    def _submit_batch_to_rollout(self, obs: torch.Tensor) -> dict[str, torch.Tensor]:
        """The step's generation. Each replica samples a contiguous chunk with a seed of its own, so the result does
        not depend on which replica answers first."""
        replicas = self.topology.replicas
        chunks = torch.tensor_split(obs, len(replicas))
        step = self.global_steps

        async def generate_all() -> list[dict[str, torch.Tensor]]:
            return await asyncio.gather(
                *[
                    replica.generate(chunk, derive_seed(self.config.seed, step, replica.replica_rank))
                    for replica, chunk in zip(replicas, chunks, strict=True)
                ]
            )

        outputs = asyncio.run(generate_all())
        return {key: torch.cat([out[key] for out in outputs]) for key in ("actions", "log_probs")}

    def _compute_reward_colocate(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return self.task.rewards(obs, actions)

    def _update_critic(self, obs: torch.Tensor, rewards: torch.Tensor) -> None:
        # verl updates the critic before the actor; its values stay out of the advantages (GRPO-style here).
        self.critic_wg.update_critic({"obs": obs, "returns": rewards})

    def _update_actor(self, batch: dict[str, torch.Tensor]) -> list[dict[str, float]]:
        metrics = self.actor_rollout_wg.update_actor(batch)
        self.check_ranks_agree()
        return metrics

    def _save_checkpoint(self) -> None:
        """verl's ``_save_checkpoint`` (``trainer_base.py`` lines 948-1030), for ``global_steps``: the actor's folder
        (with rotation), the critic's, data.pt, TransferQueue's state in every mode but sync, the tracker, the
        checkpoint callback."""
        step = self.global_steps
        folder = step_folder(self.root, step)
        trainer = self.config.trainer
        self.actor_rollout_wg.save_checkpoint(
            str(folder / ACTOR_DIR), None, step, max_ckpt_to_keep=trainer.max_actor_ckpt_to_keep
        )
        if self.critic_wg is not None:
            self.critic_wg.save_checkpoint(
                str(folder / CRITIC_DIR), None, step, max_ckpt_to_keep=trainer.max_critic_ckpt_to_keep
            )
        save_data_state(folder, self.train_dataloader.state_dict())
        if trainer.trainer_mode is not TrainerMode.sync:
            save_transfer_queue(folder / TRANSFER_QUEUE_DIR, {"global_steps": step})
        write_tracker(self.root, step)
        if self.checkpoint_callback is not None:
            self.checkpoint_callback.on_save(
                trainer=self, global_step=step, checkpoint_dir=str(folder), async_save=False
            )

    def load_checkpoint(self) -> ResumePoint:
        trainer = self.config.trainer
        start = resume_point(trainer.resume_mode, self.root, trainer.resume_from_path)
        if start.folder is None:
            print("Training from scratch", flush=True)
            return start
        print(f"Resuming from {start.folder} (global step {start.step})", flush=True)
        # verl's _load_checkpoint order (trainer_base.py lines 850-905): actor, critic, data.pt, TransferQueue.
        self.topology.actor_wg.load_checkpoint(str(start.folder / ACTOR_DIR))
        if self.critic_wg is not None:
            self.critic_wg.load_checkpoint(str(start.folder / CRITIC_DIR))
        data_state = load_data_state(start.folder)
        if data_state is None:
            print(f"Warning: no data state in {start.folder}, the data starts over", flush=True)
        else:
            self.train_dataloader.load_state_dict(data_state)
        queue = start.folder / TRANSFER_QUEUE_DIR
        if trainer.trainer_mode is not TrainerMode.sync and queue.exists():
            # verl restores it only when present; the step check is ours (a queue of another step would re-issue
            # prompts that step's weights already trained on).
            load_transfer_queue(queue, start.step)
            print(f"Restored TransferQueue state from {queue}", flush=True)
        return start

    def check_ranks_agree(self) -> str:
        digests = self.topology.actor_wg.weights_digest()
        if len(set(digests)) != 1:
            raise WeightsDivergedError(f"trainer ranks hold different weights: {digests}")
        return digests[0]

    def check_critic_ranks_agree(self) -> str:
        assert self.critic_wg is not None
        digests = self.critic_wg.weights_digest()
        if len(set(digests)) != 1:
            raise WeightsDivergedError(f"critic ranks hold different weights: {digests}")
        return digests[0]

    def check_rollout_has_trainer_weights(self) -> str:
        """The trained weights' digest, after checking that every replica serves exactly them."""
        digest = self.check_ranks_agree()
        served = ray.get([replica.servers[0].rollout_weights_digest.remote() for replica in self.topology.replicas])
        if any(d != digest for d in served):
            raise WeightsDivergedError(f"rollout replicas serve {served}, the trainer holds {digest}")
        return digest


def run_trainer(config: MiniPPOConfig) -> FinalReport:
    """Build the workers, replicas and weight sync, then train: the body of the job's ``TaskRunner``."""
    # One thread: the advantages are computed here, and a thread count change could change float sums.
    torch.set_num_threads(1)
    topology = build_topology(
        actor_config(config),
        world_size=config.trainer.n_workers,
        num_replicas=config.num_replicas,
        name_prefix=f"mini_ppo_{uuid.uuid4().hex[:8]}_",
    )
    return MiniPPOTrainer(config, topology).fit()
