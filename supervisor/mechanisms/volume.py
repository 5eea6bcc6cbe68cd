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


MIN_FREE_BYTES = 64 << 20
"""Before any step is saved, below this much free space a volume counts as full."""


@dataclass(frozen=True)
class CheckpointSpace:
    """The checkpoint folder's volume, and what needs room on it."""

    checkpoints_dir: str
    volume: Volume
    newest_step_bytes: int | None
    """What the newest complete step takes (None: there is none): the next save needs about as much."""
    set_aside_bytes: int = 0
    set_aside_count: int = 0
    """Incomplete steps on it: set aside already, or to be at the next start (a save the full disk cut short)."""
    run_logs_bytes: int | None = None
    """What the run directory's own logs take (attempt logs, Ray's logs) when they are on the same volume."""

    @property
    def needed_bytes(self) -> int:
        """What the next save needs: about what the newest complete step takes."""
        return self.newest_step_bytes if self.newest_step_bytes is not None else MIN_FREE_BYTES

    def describe(self) -> str:
        volume = self.volume
        said = (
            f"the volume {volume.mount} ({volume.device}) holding {self.checkpoints_dir} has {_size(volume.free_bytes)}"
            f" free of {_size(volume.total_bytes)}"
        )
        if self.newest_step_bytes is not None:
            said += f"; the newest complete step takes {_size(self.newest_step_bytes)}"
        if self.set_aside_count:
            said += f"; {self.set_aside_count} incomplete steps on it hold {_size(self.set_aside_bytes)}"
        if self.run_logs_bytes is not None:
            said += f"; the run directory's logs on it take {_size(self.run_logs_bytes)}"
        return said


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024:
            return f"{value:.1f} {unit}"
    return f"{value / 1024:.1f} TiB"
