"""The job's driver as a child of the supervisor: output to console and files, exit seen at once, stopped
with escalation together with every process that carries the attempt's marker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import BinaryIO

from supervisor.backends.base import Waker
from supervisor.mechanisms import orphans
from supervisor.mechanisms.bounded_log import BoundedLog
from supervisor.mechanisms.marked import find_marked_processes
from supervisor.mechanisms.processes import ChildProcess, TerminationReport, start_child, stop_group, with_descendants
from supervisor.outcomes import ExitStatus
from verl_hooks.contract import ENV_ATTEMPT, ENV_RUN_ID

LAUNCHER = ("-m", "verl_hooks.launch")


def launcher_args(argv: list[str]) -> list[str]:
    """What follows ``-m verl_hooks.launch`` in ``argv`` (``PYTHON -m verl_hooks.launch -m MODULE ...``)."""
    assert tuple(argv[1:3]) == LAUNCHER, argv
    return argv[3:]


def standby_module(argv: list[str]) -> str | None:
    """The job module a standby driver can preload for ``argv``: only a launcher's command has one."""
    if len(argv) >= 5 and tuple(argv[1:3]) == LAUNCHER and argv[3] == "-m":
        return argv[4]
    return None


def _send_command(standby: StandbyDriver, args: list[str], cwd: str | None) -> None:
    stdin = standby.child.popen.stdin
    assert stdin is not None
    stdin.write((json.dumps({"argv": args, "cwd": cwd}) + "\n").encode())
    stdin.close()  # the only line it reads


class _Tee(threading.Thread):
    """Copies one of the child's pipes to a log file and to the console, as it arrives."""

    def __init__(self, pipe: BinaryIO, log_path: Path, console: BinaryIO | None, limit_bytes: int | None) -> None:
        super().__init__(name=f"tee-{log_path.name}", daemon=True)
        self._pipe = pipe
        self._log_path = log_path
        self._console = console
        self._limit_bytes = limit_bytes

    def run(self) -> None:
        log = BoundedLog(self._log_path, self._limit_bytes)
        try:
            while chunk := os.read(self._pipe.fileno(), 65536):
                log.write(chunk)
                if self._console is not None:
                    try:
                        self._console.write(chunk)
                        self._console.flush()
                    except (OSError, ValueError):
                        self._console = None  # a closed console must not stop the log
        finally:
            log.close()
        self._pipe.close()


class StandbyDriver:
    """The next attempt's driver, started ahead of it (``python -m verl_hooks.standby MODULE``): its imports done,
    waiting on stdin for its command line. It carries the run's and the next attempt's markers from its start,
    so the reaper, a later supervisor's sweep and the next attempt's fence all see it as the run's; the attempt
    still running does not (another attempt number)."""

    def __init__(self, python: str, module: str, env: dict[str, str], cwd: str | None, run_id: str, attempt: int):
        self.attempt = attempt
        self.env = dict(env)
        self.cwd = cwd
        self.markers = {ENV_RUN_ID: run_id, ENV_ATTEMPT: str(attempt)}
        self.started_at = time.monotonic()
        self.child: ChildProcess = start_child(
            [python, "-m", "verl_hooks.standby", module],
            env={**env, **self.markers},
            cwd=cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    @property
    def pid(self) -> int:
        return self.child.pid

    def fits(self, attempt: int, env: dict[str, str], cwd: str | None) -> bool:
        """Whether it can be that attempt's driver: alive, and started with exactly that environment (a module
        may read a variable when it is imported) and working directory."""
        return self.child.poll() is None and (attempt, env, cwd) == (self.attempt, self.env, self.cwd)

    def discard(self, grace_s: float, reap_timeout_s: float) -> None:
        """End it unused: end of input first (it exits 0), then, if it is still importing or stuck in an import,
        its whole group by the one escalation."""
        try:
            assert self.child.popen.stdin is not None
            self.child.popen.stdin.close()
        except OSError:
            pass
        if self.child.wait(grace_s) is None or self.child.group_alive():
            stop_group(self.child, grace_s, reap_timeout_s)
        for pipe in (self.child.popen.stdout, self.child.popen.stderr):
            if pipe is not None:
                pipe.close()


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
        standby: StandbyDriver | None = None,
        log_limit_bytes: int | None = None,
    ) -> None:
        """With ``standby`` (one that ``fits`` this attempt), that process becomes the driver: ``argv`` must be
        the launcher's (``PYTHON -m verl_hooks.launch ...``), and what follows ``verl_hooks.launch`` is sent to it."""
        self.markers = {ENV_RUN_ID: run_id, ENV_ATTEMPT: str(attempt)}
        self.warm = standby is not None
        if standby is None:
            self.child: ChildProcess = start_child(
                argv, env={**env, **self.markers}, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
        else:
            self.child = standby.child
        assert self.child.popen.stdout is not None
        assert self.child.popen.stderr is not None
        self._tees = [
            _Tee(self.child.popen.stdout, log_dir / "stdout.log", sys.stdout.buffer if echo else None, log_limit_bytes),
            _Tee(self.child.popen.stderr, log_dir / "stderr.log", sys.stderr.buffer if echo else None, log_limit_bytes),
        ]
        for tee in self._tees:
            tee.start()
        if standby is not None:
            _send_command(standby, launcher_args(argv), cwd)

    @property
    def pid(self) -> int:
        return self.child.pid

    def wait(self, timeout_s: float | None, wake: Waker | None = None) -> ExitStatus | None:
        return self.child.wait(timeout_s, wake)

    def attempt_processes(self) -> list:
        """Those with the attempt's marker, and the supervisor's orphans (``mechanisms.orphans``) with their
        descendants: attempts do not overlap, so whatever the attempt's tree orphaned is the attempt's."""
        marked = find_marked_processes(self.markers)
        known = {p.pid for p in marked}
        return marked + [p for p in with_descendants(orphans.adopted()) if p.pid not in known]

    def stop_everything(self, grace_s: float, reap_timeout_s: float) -> TerminationReport:
        """The driver's process group (its own children, marked or not) and every other process with the
        attempt's marker (the Ray workers, which the raylet started), on one shared grace period."""
        return stop_group(self.child, grace_s, reap_timeout_s, others=self.attempt_processes())

    def join_output(self, timeout_s: float) -> None:
        """Let the tees drain what the driver wrote before it died (pipes close when its group is gone)."""
        deadline = time.monotonic() + timeout_s
        for tee in self._tees:
            tee.join(max(0.0, deadline - time.monotonic()))
