"""The emergency save on verl 0.9.1's own trainers, on a real local Ray cluster.

verl's V1 ``PPOTrainerSync`` is built with ``__new__``, as verl's own CPU tests build their workers
(``tests/checkpoint_engine/test_global_steps_on_cpu.py`` in the installed package), and its real ``fit``
(``verl/trainer/ppo/v1/trainer_base.py:412-531``) runs: its save when due (481-485), ``on_step_end`` → the guarded
``update_weights(self.global_steps)`` of verl's real ``CheckpointEngineManager`` (trainer_sync.py:35-38), its
increment (520). The manager stands over the mini-PPO job's workers and rollout replicas, the naive path and the
multi-phase ``cpu_gloo`` one; verl's real ``_save_checkpoint`` (948-1029) writes through verl's ``RayWorkerGroup``
into real files. Stand-ins only for what needs a GPU, a dataset or TransferQueue: ``step()`` (rollout and training),
the metrics, TransferQueue's clear, the dataloader's state. The config is verl's own ``ppo_trainer.yaml``, composed.

verl's legacy ``RayPPOTrainer`` (an instance by ``__new__`` too) is checked through the hook's own entry, with
verl's real ``_save_checkpoint`` and its critic warm-up rule (ray_trainer.py:1684-1686).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import ray
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict

from mini_ppo.actor import ActorConfig
from mini_ppo.topology import WeightSyncTopology, build_topology, with_backend
from tests.conftest import connect_driver
from verl_hooks import installer, trainers
from verl_hooks.contract import EmergencyStatus, EmergencyTrigger
from verl_hooks.errors import StopRequested, WeightSyncFatalError
from verl_hooks.faults import parse_fault_specs, rearm_injected_hangs, release_injected_hangs
from verl_hooks.phases import MULTI_PHASE_ORDER, SyncPhase
from verl_hooks.settings import HookSettings

pytestmark = pytest.mark.ray

SAVE_FREQ = 3
FAILING_STEP = 5
"""Not a multiple of SAVE_FREQ: only an emergency save can write it."""
TOTAL_STEPS = 6
_names = itertools.count()


@pytest.fixture(scope="module")
def verl_config() -> DictConfig:
    import verl

    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose(
            "ppo_trainer",
            overrides=[
                f"trainer.save_freq={SAVE_FREQ}",
                "trainer.test_freq=-1",
                "trainer.val_before_train=false",
                "trainer.logger=[console]",
                f"trainer.total_training_steps={TOTAL_STEPS}",
            ],
        )


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


def topology_for(topologies: dict[str, WeightSyncTopology], backend: str) -> WeightSyncTopology:
    if backend not in topologies:
        topologies[backend] = build_topology(
            with_backend(ActorConfig(), backend), world_size=2, num_replicas=2, name_prefix=f"emergency_{backend}_"
        )
    return topologies[backend]


@pytest.fixture(autouse=True)
def released_hangs() -> Iterator[None]:
    rearm_injected_hangs()
    yield
    release_injected_hangs()


def arm(faults: str, **overrides: Any) -> HookSettings:
    settings = HookSettings(
        **{"sync_timeout_s": 60.0, "cleanup_step_timeout_s": 10.0, "cancel_grace_s": 0.3, **overrides},
        hard_exit_grace_s=0,  # the backstop would end the pytest process
        faults=parse_fault_specs(faults),
    )
    installer.install(settings)
    installer.rearm_faults()
    return settings


class SavedSteps:
    """Stands between verl's trainer and its actor worker group, noting each step verl saves through it."""

    def __init__(self, worker_group: Any) -> None:
        self._wg = worker_group
        self.steps: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wg, name)

    def save_checkpoint(self, local_path: str, hdfs_path: Any, global_step: int, **kwargs: Any) -> Any:
        self.steps.append(global_step)
        return self._wg.save_checkpoint(local_path, hdfs_path, global_step, **kwargs)


def v1_trainer(topology: WeightSyncTopology, config: DictConfig, root: Path, **trainer_keys: Any):
    """verl's PPOTrainerSync, built with ``__new__`` and given what its fit and _save_checkpoint read."""
    from verl.trainer.ppo.checkpoint_callback import build_checkpoint_callback
    from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

    config = config.copy()
    with open_dict(config):
        config.trainer.default_local_dir = str(root)
        config.trainer.project_name = config.trainer.experiment_name = f"emergency-{next(_names)}"
        for key, value in trainer_keys.items():
            config.trainer[key] = value
    trainer = PPOTrainerSync.__new__(PPOTrainerSync)
    trainer.config = config
    trainer.checkpoint_manager = topology.manager
    trainer.actor_rollout_wg = SavedSteps(topology.actor_wg)
    trainer.use_critic = trainer.use_reference_policy = False
    trainer.trainer_mode = "sync"
    trainer.global_steps = 0
    trainer.steps_per_epoch = 100
    trainer.total_training_steps = TOTAL_STEPS
    trainer.train_dataloader = SimpleNamespace(state_dict=lambda: {"batches_served": trainer.global_steps})
    trainer.checkpoint_callback = build_checkpoint_callback(config)
    trainer._init_dump_executor()

    def step(metrics: dict, timing_raw: dict) -> Any:
        # The rollout and the update need GPUs and a dataset; the hybrid trainer's rollout ends asleep.
        if topology.hybrid:
            topology.manager.sleep_replicas()
        return SimpleNamespace(keys=[], partition_id="train")

    trainer.step = step
    trainer._reissue_inflight_prompts = lambda *args, **kwargs: 0
    trainer._compute_metrics = lambda *args, **kwargs: None
    return trainer


@pytest.fixture
def no_transfer_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    from verl.trainer.ppo.v1 import trainer_base

    monkeypatch.setattr(trainer_base, "tq", SimpleNamespace(kv_clear=lambda **kwargs: None))


def fit_until_failure(trainer: Any) -> WeightSyncFatalError:
    with pytest.raises(WeightSyncFatalError) as raised:
        trainer.fit(agent_loop_manager=None)
    return raised.value


def tracker(root: Path) -> str:
    return (root / "latest_checkpointed_iteration.txt").read_text()


# The default suite keeps the naive path and two multi-phase phases (a trainer phase, a rollout one); -m slow, all.
DEFAULT_SUITE_PHASES = (SyncPhase.NAIVE, SyncPhase.UPDATE_WEIGHTS, SyncPhase.RESUME_GENERATION)
CASES = [
    pytest.param(
        backend,
        phase,
        "raise",
        id=f"{backend}-{phase.value}-raise",
        marks=() if phase in DEFAULT_SUITE_PHASES else pytest.mark.slow,
    )
    for backend, phase in [("naive", SyncPhase.NAIVE), *(("cpu_gloo", p) for p in MULTI_PHASE_ORDER)]
]


@pytest.mark.parametrize(("backend", "phase", "action"), CASES)
def test_a_failed_sync_whose_trainer_side_finished_is_saved_at_its_step_by_verls_own_save(
    topologies, verl_config, no_transfer_queue, tmp_path: Path, backend: str, phase: SyncPhase, action: str
) -> None:
    topology = topology_for(topologies, backend)
    trainer = v1_trainer(topology, verl_config, tmp_path)
    arm(f"{phase.value}:{action}@{FAILING_STEP}")

    error = fit_until_failure(trainer)

    assert (error.phase, error.global_step) == (phase, FAILING_STEP)
    assert error.trainer_side["idle"] is True, error.trainer_side
    assert error.emergency_checkpoint["status"] == EmergencyStatus.SAVED.value, error.emergency_checkpoint
    assert error.emergency_checkpoint["trigger"] == EmergencyTrigger.SYNC_FAILURE.value
    assert trainer.actor_rollout_wg.steps == [SAVE_FREQ, FAILING_STEP], "the periodic save, then the emergency one"
    step_dir = tmp_path / f"global_step_{FAILING_STEP}"
    assert sorted(p.name for p in step_dir.iterdir()) == ["actor", "data.pt"]
    assert any((step_dir / "actor").iterdir()), "every rank's shard files"
    assert tracker(tmp_path) == str(FAILING_STEP), "verl's tracker, written last, names the emergency step"


@pytest.fixture
def stranded_topology(driver) -> Iterator[WeightSyncTopology]:
    """A topology of its own: its trainer rank 0 is left blocked in a rendezvous (a sync method of an async actor,
    which holds the actor's loop until the group's timeout), so its actors are killed after the test."""
    topology = build_topology(
        with_backend(ActorConfig(), "cpu_gloo"), world_size=2, num_replicas=2, name_prefix="emergency_stranded_"
    )
    try:
        yield topology
    finally:
        for actor in [*topology.actor_wg.workers, *(s for r in topology.replicas for s in r.servers)]:
            ray.kill(actor)


@pytest.mark.slow  # a topology of its own, killed after (the decision itself: test_emergency_policy.py)
def test_a_trainer_task_still_in_flight_is_never_saved_over(
    stranded_topology: WeightSyncTopology, verl_config, no_transfer_queue, tmp_path: Path
) -> None:
    trainer = v1_trainer(stranded_topology, verl_config, tmp_path)
    # The trainer's init_process_group tasks start, and wait in the group's rendezvous for a rollout that never
    # comes: a save now would run beside them.
    arm(f"build_process_group:strand@{FAILING_STEP}", trainer_idle_wait_s=0.5)

    error = fit_until_failure(trainer)

    assert error.trainer_side["idle"] is False
    assert "still running" in error.trainer_side["reason"]
    assert error.emergency_checkpoint["status"] == EmergencyStatus.SKIPPED.value
    assert "trainer side is not idle" in error.emergency_checkpoint["reason"]
    assert trainer.actor_rollout_wg.steps == [SAVE_FREQ], "nothing saved after the periodic save"
    assert not (tmp_path / f"global_step_{FAILING_STEP}").exists()
    assert tracker(tmp_path) == str(SAVE_FREQ)


@pytest.mark.slow  # a deadline to wait out; the supervisor's benchmark measures the same on every hang
def test_a_hung_sync_whose_trainer_tasks_never_started_is_saved(
    topologies, verl_config, no_transfer_queue, tmp_path: Path
) -> None:
    topology = topology_for(topologies, "cpu_gloo")
    trainer = v1_trainer(topology, verl_config, tmp_path)
    arm(f"update_weights:hang@{FAILING_STEP}", sync_timeout_s=3.0)

    error = fit_until_failure(trainer)

    assert error.hang is True
    assert error.emergency_checkpoint["status"] == EmergencyStatus.SAVED.value, error.trainer_side
    assert trainer.actor_rollout_wg.steps == [SAVE_FREQ, FAILING_STEP]


def test_a_step_saved_before_its_sync_is_not_saved_twice(
    topologies, verl_config, no_transfer_queue, tmp_path: Path
) -> None:
    topology = topology_for(topologies, "naive")
    trainer = v1_trainer(topology, verl_config, tmp_path)
    arm(f"naive:raise@{SAVE_FREQ}")

    error = fit_until_failure(trainer)

    assert error.emergency_checkpoint["status"] == EmergencyStatus.SKIPPED.value
    assert error.emergency_checkpoint["reason"] == f"step {SAVE_FREQ} is already saved"
    assert trainer.actor_rollout_wg.steps == [SAVE_FREQ]


def test_the_emergency_save_rotates_nothing_before_the_step_is_complete(
    topologies, verl_config, no_transfer_queue, tmp_path: Path
) -> None:
    """verl rotates when it saves (ensure_checkpoint_capacity / register_checkpoint): with a keep of 1 the periodic
    step would go as the emergency step is written. The supervisor rotates once the step is judged complete."""
    topology = topology_for(topologies, "naive")
    trainer = v1_trainer(topology, verl_config, tmp_path, max_actor_ckpt_to_keep=1)
    arm(f"naive:raise@{FAILING_STEP}")

    error = fit_until_failure(trainer)

    assert error.emergency_checkpoint["status"] == EmergencyStatus.SAVED.value
    assert any((tmp_path / f"global_step_{SAVE_FREQ}" / "actor").iterdir()), "the periodic step is whole"
    assert any((tmp_path / f"global_step_{FAILING_STEP}" / "actor").iterdir())


def test_a_save_past_its_deadline_is_given_up_and_said(
    topologies, verl_config, no_transfer_queue, tmp_path: Path
) -> None:
    topology = topology_for(topologies, "naive")
    trainer = v1_trainer(topology, verl_config, tmp_path)
    arm(f"naive:raise@{FAILING_STEP},emergency_save:hang@{FAILING_STEP}", emergency_save_timeout_s=1.0)

    error = fit_until_failure(trainer)

    assert error.emergency_checkpoint["status"] == EmergencyStatus.TIMED_OUT.value
    assert error.emergency_checkpoint["deadline_s"] == 1.0
    assert not (tmp_path / f"global_step_{FAILING_STEP}" / "data.pt").exists(), "the save stopped half-way"
    assert tracker(tmp_path) == str(SAVE_FREQ)


def test_a_stop_request_saves_the_step_right_after_its_sync_and_ends_fit(
    topologies, verl_config, no_transfer_queue, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from verl_hooks import heartbeat

    topology = topology_for(topologies, "naive")
    trainer = v1_trainer(topology, verl_config, tmp_path)
    arm("")
    requested = iter([False, False, False, True])  # the answer to the beats of step 4's sync asks for it
    monkeypatch.setattr(heartbeat, "save_requested", lambda: next(requested, True))

    with pytest.raises(StopRequested) as raised:
        trainer.fit(agent_loop_manager=None)

    assert raised.value.global_step == 4
    assert raised.value.emergency_checkpoint["status"] == EmergencyStatus.SAVED.value
    assert raised.value.emergency_checkpoint["trigger"] == EmergencyTrigger.STOP_REQUEST.value
    assert trainer.actor_rollout_wg.steps == [SAVE_FREQ, 4]
    assert tracker(tmp_path) == "4"


def test_verls_trainers_are_hooked_and_checked_by_fingerprint(driver) -> None:
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer

    arm("")
    assert trainers.is_hooked(PPOTrainer)
    assert trainers.is_hooked(RayPPOTrainer)

    class Changed(PPOTrainer):
        def fit(self, agent_loop_manager: Any) -> None:  # a body verl never had
            self.on_step_end()

    with pytest.raises(trainers.IncompatibleVerlError, match=r"PPOTrainer\.fit \(fingerprint"):
        check_as_verls(Changed)


def check_as_verls(cls: type) -> None:
    """Check a class against the fingerprints of verl's V1 trainer, as the hook checks verl's own."""
    cls.__name__ = "PPOTrainer"
    trainers.check_verl_trainer(cls, trainers.V1_MODULE)


@pytest.mark.parametrize(("warmup", "expected"), [(0, EmergencyStatus.SAVED), (10, EmergencyStatus.SKIPPED)])
def test_verls_legacy_trainer_saves_through_its_own_save_except_in_critic_warmup(
    topologies, verl_config, tmp_path: Path, warmup: int, expected: EmergencyStatus
) -> None:
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer

    settings = arm(f"naive:raise@{FAILING_STEP}")
    topology = topology_for(topologies, "naive")
    config = verl_config.copy()
    with open_dict(config):
        config.trainer.default_local_dir = str(tmp_path)
        config.trainer.use_v1 = False
        config.trainer.critic_warmup = warmup
    trainer = RayPPOTrainer.__new__(RayPPOTrainer)
    trainer.config = config
    trainer.actor_rollout_wg = SavedSteps(topology.actor_wg)
    trainer.use_critic = False
    trainer.train_dataloader = SimpleNamespace(state_dict=lambda: {"batches_served": FAILING_STEP})
    trainer.global_steps = FAILING_STEP
    topology.manager.sleep_replicas()
    with pytest.raises(WeightSyncFatalError) as raised:
        topology.manager.update_weights(FAILING_STEP)  # the sync at ray_trainer.py:1716
    error = raised.value

    trainers._checkpoint_after(trainer, error, installer._state, skips_critic_warmup=True)

    assert error.emergency_checkpoint["status"] == expected.value, error.emergency_checkpoint
    assert trainer.actor_rollout_wg.steps == ([FAILING_STEP] if expected is EmergencyStatus.SAVED else [])
    if expected is EmergencyStatus.SAVED:
        assert tracker(tmp_path) == str(FAILING_STEP)
        assert (tmp_path / f"global_step_{FAILING_STEP}" / "data.pt").is_file()
    else:
        assert "critic warm-up" in error.emergency_checkpoint["reason"]
    assert settings.emergency_save
    assert OmegaConf.select(config, "trainer.max_actor_ckpt_to_keep") is None, "verl's config is left as it was"


def test_verls_fully_async_trainer_says_why_it_saved_nothing(topologies) -> None:
    """It syncs before it saves (fully_async_trainer.py:594, then 599): its real async ``fit`` runs (instance by
    ``__new__``), with ``fit_step`` standing in for a step whose awaited sync fails."""
    import asyncio

    from verl.experimental.fully_async_policy import fully_async_trainer

    arm(f"naive:raise@{FAILING_STEP}")
    FullyAsyncTrainer = trainers.user_class(fully_async_trainer.FullyAsyncTrainer)  # it is a @ray.remote class
    assert trainers.is_hooked(FullyAsyncTrainer)
    topology = topology_for(topologies, "naive")
    trainer = FullyAsyncTrainer.__new__(FullyAsyncTrainer)
    trainer.message_queue_client = trainer.rollouter = object()
    trainer.global_steps = FAILING_STEP - 1

    async def fit_step() -> None:
        await topology.manager.sleep_replicas()
        await topology.manager.update_weights(trainer.global_steps)  # awaited, as _fit_update_weights does

    trainer.fit_step = fit_step
    with pytest.raises(WeightSyncFatalError) as raised:
        asyncio.run(trainer.fit())

    skipped = raised.value.emergency_checkpoint
    assert (skipped["status"], skipped["step"]) == (EmergencyStatus.SKIPPED.value, FAILING_STEP)
    assert skipped["reason"].startswith("verl's fully-async trainer syncs before it saves")
