"""Process mechanics: children that die with the supervisor, exits learned without polling, marked sweeps.

Everything the supervisor starts carries marker variables in its environment (the contract's ``ENV_RUN_ID`` and,
for a job, ``ENV_ATTEMPT``). Ray workers are not descendants of the job's driver (the raylet
starts them), but they inherit the marker through the job's runtime_env, which Ray puts into each worker's
environment. So "every process of this run" is a question ``/proc`` can answer, and nothing without the
marker is ever signalled: the machine is shared.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psutil

from supervisor.mechanisms import orphans
from supervisor.outcomes import ExitStatus

_PR_SET_PDEATHSIG = 1
REAP_TIMEOUT_S = 5.0
"""Default wait, after SIGKILL, for the kernel to reap a process before it counts as a survivor."""


@dataclass(frozen=True)
class ProcessInfo:
    """What the events log says about a process the supervisor signalled."""

    pid: int
    name: str
    cmdline: str

    @classmethod
    def of(cls, process: psutil.Process) -> ProcessInfo:
        try:
            name = process.name()
            cmdline = " ".join(process.cmdline())[:200]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            name, cmdline = "?", ""
        return cls(process.pid, name, cmdline)


def _die_with_parent(parent_pid: int) -> None:
    """Runs in the child between fork and exec: fate sharing if the supervisor is killed outright."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


class ChildProcess:
    """A direct child in a session (and process group) of its own, whose exit is readable from a pidfd."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.pgid = popen.pid  # start_new_session makes the child its group's leader
        self._pidfd: int | None = os.pidfd_open(popen.pid)
        self._status: ExitStatus | None = None

    def fileno(self) -> int:
        """Becomes readable the moment the child exits (for selectors: no polling delay)."""
        if self._pidfd is None:
            raise ValueError("child already reaped")
        return self._pidfd

    def poll(self) -> ExitStatus | None:
        if self._status is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                # Reaped by psutil (an escalation waits on its processes): gone, and how is not known here.
                self._status = ExitStatus()
                self._close_pidfd()
                return self._status
            if pid == self.pid:
                self._status = ExitStatus.from_wait_status(status)
                self.popen.returncode = status
                self._close_pidfd()
        return self._status

    def wait(self, timeout_s: float | None = None, wake: Any = None) -> ExitStatus | None:
        """Block until the child exits, the timeout passes, or ``wake`` (anything with a ``fileno``) becomes
        readable; returns None unless the child exited."""
        import select

        if self._status is not None:
            return self._status
        pidfd = self.fileno()
        ready, _, _ = select.select([pidfd, *([wake] if wake is not None else [])], [], [], timeout_s)
        return self.poll() if pidfd in ready else None

    def signal_group(self, sig: int) -> bool:
        """Signal the child's whole process group; False if it is already gone."""
        try:
            os.killpg(self.pgid, sig)
            return True
        except ProcessLookupError:
            return False

    def group_alive(self) -> bool:
        try:
            os.killpg(self.pgid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True

    def reaped_with(self, returncode: int) -> None:
        """Someone else (psutil) reaped the child: its exit as they saw it (``Popen.returncode``'s convention)."""
        if self._status is None:
            self._status = ExitStatus(signal=-returncode) if returncode < 0 else ExitStatus(code=returncode)
            self.popen.returncode = returncode
            self._close_pidfd()

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None


def start_child(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: str | os.PathLike[str] | None = None,
    stdout: int | IO[Any] | None = None,
    stderr: int | IO[Any] | None = None,
    stdin: int | IO[Any] | None = subprocess.DEVNULL,
) -> ChildProcess:
    """Start ``argv`` (no shell) in a new session that is SIGKILLed if the supervisor dies."""
    parent = os.getpid()
    popen = subprocess.Popen(  # argv from the validated config, never a shell
        list(argv),
        env=dict(env),
        cwd=cwd,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        start_new_session=True,
        preexec_fn=lambda: _die_with_parent(parent),  # prctl must run in the child
    )
    orphans.note_started(popen.pid)
    return ChildProcess(popen)


def with_descendants(processes: list[psutil.Process]) -> list[psutil.Process]:
    """The processes and every descendant of theirs, collected before any is killed (a dead parent's children
    are re-parented out of reach). A run's process may start children that carry no readable marker: Ray's
    dashboard and runtime-env agents, children of the raylet, rewrite their process title over their environment,
    and once their raylet and GCS are gone they wait forever."""
    found = {p.pid: p for p in processes}
    for process in processes:
        try:
            for child in process.children(recursive=True):
                found.setdefault(child.pid, child)
        except psutil.Error:  # gone meanwhile
            continue
    return list(found.values())


@dataclass(frozen=True)
class TerminationReport:
    terminated: tuple[ProcessInfo, ...]
    """Exited after SIGTERM within the grace period."""
    killed: tuple[ProcessInfo, ...]
    """Needed SIGKILL."""
    survivors: tuple[ProcessInfo, ...]
    """Still alive after SIGKILL (a process in uninterruptible sleep, or not ours to kill)."""


def terminate_processes(
    processes: Sequence[psutil.Process],
    grace_s: float,
    already_terminated: Collection[int] = (),
    reap_timeout_s: float = REAP_TIMEOUT_S,
    known: Mapping[int, ProcessInfo] | None = None,
) -> TerminationReport:
    """The one escalation of the supervisor: SIGTERM, wait up to ``grace_s`` on one shared deadline, SIGKILL
    the rest, wait up to ``reap_timeout_s`` for them to be reaped; already-gone processes are ignored.

    ``already_terminated``: pids the caller has just sent SIGTERM (a process group), or that a signal to another
    process ends (Ray's fate sharing): not signalled twice, since a second SIGTERM can cut short the graceful
    shutdown the first one started. ``known``: what the caller read of them before signalling them itself (a
    process that exits on that signal can no longer be read here, and must still be named in the report).
    """
    infos = {p.pid: (known or {}).get(p.pid) or ProcessInfo.of(p) for p in processes}
    for process in processes:
        if process.pid in already_terminated:
            continue
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            process.kill()
    _, survivors = psutil.wait_procs(alive, timeout=reap_timeout_s)
    killed = [p for p in alive if p not in survivors]
    terminated = [p for p in processes if p not in alive]
    return TerminationReport(
        terminated=tuple(infos[p.pid] for p in terminated),
        killed=tuple(infos[p.pid] for p in killed),
        survivors=tuple(infos[p.pid] for p in survivors),
    )


def stop_group(
    child: ChildProcess, grace_s: float, reap_timeout_s: float, others: Sequence[psutil.Process] = ()
) -> TerminationReport:
    """SIGTERM a child's whole process group and ``others`` (processes of the same work outside the group), wait
    one shared grace period, SIGKILL the rest (``terminate_processes``); then SIGKILL whatever the group still
    holds (a member that appeared meanwhile) and reap the child."""
    group = processes_in_group(child.pgid)
    # Named now: a member that exits on the SIGTERM below can no longer be read, and must still be reported.
    known = {process.pid: ProcessInfo.of(process) for process in group}
    child.signal_group(signal.SIGTERM)
    members = {p.pid for p in group}
    everything = group + [p for p in others if p.pid not in members]
    report = terminate_processes(everything, grace_s, members, reap_timeout_s, known)
    leader = next((p for p in group if p.pid == child.pid), None)
    if leader is not None and getattr(leader, "returncode", None) is not None:
        child.reaped_with(leader.returncode)  # psutil reaped it, and kept its code (negative: a signal)
    if child.group_alive():
        child.signal_group(signal.SIGKILL)
    child.wait(reap_timeout_s)
    return report


def merge_reports(*reports: TerminationReport) -> TerminationReport:
    """Several escalations as one: survivors are what the last one could not end."""
    return TerminationReport(
        terminated=tuple(p for r in reports for p in r.terminated),
        killed=tuple(p for r in reports for p in r.killed),
        survivors=reports[-1].survivors if reports else (),
    )


def processes_in_group(pgid: int) -> list[psutil.Process]:
    """The live processes of process group ``pgid``."""
    members = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                members.append(process)
        except (ProcessLookupError, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return members


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports free on ``host`` right now. All are held open until all are chosen: ports asked
    for one at a time can repeat (the kernel may hand a just-released port out again), and Ray refuses two
    components on one port."""
    with contextlib.ExitStack() as held:
        ports = []
        for _ in range(count):
            sock = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def local_ip_towards(host: str) -> str:
    """This machine's address on the route to ``host`` (no packet is sent: a UDP socket only picks a route)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((host, 9))
        return str(sock.getsockname()[0])


def wait_for(condition: Any, timeout_s: float, interval_s: float = 0.1) -> bool:
    """Poll ``condition()`` until true or the timeout; for waiting on other programs' start-up only."""
    deadline = time.monotonic() + timeout_s
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)


def tail(path: Path, max_bytes: int = 16384) -> str:
    """The end of a log file, decoded leniently; empty when the file does not exist."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            return f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""
