"""Checkpoint layout, resume decisions and the checkpoint manager, without Ray: verl's names, verl's rules."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from verl.utils.checkpoint.checkpoint_manager import find_latest_ckpt_path

from mini_ppo.checkpoint_io import (
    FinalReport,
    MiniCheckpointManager,
    ResumePoint,
    load_data_state,
    resume_point,
    save_data_state,
    write_tracker,
)
from mini_ppo.layout import (
    ACTOR_DIR,
    TRACKER_FILE,
    check_resume_path,
    shard_files,
    should_save,
    step_folder,
    step_of,
)
from mini_ppo.model import PolicySpec, build_policy, weights_digest
from mini_ppo.schema import ResumeMode

# --- layout (pure) ---


def test_shard_file_names_are_verls() -> None:
    files = shard_files("/ckpt/global_step_4/actor", world_size=2, rank=1)
    assert [p.as_posix() for p in (files.model, files.optim, files.extra_state)] == [
        "/ckpt/global_step_4/actor/model_world_size_2_rank_1.pt",
        "/ckpt/global_step_4/actor/optim_world_size_2_rank_1.pt",
        "/ckpt/global_step_4/actor/extra_state_world_size_2_rank_1.pt",
    ]
    assert step_folder("/ckpt", 12).as_posix() == "/ckpt/global_step_12"


def test_step_is_parsed_from_the_folder_name_as_verl_parses_it() -> None:
    assert step_of("/runs/global_step_3/x/global_step_17") == 17
    assert step_of(Path("rel/global_step_0")) == 0


@pytest.mark.parametrize("path", [None, "", "/ckpt/step_4", "/ckpt/global_step"])
def test_resume_path_must_name_a_step_folder(path: str | None) -> None:
    with pytest.raises(ValueError, match="must name a global_step_N checkpoint folder"):
        check_resume_path(path)


@pytest.mark.parametrize(
    ("step", "save_freq", "total", "saved"),
    [
        (2, 2, 6, True),
        (3, 2, 6, False),
        (5, 2, 5, True),  # the last step always saves...
        (5, 0, 5, False),  # ...unless saving is off
        (4, -1, 6, False),
        (1, 1, 6, True),
    ],
)
def test_save_rule_is_verls(step: int, save_freq: int, total: int, saved: bool) -> None:
    assert should_save(step, save_freq, total) is saved


# --- resume decisions, tracker, final report ---


def make_step(root: Path, step: int) -> Path:
    folder = step_folder(root, step)
    (folder / ACTOR_DIR).mkdir(parents=True)
    return folder


def test_disable_ignores_checkpoints(tmp_path: Path) -> None:
    make_step(tmp_path, 4)
    write_tracker(tmp_path, 4)
    assert resume_point(ResumeMode.disable, str(tmp_path), None) == ResumePoint.scratch()


def test_auto_follows_only_the_tracker(tmp_path: Path) -> None:
    assert resume_point(ResumeMode.auto, str(tmp_path), None) == ResumePoint.scratch(), "no tracker"
    make_step(tmp_path, 2)
    make_step(tmp_path, 4)
    write_tracker(tmp_path, 2)
    assert resume_point(ResumeMode.auto, str(tmp_path), None) == ResumePoint(step_folder(tmp_path, 2), 2)
    write_tracker(tmp_path, 6)
    assert resume_point(ResumeMode.auto, str(tmp_path), None) == ResumePoint.scratch(), "a tracker naming nothing"


def test_tracker_is_written_as_verl_reads_it(tmp_path: Path) -> None:
    make_step(tmp_path, 8)
    write_tracker(tmp_path, 8)
    assert (tmp_path / TRACKER_FILE).read_text() == "8"
    assert find_latest_ckpt_path(str(tmp_path)) == str(step_folder(tmp_path, 8))


def test_resume_path_is_taken_as_given_even_if_older_than_the_tracker(tmp_path: Path, monkeypatch) -> None:
    make_step(tmp_path, 2)
    write_tracker(tmp_path, 4)
    monkeypatch.chdir(tmp_path)
    point = resume_point(ResumeMode.resume_path, "unused", "global_step_2")
    assert point == ResumePoint(step_folder(tmp_path, 2), 2), "relative to the working directory"
    with pytest.raises(ValueError, match="global_step_N"):
        resume_point(ResumeMode.resume_path, str(tmp_path), None)


def test_data_state_round_trip_and_absence(tmp_path: Path) -> None:
    folder = step_folder(tmp_path, 3)
    assert load_data_state(folder) is None
    save_data_state(folder, {"epoch": 1, "position": 2})
    assert load_data_state(folder) == {"epoch": 1, "position": 2}


def test_final_report_is_replaced_whole(tmp_path: Path) -> None:
    FinalReport(4, "aa", 0.5, None, 4).write(tmp_path)
    path = FinalReport(6, "bb", None, 4, 2).write(tmp_path)
    assert json.loads(path.read_text()) == {
        "global_step": 6,
        "weights_sha256": "bb",
        "reward_mean": None,
        "resumed_from_step": 4,
        "steps_run": 2,
    }
    assert [p.name for p in tmp_path.iterdir()] == ["final.json"], "no temp file left behind"


# --- the checkpoint manager, on a one-rank gloo group ---


@pytest.fixture
def one_rank_group() -> Iterator[None]:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


SPEC = PolicySpec(obs_dim=4, hidden_dim=8, num_actions=3)


def trained(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        obs = torch.randn(16, SPEC.obs_dim, generator=torch.Generator().manual_seed(step))
        loss = model(obs).logsumexp(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def manager_for(seed: int) -> MiniCheckpointManager:
    model = build_policy(SPEC, seed)
    return MiniCheckpointManager(model, torch.optim.Adam(model.parameters(), lr=0.05))


@pytest.mark.usefixtures("one_rank_group")
def test_save_then_load_continues_bit_identically(tmp_path: Path) -> None:
    actor = str(step_folder(tmp_path, 3) / ACTOR_DIR)
    first = manager_for(seed=1)
    trained(first.model, first.optimizer, range(3))
    torch.manual_seed(123)
    random.seed(456)
    first.save_checkpoint(actor, global_step=3)
    expected_draws = (torch.rand(3).tolist(), random.random())
    trained(first.model, first.optimizer, range(3, 6))

    second = manager_for(seed=2)
    torch.manual_seed(0)
    second.load_checkpoint(actor)
    assert (torch.rand(3).tolist(), random.random()) == expected_draws, "RNG states restored"
    trained(second.model, second.optimizer, range(3, 6))
    assert weights_digest(second.model) == weights_digest(first.model), "model and Adam state restored exactly"
    extra = torch.load(shard_files(actor, 1, 0).extra_state, weights_only=False)
    assert extra["lr_scheduler"] is None


def save_steps(manager: MiniCheckpointManager, root: Path, steps: range, keep: int | None) -> list[list[int]]:
    """After each save, the steps that still have an ``actor/`` folder."""
    kept = []
    for step in steps:
        manager.save_checkpoint(str(step_folder(root, step) / ACTOR_DIR), global_step=step, max_ckpt_to_keep=keep)
        kept.append(sorted(step_of(p.parent) for p in root.glob(f"global_step_*/{ACTOR_DIR}")))
    return kept


@pytest.mark.usefixtures("one_rank_group")
@pytest.mark.parametrize(
    ("keep", "expected"),
    [
        (None, [[1], [1, 2], [1, 2, 3], [1, 2, 3, 4]]),
        (0, [[1], [1, 2], [1, 2, 3], [1, 2, 3, 4]]),
        (1, [[1], [2], [3], [4]]),
        (2, [[1], [1, 2], [2, 3], [3, 4]]),
        (3, [[1], [1, 2], [1, 2, 3], [2, 3, 4]]),
    ],
)
def test_rotation_is_verls(tmp_path: Path, keep: int | None, expected: list[list[int]]) -> None:
    assert save_steps(manager_for(seed=0), tmp_path, range(1, 5), keep) == expected


@pytest.mark.usefixtures("one_rank_group")
def test_rotation_makes_room_before_the_save_with_a_keep_of_two_or_more(tmp_path: Path, monkeypatch) -> None:
    """verl deletes the oldest before writing the new one (so a crash mid-save leaves keep-1 complete steps)."""
    manager = manager_for(seed=0)
    save_steps(manager, tmp_path, range(1, 3), keep=2)
    seen_during_save = []
    original = torch.save

    def spying_save(obj, path, *args, **kwargs):
        seen_during_save.append(sorted(step_of(p.parent) for p in tmp_path.glob(f"global_step_*/{ACTOR_DIR}")))
        return original(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", spying_save)
    manager.save_checkpoint(str(step_folder(tmp_path, 3) / ACTOR_DIR), global_step=3, max_ckpt_to_keep=2)
    assert seen_during_save[0] == [2, 3], "step 1 was gone before step 3's first file was written"


@pytest.mark.usefixtures("one_rank_group")
def test_a_restarted_job_does_not_rotate_what_an_earlier_attempt_saved(tmp_path: Path) -> None:
    save_steps(manager_for(seed=0), tmp_path, range(1, 3), keep=1)
    assert save_steps(manager_for(seed=0), tmp_path, range(3, 5), keep=1) == [[2, 3], [2, 4]]
