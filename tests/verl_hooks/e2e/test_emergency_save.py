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

import contextlib
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
from verl_hooks.errors import StopRequested, WeightSyncFatalError, find_step_failure_checkpoint
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


# The default suite keeps the naive path (the multi-phase topology's start-up alone is half a minute); -m slow, all.
DEFAULT_SUITE_PHASES = (SyncPhase.NAIVE,)
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


@contextlib.contextmanager
def topology_of_its_own(backend: str, prefix: str) -> Iterator[WeightSyncTopology]:
    """A topology for one test, whose actors are killed after it: a test that leaves a rank blocked, with
    collectives pending, or dead must not hand it on."""
    topology = build_topology(
        with_backend(ActorConfig(), backend), world_size=2, num_replicas=2, name_prefix=f"emergency_{prefix}_"
    )
    try:
        yield topology
    finally:
        for actor in [*topology.actor_wg.workers, *(s for r in topology.replicas for s in r.servers)]:
            ray.kill(actor)


@pytest.fixture
def stranded_topology(driver) -> Iterator[WeightSyncTopology]:
    """Its trainer rank 0 is left blocked in a rendezvous (a sync method of an async actor, which holds the
    actor's loop until the group's timeout)."""
    with topology_of_its_own("cpu_gloo", "stranded") as topology:
        yield topology


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


@pytest.fixture
def own_topology(driver) -> Iterator[WeightSyncTopology]:
    """Its trainer rank 1 may be left with a collective pending."""
    with topology_of_its_own("cpu_gloo", "pending") as topology:
        yield topology


@pytest.mark.slow  # a topology of its own, killed after (the verdict itself: test_emergency_policy.py's judge table)
def test_a_sync_whose_sender_raised_with_its_peers_collectives_pending_is_never_saved_over(
    own_topology: WeightSyncTopology, verl_config, no_transfer_queue, tmp_path: Path
) -> None:
    """Finding 2: rank 0 raises in update_weights; rank 1 returned with an all-reduce started and never waited on
    (what NCCL leaves). Every task has settled, but one raised: the save's barrier would pair with rank 1's pending
    collective, so nothing is saved."""
    ray.get([w.set_misbehaviour.remote("update_weights", "raise_on_rank_0") for w in own_topology.actor_wg.workers])
    trainer = v1_trainer(own_topology, verl_config, tmp_path)
    arm("", trainer_idle_wait_s=2.0)

    error = fit_until_failure(trainer)

    assert error.phase is SyncPhase.UPDATE_WEIGHTS
    assert error.trainer_side["idle"] is False
    assert error.trainer_side["reason"].endswith(
        "trainer task(s) of the sync raised (RuntimeError: rank 0 failed while sending the weights "
        "(set_misbehaviour)): their peers may still have collectives pending"
    )
    assert error.emergency_checkpoint["status"] == EmergencyStatus.SKIPPED.value, error.emergency_checkpoint
    assert error.emergency_checkpoint["reason"].startswith("the trainer side is not idle: ")
    assert trainer.actor_rollout_wg.steps == [], "no save ran beside the pending collective"


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


# --- failures outside the sync, on verl's own V1 trainer ------------------------------------------------------


class CountingLoader:
    """The trainer's dataloader: its state counts the batches it yielded, as a StatefulDataLoader's does."""

    def __init__(self) -> None:
        self.served = 0

    def draw(self) -> None:
        self.served += 1

    def state_dict(self) -> dict[str, int]:
        return {"batches_served": self.served}


class RolloutGeneration:
    """Stands in for verl's AgentLoopManager: generation on the topology's real rollout servers (Ray calls)."""

    def __init__(self, topology: WeightSyncTopology) -> None:
        self.topology = topology

    def generate_sequences(self, batch: Any) -> None:
        ray.get([server.generate.remote(ray_obs(), 0) for r in self.topology.replicas for server in r.servers[:1]])


def ray_obs() -> Any:
    import torch

    return torch.zeros(2, ActorConfig().policy.obs_dim)


class UpdatingWorkers(SavedSteps):
    """verl's V1 ``_update_actor`` calls ``actor_rollout_wg.update_actor(batch)`` and reads its metrics
    (trainer_base.py:1861-1864): here each rank answers (a real task on every worker) with metrics of verl's shape."""

    def update_actor(self, batch: Any) -> dict:
        self._wg.weights_digest()
        return {"metrics": {"mfu": [0.0], "pg_loss": [0.0]}}


def v1_stepping_trainer(topology: WeightSyncTopology, config: DictConfig, root: Path, after_updates: Any = None):
    """verl's PPOTrainerSync whose step runs verl's own hooked methods in verl's order: the batch drawn, then
    ``_submit_batch_to_rollout`` (trainer_base.py:1496; TransferQueue stood in for, generation on the real rollout
    servers), ``on_sample_end`` (the colocated replicas to sleep; a standalone rollout stays awake),
    ``_update_actor`` (trainer_base.py:1827)."""
    trainer = v1_trainer(topology, config, root)
    trainer.actor_rollout_wg = UpdatingWorkers(topology.actor_wg)
    trainer.train_dataloader = loader = CountingLoader()
    trainer.curr_step_profile = False

    def step(metrics: dict, timing_raw: dict) -> Any:
        loader.draw()  # verl draws the step's batch before it generates (trainer_base.py:1471)
        trainer._submit_batch_to_rollout({"uid": [f"prompt-{trainer.global_steps}"]})
        if topology.hybrid:
            trainer.on_sample_end()  # sync mode's: the colocated replicas to sleep (trainer_sync.py:40-42)
        trainer._update_actor(SimpleNamespace(extra_info={}), metrics)
        if after_updates is not None:
            after_updates(trainer.global_steps)
        return SimpleNamespace(keys=[], partition_id="train")

    trainer.step = step
    return trainer


@pytest.fixture
def transfer_queue_put(monkeypatch: pytest.MonkeyPatch) -> None:
    from verl.trainer.ppo.v1 import trainer_base

    monkeypatch.setattr(
        trainer_base, "tq", SimpleNamespace(kv_clear=lambda **kwargs: None, kv_batch_put=lambda **kwargs: None)
    )


def fit_until(trainer: Any, topology: WeightSyncTopology, error: type[BaseException]) -> BaseException:
    if topology.hybrid:
        topology.manager.sleep_replicas()  # verl's colocated rollout starts asleep
    trainer.on_init_end()  # verl's init_workers ends with it: the sync of the loaded step, before fit
    with pytest.raises(error) as raised:
        trainer.fit(agent_loop_manager=RolloutGeneration(topology))
    return raised.value


def saved_data_state(root: Path, step: int) -> dict:
    import torch

    return torch.load(root / f"global_step_{step}" / "data.pt", weights_only=False)


@pytest.mark.parametrize("backend", ["naive", pytest.param("cpu_gloo", marks=pytest.mark.slow)])
def test_a_generation_failure_saves_the_step_before_with_its_dataloader_state(
    topologies, verl_config, transfer_queue_put, tmp_path: Path, backend: str
) -> None:
    from verl_hooks.errors import InjectedFault

    topology = topology_for(topologies, backend)
    trainer = v1_stepping_trainer(topology, verl_config, tmp_path)
    arm(f"generate:raise@{FAILING_STEP}")

    error = fit_until(trainer, topology, InjectedFault)

    saved = error.verl_hooks_emergency_checkpoint
    assert (saved["status"], saved["trigger"], saved["step"], saved["failed_step"]) == (
        EmergencyStatus.SAVED.value,
        EmergencyTrigger.STEP_FAILURE.value,
        FAILING_STEP - 1,
        FAILING_STEP,
    ), saved
    assert trainer.actor_rollout_wg.steps == [SAVE_FREQ, FAILING_STEP - 1]
    assert tracker(tmp_path) == str(FAILING_STEP - 1)
    # Step 5's batch was drawn before the generation failed: step 4 is saved as its sync left the dataloader.
    assert trainer.train_dataloader.served == FAILING_STEP
    assert saved_data_state(tmp_path, FAILING_STEP - 1) == {"batches_served": FAILING_STEP - 1}
    assert trainer.global_steps == FAILING_STEP, "the trainer itself is left as it was"


@pytest.mark.slow  # a topology of its own per backend (the decisions: test_emergency_policy.py)
@pytest.mark.parametrize("backend", ["cpu_gloo", "naive"])
def test_a_rollout_servers_death_during_generation_saves_the_step_before_when_the_trainer_survives(
    driver, verl_config, transfer_queue_put, tmp_path: Path, backend: str
) -> None:
    """A replica's server process SIGKILLed as step 5 generates. Standalone, the trainer survives and saves step 4;
    colocated (naive), the server is a trainer worker: it does not answer, and nothing is saved."""
    with topology_of_its_own(backend, f"death_{backend}") as topology:
        trainer = v1_stepping_trainer(topology, verl_config, tmp_path)
        arm(f"generate:exit@{FAILING_STEP}")

        error = fit_until(trainer, topology, ray.exceptions.RayActorError)

        outcome = find_step_failure_checkpoint(error)
        if backend == "cpu_gloo":
            assert (outcome["status"], outcome["step"]) == (EmergencyStatus.SAVED.value, FAILING_STEP - 1), outcome
            assert saved_data_state(tmp_path, FAILING_STEP - 1) == {"batches_served": FAILING_STEP - 1}
        else:
            assert outcome["status"] == EmergencyStatus.SKIPPED.value
            assert outcome["reason"] == "trainer worker(s) not answering: actor_rollout_wg rank 0"
            assert trainer.actor_rollout_wg.steps == [SAVE_FREQ]


def test_an_update_that_raised_is_never_saved_over(topologies, verl_config, transfer_queue_put, tmp_path: Path) -> None:
    from verl_hooks.errors import InjectedFault

    topology = topology_for(topologies, "naive")
    trainer = v1_stepping_trainer(topology, verl_config, tmp_path)
    arm(f"train:raise@{FAILING_STEP}")

    error = fit_until(trainer, topology, InjectedFault)

    skipped = error.verl_hooks_emergency_checkpoint
    assert skipped["status"] == EmergencyStatus.SKIPPED.value
    assert skipped["reason"] == "trainer task(s) raised (_update_actor): a worker may be left inside a collective"
    assert trainer.actor_rollout_wg.steps == [SAVE_FREQ]
    assert tracker(tmp_path) == str(SAVE_FREQ)


def test_a_failure_after_the_steps_updates_saves_that_step(
    topologies, verl_config, transfer_queue_put, tmp_path: Path
) -> None:
    def fail_at_the_failing_step(step: int) -> None:
        if step == FAILING_STEP:
            raise ValueError("a bad sample after the updates")

    topology = topology_for(topologies, "naive")
    trainer = v1_stepping_trainer(topology, verl_config, tmp_path, after_updates=fail_at_the_failing_step)
    arm("")

    error = fit_until(trainer, topology, ValueError)

    saved = error.verl_hooks_emergency_checkpoint
    assert (saved["status"], saved["step"]) == (EmergencyStatus.SAVED.value, FAILING_STEP), saved
    assert saved_data_state(tmp_path, FAILING_STEP) == {"batches_served": FAILING_STEP}


def test_the_save_runs_with_the_colocated_replicas_asleep_as_verls_own_saves_do(
    topologies, verl_config, no_transfer_queue, tmp_path: Path
) -> None:
    """Finding 5: the naive sync's cleanup wakes the replicas; verl saves with them asleep (trainer_sync.py:40-42)."""
    topology = topology_for(topologies, "naive")
    trainer = v1_trainer(topology, verl_config, tmp_path)
    awake_at_save: list[list[bool]] = []
    wg = trainer.actor_rollout_wg
    original_save = wg.save_checkpoint

    def save_checkpoint(*args: Any, **kwargs: Any) -> Any:
        states = ray.get([s.rollout_state.remote() for r in topology.replicas for s in r.servers])
        awake_at_save.append([state["awake"] for state in states])
        return original_save(*args, **kwargs)

    wg.save_checkpoint = save_checkpoint
    arm(f"naive:raise@{FAILING_STEP}")

    error = fit_until_failure(trainer)

    assert error.emergency_checkpoint["status"] == EmergencyStatus.SAVED.value
    assert awake_at_save == [[False, False], [False, False]], "the periodic save and the emergency one, asleep"


LEGACY_CASES = {
    # What happened in step 5 after step 4's sync, by the legacy trainer's own method names (ray_trainer.py
    # 1586-1690), and what is saved.
    "generation": ((), (EmergencyStatus.SAVED, FAILING_STEP - 1, None)),
    "after-the-passes": (("_compute_old_log_prob", "_compute_ref_log_prob"), (EmergencyStatus.SAVED, 4, None)),
    "actor-updated": (("_update_actor",), (EmergencyStatus.SAVED, FAILING_STEP, None)),
    "actor-update-raised": (
        ("raised:_update_actor",),
        (EmergencyStatus.SKIPPED, None, "trainer task(s) raised (_update_actor)"),
    ),
    "update-in-flight": (
        ("in-flight:_update_actor",),
        (EmergencyStatus.SKIPPED, None, "trainer call(s) still running"),
    ),
}


@pytest.mark.parametrize(
    "case",
    [
        case if case in ("generation", "update-in-flight") else pytest.param(case, marks=pytest.mark.slow)
        for case in LEGACY_CASES
    ],
)
def test_verls_legacy_trainer_saves_the_right_step_for_a_failure_in_each_part_of_a_step(
    topologies, verl_config, tmp_path: Path, case: str
) -> None:
    """verl's legacy RayPPOTrainer (instance by ``__new__``), its real ``_save_checkpoint`` through the hook's own
    entry; its trainer methods are the hooked ones, and the step's calls are noted as they note them."""
    import threading

    from verl.trainer.ppo.ray_trainer import RayPPOTrainer

    from verl_hooks import step_progress

    arm("")
    for name in step_progress.TRAINER_CALLS:
        assert step_progress.is_tracked(getattr(RayPPOTrainer, name)), f"RayPPOTrainer.{name} is followed"
    topology = topology_for(topologies, "naive")
    config = verl_config.copy()
    with open_dict(config):
        config.trainer.default_local_dir = str(tmp_path)
        config.trainer.use_v1 = False
    trainer = RayPPOTrainer.__new__(RayPPOTrainer)
    trainer.config = config
    trainer.actor_rollout_wg = SavedSteps(topology.actor_wg)
    trainer.use_critic = False
    trainer.train_dataloader = loader = CountingLoader()
    calls, (status, step, reason) = LEGACY_CASES[case]
    release = threading.Event()
    with step_progress.fitting_in_this_thread(trainer):
        for served in range(1, FAILING_STEP):
            loader.draw()
            trainer.global_steps = served
            step_progress.note_synced(served)  # what the guard does when the sync of that step succeeds
        trainer.global_steps = FAILING_STEP
        loader.draw()  # step 5's batch (ray_trainer.py:1466)
        for call in calls:
            name = call.partition(":")[2] or call
            if call.startswith("raised:"):
                with contextlib.suppress(RuntimeError), step_progress.trainer_call(trainer, name):
                    raise RuntimeError("rank 1 ran out of memory")
            elif call.startswith("in-flight:"):
                entered = threading.Event()

                def in_flight(name: str = name, entered: threading.Event = entered) -> None:
                    with step_progress.trainer_call(trainer, name):
                        entered.set()
                        release.wait(30)

                threading.Thread(target=in_flight, daemon=True).start()
                entered.wait(5)
            else:
                with step_progress.trainer_call(trainer, name):
                    pass
        error = RuntimeError("the reward function raised")
        trainers._checkpoint_after(trainer, error, installer._state, skips_critic_warmup=True)
        release.set()

    outcome = error.verl_hooks_emergency_checkpoint
    assert (outcome["status"], outcome["step"], outcome["failed_step"]) == (status.value, step, FAILING_STEP), outcome
    if reason is not None:
        assert outcome["reason"].startswith(reason), outcome["reason"]
    if status is EmergencyStatus.SAVED:
        assert trainer.actor_rollout_wg.steps == [step]
        assert saved_data_state(tmp_path, step) == {"batches_served": step}
        assert tracker(tmp_path) == str(step)
    else:
        assert trainer.actor_rollout_wg.steps == []
