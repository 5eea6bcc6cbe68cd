"""A full checkpoint disk is the supervisor's own verdict: judged from the job's error and the volume's room."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from supervisor.mechanisms.volume import MIN_FREE_BYTES, CheckpointSpace, Volume, folder_bytes, volume_of
from supervisor.outcomes import Action, SupervisorRule
from supervisor.policy.disk import disk_full, out_of_space, space_warning

ENOSPC = "OSError: [Errno 28] No space left on device: '/ckpt/global_step_6/actor/model_world_size_1_rank_0.pt'"
GiB = 1 << 30


def space(free: int, newest: int | None = 2 * GiB, aside: tuple[int, int] = (0, 0)) -> CheckpointSpace:
    volume = Volume("/ckpt", "/dev/nvme1n1", 100 * GiB, free)
    return CheckpointSpace("/ckpt/run", volume, newest, set_aside_bytes=aside[0], set_aside_count=aside[1])


@pytest.mark.parametrize(
    ("texts", "said"),
    [
        ([ENOSPC], True),
        (["RuntimeError: [enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0", ENOSPC], True),
        (["OSError: [Errno 122] Disk quota exceeded"], True),
        (["torch.OutOfMemoryError: CUDA out of memory"], False),
        ([None, ""], False),
    ],
)
def test_what_says_a_write_found_no_room(texts: list[str | None], said: bool) -> None:
    assert out_of_space(texts) is said


def test_no_room_on_a_checkpoint_volume_that_cannot_hold_the_next_save_is_a_verdict() -> None:
    verdict = disk_full([ENOSPC], space(free=512 << 20, aside=(3 * GiB, 2)))
    assert verdict is not None
    assert (verdict.action, verdict.rule) == (Action.fail, SupervisorRule.DISK_FULL)
    assert verdict.reason.startswith(
        "the checkpoint disk is full (the job's error says it found no room): the volume /ckpt (/dev/nvme1n1) "
        "holding /ckpt/run has 512.0 MiB free of 100.0 GiB; the newest complete step takes 2.0 GiB; "
        "2 incomplete steps on it hold 3.0 GiB."
    )
    assert "the last complete step is kept. Free space on /ckpt (the incomplete steps can go)" in verdict.reason


def test_the_verdict_says_how_much_of_the_volume_the_runs_own_logs_hold() -> None:
    """A disk the supervisor's own logs filled must say so, next to the checkpoints."""
    full = dataclasses.replace(space(free=512 << 20), run_logs_bytes=40 * GiB)
    verdict = disk_full([ENOSPC], full)
    assert verdict is not None
    assert "the newest complete step takes 2.0 GiB; the run directory's logs on it take 40.0 GiB." in verdict.reason


@pytest.mark.parametrize(
    ("texts", "free", "newest"),
    [
        pytest.param([ENOSPC], 50 * GiB, 2 * GiB, id="no-room-on-another-volume-is-the-rules-to-judge"),
        pytest.param([ENOSPC], MIN_FREE_BYTES, None, id="no-step-yet-and-room-for-a-start"),
    ],
)
def test_otherwise_the_rules_judge(texts: list[str], free: int, newest: int | None) -> None:
    assert disk_full(texts, space(free=free, newest=newest)) is None


def test_with_no_complete_step_a_nearly_empty_volume_still_counts_as_full() -> None:
    assert disk_full([ENOSPC], space(free=MIN_FREE_BYTES - 1, newest=None)) is not None


def test_a_failure_that_does_not_say_why_on_a_volume_that_cannot_hold_the_next_save_is_one_too() -> None:
    """torch.save on a full disk says "PytorchStreamWriter failed writing file ...: file write failed"."""
    verdict = disk_full(["RuntimeError: PytorchStreamWriter failed writing file data/0: file write failed"], space(0))
    assert verdict is not None
    assert verdict.reason.startswith("the checkpoint disk is full: the volume /ckpt")


def test_a_launch_is_warned_of_when_the_next_save_may_not_fit() -> None:
    assert space_warning(space(free=3 * GiB)) is None
    assert space_warning(space(free=3 * GiB, newest=None)) is None
    warning = space_warning(space(free=GiB))
    assert warning is not None
    assert warning.startswith("the next checkpoint may not fit: the volume /ckpt (/dev/nvme1n1) holding /ckpt/run")


def test_the_volume_of_a_folder_not_made_yet_is_its_parents(tmp_path: Path) -> None:
    (tmp_path / "step").mkdir()
    (tmp_path / "step" / "weights.pt").write_bytes(b"x" * 10_000)
    volume = volume_of(tmp_path / "checkpoints" / "not-yet")
    assert volume.total_bytes > volume.free_bytes > 0
    assert Path(tmp_path).resolve().as_posix().startswith(volume.mount)
    assert folder_bytes(tmp_path / "step") >= 10_000
