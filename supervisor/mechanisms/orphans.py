"""Processes the job starts that shed the run's marker and their parent: caught as the supervisor's orphans.

A job may start a helper with a fresh environment (``subprocess.Popen(..., env={"PATH": ...})``), in a session
of its own, whose parent exits at once: it carries no marker and is nobody's descendant, so a search by marker
or by process tree never finds it, and it would outlive the attempt and the run. With ``PR_SET_CHILD_SUBREAPER``
(Linux 3.4+, any user) an orphan of the supervisor's process tree is re-parented to the supervisor instead of to
init: every child of the supervisor that it did not start itself is such an orphan, whatever its environment.
The supervisor's own long-lived children (drivers, standbys, the embedded cluster's ``ray start``, the reaper)
are noted when they start (``note_started``), so that they are never taken for one.

Out of reach: a process on another node (the subreaper is a property of this machine's process tree: in
``ray.mode=address`` and ``jobs`` only what the driver's own tree orphans on this machine is caught), and one that
a Ray worker orphans while Ray's own raylet subreaper is on (``RAY_kill_child_processes_on_worker_exit_with_raylet_
subreaper``; the raylet then ends it itself). Only a supervisor that is a subreaper has orphans: in any other
process (a test's) ``adopted`` finds none, so a child started by other means is never taken for one.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import threading

import psutil

_PR_SET_CHILD_SUBREAPER = 36

_lock = threading.Lock()
_started: set[int] = set()
_subreaper = False


def become_subreaper() -> str | None:
    """Make this process the subreaper of its descendants; returns why not (None: it is one now)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            return f"prctl(PR_SET_CHILD_SUBREAPER) failed: {os.strerror(ctypes.get_errno())}"
    except (OSError, AttributeError) as exc:  # not Linux, or no libc to ask
        return f"prctl is not available here: {exc}"
    global _subreaper
    _subreaper = True
    return None


def note_started(pid: int) -> None:
    """A child this process started itself (and reaps itself): never an orphan."""
    with _lock:
        _started.add(pid)


def adopted() -> list[psutil.Process]:
    """The live children of this process that it did not start: orphans of its tree, re-parented to it."""
    if not _subreaper:
        return []
    with _lock:
        ours = set(_started)
    found = []
    for child in psutil.Process().children():
        try:
            if child.pid not in ours and child.status() != psutil.STATUS_ZOMBIE:
                found.append(child)
        except psutil.Error:  # gone meanwhile
            continue
    return found


def reap_adopted() -> int:
    """Reap the orphans that have exited (their zombies are this process's to collect); returns how many. The
    children this process started are left to whoever waits for them."""
    if not _subreaper:
        return 0
    with _lock:
        ours = set(_started)
    reaped = 0
    for child in psutil.Process().children():
        if child.pid in ours:
            continue
        with contextlib.suppress(ChildProcessError, psutil.Error):
            if child.status() == psutil.STATUS_ZOMBIE and os.waitpid(child.pid, os.WNOHANG)[0] == child.pid:
                reaped += 1
    return reaped
