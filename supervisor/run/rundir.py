"""The run directory: its lock, its state file, its attempt folders.

Layout::

    <run_dir>/supervisor.lock     held (flock) by the one supervisor working on this run
    <run_dir>/state.json          RunHistory, replaced atomically after every change
    <run_dir>/events.jsonl        one JSON object per event (supervisor.run.events)
    <run_dir>/attempts/<n>/       stdout.log, stderr.log, error.json of attempt n
    <run_dir>/ray/                the embedded Ray cluster's temp dir (Ray's logs; vsray-*/ for a long path)
    <run_dir>/checkpoints/        the job's checkpoints, unless configured elsewhere
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

from supervisor.run.history import RunHistory
from verl_hooks.contract import write_atomically


class RunDirectoryInUse(RuntimeError):
    """Another supervisor holds this run directory."""


def write_json_atomic(path: Path, data: Any) -> None:
    """A reader sees the old or the new file, never a part (``verl_hooks.contract.write_atomically``)."""
    write_atomically(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


class RunDirectory:
    def __init__(self, path: Path) -> None:
        self.path = path.resolve()
        self._lock_fd: int | None = None

    @property
    def state_path(self) -> Path:
        return self.path / "state.json"

    @property
    def events_path(self) -> Path:
        return self.path / "events.jsonl"

    @property
    def lock_path(self) -> Path:
        return self.path / "supervisor.lock"

    def attempt_dir(self, number: int) -> Path:
        folder = self.path / "attempts" / str(number)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def acquire(self) -> None:
        """Take the run directory for this process; refuse if another live supervisor has it.

        flock is released by the kernel when its holder dies, so a crashed supervisor never leaves the run
        directory locked.
        """
        if not self.path.exists():
            # The run's records, logs and token are the user's alone; a directory the user made keeps its mode.
            self.path.mkdir(parents=True, mode=0o700)
        fd = os.open(self.lock_path, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirectoryInUse(
                f"run directory {self.path} is in use by another supervisor (pid {holder}); "
                f"wait for it to finish or choose another run_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def release(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def load_history(self) -> RunHistory | None:
        try:
            data = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return None
        return RunHistory.from_dict(data)

    def save_history(self, history: RunHistory) -> None:
        write_json_atomic(self.state_path, history.to_dict())
