"""Checkpoint layout, resume decisions and the checkpoint manager, without Ray: verl's names, verl's rules."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from verl.utils.checkpoint.checkpoint_manager import find_latest_ckpt_path

import mini_ppo.checkpoint_io as checkpoint_io
from mini_ppo.checkpoint_io import (
    FinalReport,
    MiniCheckpointManager,
    MiniMegatronCheckpointManager,
    ResumePoint,
    checkpoint_manager,
    load_data_state,
    load_transfer_queue,
    resume_point,
    save_data_state,
    save_transfer_queue,
    write_tracker,
)
from mini_ppo.layout import (
    ACTOR_DIR,
    MEGATRON_MANIFEST,
    TRACKER_FILE,
    TRANSFER_QUEUE_DIR,
    check_resume_path,
    shard_files,
    should_save,
    step_folder,
    step_of,
)
from mini_ppo.model import PolicySpec, build_policy, weights_digest
from mini_ppo.schema import CheckpointLayout, ResumeMode
from supervisor.checkpoints import inspect_checkpoint
from supervisor.checkpoints.layouts import inspect_role
from tests.supervisor import megatron_files
from verl_hooks.contract import CheckpointFacts

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
        "critic_sha256": None,
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


def manager_for(seed: int, layout: CheckpointLayout = CheckpointLayout.fsdp) -> MiniCheckpointManager:
    model = build_policy(SPEC, seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    return checkpoint_manager(layout, model, optimizer, role=ACTOR_DIR, arch="MiniPPOPolicy", transformer_config={})


@pytest.mark.usefixtures("one_rank_group")
@pytest.mark.parametrize("layout", list(CheckpointLayout))
def test_save_then_load_continues_bit_identically(tmp_path: Path, layout: CheckpointLayout) -> None:
    actor = str(step_folder(tmp_path, 3) / ACTOR_DIR)
    first = manager_for(seed=1, layout=layout)
    trained(first.model, first.optimizer, range(3))
    torch.manual_seed(123)
    random.seed(456)
    first.save_checkpoint(actor, global_step=3)
    expected_draws = (torch.rand(3).tolist(), random.random())
    trained(first.model, first.optimizer, range(3, 6))

    second = manager_for(seed=2, layout=layout)
    torch.manual_seed(0)
    second.load_checkpoint(actor)
    assert (torch.rand(3).tolist(), random.random()) == expected_draws, "RNG states restored"
    trained(second.model, second.optimizer, range(3, 6))
    assert weights_digest(second.model) == weights_digest(first.model), "model and Adam state restored exactly"
    if layout is CheckpointLayout.fsdp:
        extra = torch.load(shard_files(actor, 1, 0).extra_state, weights_only=False)
        assert extra["lr_scheduler"] is None
    verdict = inspect_role(Path(actor), tmp_path, step=3)
    assert (verdict.layout.value, verdict.world_size, verdict.problems) == (layout.value, 1, ()), (
        "the supervisor's own rules, told nothing, recognise the layout and find it complete"
    )


@pytest.mark.usefixtures("one_rank_group")
def test_the_megatron_manifest_is_verls_and_written_last(tmp_path: Path, monkeypatch) -> None:
    """At the moment the manifest goes into place every other file of the role folder is already there, as
    after verl's ``_finalize_save``; before it, the supervisor must read the folder as incomplete."""
    actor = step_folder(tmp_path, 4) / ACTOR_DIR
    manager = manager_for(seed=0, layout=CheckpointLayout.megatron)
    assert isinstance(manager, MiniMegatronCheckpointManager)
    seen: list[tuple[set[str], tuple[str, ...]]] = []
    original = os.replace

    def spying_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if Path(dst).name == MEGATRON_MANIFEST:
            files = {p.relative_to(actor).as_posix() for p in actor.rglob("*") if p.is_file()}
            seen.append((files, inspect_role(actor, tmp_path, step=4, strategy="megatron").problems))
        original(src, dst)

    monkeypatch.setattr(checkpoint_io.os, "replace", spying_replace)
    manager.save_checkpoint(str(actor), global_step=4)
    [(before, problems)] = seen
    expected = {"transformer_config.json", f"{MEGATRON_MANIFEST}.tmp"} | {
        f"{content}/dist_ckpt/{name}"
        for content in ("model", "optimizer", "extra")
        for name in ("__0_0.distcp", ".metadata", "common.pt", "metadata.json")
    }
    assert before == expected
    assert [p.split(":")[0] for p in problems] == ["missing_manifest"]

    manifest = json.loads((actor / MEGATRON_MANIFEST).read_text())
    fixture = megatron_files.manifest(4, 1)
    assert manifest.keys() == fixture.keys()
    assert manifest["directories"].keys() == fixture["directories"].keys()
    assert (manifest["global_step"], manifest["world_size"], manifest["role"]) == (4, 1, "actor")
    assert {name: entry["path"] for name, entry in manifest["contents"].items()} == {
        "model": "model/dist_ckpt",
        "optimizer": "optimizer/dist_ckpt",
        "rng_state": "extra/dist_ckpt",
        "transformer_config": "transformer_config.json",
    }


@pytest.mark.usefixtures("one_rank_group")
def test_a_megatron_folder_cut_before_a_dist_ckpt_finished_is_refused_on_load(tmp_path: Path) -> None:
    actor = step_folder(tmp_path, 2) / ACTOR_DIR
    manager_for(seed=0, layout=CheckpointLayout.megatron).save_checkpoint(str(actor), global_step=2)
    (actor / "optimizer" / "dist_ckpt" / "metadata.json").unlink()
    with pytest.raises(FileNotFoundError, match="is not a distributed checkpoint"):
        manager_for(seed=0, layout=CheckpointLayout.megatron).load_checkpoint(str(actor))


def save_steps(manager: MiniCheckpointManager, root: Path, steps: range, keep: int | None) -> list[list[int]]:
    """After each save, the steps that still have an ``actor/`` folder."""
    kept = []
    for step in steps:
        manager.save_checkpoint(str(step_folder(root, step) / ACTOR_DIR), global_step=step, max_ckpt_to_keep=keep)
        kept.append(sorted(step_of(p.parent) for p in root.glob(f"global_step_*/{ACTOR_DIR}")))
    return kept


@pytest.mark.usefixtures("one_rank_group")
@pytest.mark.parametrize("layout", list(CheckpointLayout))
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
def test_rotation_is_verls(
    tmp_path: Path, layout: CheckpointLayout, keep: int | None, expected: list[list[int]]
) -> None:
    assert save_steps(manager_for(seed=0, layout=layout), tmp_path, range(1, 5), keep) == expected


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


# --- TransferQueue's checkpoint (async trainer modes) ---


def test_transfer_queue_is_saved_as_transferqueue_saves_it_and_read_back(tmp_path: Path) -> None:
    final = tmp_path / TRANSFER_QUEUE_DIR
    (tmp_path / "transfer_queue.tmp").mkdir()  # a save cut before its rename: the next one starts over
    save_transfer_queue(final, {"global_steps": 4})
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == [
        "transfer_queue/controller_state.pkl",
        "transfer_queue/metadata.json",
        "transfer_queue/storage_units/su_0_mini_ppo_storage_0.pkl",
        "transfer_queue/storage_units/su_info.json",
    ]
    assert json.loads((final / "metadata.json").read_text()) == {
        "storage_saved": True,
        "user_metadata": {"global_steps": 4},
    }
    assert load_transfer_queue(final, 4)["partitions"] == {}, "nothing is in flight at a save"
    save_transfer_queue(final, {"global_steps": 6})  # an older one in place is replaced whole
    with pytest.raises(ValueError, match="global step 6, not of step 4"):
        load_transfer_queue(final, 4)


@pytest.mark.parametrize("missing", ["metadata.json", "controller_state.pkl"])
def test_a_transfer_queue_without_its_files_is_refused(tmp_path: Path, missing: str) -> None:
    final = tmp_path / TRANSFER_QUEUE_DIR
    save_transfer_queue(final, {"global_steps": 2})
    (final / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing):
        load_transfer_queue(final, 2)


def test_the_supervisor_accepts_the_transfer_queue_the_job_writes(tmp_path: Path) -> None:
    folder = step_folder(tmp_path, 2)
    facts = CheckpointFacts(transfer_queue=True)
    folder.mkdir()
    assert "missing_transfer_queue" in {p.split(":")[0] for p in inspect_checkpoint(folder, facts=facts).problems}
    save_transfer_queue(folder / TRANSFER_QUEUE_DIR, {"global_steps": 2})
    problems = inspect_checkpoint(folder, facts=facts).problems
    assert not [p for p in problems if "transfer_queue" in p], problems
