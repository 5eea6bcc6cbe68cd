"""The guard reaches an actor through the job's worker_process_setup_hook, and its error reaches the driver."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import ray
from ray.exceptions import RayTaskError

from tests.conftest import REPO_ROOT, connect_driver
from verl_hooks.contract import read_record
from verl_hooks.errors import CleanupOutcome, CleanupStatus, WeightSyncFatalError, find_weight_sync_error
from verl_hooks.phases import SyncPhase

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def driver_with_setup_hook(ray_cluster) -> Iterator[None]:
    connect_driver(ray_cluster, worker_process_setup_hook="verl_hooks.install")
    try:
        yield
    finally:
        ray.shutdown()


@ray.remote(num_cpus=0)
class Trainer:
    """Like verl's TaskRunner: builds the workers and replicas, then syncs weights. It never installs the guard."""

    def sync(self, step: int) -> None:
        from mini_ppo.actor import ActorConfig
        from mini_ppo.topology import build_topology, with_backend

        topology = build_topology(with_backend(ActorConfig(), "cpu_gloo"), 1, 1, name_prefix="in_actor_")
        topology.manager.update_weights(global_steps=step)


def test_fatal_error_crosses_to_the_driver_with_every_field(driver_with_setup_hook) -> None:
    trainer = Trainer.options(runtime_env={"env_vars": {"VERL_HOOKS_FAULTS": "build_process_group:raise@4"}}).remote()
    with pytest.raises(RayTaskError) as raised:
        ray.get(trainer.sync.remote(4))
    error = raised.value
    assert isinstance(error, WeightSyncFatalError), "Ray re-raises it as an instance of the original class"
    cause = error.cause
    assert type(cause) is WeightSyncFatalError
    assert find_weight_sync_error(error) is cause
    assert cause.phase is SyncPhase.BUILD_PROCESS_GROUP
    assert (cause.global_step, cause.backend, cause.hang) == (4, "cpu_gloo", False)
    assert [(o.step, o.status) for o in cause.cleanup] == [
        ("finalize_engines", CleanupStatus.OK),
        ("resume_kv_cache", CleanupStatus.OK),
        ("resume_generation", CleanupStatus.OK),
    ]
    assert all(isinstance(o, CleanupOutcome) for o in cause.cleanup)
    assert cause.cause_type == "verl_hooks.errors.InjectedFault"
    assert "fire_blocking" in cause.cause_traceback, "the original traceback travels as text"
    ray.kill(trainer)


def test_backstop_records_and_exits_75_when_the_guard_cannot_raise(tmp_path) -> None:
    """The last resort fires only when the guard's own path is blocked; here it is given nothing else to do."""
    error_file = tmp_path / "error.json"
    script = (
        "import time\n"
        "from verl_hooks.errors import WeightSyncFatalError\n"
        "from verl_hooks.guard import _Backstop\n"
        "fatal = WeightSyncFatalError("
        "'stuck', phase='finalize', global_step=9, backend='nccl', elapsed_s=1.0, hang=True)\n"
        f"_Backstop(0.2, lambda: fatal, {str(error_file)!r}).start()\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 75
    assert "the guard could not raise" in proc.stderr
    record = read_record(error_file)
    assert (record.source, record.phase, record.global_step, record.hang) == ("guard-backstop", "finalize", 9, True)
