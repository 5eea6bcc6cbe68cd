"""Running the mini-PPO job as its own process through ``verl_hooks.launch``, against the session's Ray cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from mini_ppo.layout import FINAL_FILE, TRACKER_FILE
from supervisor.mechanisms.ray_cluster import LocalRayCluster
from tests.conftest import REPO_ROOT

JOB_MODULE = "mini_ppo.main"
# Saves at 2, 4 and 6: room for a fault before the first save, between saves, right after one and at the end.
BASE_OVERRIDES = ("trainer.total_training_steps=6", "trainer.save_freq=2", "seed=11")

# The job options for the checkpoint layouts verl writes beyond plain FSDP.
MEGATRON = "trainer.checkpoint_layout=megatron"
CRITIC = "trainer.use_critic=true"
ASYNC = "trainer.trainer_mode=separate_async"
ALL_OPTIONS = (MEGATRON, CRITIC, ASYNC)


@dataclass
class JobRun:
    proc: subprocess.CompletedProcess[str]
    ckpt_dir: Path
    error_file: Path

    @property
    def returncode(self) -> int:
        return self.proc.returncode

    @property
    def output(self) -> str:
        return self.proc.stdout + self.proc.stderr

    def final(self) -> dict:
        path = self.ckpt_dir / FINAL_FILE
        assert path.exists(), f"no {FINAL_FILE} (exit {self.returncode}); output:\n{self.output[-4000:]}"
        return json.loads(path.read_text())

    def tracker(self) -> str | None:
        path = self.ckpt_dir / TRACKER_FILE
        return path.read_text() if path.exists() else None


def run_job(
    cluster: LocalRayCluster | None,
    ckpt_dir: Path,
    *overrides: str,
    attempt: int = 1,
    faults: str | None = None,
    extra_env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout_s: float = 240,
) -> JobRun:
    """One attempt of the job. ``cluster`` None runs it without RAY_ADDRESS (only for runs that never reach Ray)."""
    error_file = ckpt_dir.parent / f"{ckpt_dir.name}-attempt{attempt}-error.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VERL_HOOKS_", "VERL_SUPERVISOR_", "RAY_ADDRESS"))}
    env.update(
        {
            "PYTHONPATH": str(REPO_ROOT),
            "VERL_SUPERVISOR_ATTEMPT": str(attempt),
            "VERL_SUPERVISOR_ERROR_FILE": str(error_file),
            **(cluster.env() if cluster is not None else {}),
            **({"VERL_HOOKS_FAULTS": faults} if faults else {}),
            **(extra_env or {}),
        }
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "verl_hooks.launch",
            "-m",
            JOB_MODULE,
            *BASE_OVERRIDES,
            f"trainer.default_local_dir={ckpt_dir}",
            *overrides,
        ],
        env=env,
        cwd=cwd or ckpt_dir.parent,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    return JobRun(proc, ckpt_dir, error_file)
