"""The error record: one versioned JSON document per failed attempt, read by the supervisor.

Written atomically (temporary file, fsync, link into place) and never overwritten: the first failure recorded
in an attempt is its root cause, as in TorchElastic's error-file protocol. Light on imports on purpose: the
supervisor reads records without importing verl, Ray or torch.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from verl_hooks.errors import WeightSyncFatalError, find_weight_sync_error, qualified_name

SCHEMA_VERSION = 1

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ErrorRecord:
    error_type: str
    """Qualified class name of the root failure, e.g. ``verl_hooks.errors.WeightSyncFatalError``."""
    message: str
    source: str
    """Who wrote it: ``launcher`` (the job's driver), ``guard-backstop`` (the guard's last-resort exit), or
    ``supervisor-watchdog`` (the supervisor, for an attempt it ended because it stalled)."""
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
    hostname: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    timestamp: float = field(default_factory=time.time)
    schema_version: int = SCHEMA_VERSION

    @property
    def is_weight_sync_failure(self) -> bool:
        return self.phase is not None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ErrorRecord:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def record_for_exception(exc: BaseException, *, exit_code: int, source: str, attempt: int | None = None) -> ErrorRecord:
    """The record for an exception that ended a job (its weight-sync details when it has any)."""
    formatted = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    fatal = find_weight_sync_error(exc)
    if fatal is not None:
        return record_for_weight_sync_error(
            fatal, exit_code=exit_code, source=source, attempt=attempt, traceback_text=formatted
        )
    root = _root_cause(exc)
    return ErrorRecord(
        error_type=qualified_name(type(root)),
        message=str(root) or type(root).__name__,
        source=source,
        exit_code=exit_code,
        traceback=formatted,
        attempt=attempt,
    )


def record_for_weight_sync_error(
    fatal: WeightSyncFatalError,
    *,
    exit_code: int,
    source: str,
    attempt: int | None = None,
    traceback_text: str | None = None,
) -> ErrorRecord:
    data = fatal.to_dict()
    text = traceback_text or ""
    if data["cause_traceback"] and data["cause_traceback"] not in text:
        # Across Ray the original traceback travels only as text: keep it next to the driver's.
        text = f"{text}\nOriginal failure inside the weight sync:\n{data['cause_traceback']}"
    if data["stuck_stack"]:
        text = f"{text}\nWhere the weight sync was stuck:\n{data['stuck_stack']}"
    return ErrorRecord(
        error_type=qualified_name(WeightSyncFatalError),
        message=data["message"],
        source=source,
        exit_code=exit_code,
        phase=data["phase"],
        global_step=data["global_step"],
        backend=data["backend"],
        elapsed_s=data["elapsed_s"],
        hang=data["hang"],
        cleanup=data["cleanup"],
        cause_type=data["cause_type"],
        traceback=text or None,
        attempt=attempt,
    )


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost exception: Ray's ``RayTaskError.cause`` first, then ``__cause__``."""
    current = exc
    for _ in range(32):
        inner = getattr(current, "cause", None)
        if not isinstance(inner, BaseException):
            inner = current.__cause__
        if inner is None or inner is current:
            return current
        current = inner
    return current


def write_record(path: str | os.PathLike[str], record: ErrorRecord) -> bool:
    """Write ``record`` to ``path`` unless a record is already there. Returns whether this one was written.

    The link into place is atomic and fails when the file exists, so two writers (the guard's backstop in a
    worker and the driver) cannot interleave, and the earlier failure is kept.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(record.to_json())
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, target)
        except FileExistsError:
            logger.info("error record %s already exists; keeping the earlier failure", target)
            return False
        return True
    finally:
        os.unlink(tmp)


def read_record(path: str | os.PathLike[str]) -> ErrorRecord | None:
    """The record at ``path``, or None when there is none or it cannot be understood (the caller then falls
    back to the exit status)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        logger.warning("ignoring unreadable error record %s: %s", path, exc)
        return None
    if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
        logger.warning("ignoring error record %s with unknown schema_version %r", path, _version(data))
        return None
    try:
        return ErrorRecord.from_dict(data)
    except TypeError as exc:
        logger.warning("ignoring malformed error record %s: %s", path, exc)
        return None


def _version(data: Any) -> Any:
    return data.get("schema_version") if isinstance(data, dict) else None
