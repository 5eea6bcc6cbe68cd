"""Wiring: the trainer's worker group, the rollout replicas, and verl's ``CheckpointEngineManager`` over them."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import ray
from verl.checkpoint_engine.base import CheckpointEngineManager
from verl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup
from verl.workers.config import CheckpointEngineConfig, RolloutConfig

from mini_ppo.actor import ActorConfig, MiniActorWorker
from mini_ppo.rollout import MiniRolloutReplica

GLOO_ENGINE_MODULE = "mini_ppo.gloo_engine"


@dataclass
class WeightSyncTopology:
    actor_wg: RayWorkerGroup
    replicas: list[MiniRolloutReplica]
    manager: CheckpointEngineManager

    @property
    def hybrid(self) -> bool:
        return self.manager.backend == "naive"


def checkpoint_engine_config(actor: ActorConfig) -> CheckpointEngineConfig:
    return CheckpointEngineConfig(
        backend=actor.backend,
        update_weights_bucket_megabytes=actor.bucket_megabytes,
        engine_kwargs={actor.backend: dict(actor.engine_kwargs)} if actor.engine_kwargs else {},
        custom_backend_module=actor.custom_backend_module,
    )


def with_backend(actor: ActorConfig, backend: str) -> ActorConfig:
    """The actor config for ``backend``; every backend but "naive" is loaded from the CPU gloo engine module."""
    module = None if backend == "naive" else GLOO_ENGINE_MODULE
    return ActorConfig(**{**actor.__dict__, "backend": backend, "custom_backend_module": module})


def start_actor_group(actor: ActorConfig, world_size: int, name_prefix: str) -> RayWorkerGroup:
    """The trainer's workers, still starting up (Ray returns the handles before the actors are constructed)."""
    pool = RayResourcePool(process_on_nodes=[world_size], use_gpu=False, max_colocate_count=1)
    return RayWorkerGroup(
        resource_pool=pool,
        ray_cls_with_init=RayClassWithInitArgs(cls=ray.remote(MiniActorWorker), config=actor),
        name_prefix=f"{name_prefix}actor",
        use_gpu=False,
    )


def build_topology(actor: ActorConfig, world_size: int, num_replicas: int, name_prefix: str) -> WeightSyncTopology:
    """Start the trainer's workers and the rollout replicas, and put verl's manager over them.

    With backend "naive" the replicas are served by the trainer's own workers (verl's hybrid engine): one
    replica per trainer rank. Any other backend gets standalone replicas that receive the weights over the
    checkpoint engine.
    """
    actor_wg = start_actor_group(actor, world_size, name_prefix)
    engine_config = checkpoint_engine_config(actor)
    rollout_config = RolloutConfig(
        name="mini",
        tensor_model_parallel_size=1,
        data_parallel_size=1,
        pipeline_model_parallel_size=1,
        checkpoint_engine=engine_config,
    )
    if actor.backend == "naive" and num_replicas != world_size:
        raise ValueError(f"hybrid rollout (backend naive) needs one replica per trainer rank: {world_size}")
    replicas = [
        MiniRolloutReplica(replica_rank=rank, config=rollout_config, model_config=actor.policy, gpus_per_node=1)
        for rank in range(num_replicas)
    ]

    async def start_replicas() -> None:
        if actor.backend == "naive":
            # The trainer's workers serve the rollout: they must be initialised first.
            actor_wg.init_model()
            await asyncio.gather(*[replica.init_hybrid(actor_wg) for replica in replicas])
        else:
            # Every process imports verl on start-up (seconds each): let the trainer's workers initialise while
            # the rollout workers start, instead of one after the other.
            await asyncio.gather(
                *actor_wg.execute_all_async("init_model"),
                *[replica.init_standalone_cpu(name_prefix) for replica in replicas],
            )

    asyncio.run(start_replicas())
    manager = CheckpointEngineManager(config=engine_config, actor_wg=actor_wg, replicas=replicas)
    return WeightSyncTopology(actor_wg=actor_wg, replicas=replicas, manager=manager)


def replica_states(topology: WeightSyncTopology) -> list[dict]:
    """Each replica's serving state, for tests and for the trainer's sanity checks."""
    return ray.get([replica.servers[0].rollout_state.remote() for replica in topology.replicas])
