"""The contract between a job and its supervisor, in one place: both sides import it.

What crosses the boundary, and nothing else:
- **environment variables** the supervisor sets for each attempt and the guard's settings (they reach every
  Ray worker of the job through the runtime_env the launcher sets up);
- **exit codes** of the job's launcher;
- **heartbeats**: their kinds and the fields each kind carries;
- **the error record**: a versioned JSON document, its reader and its writer, and the phases it names;
- **the checkpoint marker**: what the job's checkpoint callback says about each step it saved;
- **how a failure travels**: the chain of causes through Ray's wrappers.

Light on imports on purpose (no verl, Ray or torch; of ``verl_hooks`` only ``phases``, which imports nothing):
the supervisor imports this module and nothing else of ``verl_hooks``, and every Ray worker of a job imports it
through the setup hook.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from enum import Enum, IntEnum
from pathlib import Path
from typing import Any, ClassVar

from verl_hooks.phases import SyncPhase

logger = logging.getLogger(__name__)

# --- environment variables -------------------------------------------------------------------------------------

# Set by the supervisor for each attempt. RUN_ID and ATTEMPT also mark every process of the attempt, so that
# teardown can find the job's Ray workers, which are not descendants of its driver.
ENV_RUN_ID = "VERL_SUPERVISOR_RUN_ID"
ENV_ATTEMPT = "VERL_SUPERVISOR_ATTEMPT"
ENV_ERROR_FILE = "VERL_SUPERVISOR_ERROR_FILE"
ENV_RUN_DIR = "VERL_SUPERVISOR_RUN_DIR"
ENV_STACKS_DIR = "VERL_SUPERVISOR_STACKS_DIR"
ENV_HEARTBEAT_URL = "VERL_SUPERVISOR_HEARTBEAT_URL"
ENV_HEARTBEAT_TOKEN = "VERL_SUPERVISOR_HEARTBEAT_TOKEN"  # a secret: never logged, never in an event
ENV_HEARTBEAT_INTERVAL_S = "VERL_SUPERVISOR_HEARTBEAT_INTERVAL_S"
DEFAULT_HEARTBEAT_INTERVAL_S = 5.0
"""The driver's alive beat interval when nothing sets it (``watchdog.heartbeat_interval_s``, the variable)."""
# Marks the processes of the supervisor's embedded Ray cluster (never a job's).
ENV_CLUSTER_ID = "VERL_SUPERVISOR_CLUSTER_ID"

# The guard's settings (verl_hooks.settings reads them).
ENV_SYNC_TIMEOUT_S = "VERL_HOOKS_SYNC_TIMEOUT_S"
ENV_SYNC_ADAPTIVE = "VERL_HOOKS_SYNC_ADAPTIVE"
ENV_SYNC_ADAPTIVE_MULTIPLE = "VERL_HOOKS_SYNC_ADAPTIVE_MULTIPLE"
ENV_SYNC_ADAPTIVE_FLOOR_S = "VERL_HOOKS_SYNC_ADAPTIVE_FLOOR_S"
ENV_CLEANUP_STEP_TIMEOUT_S = "VERL_HOOKS_CLEANUP_STEP_TIMEOUT_S"
ENV_HARD_EXIT_GRACE_S = "VERL_HOOKS_HARD_EXIT_GRACE_S"
ENV_FAULTS = "VERL_HOOKS_FAULTS"
# "1": guard an update_weights body whose fingerprint is not a verified one, at the user's risk (verl_hooks.compat).
ENV_ALLOW_UNVERIFIED_VERL = "VERL_HOOKS_ALLOW_UNVERIFIED_VERL"
# verl's own (PR #7045) limit on building the first checkpoint-engine process group; the guard reads it.
ENV_VERL_CKPT_ENGINE_INIT_TIMEOUT_S = "VERL_CKPT_ENGINE_INIT_TIMEOUT_S"
ENV_FAULT_LOG = "VERL_HOOKS_FAULT_LOG"
# A file shared by every process of a run: a fault recorded there as fired is not fired again (once per run).
ENV_FAULT_LEDGER = "VERL_HOOKS_FAULT_LEDGER"
ENV_CHAINED_SETUP_HOOK = "VERL_HOOKS_CHAINED_SETUP_HOOK"
# The user's own trainer.checkpoint_callback_class, which the launcher replaced by ours; ours runs it first.
ENV_CHAINED_CHECKPOINT_CALLBACK = "VERL_HOOKS_CHAINED_CHECKPOINT_CALLBACK"
# The emergency save (verl_hooks.emergency): "0" turns it off; its deadline when the job has timed no save yet.
ENV_EMERGENCY_SAVE = "VERL_HOOKS_EMERGENCY_SAVE"
ENV_EMERGENCY_SAVE_TIMEOUT_S = "VERL_HOOKS_EMERGENCY_SAVE_TIMEOUT_S"
DEFAULT_EMERGENCY_SAVE_TIMEOUT_S = 600.0
"""The emergency save's deadline when nothing sets it (``restart.emergency_save_timeout_s``, the variable)."""
# Trainer classes of the job's own with verl's trainer shape, "module:Class" comma-separated, that get the
# emergency save besides verl's own trainers (verl_hooks.trainers).
ENV_TRAINER_CLASSES = "VERL_HOOKS_TRAINER_CLASSES"

# Variables a job's Ray workers must see for the guard to behave as in the driver.
FORWARDED_ENV_PREFIXES = ("VERL_HOOKS_", "VERL_SUPERVISOR_")
# The experiment trackers' run identity, which verl's Tracking reads in the process that opens them (the
# TaskRunner, a Ray worker): wandb's run id and resume mode, MLflow's run id (verl/utils/tracking.py:110), the
# tensorboard folder (tracking.py:557). The supervisor sets them so that every attempt writes into one run.
TRACKER_ENV = ("WANDB_RUN_ID", "WANDB_RESUME", "MLFLOW_RUN_ID", "TENSORBOARD_DIR")
# Forwarded by name: the trackers' identity, and verl's own init timeout, read by the guard and by verl's workers.
FORWARDED_ENV_NAMES = (*TRACKER_ENV, ENV_VERL_CKPT_ENGINE_INIT_TIMEOUT_S)
# Variables that name paths on the supervisor's machine: no use to a driver that may run on another one.
SUPERVISOR_LOCAL_ENV = (ENV_ERROR_FILE, ENV_STACKS_DIR)

# The runtime_env hook that installs the guard in every worker process of a job.
SETUP_HOOK = "verl_hooks.install"
# verl's trainer.checkpoint_callback_class that writes the checkpoint marker (below). Spelled here because the
# launcher, which must not import verl, recognises it in the job's arguments.
CHECKPOINT_CALLBACK_CLASS = "verl_hooks.checkpoint_callback.SupervisorCheckpointCallback"
# Where Ray's Jobs API hands a submission's job config (runtime_env, metadata) to its driver.
RAY_INJECTED_JOB_CONFIG = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def forwarded_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables of ``environ`` that the job's Ray workers need to see."""
    return {k: v for k, v in environ.items() if k.startswith(FORWARDED_ENV_PREFIXES) or k in FORWARDED_ENV_NAMES}


def injected_job_config(environ: Mapping[str, str]) -> dict[str, Any] | None:
    """The job config Ray's Jobs API injected into this process's environment (None: not a submission's driver,
    or one whose config cannot be read)."""
    raw = environ.get(RAY_INJECTED_JOB_CONFIG)
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except ValueError:
        return None
    return config if isinstance(config, dict) else None


def injected_runtime_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """The runtime_env of the injected job config (empty when there is none)."""
    runtime_env = (injected_job_config(environ) or {}).get("runtime_env")
    return dict(runtime_env) if isinstance(runtime_env, dict) else {}


# --- exit codes ------------------------------------------------------------------------------------------------


class JobExitCode(IntEnum):
    """Exit codes of ``python -m verl_hooks.launch`` (docs/reference/exit-codes.md is generated from them), which
    the supervisor's rules (``conf/supervisor.yaml``) classify."""

    SUCCESS = 0
    """The job finished."""
    FAILURE = 1
    """Any other failure (a job's own ``sys.exit(n)`` keeps its code)."""
    USAGE = 2
    """No ``-m MODULE``, or no such module."""
    WEIGHT_SYNC_FATAL = 75
    """The job died of a ``WeightSyncFatalError`` (EX_TEMPFAIL: restart it)."""
    CONFIG_ERROR = 78
    """A configuration error a restart cannot fix (EX_CONFIG): Hydra/OmegaConf, bad settings, unsupported verl."""
    INTERRUPTED = 130
    """Interrupted (SIGINT)."""
    STOPPED = 143
    """The supervisor asked the job to stop (it is being stopped: a preemption); the trainer saved the step it
    was at, when it could, and the job ended (as on SIGTERM)."""


# --- heartbeats ------------------------------------------------------------------------------------------------


class HeartbeatKind(str, Enum):
    """What a heartbeat says. Each kind carries the fields of ``HEARTBEAT_FIELDS`` besides the common ones
    (``kind``, ``attempt``, ``pid``, ``host``, ``sent_at``)."""

    ALIVE = "alive"
    """From the driver, every interval: the process is not frozen."""
    SYNC_BEGIN = "sync_begin"
    """From the guard: a weight sync began."""
    SYNC_PHASE = "sync_phase"
    """From the guard: the sync entered a phase."""
    SYNC_END = "sync_end"
    """From the guard: the sync finished."""
    SYNC_FAILED = "sync_failed"
    """From the guard: the sync failed or hung; its cleanup has run."""
    ERROR_RECORD = "error_record"
    """From the launcher, synchronously before the driver exits: its error record (``fields["record"]``)."""
    TRACKER = "tracker"
    """From the process that opened verl's experiment trackers: a tracker's run id that later attempts must
    reuse (MLflow's, which only the first attempt can learn)."""
    SAVE_BEGIN = "save_begin"
    """From the trainer: an emergency save began (after a failed sync, or for a stop); it may take up to
    ``deadline_s``, and the supervisor does not tear the job down meanwhile."""
    SAVE_END = "save_end"
    """From the trainer: the emergency save ended (``status``: an ``EmergencyStatus`` value)."""
    CHECKPOINT_SAVED = "checkpoint_saved"
    """From the trainer: its own ``_save_checkpoint`` of ``step`` returned after ``duration_s`` (a periodic save,
    or an emergency one): what the next attempts' emergency saves take their deadline from."""


HEARTBEAT_FIELDS: dict[HeartbeatKind, tuple[str, ...]] = {
    HeartbeatKind.ALIVE: (),
    HeartbeatKind.SYNC_BEGIN: ("step", "backend"),
    HeartbeatKind.SYNC_PHASE: ("step", "phase"),
    HeartbeatKind.SYNC_END: ("step", "duration_s"),
    HeartbeatKind.SYNC_FAILED: ("step", "phase", "hang"),
    HeartbeatKind.ERROR_RECORD: ("record",),
    HeartbeatKind.TRACKER: ("backend", "run_id"),
    HeartbeatKind.SAVE_BEGIN: ("step", "trigger", "deadline_s"),
    HeartbeatKind.SAVE_END: ("step", "trigger", "status", "elapsed_s"),
    HeartbeatKind.CHECKPOINT_SAVED: ("step", "duration_s"),
}

PAST_SAVE_FIELD = "past_save_s"
"""In the JSON answer to a heartbeat: the longest save the trainer timed in the run's earlier attempts (the
supervisor's reading of their ``checkpoint_saved`` beats), for the emergency save's deadline before this attempt
has timed a save of its own. In an answer, not the environment: it grows while a standby driver waits."""

SAVE_REQUEST_FIELD = "save_requested"
"""In the JSON answer to a heartbeat: true once the supervisor asks the job to save at its next safe point and
stop (``restart.save_on_stop_s``). Only an authenticated beat gets an answer, so only the job learns of it."""

PROGRESS_KINDS = frozenset(
    {HeartbeatKind.SYNC_BEGIN, HeartbeatKind.SYNC_PHASE, HeartbeatKind.SYNC_END, HeartbeatKind.SYNC_FAILED}
)
"""Beats that prove the training loop moves: verl syncs weights every step."""


def heartbeat_payload(kind: HeartbeatKind, attempt: int, **fields: Any) -> dict[str, Any]:
    """The JSON body of one heartbeat; refuses fields its kind does not carry (a typo would go unnoticed)."""
    kind = HeartbeatKind(kind)
    unknown = set(fields) - set(HEARTBEAT_FIELDS[kind])
    if unknown:
        raise ValueError(f"heartbeat {kind.value} carries no {', '.join(sorted(unknown))}")
    return {
        "kind": kind.value,
        "attempt": attempt,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "sent_at": time.time(),
        **fields,
    }


def heartbeat_kind(payload: Mapping[str, Any]) -> HeartbeatKind | None:
    """The kind of a received heartbeat; None for a kind this side does not know."""
    try:
        return HeartbeatKind(payload.get("kind"))
    except ValueError:
        return None


# --- the error record ------------------------------------------------------------------------------------------

SYNC_PHASES: tuple[str, ...] = tuple(phase.value for phase in SyncPhase)
"""The weight-sync phases an error record's ``phase`` can name (``verl_hooks.phases``, which imports nothing)."""

RECORD_SCHEMA_VERSION = 1


class RecordSource(str, Enum):
    """Who wrote an error record."""

    LAUNCHER = "launcher"
    """The job's driver (``verl_hooks.launch``)."""
    GUARD_BACKSTOP = "guard-backstop"
    """The guard's last-resort exit, in the process whose weight sync hung."""
    SUPERVISOR_WATCHDOG = "supervisor-watchdog"
    """The supervisor, for an attempt it ended because it stalled."""
    SUPERVISOR_RESUME_CHECK = "supervisor-resume-check"
    """The supervisor, for an attempt it ended because it did not resume from the chosen checkpoint."""


@dataclass(frozen=True)
class ErrorRecord:
    """One versioned JSON document per failed attempt (``$VERL_SUPERVISOR_ERROR_FILE``). Written atomically and
    never overwritten: the first failure recorded in an attempt is its root cause, as in TorchElastic's
    error-file protocol."""

    error_type: str
    """Qualified class name of the root failure, e.g. ``verl_hooks.errors.WeightSyncFatalError``."""
    message: str
    source: RecordSource
    """Who wrote it (written as the member's value)."""
    exit_code: int | None = None
    signal: str | None = None
    phase: str | None = None
    global_step: int | None = None
    backend: str | None = None
    elapsed_s: float | None = None
    hang: bool | None = None
    cleanup: list[dict[str, Any]] = field(default_factory=list)
    cause_type: str | None = None
    traceback: str | None = None
    attempt: int | None = None
    emergency_checkpoint: dict[str, Any] | None = None
    """What the trainer did about the step it was at before the job ended (``EmergencyCheckpoint.to_dict``);
    None when no trainer hook saw the failure. Added in place: older readers ignore it."""
    hostname: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    timestamp: float = field(default_factory=time.time)
    schema_version: int = RECORD_SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    SUMMARY_FIELDS: ClassVar[tuple[str, ...]] = (
        "error_type",
        "message",
        "phase",
        "global_step",
        "backend",
        "hang",
        "cleanup",
        "emergency_checkpoint",
        "source",
        "timestamp",
    )
    """What the supervisor's events and notifications carry of a record (its traceback stays in the file)."""

    def summary(self, message_chars: int = 500) -> dict[str, Any]:
        """``SUMMARY_FIELDS`` as JSON values, the message cut at ``message_chars``."""
        values = {name: getattr(self, name) for name in self.SUMMARY_FIELDS}
        return {**values, "message": self.message[:message_chars], "source": self.source.value}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ErrorRecord:
        known = set(cls.__dataclass_fields__)
        values = {k: v for k, v in data.items() if k in known}
        if "source" in values:
            values["source"] = RecordSource(values["source"])  # ValueError: not a record of ours
        return cls(**values)


def write_atomically(path: str | os.PathLike[str], text: str, *, overwrite: bool = True) -> bool:
    """Write ``text`` to ``path`` so that a reader sees the old file (or none) or the whole new one, never a part:
    the one way both sides write a file another process may read at any moment (the run's state, an error
    record, a checkpoint's marker).

    A temporary file beside it is written and fsynced, then renamed over ``path`` or, without ``overwrite``,
    linked into place, which fails when ``path`` exists: then nothing changes and it returns False (the first
    writer wins). The directory is fsynced last, so the rename survives a crash of the machine.
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, target)
        else:
            try:
                os.link(tmp, target)
            except FileExistsError:
                return False
    finally:
        Path(tmp).unlink(missing_ok=True)
    directory = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return True


def write_record(path: str | os.PathLike[str], record: ErrorRecord) -> bool:
    """Write ``record`` to ``path`` unless a record is already there. Returns whether this one was written.

    The link into place is atomic and fails when the file exists, so two writers (the guard's backstop in a
    worker and the driver) cannot interleave, and the earlier failure is kept.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if write_atomically(target, record.to_json(), overwrite=False):
        return True
    logger.info("error record %s already exists; keeping the earlier failure", target)
    return False


def read_record(path: str | os.PathLike[str]) -> ErrorRecord | None:
    """The record at ``path``, or None when there is none or it cannot be understood (the reader then falls
    back to the exit status)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        logger.warning("ignoring unreadable error record %s: %s", path, exc)
        return None
    return record_from_payload(data, str(path))


def record_from_payload(data: Any, where: str = "heartbeat") -> ErrorRecord | None:
    """A record from its JSON form (a file's content or a heartbeat's ``record`` field); None if it is not one."""
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version != RECORD_SCHEMA_VERSION:
        logger.warning("ignoring error record from %s with unknown schema_version %r", where, version)
        return None
    try:
        return ErrorRecord.from_dict(data)
    except (TypeError, ValueError) as exc:
        logger.warning("ignoring malformed error record from %s: %s", where, exc)
        return None


# --- the emergency checkpoint ----------------------------------------------------------------------------------


class EmergencyTrigger(str, Enum):
    """Why the trainer was asked to save the step it is at."""

    SYNC_FAILURE = "sync_failure"
    """A weight sync failed or hung; verl saves before it syncs, so the trainer holds exactly the step's state."""
    STOP_REQUEST = "stop_request"
    """The supervisor is being stopped (``restart.save_on_stop_s``): saved right after a successful sync."""
    STEP_FAILURE = "step_failure"
    """Anything else escaped the trainer's ``fit`` (generation, reward, a replica's death, data, validation): the
    step the trainer last completed is saved, when its state is still that step's (``verl_hooks.step_progress``)."""


class EmergencyStatus(str, Enum):
    SAVED = "saved"
    SKIPPED = "skipped"
    """Not attempted, for the ``reason`` given (a trainer task still in flight, the step already saved, ...)."""
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    """Still running at its deadline: given up, the job ends; a half-written step is set aside by the supervisor."""


@dataclass(frozen=True)
class EmergencyCheckpoint:
    """What the trainer did about the step it was at when the job had to end."""

    status: EmergencyStatus
    trigger: EmergencyTrigger
    step: int | None
    reason: str | None = None
    """Why it was skipped, or the error that failed it."""
    elapsed_s: float | None = None
    deadline_s: float | None = None
    failed_step: int | None = None
    """For a failure outside the sync: the step the trainer was working on (``global_steps``) when it failed."""

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "status": self.status.value, "trigger": self.trigger.value}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> EmergencyCheckpoint | None:
        """None for no data, or for data this side cannot read (a newer job's)."""
        if not isinstance(data, Mapping):
            return None
        try:
            return cls(
                status=EmergencyStatus(data["status"]),
                trigger=EmergencyTrigger(data["trigger"]),
                step=data.get("step"),
                reason=data.get("reason"),
                elapsed_s=data.get("elapsed_s"),
                deadline_s=data.get("deadline_s"),
                failed_step=data.get("failed_step"),
            )
        except (KeyError, ValueError):
            return None

    def summary(self) -> str:
        """One line for the console, the events and the alerts."""
        if self.status is EmergencyStatus.SAVED:
            return f"saved step {self.step} in {self.elapsed_s or 0:.1f} s"
        if self.status is EmergencyStatus.TIMED_OUT:
            return f"step {self.step} not saved: the save was still running at its {self.deadline_s or 0:g} s deadline"
        if self.status is EmergencyStatus.FAILED:
            return f"saving step {self.step} failed: {self.reason}"
        return f"skipped: {self.reason}"


# --- the checkpoint marker -------------------------------------------------------------------------------------

CHECKPOINT_MARKER = "verl_supervisor_checkpoint.json"
"""Written inside each ``global_step_N`` folder by ``verl_hooks.checkpoint_callback`` after verl saved the step."""

MARKER_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class CheckpointFacts:
    """What a step of this run must contain, from the job's own verl configuration (not guessed from files).

    ``None`` means unknown: the supervisor then decides from the files themselves.
    """

    actor_strategy: str | None = None
    """``actor_rollout_ref.actor.strategy``: ``fsdp``, ``fsdp2`` or ``megatron`` (others are not judged)."""
    actor_save_contents: tuple[str, ...] | None = None
    """``actor_rollout_ref.actor.checkpoint.save_contents``."""
    critic: bool | None = None
    """Whether the trainer uses a critic (``trainer.use_critic``), so that every step must hold ``critic/``."""
    critic_strategy: str | None = None
    critic_save_contents: tuple[str, ...] | None = None
    async_save: bool | None = None
    """``actor_rollout_ref.actor.checkpoint.async_save`` (Megatron only)."""
    transfer_queue: bool | None = None
    """Whether the trainer saves ``transfer_queue/`` (verl's V1 trainer in a mode other than ``sync``)."""
    max_actor_ckpt_to_keep: int | None = None
    max_critic_ckpt_to_keep: int | None = None

    def merged_over(self, other: CheckpointFacts) -> CheckpointFacts:
        """These facts, with the ones this side does not know taken from ``other``."""
        mine = asdict(self)
        return CheckpointFacts(**{k: (v if v is not None else getattr(other, k)) for k, v in mine.items()})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CheckpointFacts:
        values = {k: data.get(k) for k in cls.__dataclass_fields__}
        for key in ("actor_save_contents", "critic_save_contents"):
            if values[key] is not None:
                values[key] = tuple(str(item) for item in values[key])
        return cls(**values)


@dataclass(frozen=True)
class CheckpointMarker:
    """The job's word that verl finished saving step ``step``: every file of the step folder with its size.

    ``durable`` is False for an asynchronous save (Megatron ``async_save``): verl calls the callback while its
    writes may still be in flight, so the files listed are those present then, and completeness must also wait
    for the layout's own completion point.
    """

    step: int
    files: dict[str, int]
    """Path relative to the step folder (``/``-separated) → size in bytes."""
    durable: bool
    facts: CheckpointFacts
    written_at: float = field(default_factory=time.time)
    schema_version: int = MARKER_SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


def write_checkpoint_marker(step_dir: str | os.PathLike[str], marker: CheckpointMarker) -> Path:
    """Write ``marker`` into ``step_dir`` atomically (a reader sees the whole marker or none)."""
    target = Path(step_dir) / CHECKPOINT_MARKER
    write_atomically(target, marker.to_json())
    return target


def read_checkpoint_marker(step_dir: str | os.PathLike[str]) -> CheckpointMarker | None:
    """The marker in ``step_dir``; None when there is none. Raises ``ValueError`` for one that cannot be read
    (the caller treats the step as damaged rather than as a step without a marker)."""
    path = Path(step_dir) / CHECKPOINT_MARKER
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(data, dict) or data.get("schema_version") != MARKER_SCHEMA_VERSION:
        raise ValueError(
            f"{path}: unknown schema_version {data.get('schema_version') if isinstance(data, dict) else None!r}"
        )
    try:
        files = {str(name): int(size) for name, size in dict(data["files"]).items()}
        return CheckpointMarker(
            step=int(data["step"]),
            files=files,
            durable=bool(data["durable"]),
            facts=CheckpointFacts.from_dict(data.get("facts") or {}),
            written_at=float(data.get("written_at", 0.0)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: malformed marker ({type(exc).__name__}: {exc})") from exc


# --- how a failure travels -------------------------------------------------------------------------------------


def exception_chain(exc: BaseException, *, with_context: bool = False, limit: int = 64) -> Iterator[BaseException]:
    """``exc`` and the exceptions behind it, outermost first: Ray's ``RayTaskError.cause`` (the original
    exception, unpickled at the driver) and Python's ``__cause__`` (and ``__context__`` when asked); each
    exception once, cycles not followed."""
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending and len(seen) < limit:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        links = [getattr(current, "cause", None), current.__cause__]
        if with_context:
            links.append(current.__context__)
        pending += [link for link in links if isinstance(link, BaseException)]


def root_cause(exc: BaseException) -> BaseException:
    """The innermost exception behind ``exc``."""
    *_, innermost = exception_chain(exc)
    return innermost
