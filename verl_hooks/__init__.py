"""Fail-fast weight sync for verl: turns any failure or hang of ``CheckpointEngineManager.update_weights`` into a
bounded best-effort rollout resume plus a typed ``WeightSyncFatalError``, so that the job can be restarted.

Importing this package is cheap (no verl, Ray or torch): Ray imports it in every worker process of a job when
``verl_hooks.install`` is the job's ``worker_process_setup_hook``.
"""

from verl_hooks.contract import JobExitCode
from verl_hooks.errors import (
    CleanupOutcome,
    CleanupStatus,
    HookSettingsError,
    IncompatibleVerlError,
    InjectedFault,
    WeightSyncFatalError,
    WeightSyncTimeout,
)
from verl_hooks.installer import install
from verl_hooks.phases import CleanupStep, SyncPhase
from verl_hooks.settings import HookSettings

EXIT_WEIGHT_SYNC_FATAL = JobExitCode.WEIGHT_SYNC_FATAL
"""Exit code of a job driver that died of a ``WeightSyncFatalError`` (75, EX_TEMPFAIL: restart it)."""
EXIT_CONFIG_ERROR = JobExitCode.CONFIG_ERROR
"""Exit code of the launcher for a configuration error a restart cannot fix (78, EX_CONFIG)."""

__all__ = [
    "EXIT_CONFIG_ERROR",
    "EXIT_WEIGHT_SYNC_FATAL",
    "CleanupOutcome",
    "CleanupStatus",
    "CleanupStep",
    "HookSettings",
    "HookSettingsError",
    "IncompatibleVerlError",
    "InjectedFault",
    "JobExitCode",
    "SyncPhase",
    "WeightSyncFatalError",
    "WeightSyncTimeout",
    "install",
]
