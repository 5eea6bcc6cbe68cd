"""A job driver shaped like verl's main_ppo, for the launcher tests.

It calls ``ray.init`` with a runtime_env of its own (an env var and, optionally, its own setup hook) and runs
a TaskRunner actor whose ``run`` does a weight sync through verl's CheckpointEngineManager. The guard must
reach that actor through the launcher alone: nothing here installs it.

    python -m verl_hooks.launch -m tests.verl_hooks.e2e.jobs.sync_job MODE [STEP]

MODE: sync (one sync at STEP; faults come from VERL_HOOKS_FAULTS), fail (the trainer raises ValueError),
exit3 (the driver calls sys.exit(3)), backstop (the guard's backstop ends the trainer, as it would after a
hang the guard itself could not report).
"""

from __future__ import annotations

import json
import os
import sys

import ray


def own_setup_hook() -> None:
    """The job's own worker_process_setup_hook, which the launcher must keep running."""
    os.environ["SYNC_JOB_OWN_HOOK_RAN"] = "1"


@ray.remote(num_cpus=0)
class TaskRunner:
    def run(self, mode: str, step: int) -> dict:
        from verl.checkpoint_engine.base import CheckpointEngineManager

        from verl_hooks.installer import is_guarded

        seen = {
            "guarded": is_guarded(CheckpointEngineManager),
            "own_env": os.environ.get("SYNC_JOB_OWN_ENV"),
            "own_hook_ran": os.environ.get("SYNC_JOB_OWN_HOOK_RAN"),
            "attempt": os.environ.get("VERL_SUPERVISOR_ATTEMPT"),
        }
        if mode == "fail":
            raise ValueError("the trainer failed for a reason of its own")
        if mode == "backstop":
            self._end_by_the_backstop(step)
        from mini_ppo.actor import ActorConfig
        from mini_ppo.topology import build_topology, replica_states

        topology = build_topology(ActorConfig(), world_size=1, num_replicas=1, name_prefix="sync_job_")
        topology.manager.sleep_replicas()
        topology.manager.update_weights(global_steps=step)
        return {**seen, "replicas": replica_states(topology)}

    @staticmethod
    def _end_by_the_backstop(step: int) -> None:
        import time

        from verl_hooks.errors import WeightSyncFatalError
        from verl_hooks.guard import _Backstop

        fatal = WeightSyncFatalError(
            "stuck", phase="build_process_group", global_step=step, backend="nccl", elapsed_s=1.0, hang=True
        )
        _Backstop(0.2, lambda: fatal, os.environ.get("VERL_SUPERVISOR_ERROR_FILE")).start()
        time.sleep(60)


def main() -> None:
    mode = sys.argv[1]
    step = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    if mode == "exit3":
        sys.exit(3)
    ray.init(
        address=os.environ["RAY_ADDRESS"],
        runtime_env={
            "env_vars": {"SYNC_JOB_OWN_ENV": "kept"},
            "worker_process_setup_hook": "tests.verl_hooks.e2e.jobs.sync_job.own_setup_hook",
        },
        log_to_driver=False,
    )
    print("RESULT " + json.dumps(ray.get(TaskRunner.remote().run.remote(mode, step))), flush=True)


if __name__ == "__main__":
    main()
