"""What an attempt's ``heartbeats.jsonl`` says, summed up: when it first and last made progress, which steps its
weight syncs finished at what time, and when each of its processes last spoke.

The loop appends every heartbeat it takes to ``attempts/<n>/heartbeats.jsonl`` (``received_at`` is the
supervisor's wall clock). ``status``, ``report`` and the metrics read those files while the run goes on, so the
reader keeps its place in each file and parses only what was appended since.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from verl_hooks.contract import PROGRESS_KINDS, HeartbeatKind

_PROGRESS = frozenset(kind.value for kind in PROGRESS_KINDS)


@dataclass
class AttemptBeats:
    first_progress_at: float | None = None
    last_progress_at: float | None = None
    last_beat_at: float | None = None
    max_step: int | None = None
    sync_ends: list[tuple[float, int]] = field(default_factory=list)
    """(received_at, step) of every finished weight sync, in arrival order."""
    first_at_step: dict[int, float] = field(default_factory=dict)
    """When the first beat carrying each step arrived. verl syncs the weights of step N after training and
    saving it, so that is when step N's work was done; a resumed attempt's first sync carries the resumed step."""
    last_beat_by_source: dict[str, float] = field(default_factory=dict)
    """``host:pid`` of each process that sent beats, and when its last one arrived."""
    longest_save_s: float | None = None
    """The longest of the trainer's own saves (``checkpoint_saved`` beats) in this attempt."""

    def take(self, beat: dict[str, Any]) -> None:
        at = beat.get("received_at")
        if not isinstance(at, (int, float)):
            return
        self.last_beat_at = at if self.last_beat_at is None else max(self.last_beat_at, at)
        source = f"{beat.get('host', '?')}:{beat.get('pid', '?')}"
        self.last_beat_by_source[source] = at
        duration = beat.get("duration_s")
        if beat.get("kind") == HeartbeatKind.CHECKPOINT_SAVED.value and isinstance(duration, (int, float)):
            self.longest_save_s = max(duration, self.longest_save_s or 0.0)
        if beat.get("kind") not in _PROGRESS:
            return
        self.first_progress_at = at if self.first_progress_at is None else min(self.first_progress_at, at)
        self.last_progress_at = at if self.last_progress_at is None else max(self.last_progress_at, at)
        step = beat.get("step")
        if isinstance(step, int):
            self.max_step = step if self.max_step is None else max(self.max_step, step)
            self.first_at_step[step] = min(at, self.first_at_step.get(step, at))
            if beat.get("kind") == HeartbeatKind.SYNC_END.value:
                self.sync_ends.append((at, step))

    def reached_at(self, step: int) -> float | None:
        """When this attempt had step ``step`` done (its sync of that step began)."""
        return self.first_at_step.get(step)

    def back_at(self, step: int | None) -> float | None:
        """When this attempt first synced ``step`` or a later one (None: any): the run was back where a failed
        attempt's kept work had left it."""
        times = [at for carried, at in self.first_at_step.items() if step is None or carried >= step]
        return min(times) if times else None


ALIVE_FILE = "alive.json"
"""Beside heartbeats.jsonl: ``host:pid`` of each process that sent ``alive`` beats, and when its last arrived.
The loop keeps only the last of each (they come every few seconds for as long as the attempt lives)."""


class BeatsReader:
    """Summaries of the attempts' heartbeat files, read incrementally (a live run's files only grow)."""

    def longest_save_s(self, attempts: range) -> float | None:
        """The longest save the trainer timed in any of ``attempts``: the next emergency save's deadline comes
        from it until the new attempt has timed a save of its own."""
        longest = [s for s in (self.of(n).longest_save_s for n in attempts) if s is not None]
        return max(longest) if longest else None

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self._summaries: dict[int, AttemptBeats] = {}
        self._offsets: dict[int, int] = {}

    def of(self, attempt: int) -> AttemptBeats:
        summary = self._summaries.setdefault(attempt, AttemptBeats())
        self._take_alive(summary, self.run_dir / "attempts" / str(attempt) / ALIVE_FILE)
        path = self.run_dir / "attempts" / str(attempt) / "heartbeats.jsonl"
        try:
            with path.open("rb") as f:
                f.seek(self._offsets.get(attempt, 0))
                data = f.read()
        except FileNotFoundError:
            return summary
        # Only whole lines: the loop may be in the middle of appending one.
        whole = data[: data.rfind(b"\n") + 1]
        self._offsets[attempt] = self._offsets.get(attempt, 0) + len(whole)
        for line in whole.splitlines():
            try:
                beat = json.loads(line)
            except ValueError:
                continue
            if isinstance(beat, dict):
                summary.take(beat)
        return summary

    @staticmethod
    def _take_alive(summary: AttemptBeats, path: Path) -> None:
        try:
            alive = json.loads(path.read_text())
        except (OSError, ValueError):
            return  # none yet, or one a crash cut short: the next write replaces it whole
        if not isinstance(alive, dict):
            return
        for source, at in alive.items():
            if isinstance(at, int | float) and not isinstance(at, bool):
                summary.last_beat_by_source[str(source)] = max(at, summary.last_beat_by_source.get(str(source), at))
                summary.last_beat_at = at if summary.last_beat_at is None else max(summary.last_beat_at, at)
