"""The environment an attempt's job is started with: the supervisor's contract with ``verl_hooks``
(``verl_hooks.contract``'s variables), the user's ``job.env``, and one experiment-tracker run across attempts."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import verl_hooks.contract as contract
from supervisor.config import SupervisorConfig
from supervisor.job.trackers import tracker_env


@dataclass(frozen=True)
class HeartbeatAddress:
    url: str
    token: str
    """A secret: only ever in the job's environment."""


def attempt_env(
    config: SupervisorConfig,
    run_id: str,
    trackers: Mapping[str, str],
    run_dir: Path,
    number: int,
    inherited_env: Mapping[str, str],
    heartbeat: HeartbeatAddress | None,
) -> dict[str, str]:
    """Attempt ``number``'s variables. ``trackers``: the tracker runs earlier attempts reported; ``inherited_env``:
    the supervisor's own environment, which the job inherits (a tracker variable the user set there is kept)."""
    restart, log_dir = config.restart, run_dir / "attempts" / str(number)
    env = {
        contract.ENV_EMERGENCY_SAVE: "1" if restart.emergency_save else "0",
        contract.ENV_EMERGENCY_SAVE_TIMEOUT_S: str(restart.emergency_save_timeout_s),
        **config.job.env,
        contract.ENV_RUN_ID: run_id,
        contract.ENV_ATTEMPT: str(number),
        contract.ENV_ERROR_FILE: str(log_dir / "error.json"),
        contract.ENV_RUN_DIR: str(run_dir),
        contract.ENV_STACKS_DIR: str(log_dir / "stacks"),
    }
    env.update(tracker_env(run_id, run_dir, {**inherited_env, **config.job.env}, trackers))
    if heartbeat is not None:
        env[contract.ENV_HEARTBEAT_URL] = heartbeat.url
        env[contract.ENV_HEARTBEAT_TOKEN] = heartbeat.token
        env[contract.ENV_HEARTBEAT_INTERVAL_S] = str(config.watchdog.heartbeat_interval_s)
    return env
