"""The job's driver as a child of the supervisor: output to console and files, exit seen at once, stopped
with escalation together with every process that carries the attempt's marker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import BinaryIO

from supervisor.mechanisms.marked import find_marked_processes
from supervisor.mechanisms.processes import (
    ChildProcess,
    ProcessInfo,
    TerminationReport,
    processes_in_group,
    start_child,
    terminate_processes,
)
from supervisor.policy.outcomes import ExitStatus
from verl_hooks.contract import ENV_ATTEMPT, ENV_RUN_ID


class _Tee(threading.Thread):
    """Copies one of the child's pipes to a log file and to the console, as it arrives."""

    def __init__(self, pipe: BinaryIO, log_path: Path, console: BinaryIO | None) -> None:
        super().__init__(name=f"tee-{log_path.name}", daemon=True)
        self._pipe = pipe
        self._log_path = log_path
        self._console = console

    def run(self) -> None:
        with self._log_path.open("ab") as log:
            while chunk := os.read(self._pipe.fileno(), 65536):
                log.write(chunk)
                log.flush()
                if self._console is not None:
                    try:
                        self._console.write(chunk)
                        self._console.flush()
                    except (OSError, ValueError):
                        self._console = None  # a closed console must not stop the log
        self._pipe.close()


class DriverProcess:
    """One attempt's driver. Its environment carries the run and attempt markers, which the job's Ray workers
    inherit through the runtime_env the launcher sets up, so that teardown can find all of them."""

    def __init__(
        self,
        argv: list[str],
        env: dict[str, str],
        cwd: str | None,
        log_dir: Path,
        run_id: str,
        attempt: int,
        echo: bool = True,
    ) -> None:
        self.markers = {ENV_RUN_ID: run_id, ENV_ATTEMPT: str(attempt)}
        self.child: ChildProcess = start_child(
            argv, env={**env, **self.markers}, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert self.child.popen.stdout is not None
        assert self.child.popen.stderr is not None
        self._tees = [
            _Tee(self.child.popen.stdout, log_dir / "stdout.log", sys.stdout.buffer if echo else None),
            _Tee(self.child.popen.stderr, log_dir / "stderr.log", sys.stderr.buffer if echo else None),
        ]
        for tee in self._tees:
            tee.start()

    @property
    def pid(self) -> int:
        return self.child.pid

    def wait(self, timeout_s: float | None) -> ExitStatus | None:
        return self.child.wait(timeout_s)

    def attempt_processes(self) -> list:
        return find_marked_processes(self.markers)

    def stop_everything(self, grace_s: float, reap_timeout_s: float) -> TerminationReport:
        """SIGTERM the driver's process group (its own children, marked or not) and every other process with
        the attempt's marker (the Ray workers, which the raylet started), wait one shared grace period,
        SIGKILL the rest; then SIGKILL whatever is left in the group."""
        group = processes_in_group(self.child.pgid)
        # Named now: a member that exits on the SIGTERM below can no longer be read, and must still be reported.
        known = {process.pid: ProcessInfo.of(process) for process in group}
        self.child.signal_group(signal.SIGTERM)
        members = {p.pid for p in group}
        everything = group + [p for p in self.attempt_processes() if p.pid not in members]
        report = terminate_processes(everything, grace_s, members, reap_timeout_s, known)
        if self.child.group_alive():
            self.child.signal_group(signal.SIGKILL)
        self.child.wait(reap_timeout_s)
        return report

    def join_output(self, timeout_s: float) -> None:
        """Let the tees drain what the driver wrote before it died (pipes close when its group is gone)."""
        deadline = time.monotonic() + timeout_s
        for tee in self._tees:
            tee.join(max(0.0, deadline - time.monotonic()))
