"""Fate sharing without lag: a tiny process that outlives the supervisor only to end the run's processes.

The supervisor's children die with it (``PR_SET_PDEATHSIG``), but not their children: Ray's GCS, raylet and
workers notice a dead ``ray start`` only seconds later, and keep training meanwhile. The reaper is started with
the read end of a pipe whose write end only the supervisor holds. The kernel closes it when the supervisor dies,
however it dies (SIGKILL included): the reaper wakes at once and SIGKILLs the processes that carry the run's
marker and their descendants, the ones this run started and nothing else. Processes of the run whose marker
cannot be read (Ray's agents rewrite their title over their environment, and a dead raylet leaves them orphans)
are announced over the same pipe while the supervisor lives (``adopt PID START_TIME``). A supervisor that ends
normally first writes ``done``, and the reaper leaves quietly.

    python -m supervisor.mechanisms.reaper '{"VERL_SUPERVISOR_RUN_ID": "..."}'   (stdin: the pipe)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping

import psutil

from supervisor.mechanisms import orphans
from supervisor.mechanisms.marked import find_marked_processes
from supervisor.mechanisms.processes import with_descendants

DONE = "done"
ADOPT = "adopt"
_RESCANS = 3
"""A process being spawned while the run dies is found by a scan after the first one."""


class Reaper:
    """The supervisor's end: ``disarm`` when the run ended in order."""

    def __init__(self, process: subprocess.Popen[bytes], write_fd: int) -> None:
        self._process = process
        self._write_fd: int | None = write_fd

    @property
    def pid(self) -> int:
        return self._process.pid

    def adopt(self, processes: Iterable[psutil.Process]) -> None:
        """Processes of the run that carry no readable marker (Ray's agents): the reaper ends them too, found by
        pid and start time (a reused pid is never taken for them)."""
        if self._write_fd is None:
            return
        lines = []
        for process in processes:
            try:
                lines.append(f"{ADOPT} {process.pid} {process.create_time()!r}\n")
            except psutil.Error:  # gone already
                continue
        if lines:
            os.write(self._write_fd, "".join(lines).encode())

    def disarm(self, timeout_s: float = 5.0) -> None:
        if self._write_fd is None:
            return
        try:
            os.write(self._write_fd, f"{DONE}\n".encode())
        finally:
            os.close(self._write_fd)
            self._write_fd = None
        try:
            self._process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self._process.kill()  # our own child: it must not outlive an orderly end either
            self._process.wait()


def start_reaper(marker: Mapping[str, str]) -> Reaper:
    """Start the reaper for the processes carrying ``marker``; it holds no marker itself."""
    read_fd, write_fd = os.pipe()
    os.set_inheritable(write_fd, False)
    env = {k: v for k, v in os.environ.items() if k not in marker}
    process = subprocess.Popen(
        [sys.executable, "-m", "supervisor.mechanisms.reaper", json.dumps(dict(marker))],
        stdin=read_fd,
        env=env,
        start_new_session=True,  # a Ctrl-C to the supervisor's terminal must not end the reaper first
    )
    orphans.note_started(process.pid)
    os.close(read_fd)
    return Reaper(process, write_fd)


def reap(marker: Mapping[str, str], died_at: float, adopted: Iterable[tuple[int, float]] = ()) -> int:
    """SIGKILL every process carrying ``marker`` that existed when the supervisor died, their descendants and the
    ``adopted`` (pid, start time) ones still running; returns how many."""
    killed = 0
    for _ in range(_RESCANS):
        found = with_descendants(find_marked_processes(marker) + _still_running(adopted))
        found = [p for p in found if _created_before(p, died_at)]
        for process in found:
            try:
                process.send_signal(signal.SIGKILL)
                killed += 1
            except psutil.Error:  # gone meanwhile
                continue
        if not found:
            break
        time.sleep(0.1)
    return killed


def _still_running(adopted: Iterable[tuple[int, float]]) -> list[psutil.Process]:
    found = []
    for pid, started in adopted:
        try:
            process = psutil.Process(pid)
            if process.create_time() == started:
                found.append(process)
        except psutil.Error:  # gone
            continue
    return found


def _created_before(process: psutil.Process, moment: float) -> bool:
    # Processes created after the death belong to a supervisor that already continues the run.
    try:
        return process.create_time() <= moment + 0.5
    except psutil.Error:  # gone meanwhile
        return False


def main(argv: list[str]) -> int:
    marker = json.loads(argv[1])
    if not isinstance(marker, dict) or not marker:
        print("reaper: needs a non-empty JSON marker", file=sys.stderr)
        return 2
    adopted: list[tuple[int, float]] = []
    for line in sys.stdin:  # ends at EOF: the supervisor closed the pipe, or died
        word, *fields = line.split()
        if word == DONE:
            return 0
        if word == ADOPT and len(fields) == 2:
            adopted.append((int(fields[0]), float(fields[1])))
    killed = reap(marker, time.time(), adopted)
    print(f"reaper: the supervisor died; SIGKILLed {killed} process(es) of its run", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
