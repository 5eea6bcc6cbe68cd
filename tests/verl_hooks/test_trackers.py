"""One experiment-tracker run across attempts, with verl's own ``Tracking`` and the trackers' offline modes.

Each attempt is a process that opens verl 0.9.1's ``Tracking`` as ``RayPPOTrainer.fit`` does (with the guard
installed, as in every process of a supervised job), in the environment the supervisor gives that attempt
(``supervisor.job.trackers``), and logs its steps: attempt 1 steps 1-2 with a fresh config, attempt 2 steps 3-6
with the resumed one. MLflow's run id reaches the supervisor over a real heartbeat server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.job.heartbeats import HeartbeatServer
from supervisor.job.trackers import tracker_env, wandb_run_id
from tests.conftest import REPO_ROOT
from tests.tracker_files import mlflow_runs, tensorboard_steps, wandb_offline_runs
from verl_hooks.contract import (
    ENV_ATTEMPT,
    ENV_HEARTBEAT_TOKEN,
    ENV_HEARTBEAT_URL,
    HeartbeatKind,
)

pytest.importorskip("mlflow")

BACKENDS = ["tensorboard", "mlflow", "wandb"]
ATTEMPT = f"""
import json, sys
BACKENDS = {BACKENDS!r}
if sys.argv[3] == "guarded":
    from verl_hooks.installer import install
    install()
from verl.utils.tracking import Tracking
config, steps = json.loads(sys.argv[1]), json.loads(sys.argv[2])
tracking = Tracking(project_name="mini_ppo", experiment_name="demo", default_backend=BACKENDS, config=config)
for step in steps:
    tracking.log(data={{"loss": float(step)}}, step=step)
tracking.finish()
print("mlflow" in tracking.logger)
"""


def config_of(resume_mode: str, resume_from: str | None) -> dict:
    return {"trainer": {"resume_mode": resume_mode, "resume_from_path": resume_from, "total_training_steps": 6}}


def run_attempt(number: int, env: dict[str, str], config: dict, steps: list[int], guarded: bool = True) -> bool:
    proc = subprocess.run(
        [sys.executable, "-c", ATTEMPT, json.dumps(config), json.dumps(steps), "guarded" if guarded else "plain"],
        env={**env, ENV_ATTEMPT: str(number)},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout.strip().splitlines()[-1] == "True"


@pytest.fixture
def trackers_env(tmp_path: Path) -> dict[str, str]:
    """The trackers offline, writing under tmp_path; nothing of the user's own environment."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_", "TENSORBOARD_", "VERL_"))}
    return {
        **base,
        "PYTHONPATH": str(REPO_ROOT),
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path / "wandb_dir"),
        "WANDB_SILENT": "true",
        "MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri(),
        "MLFLOW_ALLOW_FILE_STORE": "true",  # a local file store: what mlflow-skinny has without a database
    }


@pytest.mark.slow  # the supervisor's raise test (tests/supervisor/e2e/test_mini_ppo.py) checks all three trackers
def test_two_attempts_write_into_one_run_of_each_tracker(tmp_path: Path, trackers_env: dict[str, str]) -> None:
    (tmp_path / "wandb_dir").mkdir()
    run_id, run_dir = "0123456789abcdef", tmp_path / "run"
    server = HeartbeatServer()
    server.start()
    try:
        heartbeat = {ENV_HEARTBEAT_URL: server.url, ENV_HEARTBEAT_TOKEN: server.token}
        first_env = tracker_env(run_id, run_dir, trackers_env, learnt={})
        assert run_attempt(1, {**trackers_env, **heartbeat, **first_env}, config_of("disable", None), [1, 2])
        (beat,) = [b for b in server.take_received() if b.kind is HeartbeatKind.TRACKER]
        assert (beat.attempt, beat.fields["backend"]) == (1, "mlflow")

        learnt = {"mlflow": beat.fields["run_id"]}
        second_env = tracker_env(run_id, run_dir, trackers_env, learnt)
        assert second_env["MLFLOW_RUN_ID"] == learnt["mlflow"]
        resumed = config_of("resume_path", str(run_dir / "checkpoints" / "global_step_2"))
        assert run_attempt(2, {**trackers_env, **heartbeat, **second_env}, resumed, [3, 4, 5, 6]), "MLflow kept"
    finally:
        server.stop()

    (run,), client = mlflow_runs(tmp_path / "mlruns")
    assert run.info.run_id == learnt["mlflow"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4, 5, 6]
    resume_mode = [v for k, v in run.data.params.items() if k.endswith("resume_mode")]
    assert resume_mode == ["disable"], "MLflow params cannot change: the first attempt's are kept"

    assert tensorboard_steps(run_dir / "tensorboard") == [1, 2, 3, 4, 5, 6]
    assert len(list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))) == 2, "one file per attempt"

    offline = wandb_offline_runs(tmp_path / "wandb_dir")
    assert len(offline) == 2
    assert all(name.endswith(wandb_run_id(run_id)) for name in offline), offline


def test_values_the_user_set_win(tmp_path: Path) -> None:
    user = {"WANDB_RUN_ID": "mine", "TENSORBOARD_DIR": "/data/tb", "MLFLOW_RUN_ID": "theirs"}
    assert tracker_env("abc", tmp_path, user, learnt={"mlflow": "learnt"}) == {"WANDB_RESUME": "allow"}
    assert tracker_env("abc", tmp_path, {}, learnt={}) == {
        "WANDB_RUN_ID": "verl-abc",
        "WANDB_RESUME": "allow",
        "TENSORBOARD_DIR": str(tmp_path / "tensorboard"),
    }


@pytest.mark.slow  # verl retries MLflow three times, 5 s apart, before it gives up
def test_without_the_guard_verl_loses_mlflow_in_an_attempt_that_attaches_to_the_run(
    tmp_path: Path, trackers_env: dict[str, str]
) -> None:
    """Why the guard keeps the first attempt's params: verl 0.9.1 alone, attached with MLFLOW_RUN_ID to a run
    whose params its resumed config changes, ends "without MLflow tracking"."""
    first_env = tracker_env("0123456789abcdef", tmp_path / "run", trackers_env, learnt={})
    assert run_attempt(1, {**trackers_env, **first_env}, config_of("disable", None), [1, 2], guarded=False)
    (run,), _ = mlflow_runs(tmp_path / "mlruns")
    env = {**trackers_env, **first_env, "MLFLOW_RUN_ID": run.info.run_id}
    assert not run_attempt(2, env, config_of("resume_path", "/ckpt/global_step_2"), [3], guarded=False)
