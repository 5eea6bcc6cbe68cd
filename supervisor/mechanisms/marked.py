"""Which live processes carry a marker in their environment (see ``processes``): the one question the
supervisor asks of ``/proc`` to find what belongs to a run or an attempt.

It depends on nothing of the supervisor (only ``os`` and ``psutil``), so that ``node_scan`` can ship it by value
to a Ray task on another node, where the supervisor is not installed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import psutil


def find_marked_processes(
    markers: Mapping[str, str | None], *, exclude_pids: Iterable[int] = ()
) -> list[psutil.Process]:
    """Live processes whose environment has every marker (with that value; None means any value).

    Only processes whose environment this user may read are considered: other users' processes are never
    matched, let alone signalled.
    """
    excluded = {os.getpid(), *exclude_pids}
    found = []
    for process in psutil.process_iter():
        if process.pid in excluded:
            continue
        try:
            environ = process.environ()
            if process.status() == psutil.STATUS_ZOMBIE:
                continue
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
        if all(key in environ and (value is None or environ[key] == value) for key, value in markers.items()):
            found.append(process)
    return found
