"""Is a ``.pt`` file a whole ``torch.save`` archive? Checked as a zip, never unpickled.

``torch.load`` would be slow for multi-GB shards and can run arbitrary code; the zip's central directory and its
small pickle member say whether the write finished.
"""

from __future__ import annotations

import re
import struct
import zipfile
from pathlib import Path

from supervisor.checkpoints.problems import CheckpointProblem
from supervisor.config import VerifyLevel

_PICKLE_MEMBER_RE = re.compile(r"[^/]+/data\.pkl")


def archive_problem(path: Path, verify: VerifyLevel) -> tuple[CheckpointProblem, str] | None:
    """Checks that ``path`` is a non-empty torch.save zip archive; returns the problem and a detail, or None."""
    try:
        if not path.is_file():
            return CheckpointProblem.CORRUPT_ARCHIVE, "not a regular file"
        size = path.stat().st_size
        if size == 0:
            return CheckpointProblem.EMPTY_FILE, "0 bytes"
        with zipfile.ZipFile(path) as archive:
            return _zip_problem(archive, size, verify)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, struct.error, NotImplementedError) as e:
        return CheckpointProblem.CORRUPT_ARCHIVE, f"{type(e).__name__}: {e}"
    except OSError as e:
        return CheckpointProblem.UNREADABLE, f"{type(e).__name__}: {e}"


def _zip_problem(archive: zipfile.ZipFile, size: int, verify: VerifyLevel) -> tuple[CheckpointProblem, str] | None:
    """The checks on an opened archive; zip errors propagate to :func:`archive_problem`."""
    members = archive.infolist()
    pickles = [m for m in members if _PICKLE_MEMBER_RE.fullmatch(m.filename)]
    if len(pickles) != 1:
        return CheckpointProblem.CORRUPT_ARCHIVE, f"{len(pickles)} '*/data.pkl' members, not a torch.save archive"
    beyond = [m.filename for m in members if m.header_offset + m.compress_size > size]
    if beyond:
        return CheckpointProblem.CORRUPT_ARCHIVE, f"member {beyond[0]!r} extends past the end of the file"
    archive.read(pickles[0])  # small; reading it to the end checks its local header and CRC-32
    if verify is VerifyLevel.crc:
        bad = archive.testzip()
        if bad is not None:
            return CheckpointProblem.CORRUPT_ARCHIVE, f"bad CRC-32 in member {bad!r}"
    return None
