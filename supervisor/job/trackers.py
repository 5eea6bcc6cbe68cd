"""One experiment-tracker run across a run's attempts: the identity each attempt is given.

verl's ``Tracking`` (verl/utils/tracking.py, 0.9.1) opens its trackers from the environment of the process that
runs the trainer:

- wandb: ``wandb.init(project, name, entity, config, settings)`` (tracking.py:85) passes no id, so wandb takes
  ``WANDB_RUN_ID`` and ``WANDB_RESUME`` from the environment. A run id stable per run directory with
  ``WANDB_RESUME=allow`` makes every attempt continue one wandb run. wandb drops a logged step lower than the
  run's current one, so the steps an attempt redoes after a resume are kept as first logged.
- MLflow: ``MLFLOW_RUN_ID`` set means ``mlflow.start_run(run_id=...)`` (tracking.py:110-112); otherwise a new run.
  MLflow draws the id itself, so the first attempt's id is learnt from the job (a ``tracker`` heartbeat from the
  guard, see ``verl_hooks.trackers``) and given to every later attempt.
- tensorboard: ``TENSORBOARD_DIR``, else ``tensorboard_log/<project>/<experiment>`` relative to the trainer's
  working directory (tracking.py:557), which need not be the same for every attempt on a cluster. The supervisor
  names one folder for the run: ``<run_dir>/tensorboard``.

A variable the user set (in the supervisor's environment or ``job.env``) always wins.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path


def wandb_run_id(run_id: str) -> str:
    """wandb run ids may hold letters, digits, ``-`` and ``_``; the run id is hex."""
    return f"verl-{run_id}"


def tracker_env(run_id: str, run_dir: Path, user_env: Mapping[str, str], learnt: Mapping[str, str]) -> dict[str, str]:
    """The tracker variables for an attempt; ``learnt`` maps a backend to the run id an earlier attempt reported."""
    env = {
        "WANDB_RUN_ID": wandb_run_id(run_id),
        "WANDB_RESUME": "allow",
        "TENSORBOARD_DIR": str(run_dir / "tensorboard"),
    }
    if learnt.get("mlflow"):
        env["MLFLOW_RUN_ID"] = learnt["mlflow"]
    return {key: value for key, value in env.items() if key not in user_env}
