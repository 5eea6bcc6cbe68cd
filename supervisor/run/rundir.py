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
import time
from pathlib import Path
from typing import Any

from supervisor.run.events import read_events
from supervisor.run.history import SCHEMA_VERSION, RunHistory
from supervisor.run.rebuild import history_from_events
from verl_hooks.contract import write_atomically


class RunDirectoryInUse(RuntimeError):
    """Another supervisor holds this run directory."""


class DamagedRunFile(RuntimeError):
    """A file of the run cannot be read and nothing else holds what it held: the message says which, what is
    wrong with it and what the user can do."""

    def __init__(self, path: Path, problem: str, advice: str) -> None:
        super().__init__(f"{path} cannot be read: {problem}; {advice}")
        self.path, self.problem, self.advice = path, problem, advice


def write_json_atomic(path: Path, data: Any) -> None:
    """A reader sees the old or the new file, never a part (``verl_hooks.contract.write_atomically``)."""
    write_atomically(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


class RunDirectory:
    def __init__(self, path: Path) -> None:
        self.path = path.resolve()
        self._lock_fd: int | None = None
        self.state_problem: str | None = None
        """Set by ``load_history`` when state.json was damaged and the history rebuilt from the events."""

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
        """The run's history: state.json, or, when that cannot be read (cut short, garbled), the history
        ``events.jsonl`` tells (``state_problem`` then says what was wrong). None when there is no state.json.
        Raises ``DamagedRunFile`` when neither can be read, or state.json is another version's."""
        self.state_problem = None
        try:
            text = self.state_path.read_bytes().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return None
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError(f"not a JSON object but {type(data).__name__}")
        except ValueError as exc:
            problem = f"it is not whole JSON ({exc})"
        else:
            version = data.get("schema_version")
            if isinstance(version, int) and version != SCHEMA_VERSION:
                raise DamagedRunFile(
                    self.state_path,
                    f"its schema_version is {version!r}, this supervisor reads {SCHEMA_VERSION}",
                    "read it with the version of verl-supervisor that wrote it",
                )
            try:
                return RunHistory.from_dict(data)
            except (KeyError, TypeError, ValueError) as exc:
                problem = f"it is not a run's history ({type(exc).__name__}: {exc})"
        rebuilt = history_from_events(read_events(self.events_path))
        if rebuilt is None:
            raise DamagedRunFile(
                self.state_path,
                problem,
                f"{self.events_path.name} holds no event of the run to rebuild it from: restore state.json from a "
                "backup, or start the run again in a new run_dir (its checkpoints can be reused with "
                "checkpoints.dir=...)",
            )
        self.state_problem = f"state.json could not be read ({problem}): rebuilt from {self.events_path.name}"
        return rebuilt

    def set_aside_damaged_state(self) -> Path | None:
        """Before the supervisor writes a rebuilt history: the damaged state.json kept beside it, renamed."""
        if self.state_problem is None or not self.state_path.exists():
            return None
        aside = self.state_path.with_name(f"state.json.damaged-{int(time.time())}")
        self.state_path.rename(aside)
        return aside

    def save_history(self, history: RunHistory) -> None:
        write_json_atomic(self.state_path, history.to_dict())
