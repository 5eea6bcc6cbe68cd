"""The trainer's workers: a verl ``Worker`` per data-parallel rank, driven through verl's ``RayWorkerGroup``.

The weight-sync surface (``update_weights``, ``execute_checkpoint_engine``) has the dispatch modes and
semantics of verl's ``ActorRolloutRefWorker`` in ``verl/workers/engine_workers.py``, so verl's
``CheckpointEngineManager`` drives it exactly as it drives the real one. In the hybrid layout (backend
"naive") each worker also serves a rollout replica from the same process, as verl's hybrid engine does.

With a critic, the same processes hold the value model too: verl colocates the roles that share a resource pool
in one process (``create_colocated_worker_cls``), names their methods ``<role>_<method>`` and hands the trainer
one worker group per role through ``RayWorkerGroup.spawn``, which strips the prefix. The ``critic_*`` methods
here are those names, so ``spawn({"critic"})`` gives the trainer verl's critic worker group API.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from verl.checkpoint_engine.base import CheckpointEngineRegistry
from verl.single_controller.base import Worker
from verl.single_controller.base.decorator import Dispatch, register
from verl.utils.distributed import initialize_global_process_group_ray
from verl.utils.import_utils import import_external_libs

from mini_ppo.checkpoint_io import checkpoint_manager
from mini_ppo.layout import ACTOR_DIR, CRITIC_DIR
from mini_ppo.model import PolicySpec, build_policy, build_value_model, named_weights, weights_digest
from mini_ppo.rollout import RolloutEngine, RolloutServerMixin


@dataclass(frozen=True)
class ActorConfig:
    policy: PolicySpec = field(default_factory=PolicySpec)
    seed: int = 1
    lr: float = 0.01
    clip_ratio: float = 0.2
    backend: str = "naive"
    bucket_megabytes: int = 1
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    custom_backend_module: str | None = None
    checkpoint_layout: str = "fsdp"
    """``fsdp`` or ``megatron``: the layout of the role folders this worker writes and reads."""
    use_critic: bool = False


def transformer_config(spec: PolicySpec, out_dim: int) -> dict[str, Any]:
    """What the Megatron layout's ``transformer_config.json`` says of a model here: its shape."""
    return {"num_layers": 2, "hidden_size": spec.hidden_dim, "input_size": spec.obs_dim, "output_size": out_dim}


class MiniActorWorker(Worker, RolloutServerMixin):
    def __init__(self, config: ActorConfig) -> None:
        super().__init__()
        # One thread per worker: two cores are shared by every worker, and thread count changes float sums.
        torch.set_num_threads(1)
        self.config = config

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_model(self) -> None:
        initialize_global_process_group_ray(backend="cpu:gloo")
        self.policy = build_policy(self.config.policy, self.config.seed)
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=self.config.lr)
        import_external_libs(self.config.custom_backend_module)
        self.checkpoint_engine = CheckpointEngineRegistry.new(
            self.config.backend,
            is_master=self.rank == 0,
            bucket_size=self.config.bucket_megabytes << 20,
            **self.config.engine_kwargs,
        )
        self.rollout_engine = RolloutEngine(self.config.policy)
        spec = self.config.policy
        self.checkpoint_manager = checkpoint_manager(
            self.config.checkpoint_layout,
            self.policy,
            self.optimizer,
            role=ACTOR_DIR,
            arch="MiniPPOPolicy",
            transformer_config=transformer_config(spec, spec.num_actions),
        )
        if self.config.use_critic:
            self.critic = build_value_model(spec, self.config.seed)
            # The actor's learning rate: the critic is there for its checkpoints, it needs no knob of its own.
            self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=self.config.lr)
            self.critic_checkpoint_manager = checkpoint_manager(
                self.config.checkpoint_layout,
                self.critic,
                self.critic_optimizer,
                role=CRITIC_DIR,
                arch="MiniPPOValueModel",
                transformer_config=transformer_config(spec, 1),
            )

    def _all_reduce_mean_grads(self, model: torch.nn.Module) -> None:
        """Average the gradients over the data-parallel ranks: one flat all-reduce, a fixed order of sums."""
        grads = [p.grad for p in model.parameters()]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def update_actor(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One PPO-clip step on this rank's shard of the batch; gradients averaged over ranks with gloo."""
        shard = {key: value[self.rank :: self.world_size] for key, value in batch.items()}
        log_probs = torch.log_softmax(self.policy(shard["obs"]), dim=-1)
        new_log_probs = log_probs.gather(-1, shard["actions"].unsqueeze(-1)).squeeze(-1)
        ratio = torch.exp(new_log_probs - shard["old_log_probs"])
        clipped = torch.clamp(ratio, 1 - self.config.clip_ratio, 1 + self.config.clip_ratio)
        loss = -torch.min(ratio * shard["advantages"], clipped * shard["advantages"]).mean()
        self.optimizer.zero_grad(set_to_none=False)
        loss.backward()
        self._all_reduce_mean_grads(self.policy)
        self.optimizer.step()
        return {"actor/loss": float(loss.detach()), "actor/ratio_mean": float(ratio.detach().mean())}

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def critic_update_critic(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One value-regression step towards the returns on this rank's shard. It draws no random number and
        touches nothing of the policy: the policy's updates are the same with or without it."""
        shard = {key: value[self.rank :: self.world_size] for key, value in batch.items()}
        values = self.critic(shard["obs"]).squeeze(-1)
        loss = torch.nn.functional.mse_loss(values, shard["returns"])
        self.critic_optimizer.zero_grad(set_to_none=False)
        loss.backward()
        self._all_reduce_mean_grads(self.critic)
        self.critic_optimizer.step()
        return {"critic/vf_loss": float(loss.detach())}

    @register(dispatch_mode=Dispatch.ONE_TO_ALL, blocking=False)
    async def update_weights(self, global_steps: int | None = None, mode: str = "auto") -> dict[str, Any]:
        """As verl's worker: send through the checkpoint engine, or (naive) load the colocated rollout."""
        effective_mode = mode if mode != "auto" else self.config.backend
        if effective_mode != "naive":
            if getattr(self, "_misbehaviour", {}).get("update_weights") == "raise_on_rank_0":
                return self._fail_on_rank_0_with_peers_pending()
            metrics = await self.checkpoint_engine.send_weights(named_weights(self.policy), global_steps=global_steps)
            return metrics or {}
        self.rollout_engine.resume(["weights"])
        self.rollout_engine.load_weights(named_weights(self.policy), global_steps)
        self.rollout_engine.resume(["kv_cache"])
        return {}

    def _fail_on_rank_0_with_peers_pending(self) -> dict[str, Any]:
        """How verl's NCCL engine fails when its only sender raises: rank 0 raises, the other ranks have walked the
        weight generator and returned with their collectives still queued, never waited on (checkpoint_engine/
        nccl_checkpoint_engine.py:327-332). A gloo collective started with ``async_op=True`` leaves a rank so."""
        if self.rank == 0:
            raise RuntimeError("rank 0 failed while sending the weights (set_misbehaviour)")
        flat = torch.cat([p.detach().reshape(-1) for p in self.policy.parameters()])
        self._pending_collective = dist.all_reduce(flat, async_op=True)  # kept alive, never waited on
        return {}

    @register(dispatch_mode=Dispatch.DP_COMPUTE, blocking=False)
    def execute_checkpoint_engine(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.checkpoint_engine, method)(*args, **kwargs)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def save_checkpoint(
        self, local_path: str, hdfs_path: str | None = None, global_step: int = 0, max_ckpt_to_keep: int | None = None
    ) -> None:
        """verl's worker API: every rank writes its own shard files into ``local_path`` (a step's ``actor/``)."""
        self.checkpoint_manager.save_checkpoint(local_path, hdfs_path, global_step, max_ckpt_to_keep)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def load_checkpoint(
        self, local_path: str, hdfs_path: str | None = None, del_local_after_load: bool = False
    ) -> None:
        self.checkpoint_manager.load_checkpoint(local_path, hdfs_path, del_local_after_load)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def weights_digest(self) -> str:
        return weights_digest(self.policy)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def critic_save_checkpoint(
        self, local_path: str, hdfs_path: str | None = None, global_step: int = 0, max_ckpt_to_keep: int | None = None
    ) -> None:
        """verl's critic worker API (a step's ``critic/``); its own manager, so its own rotation list."""
        self.critic_checkpoint_manager.save_checkpoint(local_path, hdfs_path, global_step, max_ckpt_to_keep)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def critic_load_checkpoint(
        self, local_path: str, hdfs_path: str | None = None, del_local_after_load: bool = False
    ) -> None:
        self.critic_checkpoint_manager.load_checkpoint(local_path, hdfs_path, del_local_after_load)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def critic_weights_digest(self) -> str:
        return weights_digest(self.critic)
