"""Every ``VERL_HOOKS_*`` and ``VERL_SUPERVISOR_*`` variable the job's side reads (and MLflow's run id), read here
and nowhere else (``contract`` names them; ``launch``, the job's entry point, writes what its workers get).

The environment is the only channel that reaches every Ray worker of a job (through the job's runtime_env), so
that is where the launcher and the supervisor put them. The guard's settings are resolved once, when the hook is
installed (``HookSettings``), and handed to the guard as a value. The few variables the job's other parts need at
the moment they act (the heartbeat channel, the stacks folder, the hook and callback the launcher set aside, the
consent to an unverified verl) are read by the functions at the end of this module, at that moment, so that a
worker started later with another environment reads its own.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from verl_hooks.contract import (
    DEFAULT_EMERGENCY_SAVE_TIMEOUT_S,
    DEFAULT_HEARTBEAT_INTERVAL_S,
    ENV_ALLOW_UNVERIFIED_VERL,
    ENV_ATTEMPT,
    ENV_CHAINED_CHECKPOINT_CALLBACK,
    ENV_CHAINED_SETUP_HOOK,
    ENV_CLEANUP_STEP_TIMEOUT_S,
    ENV_EMERGENCY_SAVE,
    ENV_EMERGENCY_SAVE_TIMEOUT_S,
    ENV_ERROR_FILE,
    ENV_FAULT_LEDGER,
    ENV_FAULT_LOG,
    ENV_FAULTS,
    ENV_HARD_EXIT_GRACE_S,
    ENV_HEARTBEAT_INTERVAL_S,
    ENV_HEARTBEAT_TOKEN,
    ENV_HEARTBEAT_URL,
    ENV_STACKS_DIR,
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
    fault_ledger: str | None = None
    """A file every process of the run shares: a fault recorded there as fired is not fired again (once per run,
    whichever attempt reaches its step), rather than once per process."""

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
            error_file=error_file(env),
            fault_log=env.get(ENV_FAULT_LOG) or None,
            fault_ledger=env.get(ENV_FAULT_LEDGER) or None,
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


# --- what the job's other parts read when they act -----------------------------------------------------------


@dataclass(frozen=True)
class HeartbeatChannel:
    url: str
    token: str = field(repr=False)
    """A secret: never logged."""
    attempt: int


def heartbeat_channel(environ: Mapping[str, str] | None = None) -> HeartbeatChannel | None:
    """Where this process sends heartbeats; None when no supervisor listens."""
    env = os.environ if environ is None else environ
    url, token = env.get(ENV_HEARTBEAT_URL), env.get(ENV_HEARTBEAT_TOKEN)
    return HeartbeatChannel(url, token, _int(env, ENV_ATTEMPT, 1)) if url and token else None


def heartbeat_interval_s(environ: Mapping[str, str] | None = None) -> float:
    env = os.environ if environ is None else environ
    return _float(env, ENV_HEARTBEAT_INTERVAL_S, DEFAULT_HEARTBEAT_INTERVAL_S)


def stacks_dir(environ: Mapping[str, str] | None = None) -> str | None:
    """The attempt's folder for stack dumps on SIGUSR1 (None: no supervisor asked for them)."""
    return (os.environ if environ is None else environ).get(ENV_STACKS_DIR) or None


def unverified_verl_allowed(environ: Mapping[str, str] | None = None) -> bool:
    """The user's consent to guard (and hook) a verl whose methods the guard was not verified against."""
    return (os.environ if environ is None else environ).get(ENV_ALLOW_UNVERIFIED_VERL) == "1"


def chained_setup_hook(environ: Mapping[str, str] | None = None) -> str | None:
    """The job's own ``worker_process_setup_hook``, which the launcher set aside to put ours in its place."""
    return (os.environ if environ is None else environ).get(ENV_CHAINED_SETUP_HOOK) or None


def chained_checkpoint_callback(environ: Mapping[str, str] | None = None) -> str | None:
    """The job's own ``trainer.checkpoint_callback_class``, which the launcher set aside to chain it."""
    return (os.environ if environ is None else environ).get(ENV_CHAINED_CHECKPOINT_CALLBACK, "").strip() or None


def fault_log(environ: Mapping[str, str] | None = None) -> str | None:
    """Where an injected fault notes that it fired."""
    return (os.environ if environ is None else environ).get(ENV_FAULT_LOG) or None


def error_file(environ: Mapping[str, str] | None = None) -> str | None:
    """Where the job's error record goes (read alone when the other settings cannot be understood)."""
    return (os.environ if environ is None else environ).get(ENV_ERROR_FILE) or None


def mlflow_run_id(environ: Mapping[str, str] | None = None) -> str | None:
    """The MLflow run an attempt continues (set by the supervisor; MLflow's own variable, which verl's tracker
    passes on by leaving it to MLflow)."""
    return (os.environ if environ is None else environ).get("MLFLOW_RUN_ID") or None
