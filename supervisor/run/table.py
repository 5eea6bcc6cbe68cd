"""The attempts table printed when a run ends: one row per attempt, as a person scans it."""

from __future__ import annotations

import time

from supervisor.run.history import AttemptRecord, RunHistory

COLUMNS = ("attempt", "started", "ended", "exit", "classification", "resumed from", "reached")


def _clock(ts: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts)) if ts else "-"


def _step(step: int | None) -> str:
    return "-" if step is None else f"step {step}"


def _exit(attempt: AttemptRecord) -> str:
    if attempt.signal:
        return attempt.signal
    return "-" if attempt.exit_code is None else str(attempt.exit_code)


def _classification(attempt: AttemptRecord) -> str:
    if attempt.action is None:
        return "-"
    detail = attempt.error_type.rsplit(".", 1)[-1] if attempt.error_type else attempt.rule
    if attempt.phase:
        detail += f"@{attempt.phase}"
    return f"{attempt.action.value} ({detail})"


def attempts_table(history: RunHistory) -> str:
    rows = [
        (
            str(a.number),
            _clock(a.started_at),
            _clock(a.ended_at),
            _exit(a),
            _classification(a),
            _step(a.resumed_from_step) if a.resumed_from_step is not None else "fresh",
            _step(a.reached_step),
        )
        for a in history.attempts
    ]
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in rows]
    ended = history.exit_code is not None  # finished, or stopped by a signal (then it can be continued)
    outcome = f"outcome: {history.outcome} (exit {history.exit_code})" if ended else "run not finished"
    return "\n".join([f"attempts of run {history.run_id}:", *lines, outcome])
