"""The guard's settings, resolved once from the environment when the hook is installed.

The environment is the only channel that reaches every Ray worker of a job (through the job's runtime_env), so
that is where the launcher and the supervisor put them. Mechanisms receive a ``HookSettings`` value and never
read the environment themselves.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from verl_hooks.contract import (
    DEFAULT_EMERGENCY_SAVE_TIMEOUT_S,
    ENV_ATTEMPT,
    ENV_CLEANUP_STEP_TIMEOUT_S,
    ENV_EMERGENCY_SAVE,
    ENV_EMERGENCY_SAVE_TIMEOUT_S,
    ENV_ERROR_FILE,
    ENV_FAULT_LOG,
    ENV_FAULTS,
    ENV_HARD_EXIT_GRACE_S,
    ENV_SYNC_ADAPTIVE,
    ENV_SYNC_ADAPTIVE_FLOOR_S,
    ENV_SYNC_ADAPTIVE_MULTIPLE,
    ENV_SYNC_TIMEOUT_S,
    ENV_TRAINER_CLASSES,
    ENV_VERL_CKPT_ENGINE_INIT_TIMEOUT_S,
)
from verl_hooks.errors import HookSettingsError
from verl_hooks.faults import FaultSpec, parse_fault_specs


@dataclass(frozen=True)
class HookSettings:
    sync_timeout_s: float = 600.0
    """Deadline on a whole weight sync; past it the sync counts as hung. Generous: a large model's sync over a
    slow fabric can take minutes, and a false alarm costs a restart."""
    sync_adaptive: bool = True
    """After the first syncs, the deadline becomes ``sync_adaptive_multiple`` x the slowest recent sync, at least
    ``sync_adaptive_floor_s`` and at most ``sync_timeout_s`` (``verl_hooks.deadline``)."""
    sync_adaptive_multiple: float = 5.0
    sync_adaptive_floor_s: float = 60.0
    cleanup_step_timeout_s: float = 30.0
    """Bound on each best-effort cleanup step after a failure."""
    cancel_grace_s: float = 0.5
    """After the deadline, how long a hung sync gets to unwind from a cancellation before cleanup starts. A
    cancellation takes effect at the sync's next ``await``, milliseconds in a live event loop; a sync stuck in a
    collective never unwinds, and every second of this is added to the detection of each hang."""
    hard_exit_grace_s: float = 60.0
    """Backstop: if the guard itself has not raised this long after the deadline plus the cleanup budget, the
    process writes its error record and exits with code 75. 0 disables the backstop."""
    verl_init_timeout_s: float | None = None
    """verl's own limit on the first process-group init (``VERL_CKPT_ENGINE_INIT_TIMEOUT_S``, verl PR #7045), when
    the environment sets it: the guard's first sync then outlasts it."""
    emergency_save: bool = True
    """After a failed sync whose trainer side is idle (and when the supervisor asks the job to stop), the trainer
    saves the step it is at through its own ``_save_checkpoint`` (``verl_hooks.emergency``)."""
    emergency_save_timeout_s: float = DEFAULT_EMERGENCY_SAVE_TIMEOUT_S
    """The emergency save's deadline while the job has timed none of its periodic saves; once it has, the
    deadline is a multiple of the slowest of them, never above this."""
    trainer_idle_wait_s: float = 1.0
    """After a failed sync and its cleanup, how long the trainer's tasks of the sync get to finish before the
    trainer side counts as busy (no emergency save): a rollout that failed makes its trainer peers' collective
    fail soon after; one that hung leaves them blocked."""
    trainer_classes: tuple[str, ...] = ()
    """``module:Class`` of the job's own trainers with verl's shape that get the emergency save too."""
    faults: tuple[FaultSpec, ...] = ()
    attempt: int = 1
    error_file: str | None = None
    fault_log: str | None = None
    """Append a JSON line (time, spec, pid) here when an injected fault fires: the failure's own timestamp."""

    def __post_init__(self) -> None:
        for name in (
            "sync_timeout_s",
            "cleanup_step_timeout_s",
            "cancel_grace_s",
            "sync_adaptive_floor_s",
            "emergency_save_timeout_s",
        ):
            if getattr(self, name) <= 0:
                raise HookSettingsError(f"verl_hooks setting {name} must be > 0, got {getattr(self, name)}")
        if self.hard_exit_grace_s < 0:
            raise HookSettingsError(f"verl_hooks setting hard_exit_grace_s must be >= 0, got {self.hard_exit_grace_s}")
        if self.sync_adaptive_multiple < 1:
            raise HookSettingsError(
                f"verl_hooks setting sync_adaptive_multiple must be >= 1, got {self.sync_adaptive_multiple}"
            )
        if self.trainer_idle_wait_s < 0:
            raise HookSettingsError("verl_hooks setting trainer_idle_wait_s must be >= 0")
        for name in self.trainer_classes:
            module, _, cls = name.partition(":")
            if not module or not cls:
                raise HookSettingsError(f"{ENV_TRAINER_CLASSES}: {name!r} is not module:Class")
        if self.attempt < 1:
            raise HookSettingsError(f"{ENV_ATTEMPT} must be >= 1, got {self.attempt}")

    @property
    def cleanup_budget_s(self) -> float:
        """The longest the cleanup after a failure can take (four steps at most)."""
        return self.cancel_grace_s + 4 * self.cleanup_step_timeout_s

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> HookSettings:
        env = os.environ if environ is None else environ
        defaults = cls()
        return cls(
            sync_timeout_s=_float(env, ENV_SYNC_TIMEOUT_S, defaults.sync_timeout_s),
            sync_adaptive=_flag(env, ENV_SYNC_ADAPTIVE),
            sync_adaptive_multiple=_float(env, ENV_SYNC_ADAPTIVE_MULTIPLE, defaults.sync_adaptive_multiple),
            sync_adaptive_floor_s=_float(env, ENV_SYNC_ADAPTIVE_FLOOR_S, defaults.sync_adaptive_floor_s),
            cleanup_step_timeout_s=_float(env, ENV_CLEANUP_STEP_TIMEOUT_S, defaults.cleanup_step_timeout_s),
            hard_exit_grace_s=_float(env, ENV_HARD_EXIT_GRACE_S, defaults.hard_exit_grace_s),
            verl_init_timeout_s=_optional_float(env, ENV_VERL_CKPT_ENGINE_INIT_TIMEOUT_S),
            emergency_save=_flag(env, ENV_EMERGENCY_SAVE),
            emergency_save_timeout_s=_float(env, ENV_EMERGENCY_SAVE_TIMEOUT_S, defaults.emergency_save_timeout_s),
            trainer_classes=tuple(n.strip() for n in env.get(ENV_TRAINER_CLASSES, "").split(",") if n.strip()),
            faults=parse_fault_specs(env.get(ENV_FAULTS)),
            attempt=_int(env, ENV_ATTEMPT, 1),
            error_file=env.get(ENV_ERROR_FILE) or None,
            fault_log=env.get(ENV_FAULT_LOG) or None,
        )


def _flag(env: Mapping[str, str], name: str) -> bool:
    """On unless set to 0, false, no or off."""
    return env.get(name, "1").strip().lower() not in ("0", "false", "no", "off")


def _optional_float(env: Mapping[str, str], name: str) -> float | None:
    return None if env.get(name) in (None, "") else _float(env, name, 0.0)


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise HookSettingsError(f"{name} must be a number of seconds, got {raw!r}") from None


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise HookSettingsError(f"{name} must be an integer, got {raw!r}") from None
