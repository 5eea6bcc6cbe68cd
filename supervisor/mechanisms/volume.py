"""How much room the checkpoint folder's volume has, and what the folders on it hold."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import psutil


@dataclass(frozen=True)
class Volume:
    """The filesystem a path lives on, as ``statvfs`` and the mount table say."""

    mount: str
    """Its mount point."""
    device: str
    total_bytes: int
    free_bytes: int
    """Available to an unprivileged writer (``f_bavail``): what the job's save can still use."""


def volume_of(path: str | os.PathLike[str]) -> Volume:
    """The volume of ``path`` (or of its nearest existing parent: the checkpoint folder may not exist yet)."""
    where = Path(path).absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    stats = os.statvfs(where)
    mount, device = _mount_of(where)
    return Volume(mount, device, stats.f_blocks * stats.f_frsize, stats.f_bavail * stats.f_frsize)


def _mount_of(path: Path) -> tuple[str, str]:
    resolved = str(path.resolve())
    best = ("/", "?")
    for partition in psutil.disk_partitions(all=True):
        mount = partition.mountpoint
        inside = resolved == mount or resolved.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best[0]):
            best = (mount, partition.device)
    return best


def folder_bytes(path: str | os.PathLike[str]) -> int:
    """What the files under ``path`` take on their volume (allocated blocks, as ``du`` counts)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:  # removed meanwhile
                continue
    return total


RUN_LOG_FOLDERS = ("attempts", "ray")
"""What the supervisor writes in a run directory that grows with the run: the attempts' logs, Ray's logs."""


def run_logs_bytes(run_dir: str | os.PathLike[str]) -> int:
    """What the run directory's logs take (the checkpoints, the user's, are not counted)."""
    return sum(folder_bytes(Path(run_dir) / name) for name in RUN_LOG_FOLDERS if (Path(run_dir) / name).is_dir())
