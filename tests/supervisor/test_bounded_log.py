"""Attempt logs stay under their limit for a job of any length, keeping the first lines and the newest."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from supervisor.backends.driver import DriverProcess
from supervisor.mechanisms.bounded_log import BoundedLog, log_bytes, read_tail, tail_paths

MARKER_ROOM = 300
"""The head's closing line (where the log goes on) may pass the limit by this much."""


def lines(first: int, count: int) -> bytes:
    return b"".join(f"line {n:08d} {'x' * 40}\n".encode() for n in range(first, first + count))


@pytest.mark.parametrize("chunk", [1, 100, 4096, 1 << 20])
def test_a_log_written_past_its_limit_keeps_its_start_and_its_newest_part(tmp_path: Path, chunk: int) -> None:
    path = tmp_path / "stdout.log"
    limit = 64 * 1024
    data = lines(0, 20_000)  # about 1 MB: 16 times the limit
    log = BoundedLog(path, limit)
    for at in range(0, len(data), chunk):
        log.write(data[at : at + chunk])
    log.close()

    assert log_bytes(path) <= limit + MARKER_ROOM
    head = path.read_bytes()
    assert head.startswith(b"line 00000000 "), "the first lines: where start-up errors are"
    assert b"this log goes on in stdout.log.tail (newest) and stdout.log.tail.1" in head
    newest, before = tail_paths(path)
    assert newest.read_bytes().endswith(b"line 00019999 " + b"x" * 40 + b"\n"), "the last line"
    assert before.exists()
    assert read_tail(path, 100).endswith(data[-100:].decode())
    assert read_tail(path, 3 * limit).endswith(data[-len(before.read_bytes()) - len(newest.read_bytes()) :].decode())
    assert log.dropped_bytes > 0


def test_a_log_under_its_limit_is_an_ordinary_log(tmp_path: Path) -> None:
    path = tmp_path / "stdout.log"
    log = BoundedLog(path, 1 << 20)
    log.write(lines(0, 10))
    log.close()
    assert path.read_bytes() == lines(0, 10)
    assert not any(p.exists() for p in tail_paths(path))
    assert read_tail(path, 30) == lines(0, 10)[-30:].decode()


def test_no_limit_means_no_limit(tmp_path: Path) -> None:
    path = tmp_path / "stdout.log"
    log = BoundedLog(path, None)
    log.write(lines(0, 5000))
    log.close()
    assert path.read_bytes() == lines(0, 5000)


def test_a_job_printing_fast_leaves_logs_under_the_limit(tmp_path: Path) -> None:
    """A real driver process printing about 8 MB as fast as it can, behind the supervisor's pipe reader."""
    script = "import sys\nfor n in range(150_000):\n    sys.stdout.write(f'line {n:08d} ' + 'x' * 40 + '\\n')\n"
    script += "sys.stdout.flush()\nsys.stderr.write('the end\\n')\n"
    limit = 1 << 20
    driver = DriverProcess(
        [sys.executable, "-c", script],
        {"PATH": "/usr/bin:/bin"},
        None,
        tmp_path,
        run_id="bounded-log-test",
        attempt=1,
        echo=False,
        log_limit_bytes=limit,
    )
    status = driver.wait(60)
    assert status is not None
    assert status.code == 0
    driver.join_output(10)

    stdout = tmp_path / "stdout.log"
    assert log_bytes(stdout) <= limit + MARKER_ROOM
    assert stdout.read_bytes().startswith(b"line 00000000 ")
    assert read_tail(stdout, 200).endswith("line 00149999 " + "x" * 40 + "\n")
    assert (tmp_path / "stderr.log").read_text() == "the end\n"
