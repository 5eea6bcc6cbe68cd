"""An attempt's log that never grows past its limit, keeping its first part and its newest part.

A verl run prints thousands of lines a step (vLLM, progress bars, each worker's warnings): over a week that is
gigabytes, usually on the volume that also holds the checkpoints. The first part of a log holds the start-up
errors; the newest part, what the job did last and the failure the classification rules look for. So:

    stdout.log          the first ``head_bytes``, then one line saying where the rest went
    stdout.log.tail     the newest part, up to half of what the limit leaves after the head
    stdout.log.tail.1   the part before it (replaced when .tail fills again); what came before that is dropped

and ``read_tail`` gives the end of the log as a reader expects it, from whichever files hold it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

TAIL_SUFFIX = ".tail"
HEAD_SHARE = 0.25
"""Of the limit, the share kept from the log's start."""


def tail_paths(path: Path) -> tuple[Path, Path]:
    """The newest part's file and the one before it."""
    newest = path.with_name(path.name + TAIL_SUFFIX)
    return newest, newest.with_name(newest.name + ".1")


class BoundedLog:
    """Appends to ``path`` as an ordinary log until ``limit_bytes`` would be passed (None: never bounded)."""

    def __init__(self, path: Path, limit_bytes: int | None) -> None:
        self.path = path
        self.limit_bytes = limit_bytes
        self.head_bytes = None if limit_bytes is None else max(1, int(limit_bytes * HEAD_SHARE))
        self.segment_bytes = None if limit_bytes is None else max(1, (limit_bytes - self.head_bytes) // 2)
        self.dropped_bytes = 0
        self._head: BinaryIO | None = path.open("ab")
        self._head_size = self._head.tell()
        self._tail: BinaryIO | None = None
        self._tail_size = 0

    def write(self, data: bytes) -> None:
        if self._head is not None:
            room = len(data) if self.head_bytes is None else max(0, self.head_bytes - self._head_size)
            self._head.write(data[:room])
            self._head.flush()
            self._head_size += min(room, len(data))
            data = data[room:]
            if not data:
                return
            self._close_head()
        segment = self.segment_bytes or 1
        while data:
            if self._tail is None or self._tail_size >= segment:
                self._rotate()
            tail = self._tail
            piece = data[: segment - self._tail_size]
            tail.write(piece)  # type: ignore[union-attr]
            self._tail_size += len(piece)
            data = data[len(piece) :]
        self._tail.flush()  # type: ignore[union-attr]

    def _close_head(self) -> None:
        """The head is full: it says where the log goes on, and is not written again."""
        newest, before = tail_paths(self.path)
        assert self._head is not None
        self._head.write(
            f"\n[verl-supervisor] this log goes on in {newest.name} (newest) and {before.name}; it is kept "
            f"under {self.limit_bytes} bytes (job.log_limit_mb): what falls between is dropped\n".encode()
        )
        self._head.close()
        self._head = None

    def _rotate(self) -> None:
        newest, before = tail_paths(self.path)
        if self._tail is not None:
            self._tail.close()
            if before.exists():
                self.dropped_bytes += before.stat().st_size
            os.replace(newest, before)
        self._tail = newest.open("wb")
        self._tail_size = 0

    def close(self) -> None:
        for handle in (self._head, self._tail):
            if handle is not None:
                handle.close()
        self._head = self._tail = None


def read_tail(path: Path, max_bytes: int = 16384) -> str:
    """The last ``max_bytes`` of a log written by ``BoundedLog`` (or any plain log), decoded leniently; empty
    when there is none."""
    newest, before = tail_paths(path)
    parts = [p for p in (path, before, newest) if p.exists()] if newest.exists() else [path]
    chunks: list[bytes] = []
    wanted = max_bytes
    for part in reversed(parts):
        try:
            with part.open("rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - wanted))
                chunk = f.read()
        except FileNotFoundError:
            continue
        chunks.insert(0, chunk)
        wanted -= len(chunk)
        if wanted <= 0:
            break
    return b"".join(chunks).decode("utf-8", errors="replace")


def log_bytes(path: Path) -> int:
    """What a log and its kept parts take on disk."""
    return sum(p.stat().st_size for p in (path, *tail_paths(path)) if p.exists())
