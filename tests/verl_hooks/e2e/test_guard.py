"""The guard on verl 0.9.1's real CheckpointEngineManager, on a real local Ray cluster.

The trainer side is verl's RayWorkerGroup over the mini-PPO job's workers; the rollout replicas are verl's
RolloutReplica with CPU servers that keep real state (generation paused or running, KV cache released or
present, weight version). Faults fire inside the real phases, so what the replicas are left with is what a
real failure at that point leaves, and the assertions are on that state.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator

import pytest
import ray
import torch

from mini_ppo.actor import ActorConfig
from mini_ppo.topology import WeightSyncTopology, build_topology, replica_states, with_backend
from tests.conftest import connect_driver
from verl_hooks import installer
from verl_hooks.errors import CleanupStatus, InjectedFault, WeightSyncFatalError, WeightSyncTimeout
from verl_hooks.faults import parse_fault_specs, rearm_injected_hangs, release_injected_hangs
from verl_hooks.phases import MULTI_PHASE_ORDER, CleanupStep, SyncPhase, plan_cleanup
from verl_hooks.settings import HookSettings

pytestmark = pytest.mark.ray

HEALTHY = {"generation": "running", "kv_cache": "present", "awake": True}
_steps = itertools.count(100)


@pytest.fixture(scope="module")
def driver(ray_cluster) -> Iterator[None]:
    connect_driver(ray_cluster)
    try:
        yield
    finally:
        ray.shutdown()
        installer.uninstall()


@pytest.fixture(scope="module")
def topologies(driver) -> dict[str, WeightSyncTopology]:
    return {}


@pytest.fixture(params=["naive", "cpu_gloo"])
def topology(request, topologies) -> WeightSyncTopology:
    backend = request.param
    if backend not in topologies:
        topologies[backend] = build_topology(
            with_backend(ActorConfig(), backend), world_size=2, num_replicas=2, name_prefix=f"guard_{backend}_"
        )
    return topologies[backend]


@pytest.fixture(autouse=True)
def released_hangs() -> Iterator[None]:
    """Injected blocking hangs park a thread; release them after each test so that none is left behind."""
    rearm_injected_hangs()
    yield
    release_injected_hangs()


def arm(faults: str = "", **overrides: float) -> HookSettings:
    """Install the guard in this process with short bounds, and let its faults fire again."""
    settings = HookSettings(
        **{"sync_timeout_s": 60.0, "cleanup_step_timeout_s": 10.0, "cancel_grace_s": 0.3, **overrides},
        hard_exit_grace_s=0,  # the backstop would end the pytest process
        faults=parse_fault_specs(faults),
    )
    installer.install(settings)
    installer.rearm_faults()
    return settings


def sync(topology: WeightSyncTopology, step: int):
    """One weight sync as verl's trainer runs it (the hybrid trainer puts the rollout to sleep first)."""
    if topology.hybrid:
        topology.manager.sleep_replicas()
    return topology.manager.update_weights(global_steps=step)


def healthy_start(topology: WeightSyncTopology) -> int:
    """A fault-free sync, so every test starts from serving replicas holding a known weight version."""
    arm()
    step = next(_steps)
    sync(topology, step)
    assert all(state == {**HEALTHY, "weight_version": step} for state in replica_states(topology))
    return step


def can_generate(topology: WeightSyncTopology) -> bool:
    obs = torch.zeros(4, ActorConfig().policy.obs_dim)
    results = ray.get([replica.servers[0].generate.remote(obs, 0) for replica in topology.replicas])
    return all(result["actions"].shape == (4,) for result in results)


def rollout_digest(topology: WeightSyncTopology) -> str:
    digests = set(ray.get([replica.servers[0].rollout_weights_digest.remote() for replica in topology.replicas]))
    assert len(digests) == 1, "replicas hold different weights"
    return digests.pop()


def test_successful_sync_returns_verls_result_unchanged(topology: WeightSyncTopology) -> None:
    healthy_start(topology)
    step = next(_steps)
    result = sync(topology, step)
    assert result == ({} if topology.hybrid else {"checkpoint_engine/buckets": 1})
    assert all(state["weight_version"] == step for state in replica_states(topology))
    assert set(topology.actor_wg.weights_digest()) == {rollout_digest(topology)}


def test_awaited_from_a_coroutine_as_the_fully_async_trainer_does(topology: WeightSyncTopology) -> None:
    healthy_start(topology)
    step = next(_steps)

    async def trainer_step() -> object:
        if topology.hybrid:
            await topology.manager.sleep_replicas()
        pending = topology.manager.update_weights(global_steps=step)
        assert asyncio.iscoroutine(pending)
        return await pending

    asyncio.run(trainer_step())
    assert all(state["weight_version"] == step for state in replica_states(topology))

    step += 1
    arm(f"{'naive' if topology.hybrid else 'finalize'}:raise@{step}")
    with pytest.raises(WeightSyncFatalError):
        asyncio.run(trainer_step())


def test_a_hang_after_fast_syncs_ends_at_a_deadline_learnt_from_them(topology: WeightSyncTopology) -> None:
    """The fixed limit (60 s here) stays for the first syncs; then 5 x the slowest recent one, at least 1 s."""
    arm(sync_adaptive_floor_s=1.0)
    for _ in range(3):
        sync(topology, next(_steps))
    step = next(_steps)
    arm(f"{'naive' if topology.hybrid else 'update_weights'}:hang@{step}", sync_adaptive_floor_s=1.0)
    with pytest.raises(WeightSyncFatalError) as raised:
        sync(topology, step)
    assert raised.value.hang
    assert 1.0 <= raised.value.elapsed_s < 10.0, "ended at the learnt deadline, not the fixed 60 s"
    assert "the adaptive limit" in raised.value.message
    assert can_generate(topology)


CASES = [("naive", SyncPhase.NAIVE, action) for action in ("raise", "hang")] + [
    ("cpu_gloo", phase, action) for phase in MULTI_PHASE_ORDER for action in ("raise", "hang")
]


@pytest.mark.parametrize(
    ("topology", "phase", "action"),
    CASES,
    indirect=["topology"],
    ids=[f"{b}-{p.value}-{a}" for b, p, a in CASES],
)
def test_failure_in_each_phase_is_typed_and_leaves_the_rollout_serving(
    topology: WeightSyncTopology, phase: SyncPhase, action: str
) -> None:
    previous = healthy_start(topology)
    step = next(_steps)
    settings = arm(f"{phase.value}:{action}@{step}", sync_timeout_s=3.0)

    with pytest.raises(WeightSyncFatalError) as raised:
        sync(topology, step)
    error = raised.value

    assert error.phase is phase
    assert (error.global_step, error.backend) == (step, topology.manager.backend)
    assert error.hang is (action == "hang")
    if action == "raise":
        assert isinstance(error.__cause__, InjectedFault)
        assert "InjectedFault" in error.cause_traceback
    else:
        assert isinstance(error.__cause__, WeightSyncTimeout)
        assert error.elapsed_s >= settings.sync_timeout_s
        assert "verl/checkpoint_engine/base.py" in error.stuck_stack, "the stack names where verl was stuck"

    entered = list(MULTI_PHASE_ORDER[: MULTI_PHASE_ORDER.index(phase) + 1]) if phase is not SyncPhase.NAIVE else [phase]
    expected_steps = plan_cleanup(entered, set(entered[:-1]))
    assert [o.step for o in error.cleanup] == [s.value for s in expected_steps]
    assert all(o.status is CleanupStatus.OK for o in error.cleanup), error.cleanup

    weights_were_copied = phase in (SyncPhase.FINALIZE, SyncPhase.RESUME_KV_CACHE, SyncPhase.RESUME_GENERATION)
    expected_version = step if weights_were_copied else previous
    assert replica_states(topology) == [{**HEALTHY, "weight_version": expected_version}] * 2
    assert can_generate(topology)


@pytest.mark.parametrize("topology", ["cpu_gloo"], indirect=True)
def test_cleanup_that_fails_or_hangs_is_reported_without_masking_the_failure(topology: WeightSyncTopology) -> None:
    healthy_start(topology)
    step = next(_steps)
    first, second = (replica.servers[0] for replica in topology.replicas)
    ray.get(first.set_misbehaviour.remote("resume_kv_cache", "hang"))
    ray.get(second.set_misbehaviour.remote("resume_generation", "raise"))
    try:
        arm(f"update_weights:raise@{step}", cleanup_step_timeout_s=1.0)
        with pytest.raises(WeightSyncFatalError) as raised:
            sync(topology, step)
    finally:
        ray.get(first.set_misbehaviour.remote("resume_kv_cache", None))
        ray.get(second.set_misbehaviour.remote("resume_generation", None))
    error = raised.value
    outcomes = {o.step: o for o in error.cleanup}
    assert outcomes[CleanupStep.FINALIZE_ENGINES.value].status is CleanupStatus.OK
    assert outcomes[CleanupStep.RESUME_KV_CACHE.value].status is CleanupStatus.TIMED_OUT
    assert outcomes[CleanupStep.RESUME_GENERATION.value].status is CleanupStatus.FAILED
    assert "rollout server failed in resume_generation" in outcomes[CleanupStep.RESUME_GENERATION.value].message
    assert isinstance(error.__cause__, InjectedFault), "the primary failure stays the cause"
    assert error.phase is SyncPhase.UPDATE_WEIGHTS
    assert "resume_kv_cache, resume_generation" in str(error)
