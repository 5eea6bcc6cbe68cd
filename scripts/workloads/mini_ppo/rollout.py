"""Rollout replicas for CPU, built on verl's own ``RolloutReplica`` and ``CheckpointEngineWorker``.

Each replica serves a copy of the policy and keeps the state verl's inference servers have and its weight sync
changes: generation running or paused, KV cache present or released, awake or asleep, and the version of the
weights it holds. It refuses to generate in a state a real server could not generate in, so a weight sync that
leaves a replica paused or without KV cache breaks the next rollout exactly as it would on GPUs.

Two layouts, as in verl:
- hybrid (checkpoint-engine backend "naive"): the trainer's own workers serve the rollout, and the weights are
  copied in-process;
- standalone (any other backend): each replica is a ``MiniRolloutWorker`` actor, a ``CheckpointEngineWorker``
  whose checkpoint engine receives the weights from the trainer over a real process group.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import ray
import torch
from verl.checkpoint_engine.base import CheckpointEngineWorker
from verl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup
from verl.workers.config import RolloutConfig
from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.replica import RolloutMode, RolloutReplica
from verl.workers.rollout.utils import ensure_async_iterator

from mini_ppo.model import PolicySpec, build_policy, weights_digest

KV_CACHE_ELEMENTS = 1 << 16


class RolloutUnavailable(RuntimeError):
    """A replica was asked to generate in a state where a real inference server could not."""


class RolloutEngine:
    """An in-process inference engine: the policy's weights plus the serving state around them."""

    def __init__(self, spec: PolicySpec) -> None:
        self.model = build_policy(spec, seed=0)  # placeholder weights until the first sync
        self.generation_paused = False
        self.awake = True
        self.kv_cache: torch.Tensor | None = torch.zeros(KV_CACHE_ELEMENTS)
        self.weight_version: int | None = None
        self.weights_loading = False

    def abort_all_requests(self) -> None:
        self.generation_paused = True

    def resume_generation(self) -> None:
        self.generation_paused = False

    def release_kv_cache(self) -> None:
        self.kv_cache = None

    def resume_kv_cache(self) -> None:
        if self.kv_cache is None:
            self.kv_cache = torch.zeros(KV_CACHE_ELEMENTS)

    def sleep(self) -> None:
        self.awake = False
        self.kv_cache = None

    def wake_up(self) -> None:
        self.awake = True
        self.resume_kv_cache()

    def resume(self, tags: Iterable[str]) -> None:
        """verl's ``BaseRollout.resume``: bring back "weights" and/or "kv_cache"."""
        tags = set(tags)
        if "weights" in tags:
            self.awake = True
        if "kv_cache" in tags:
            self.resume_kv_cache()

    def begin_weight_load(self) -> None:
        # Until finish_weight_load the weights are a mix of two versions, and the version says so (None).
        self.weights_loading = True
        self.weight_version = None

    def load_weight(self, name: str, tensor: torch.Tensor) -> None:
        with torch.no_grad():
            dict(self.model.named_parameters())[name].copy_(tensor)

    def finish_weight_load(self, version: int | None) -> None:
        self.weights_loading = False
        self.weight_version = version

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], version: int | None) -> None:
        """Copy weights in place, one tensor at a time, as a real server does (a failure part-way leaves them
        half-updated)."""
        self.begin_weight_load()
        for name, tensor in weights:
            self.load_weight(name, tensor)
        self.finish_weight_load(version)

    def generate(self, obs: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
        """Sample one action per observation with the weights held; the seed makes it reproducible."""
        if self.generation_paused:
            raise RolloutUnavailable("generation is paused (abort_all_requests without resume_generation)")
        if not self.awake:
            raise RolloutUnavailable("the replica is asleep")
        if self.kv_cache is None:
            raise RolloutUnavailable("the KV cache is released")
        if self.weights_loading or self.weight_version is None:
            raise RolloutUnavailable("the weights are not fully loaded")
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            logits = self.model(obs)
            log_probs = torch.log_softmax(logits, dim=-1)
            actions = torch.multinomial(log_probs.exp(), 1, generator=generator).squeeze(-1)
        return {"actions": actions, "log_probs": log_probs.gather(-1, actions.unsqueeze(-1)).squeeze(-1)}

    def state(self) -> dict[str, Any]:
        return {
            "generation": "paused" if self.generation_paused else "running",
            "kv_cache": "released" if self.kv_cache is None else "present",
            "awake": self.awake,
            "weight_version": self.weight_version,
        }


class RolloutServerMixin:
    """The server methods verl's ``RolloutReplica`` calls on ``replica.servers`` (all awaited ObjectRefs).

    ``set_misbehaviour`` makes one of them fail or hang from now on, as a broken inference server would: tests
    use it to check that cleanup after a failed sync reports such a server and is bounded in time.
    """

    rollout_engine: RolloutEngine
    _misbehaviour: dict[str, str]

    async def set_misbehaviour(self, method: str, action: str | None) -> None:
        """``raise_on_rank_0`` is for a trainer worker's ``update_weights`` (``mini_ppo.actor``)."""
        if action not in (None, "raise", "hang", "raise_on_rank_0"):
            raise ValueError(f"misbehaviour must be raise, hang, raise_on_rank_0 or None, not {action!r}")
        if not hasattr(self, "_misbehaviour"):
            self._misbehaviour = {}
        if action is None:
            self._misbehaviour.pop(method, None)
        else:
            self._misbehaviour[method] = action

    async def _serve(self, method: str) -> None:
        action = getattr(self, "_misbehaviour", {}).get(method)
        if action == "raise":
            raise RuntimeError(f"rollout server failed in {method} (set_misbehaviour)")
        if action == "hang":
            await asyncio.Event().wait()

    async def abort_all_requests(self, reject_request: bool = False) -> None:
        await self._serve("abort_all_requests")
        self.rollout_engine.abort_all_requests()

    async def resume_generation(self) -> None:
        await self._serve("resume_generation")
        self.rollout_engine.resume_generation()

    async def release_kv_cache(self) -> None:
        await self._serve("release_kv_cache")
        self.rollout_engine.release_kv_cache()

    async def resume_kv_cache(self) -> None:
        await self._serve("resume_kv_cache")
        self.rollout_engine.resume_kv_cache()

    async def clear_kv_cache(self) -> None:
        await self._serve("clear_kv_cache")
        self.rollout_engine.resume_kv_cache()

    async def sleep(self) -> None:
        await self._serve("sleep")
        self.rollout_engine.sleep()

    async def wake_up(self) -> None:
        await self._serve("wake_up")
        self.rollout_engine.wake_up()

    async def generate(self, obs: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
        await self._serve("generate")
        return self.rollout_engine.generate(obs, seed)

    async def rollout_state(self) -> dict[str, Any]:
        return self.rollout_engine.state()

    async def rollout_weights_digest(self) -> str:
        return weights_digest(self.rollout_engine.model)


class MiniServerAdapter(BaseRollout):
    """verl's server adapter: what a ``CheckpointEngineWorker`` hands received weights to."""

    def __init__(self, engine: RolloutEngine) -> None:  # no super().__init__: there is no HF model config
        self.engine = engine

    async def resume(self, tags: list[str]) -> None:
        self.engine.resume(tags)

    async def release(self) -> None:
        self.engine.sleep()

    async def update_weights(self, weights: Any, wire_format: str = "named_tensors", **kwargs: Any) -> None:
        if wire_format != "named_tensors":
            raise NotImplementedError(f"mini rollout only understands named_tensors, not {wire_format}")
        self.engine.begin_weight_load()
        async for name, tensor in ensure_async_iterator(weights):
            # The tensor may be a view into the checkpoint engine's receive bucket: copy it before the next one.
            self.engine.load_weight(name, tensor)
        self.engine.finish_weight_load(kwargs.get("global_steps"))


class MiniRolloutWorker(CheckpointEngineWorker, RolloutServerMixin):
    """A standalone replica's only worker: verl's ``CheckpointEngineWorker`` plus the server it feeds."""

    def __init__(self, rollout_config: RolloutConfig, model_config: PolicySpec, replica_rank: int = 0) -> None:
        torch.set_num_threads(1)
        self.rollout_engine = RolloutEngine(model_config)
        super().__init__(rollout_config, model_config, server_adapter=MiniServerAdapter(self.rollout_engine))
        self.replica_rank = replica_rank


class MiniRolloutReplica(RolloutReplica):
    """verl's ``RolloutReplica`` on CPU, one worker per replica (tensor, data and pipeline parallel size 1)."""

    def rollout_worker_use_gpu(self) -> bool:
        return False

    def get_ray_class_with_init_args(self) -> RayClassWithInitArgs:
        return RayClassWithInitArgs(
            cls=ray.remote(MiniRolloutWorker),
            rollout_config=self.config,
            model_config=self.model_config,
            replica_rank=self.replica_rank,
        )

    async def init_standalone_cpu(self, name_prefix: str) -> None:
        """Standalone layout on a CPU resource pool of its own (verl's ``init_standalone`` asks for GPUs)."""
        self.rollout_mode = RolloutMode.STANDALONE
        self.resource_pool = RayResourcePool(process_on_nodes=[1], use_gpu=False, max_colocate_count=1)
        worker_group = RayWorkerGroup(
            resource_pool=self.resource_pool,
            ray_cls_with_init=self.get_ray_class_with_init_args(),
            bin_pack=False,
            name_prefix=f"{name_prefix}rollout_{self.replica_rank}",
            use_gpu=False,
        )
        self.workers = worker_group.workers
        await self.launch_servers()

    async def launch_servers(self) -> None:
        # The worker is its own server: no HTTP front end, generation is called on the actor directly. Ray
        # returns actor handles before the actors are constructed; like a real server launch, wait until the
        # servers answer, so that start-up time is not charged to the first weight sync.
        self.servers = list(self.workers)
        self._server_handle = self.servers[0]
        await asyncio.gather(*[server.rollout_state.remote() for server in self.servers])

    async def generate(self, obs: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
        return await self.servers[0].generate.remote(obs, seed)

    async def state(self) -> dict[str, Any]:
        states = await asyncio.gather(*[server.rollout_state.remote() for server in self.servers])
        return states[0]
