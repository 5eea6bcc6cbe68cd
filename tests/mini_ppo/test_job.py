"""The mini-PPO job end to end, as its own process behind ``verl_hooks.launch``: verl's layout, verl's resume
semantics, weight-sync faults that exit 75, and runs interrupted anywhere that end bit-identical to one that was not.

Every run here is a real Ray job (15-25 s on two cores, most of it Ray workers importing verl): the default suite
runs nine, the rest are marked slow.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from verl.utils.checkpoint.checkpoint_manager import find_latest_ckpt_path

from mini_ppo.layout import (
    ACTOR_DIR,
    CRITIC_DIR,
    DATA_FILE,
    FSDP_CONFIG_FILE,
    MEGATRON_MANIFEST,
    TRANSFER_QUEUE_DIR,
    shard_files,
    step_folder,
)
from mini_ppo.model import PolicySpec, build_policy, weights_digest
from supervisor.checkpoints import CheckpointProblem, inspect_checkpoint, scan_checkpoints
from tests.mini_ppo.harness import ALL_OPTIONS, ASYNC, CRITIC, MEGATRON, JobRun, run_job
from tests.mini_ppo.user_callback import CALLS_FILE, RecordingCallback
from verl_hooks.contract import (
    CHECKPOINT_CALLBACK_CLASS,
    CHECKPOINT_MARKER,
    CheckpointFacts,
    read_checkpoint_marker,
    read_record,
)

pytestmark = pytest.mark.ray

EXIT_WEIGHT_SYNC_FATAL = 75
WORLD_SIZE = 2


@pytest.fixture(scope="module")
def reference(ray_cluster, tmp_path_factory) -> JobRun:
    """The uninterrupted run every interrupted one must end equal to (naive backend, every checkpoint kept)."""
    run = run_job(ray_cluster, tmp_path_factory.mktemp("reference") / "ckpt")
    assert run.returncode == 0, run.output[-4000:]
    return run


def assert_same_end(resumed: JobRun, reference: JobRun, *, resumed_from: int | None) -> None:
    final, expected = resumed.final(), reference.final()
    assert final["weights_sha256"] == expected["weights_sha256"], "the resumed run's weights differ in some bit"
    assert final["global_step"] == expected["global_step"] == 6
    assert final["resumed_from_step"] == resumed_from
    assert final["steps_run"] == 6 - (resumed_from or 0)


def assert_sync_failure(run: JobRun, *, phase: str, step: int, backend: str, hang: bool = False) -> None:
    assert run.returncode == EXIT_WEIGHT_SYNC_FATAL, run.output[-4000:]
    record = read_record(run.error_file)
    assert record.error_type == "verl_hooks.errors.WeightSyncFatalError"
    assert (record.phase, record.global_step, record.backend, record.hang) == (phase, step, backend, hang)
    assert (record.exit_code, record.attempt) == (EXIT_WEIGHT_SYNC_FATAL, 1)
    if not hang:
        assert "InjectedFault" in record.traceback, "the record carries the original failure"
    assert not (run.ckpt_dir / "final.json").exists()


# --- default suite: five job runs ---


def test_uninterrupted_run_writes_verls_layout(reference: JobRun) -> None:
    root = reference.ckpt_dir
    final = reference.final()
    assert (final["global_step"], final["steps_run"], final["resumed_from_step"]) == (6, 6, None)
    assert 0.0 <= final["reward_mean"] <= 1.0
    assert reference.tracker() == "6"
    assert find_latest_ckpt_path(str(root)) == str(step_folder(root, 6)), "verl's own lookup finds the job's save"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["global_step_2", "global_step_4", "global_step_6"]
    for step in (2, 4, 6):
        folder = step_folder(root, step)
        assert (folder / DATA_FILE).is_file()
        expected = {
            path.name
            for rank in range(WORLD_SIZE)
            for path in vars(shard_files(folder / ACTOR_DIR, WORLD_SIZE, rank)).values()
        } | {FSDP_CONFIG_FILE}
        assert {p.name for p in (folder / ACTOR_DIR).iterdir()} == expected
    last = step_folder(root, 6) / ACTOR_DIR
    policy = build_policy(PolicySpec(), seed=0)
    shards = [torch.load(shard_files(last, WORLD_SIZE, rank).model, weights_only=False) for rank in range(WORLD_SIZE)]
    assert all(torch.equal(shards[0][k], shards[1][k]) for k in shards[0]), "data-parallel ranks hold the same model"
    policy.load_state_dict(shards[0])
    assert weights_digest(policy) == final["weights_sha256"], "final.json digests the weights the last save holds"
    extra = torch.load(shard_files(last, WORLD_SIZE, 1).extra_state, weights_only=False)
    assert extra["lr_scheduler"] is None
    assert {"cpu", "random"} <= set(extra["rng"])
    optim = torch.load(shard_files(last, WORLD_SIZE, 0).optim, weights_only=False)
    assert int(optim["state"][0]["step"]) == 6, "Adam's state has seen every step"
    assert torch.load(step_folder(root, 6) / DATA_FILE, weights_only=False)["position"] == 6


def test_every_save_carries_the_supervisors_checkpoint_marker(reference: JobRun) -> None:
    """The job's config names verl_hooks' callback by default; the job calls it after the tracker, as verl does."""
    for step in (2, 4, 6):
        folder = step_folder(reference.ckpt_dir, step)
        marker = read_checkpoint_marker(folder)
        assert marker is not None, f"no marker in {folder}"
        on_disk = {
            p.relative_to(folder).as_posix(): p.stat().st_size
            for p in folder.rglob("*")
            if p.is_file() and p.name != CHECKPOINT_MARKER
        }
        assert marker.files == on_disk
        assert (marker.step, marker.durable) == (step, True)
        facts = marker.facts
        assert (facts.critic, facts.transfer_queue, facts.async_save) == (False, False, False)
        # What a verl config with the FSDP strategy and verl's default save_contents says; no critic to describe.
        assert (facts.actor_strategy, facts.actor_save_contents) == ("fsdp", ("model", "optimizer", "extra"))
        assert (facts.critic_strategy, facts.max_actor_ckpt_to_keep, facts.max_critic_ckpt_to_keep) == (None,) * 3


@pytest.mark.slow  # the chaining itself: tests/verl_hooks/test_checkpoint_callback.py, test_verl_entry.py
def test_a_users_checkpoint_callback_runs_before_the_marker_in_the_jobs_actor(ray_cluster, tmp_path: Path) -> None:
    """The launcher moves the user's callback aside; the environment carries it into the TaskRunner actor."""
    ckpt = tmp_path / "ckpt"
    theirs = f"{RecordingCallback.__module__}.{RecordingCallback.__qualname__}"
    run = run_job(
        ray_cluster,
        ckpt,
        "trainer.total_training_steps=2",
        f"trainer.checkpoint_callback_class={CHECKPOINT_CALLBACK_CLASS}",
        f"trainer.checkpoint_callback_class={theirs}",
    )
    assert run.returncode == 0, run.output[-4000:]
    assert f"trainer.checkpoint_callback_class={theirs} runs first" in run.output
    calls = [json.loads(line) for line in (ckpt / CALLS_FILE).read_text().splitlines()]
    assert calls == [
        {
            "global_step": 2,
            "checkpoint_dir": str(step_folder(ckpt, 2)),
            "async_save": False,
            "marker_there": False,
            "has_config": True,
        }
    ]
    assert read_checkpoint_marker(step_folder(ckpt, 2)) is not None


@pytest.mark.slow  # under the supervisor: tests/supervisor/e2e/test_mini_ppo*.py
def test_naive_sync_fault_between_saves_exits_75_and_resume_ends_bit_identical(
    ray_cluster, tmp_path: Path, reference: JobRun
) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "final.json").write_text('{"global_step": 99}')  # an earlier run's: must not survive a failed one
    faults = "naive:raise@3#1"
    failed = run_job(ray_cluster, ckpt, faults=faults, attempt=1)
    assert_sync_failure(failed, phase="naive", step=3, backend="naive")
    assert failed.tracker() == "2"
    assert not step_folder(ckpt, 4).exists()
    assert "exit 75 so that a supervisor restarts it" in failed.output

    resumed = run_job(ray_cluster, ckpt, faults=faults, attempt=2)
    assert resumed.returncode == 0, resumed.output[-4000:]
    assert_same_end(resumed, reference, resumed_from=2)


@pytest.mark.slow  # under the supervisor: tests/supervisor/e2e/test_mini_ppo*.py
def test_multi_phase_sync_fault_right_after_a_save_and_resume_path_end_bit_identical(
    ray_cluster, tmp_path: Path, reference: JobRun
) -> None:
    """The cpu_gloo backend runs verl's multi-phase sync over standalone replicas; its weights must reach the
    rollout bit for bit, so it ends exactly where the naive reference does."""
    ckpt = tmp_path / "ckpt"
    faults = "update_weights:raise@4#1"
    failed = run_job(ray_cluster, ckpt, "rollout.backend=cpu_gloo", faults=faults, attempt=1)
    assert_sync_failure(failed, phase="update_weights", step=4, backend="cpu_gloo")
    assert failed.tracker() == "4", "the step's save came before its sync"

    resumed = run_job(
        ray_cluster,
        ckpt,
        "rollout.backend=cpu_gloo",
        "trainer.resume_mode=resume_path",
        f"trainer.resume_from_path={step_folder(ckpt, 4)}",
        faults=faults,
        attempt=2,
    )
    assert resumed.returncode == 0, resumed.output[-4000:]
    assert_same_end(resumed, reference, resumed_from=4)


# --- the other layouts verl writes: Megatron, a critic, TransferQueue's state ---


@pytest.fixture(scope="module")
def all_options(ray_cluster, tmp_path_factory) -> JobRun:
    """An uninterrupted run in the Megatron layout, with a critic, in an async trainer mode."""
    run = run_job(ray_cluster, tmp_path_factory.mktemp("all_options") / "ckpt", *ALL_OPTIONS)
    assert run.returncode == 0, run.output[-4000:]
    return run


def test_megatron_critic_and_transfer_queue_are_written_as_verl_writes_them(
    all_options: JobRun, reference: JobRun, tmp_path: Path
) -> None:
    root = all_options.ckpt_dir
    infos = scan_checkpoints(root)
    assert [(info.step, info.complete, info.layout, info.marker) for info in infos] == [
        (step, True, "megatron", True) for step in (2, 4, 6)
    ], [info.problems for info in infos]
    for step in (2, 4, 6):
        folder = step_folder(root, step)
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            [ACTOR_DIR, CRITIC_DIR, DATA_FILE, TRANSFER_QUEUE_DIR, CHECKPOINT_MARKER]
        )
        for role in (ACTOR_DIR, CRITIC_DIR):
            manifest = json.loads((folder / role / MEGATRON_MANIFEST).read_text())
            assert (manifest["role"], manifest["global_step"], manifest["world_size"]) == (role, step, WORLD_SIZE)
        queue = json.loads((folder / TRANSFER_QUEUE_DIR / "metadata.json").read_text())
        assert queue == {"storage_saved": True, "user_metadata": {"global_steps": step}}
        facts = read_checkpoint_marker(folder).facts
        assert (facts.actor_strategy, facts.critic, facts.critic_strategy, facts.transfer_queue) == (
            "megatron",
            True,
            "megatron",
            True,
        )
    # Without the marker (a step saved by verl's legacy trainer, say) the layout rules alone judge the files.
    bare = tmp_path / "global_step_6"
    shutil.copytree(step_folder(root, 6), bare)
    (bare / CHECKPOINT_MARKER).unlink()
    info = inspect_checkpoint(bare, facts=CheckpointFacts(critic=True, transfer_queue=True))
    assert (info.complete, info.layout, info.world_size, info.marker) == (True, "megatron", WORLD_SIZE, False)
    (bare / ACTOR_DIR / MEGATRON_MANIFEST).unlink()
    assert CheckpointProblem.MISSING_MANIFEST in inspect_checkpoint(bare).problem_kinds

    final = all_options.final()
    assert final["weights_sha256"] == reference.final()["weights_sha256"], "the layout and the critic change no bit"
    assert reference.final()["critic_sha256"] is None
    assert final["critic_sha256"] is not None


def fail_at_3_then_resume(ray_cluster, ckpt: Path, *options: str) -> JobRun:
    """Attempt 1 fails in the weight sync of step 3 (step 2 saved); attempt 2 resumes from the tracker."""
    faults = "naive:raise@3#1"
    failed = run_job(ray_cluster, ckpt, *options, faults=faults, attempt=1)
    assert_sync_failure(failed, phase="naive", step=3, backend="naive")
    assert [(info.step, info.complete) for info in scan_checkpoints(ckpt)] == [(2, True)]
    resumed = run_job(ray_cluster, ckpt, *options, faults=faults, attempt=2)
    assert resumed.returncode == 0, resumed.output[-4000:]
    assert "Resuming from" in resumed.output
    assert all(info.complete for info in scan_checkpoints(ckpt))
    return resumed


@pytest.mark.slow  # under the supervisor: tests/supervisor/e2e/test_mini_ppo*.py
def test_every_layout_resumed_from_step_2_ends_bit_identical(
    ray_cluster, tmp_path: Path, reference: JobRun, all_options: JobRun
) -> None:
    resumed = fail_at_3_then_resume(ray_cluster, tmp_path / "ckpt", *ALL_OPTIONS)
    assert_same_end(resumed, reference, resumed_from=2)
    assert resumed.final()["critic_sha256"] == all_options.final()["critic_sha256"], "the critic was restored"
    assert "Restored TransferQueue state" in resumed.output


@pytest.mark.slow
@pytest.mark.parametrize("option", [MEGATRON, CRITIC, ASYNC], ids=["megatron", "critic", "separate_async"])
def test_each_option_alone_resumes_bit_identical(
    ray_cluster, tmp_path: Path, reference: JobRun, all_options: JobRun, option: str
) -> None:
    resumed = fail_at_3_then_resume(ray_cluster, tmp_path / "ckpt", option)
    assert_same_end(resumed, reference, resumed_from=2)
    expected_critic = all_options.final()["critic_sha256"] if option == CRITIC else None
    assert resumed.final()["critic_sha256"] == expected_critic, "the critic trains the same bits in either layout"


# --- slow: the other interruption points and resume modes ---


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fault", "resumed_from"),
    [
        pytest.param("naive:raise@0#1", None, id="initial-sync"),
        pytest.param("naive:raise@1#1", None, id="before-first-save"),
        pytest.param("naive:raise@2#1", 2, id="right-after-a-save"),
        pytest.param("naive:raise@6#1", 6, id="last-step"),
    ],
)
def test_interrupted_anywhere_resume_auto_ends_bit_identical(
    ray_cluster, tmp_path: Path, reference: JobRun, fault: str, resumed_from: int | None
) -> None:
    ckpt = tmp_path / "ckpt"
    step = int(fault.split("@")[1].split("#")[0])
    failed = run_job(ray_cluster, ckpt, faults=fault, attempt=1)
    assert_sync_failure(failed, phase="naive", step=step, backend="naive")
    assert failed.tracker() == (None if resumed_from is None else str(resumed_from))

    resumed = run_job(ray_cluster, ckpt, faults=fault, attempt=2)
    assert resumed.returncode == 0, resumed.output[-4000:]
    assert_same_end(resumed, reference, resumed_from=resumed_from)
    if resumed_from == 6:
        assert resumed.final()["reward_mean"] is None, "a run that did no step has no reward to report"


@pytest.mark.slow
def test_resume_path_to_an_older_checkpoint_replays_to_the_same_end(
    ray_cluster, tmp_path: Path, reference: JobRun
) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(reference.ckpt_dir, ckpt)
    run = run_job(
        ray_cluster, ckpt, "trainer.resume_mode=resume_path", f"trainer.resume_from_path={step_folder(ckpt, 2)}"
    )
    assert run.returncode == 0, run.output[-4000:]
    assert_same_end(run, reference, resumed_from=2)
    assert run.tracker() == "6"


@pytest.mark.slow
def test_resume_mode_disable_starts_over_despite_checkpoints(ray_cluster, tmp_path: Path, reference: JobRun) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(reference.ckpt_dir, ckpt)
    run = run_job(ray_cluster, ckpt, "trainer.resume_mode=disable")
    assert run.returncode == 0, run.output[-4000:]
    assert_same_end(run, reference, resumed_from=None)


@pytest.mark.slow
def test_auto_with_a_tracker_naming_a_missing_folder_starts_over(
    ray_cluster, tmp_path: Path, reference: JobRun
) -> None:
    """verl's ``find_latest_ckpt_path`` returns None for such a tracker, and verl silently trains from scratch."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(reference.ckpt_dir, ckpt)
    shutil.rmtree(step_folder(ckpt, 6))
    run = run_job(ray_cluster, ckpt)
    assert run.returncode == 0, run.output[-4000:]
    assert_same_end(run, reference, resumed_from=None)


@pytest.mark.slow
def test_rotation_keeps_the_newest_actor_folders(ray_cluster, tmp_path: Path, reference: JobRun) -> None:
    """verl deletes only old steps' ``actor/``: their data.pt stays behind, and the tracker names the newest."""
    ckpt = tmp_path / "ckpt"
    run = run_job(ray_cluster, ckpt, "trainer.save_freq=1", "trainer.max_actor_ckpt_to_keep=2")
    assert run.returncode == 0, run.output[-4000:]
    assert run.final()["weights_sha256"] == reference.final()["weights_sha256"], "saving more often changes nothing"
    assert [step for step in range(1, 7) if (step_folder(ckpt, step) / ACTOR_DIR).exists()] == [5, 6]
    assert all((step_folder(ckpt, step) / DATA_FILE).exists() for step in range(1, 7))
    assert run.tracker() == "6"


@pytest.mark.slow
def test_hang_in_the_process_group_rendezvous_exits_75(ray_cluster, tmp_path: Path) -> None:
    run = run_job(
        ray_cluster,
        tmp_path / "ckpt",
        "rollout.backend=cpu_gloo",
        faults="build_process_group:hang@3#1",
        extra_env={"VERL_HOOKS_SYNC_TIMEOUT_S": "3", "VERL_HOOKS_CLEANUP_STEP_TIMEOUT_S": "5"},
    )
    assert_sync_failure(run, phase="build_process_group", step=3, backend="cpu_gloo", hang=True)
    assert run.tracker() == "2"


@pytest.mark.slow
def test_the_policy_learns(ray_cluster, tmp_path: Path) -> None:
    """Not a sleep loop: with the rollout generating from the synced weights, the reward climbs."""
    run = run_job(ray_cluster, tmp_path / "ckpt", "trainer.total_training_steps=40", "trainer.save_freq=-1")
    assert run.returncode == 0, run.output[-4000:]
    # A policy that does not learn picks the right one of 8 actions 1/8 of the time.
    assert run.final()["reward_mean"] > 0.4
    assert not any(run.ckpt_dir.glob("global_step_*")), "save_freq <= 0 never saves"
