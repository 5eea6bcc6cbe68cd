"""``verl-supervisor report``: a run's story as markdown and a timeline picture, from its run directory.

The picture is the benchmark's (``supervisor.run.timeline``): the embedded Ray cluster's start, then per
attempt its start-up (launch to its first weight sync), its training, its teardown (the failure known to the
fence proved) and the backoff; ticks are the finished weight syncs, one per step; a red cross is a failure known
to the supervisor.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from supervisor.run.beats import BeatsReader
from supervisor.run.events import read_events
from supervisor.run.status import RunStatus, StatusReader, error_line
from supervisor.run.timeline import Span, TimelineRow, draw_timeline

# The first of these per attempt is when the supervisor knew that the attempt had failed.
FAILURE_KNOWN = ("error_record_received", "stall_detected", "attempt_exited")


def _attempt_events(events: list[dict[str, Any]], attempt: int) -> dict[str, list[dict[str, Any]]]:
    mine: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        if event.get("attempt") == attempt or event.get("next_attempt") == attempt + 1:
            mine.setdefault(event["event"], []).append(event)
    return mine


def timeline_row(run_dir: Path, status: RunStatus, now: float) -> tuple[TimelineRow, float]:
    """The run as one timeline row, in seconds since the run (first) started; returns the row and its origin."""
    events = read_events(run_dir / "events.jsonl")
    origin = next((e["ts"] for e in events if e["event"] == "run_started"), now)
    beats = BeatsReader(run_dir)
    row = TimelineRow(f"run {status.run_id}")
    for cluster in [e for e in events if e["event"] == "cluster_started"]:
        row.spans.append(Span(cluster["ts"] - cluster["startup_s"] - origin, cluster["ts"] - origin, "cluster start"))
    for attempt in status.attempts:
        number = attempt["number"]
        mine = _attempt_events(events, number)
        summary = beats.of(number)
        started = attempt["started_at"]
        ended = attempt["ended_at"] or now
        known = min((e["ts"] for kind in FAILURE_KNOWN for e in mine.get(kind, [])), default=ended)
        failed = attempt["action"] not in (None, "done")
        stop_training = known if failed else ended
        first = summary.first_progress_at if summary.first_progress_at is not None else stop_training
        row.spans += [
            Span(started - origin, min(first, stop_training) - origin, "start-up"),
            Span(min(first, stop_training) - origin, stop_training - origin, "training"),
        ]
        teardowns = mine.get("teardown", [])
        if teardowns:
            row.spans.append(Span(known - origin, teardowns[-1]["ts"] - origin, "teardown"))
        for backoff in [b for b in mine.get("backoff", []) if b["delay_s"] > 0]:
            row.spans.append(Span(backoff["ts"] - origin, backoff["ts"] + backoff["delay_s"] - origin, "backoff"))
        row.steps += [at - origin for at, _ in summary.sync_ends]
        if failed:
            row.failures.append(known - origin)
    if status.in_flight is None and status.state != "finished":
        row.note, row.note_at = status.state.replace("_", " "), now - origin
    return row, origin


def markdown(run_dir: Path, status: RunStatus, picture: str | None) -> str:
    events = read_events(run_dir / "events.jsonl")
    exited = {e["attempt"]: e for e in events if e["event"] == "attempt_exited"}
    lines = [f"# Run {status.run_id}", ""]
    verdict = f"{status.outcome} (exit {status.exit_code})" if status.outcome else status.state.replace("_", " ")
    lines += [
        f"- **State**: {verdict}",
        f"- **Run directory**: `{status.run_dir}`",
        f"- **Attempts**: {len(status.attempts)}; restarts used {status.restarts_used}"
        + (f" of {status.max_restarts}" if status.max_restarts is not None else ""),
        f"- **Time lost to failures**: {status.lost_s:.1f} s",
        "- **Newest complete checkpoint seen**: "
        + ("none" if status.newest_checkpoint_step is None else f"global_step_{status.newest_checkpoint_step}"),
    ]
    if status.last_error:
        lines.append(f"- **Last error**: {status.last_error}")
    lines += [f"- **Node unhealthy**: {node}: {problems}" for node, problems in status.unhealthy_nodes.items()]
    lines += [f"- **Node excluded** (drained in Ray): {node}: {why}" for node, why in status.excluded_nodes.items()]
    lines += [f"- **Preempted**: {line}" for line in status.preemptions]
    lines += ["", "## Attempts", "", "| # | resumed from | duration | exit | verdict | error | reached |"]
    lines.append("|---|---|---|---|---|---|---|")
    for attempt in status.attempts:
        event = exited.get(attempt["number"], {})
        duration = f"{attempt['ended_at'] - attempt['started_at']:.1f} s" if attempt["ended_at"] else "running"
        exit_ = attempt["signal"] or ("-" if attempt["exit_code"] is None else str(attempt["exit_code"]))
        verdict = f"{attempt['action']} ({attempt['rule']})" if attempt["action"] else "-"
        resumed = attempt["resumed_from_step"]
        reached = attempt["reached_step"]
        lines.append(
            f"| {attempt['number']} | {'fresh' if resumed is None else f'step {resumed}'} | {duration} | {exit_} | "
            f"{verdict} | {error_line(event.get('record')) or '-'} | {'-' if reached is None else f'step {reached}'} |"
        )
    if picture:
        lines += ["", "## Timeline", "", f"![timeline]({picture})"]
    lines += ["", "## Events", "", "| time | event | detail |", "|---|---|---|"]
    origin = events[0]["ts"] if events else 0.0
    for event in events:
        detail = {k: v for k, v in event.items() if k not in ("ts", "event", "run_id", "argv", "record", "dumps")}
        text = ", ".join(f"{k}={v}" for k, v in sorted(detail.items()) if v not in (None, [], {}, ""))
        lines.append(f"| +{event['ts'] - origin:.1f} s | {event['event']} | {text[:200].replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def write_report(run_dir: Path, out: Path, now: float | None = None) -> tuple[Path, Path | None]:
    """Writes ``report.md`` and ``timeline.png`` into ``out``; returns their paths (None: no picture, because
    matplotlib is not installed)."""
    now = time.time() if now is None else now
    status = StatusReader(run_dir).read(now)
    out.mkdir(parents=True, exist_ok=True)
    picture: Path | None = out / "timeline.png"
    row, _ = timeline_row(run_dir, status, now)
    try:
        draw_timeline(
            [row],
            picture,
            f"Run {status.run_id}",
            "seconds since the run started (ticks: weight syncs, one per step; x: a failure known)",
        )
    except ImportError:
        picture = None
    report = out / "report.md"
    report.write_text(markdown(run_dir, status, picture.name if picture else None))
    return report, picture
