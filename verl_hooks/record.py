"""Error records for exceptions: how the job side describes the failure that ended it.

The record's schema, its reader and its writer are part of the job/supervisor contract
(``verl_hooks.contract``); this module builds records from exceptions, which only the job side raises.
"""

from __future__ import annotations

import traceback

from verl_hooks.contract import ErrorRecord, RecordSource, root_cause
from verl_hooks.errors import (
    SYNC_FAILURE_FIELDS,
    StopRequested,
    WeightSyncFatalError,
    find_step_failure_checkpoint,
    find_stop_request,
    find_weight_sync_error,
    qualified_name,
)


def record_for_exception(
    exc: BaseException, *, exit_code: int, source: RecordSource, attempt: int | None = None
) -> ErrorRecord:
    """The record for an exception that ended a job (its weight-sync details when it has any)."""
    formatted = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    fatal = find_weight_sync_error(exc)
    if fatal is not None:
        return record_for_weight_sync_error(
            fatal, exit_code=exit_code, source=source, attempt=attempt, traceback_text=formatted
        )
    stop = find_stop_request(exc)
    if stop is not None:
        return ErrorRecord(
            error_type=qualified_name(StopRequested),
            message=stop.message,
            source=source,
            exit_code=exit_code,
            global_step=stop.global_step,
            traceback=formatted,
            attempt=attempt,
            emergency_checkpoint=stop.emergency_checkpoint,
        )
    root = root_cause(exc)
    emergency = find_step_failure_checkpoint(exc)
    return ErrorRecord(
        error_type=qualified_name(type(root)),
        message=str(root) or type(root).__name__,
        source=source,
        exit_code=exit_code,
        global_step=None if emergency is None else emergency.get("failed_step"),
        traceback=formatted,
        attempt=attempt,
        emergency_checkpoint=emergency,
    )


def record_for_weight_sync_error(
    fatal: WeightSyncFatalError,
    *,
    exit_code: int,
    source: RecordSource,
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
    shared = {name: data[name] for name in RECORDED_SYNC_FIELDS}
    return ErrorRecord(
        error_type=qualified_name(WeightSyncFatalError),
        source=source,
        exit_code=exit_code,
        traceback=text or None,
        attempt=attempt,
        **shared,
    )


RECORDED_SYNC_FIELDS = tuple(name for name in SYNC_FAILURE_FIELDS if name in ErrorRecord.__dataclass_fields__)
"""The fields of a failed sync its error record takes by the same name: every one the record has (the rest,
``cause_message``, ``cause_traceback``, ``stuck_stack`` and ``trainer_side``, go into its traceback or stay in
the job's log)."""
