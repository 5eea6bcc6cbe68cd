"""A full checkpoint disk is a verdict: the run stops at once with exit 3, saying so, every complete step kept.

The checkpoint folder is on a tmpfs the test mounts, sized to hold two of the mini-PPO job's steps and part of
a third (its steps' sizes are read from the session's reference run); skipped where the machine does not let
the test mount one.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.checkpoints import scan_checkpoints
from tests.supervisor.e2e.conftest import FAST, JOB_ARGS, events_of, run_supervisor

# A whole run of the mini-PPO job onto a real full volume: with -m slow. The loop's verdict and warning are
# tests/supervisor/test_loop.py's (milliseconds), the verdict itself tests/supervisor/test_disk.py's.
pytestmark = [pytest.mark.ray, pytest.mark.slow]

PAGE = 4096


def pages(folder: Path) -> int:
    """What the folder's files take on a tmpfs, in pages."""
    return sum(-(-f.stat().st_size // PAGE) for f in folder.rglob("*") if f.is_file())


@pytest.fixture
def small_volume(tmp_path: Path, reference: dict) -> Iterator[Path]:
    step = pages(reference["checkpoints"] / "global_step_2")
    size = (2 * step + step // 2 + 2) * PAGE  # two steps, the tracker file, and half of a third step
    mount_point = tmp_path / "small-volume"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {(done.stderr or done.stdout).strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "--lazy", str(mount_point)], check=False)


def test_a_checkpoint_disk_that_fills_up_stops_the_run_at_once_with_exit_3(runs, reference, small_volume) -> None:
    run_dir = runs.new()
    checkpoints = small_volume / "checkpoints"
    # No standby: no restart is to come, and its imports would only slow the job down.
    proc = run_supervisor(
        run_dir, *FAST, "restart.warm_standby=false", f"checkpoints.dir={checkpoints}", job_args=JOB_ARGS
    )

    assert proc.returncode == 3, proc.stderr[-3000:]
    assert len(events_of(run_dir, "attempt_started")) == 1, "no attempt was launched into the full disk"
    (exited,) = events_of(run_dir, "attempt_exited")
    assert (exited["rule"], exited["action"]) == ("disk-full", "fail")
    finished = events_of(run_dir, "run_finished")[-1]
    assert finished["exit_code"] == 3
    assert finished["reason"].startswith("not restarting: the checkpoint disk is full")
    assert f"the volume {small_volume} (tmpfs) holding {checkpoints}" in finished["reason"]
    assert "free of" in finished["reason"]
    assert "1 incomplete steps on it hold" in finished["reason"], "the save the full disk cut short"
    assert "the checkpoint disk is full" in proc.stdout + proc.stderr, "the console says it"
    complete = sorted(info.step for info in scan_checkpoints(checkpoints) if info.complete)
    assert complete == [2, 4], "every complete step is kept"
    for step in (2, 4):
        ours = checkpoints / f"global_step_{step}" / "actor"
        theirs = reference["checkpoints"] / f"global_step_{step}" / "actor"
        for model in theirs.glob("model_*.pt"):
            assert (ours / model.name).read_bytes() == model.read_bytes(), f"step {step} intact"
