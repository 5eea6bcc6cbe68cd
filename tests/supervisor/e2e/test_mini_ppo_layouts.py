"""The supervisor on the mini-PPO job in each checkpoint layout of verl 0.9.1 beyond plain FSDP: the Megatron
layout v2, a ``critic/`` role folder, TransferQueue's ``transfer_queue/`` (verl's V1 trainer in an async mode).

Each recovered run must resume from the step the supervisor judged complete in that layout and end with the
weights of a run that never failed: the policy's are the same bits in every layout (the reference of the FSDP
tests), the critic's are those of an uninterrupted run with a critic.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mini_ppo.layout import (
    ACTOR_DIR,
    CRITIC_DIR,
    DATA_FILE,
    FINAL_FILE,
    MEGATRON_MANIFEST,
    TRACKER_FILE,
    TRANSFER_QUEUE_DIR,
)
from supervisor.checkpoints import CheckpointProblem, scan_checkpoints
from tests.mini_ppo.harness import ALL_OPTIONS, ASYNC, CRITIC, MEGATRON
from tests.supervisor.e2e.conftest import (
    FAST,
    JOB_ARGS,
    events_of,
    final_of,
    run_supervisor,
    run_supervisor_with_faults,
)
from verl_hooks.contract import CHECKPOINT_MARKER

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def critic_reference(ray_cluster, tmp_path_factory) -> dict:
    """An uninterrupted run of JOB_ARGS with every option: its final.json (the critic's digest of every run with a
    critic: the layout changes no bit) and its checkpoints, the template of a save cut short."""
    from tests.mini_ppo.harness import run_job

    ckpt = tmp_path_factory.mktemp("mini_critic_reference") / "checkpoints"
    run = run_job(ray_cluster, ckpt, *JOB_ARGS, *ALL_OPTIONS)
    assert run.returncode == 0, run.output[-3000:]
    return {"final": run.final(), "checkpoints": ckpt}


def assert_same_end(run_dir: Path, reference: dict, critic_reference: dict, options: tuple[str, ...]) -> None:
    final = final_of(run_dir)
    assert final["weights_sha256"] == reference["final"]["weights_sha256"]
    expected_critic = critic_reference["final"]["critic_sha256"] if CRITIC in options else None
    assert expected_critic is None or len(expected_critic) == 64
    assert final["critic_sha256"] == expected_critic, "the critic was restored from the checkpoint"


@pytest.mark.parametrize(
    "options",
    [
        # Every layout is judged in milliseconds by tests/supervisor/test_checkpoint_layouts.py, on files verl's own
        # writers produce; these whole runs of the loop take a minute each.
        pytest.param(ALL_OPTIONS, id="megatron-critic-separate_async", marks=pytest.mark.slow),
        pytest.param((MEGATRON,), id="megatron", marks=pytest.mark.slow),
        pytest.param((CRITIC,), id="fsdp-critic", marks=pytest.mark.slow),
        pytest.param((ASYNC,), id="separate_async", marks=pytest.mark.slow),
    ],
)
def test_weight_sync_failure_is_resumed_from_its_emergency_checkpoint_in_every_layout_bit_identical(
    runs, reference, critic_reference, options: tuple[str, ...]
) -> None:
    """The sync of step 3 fails with the trainer side idle: the trainer saves step 3 (critic/, the Megatron
    manifest, as its periodic saves do), the supervisor judges it complete in its layout, and the relaunch redoes
    nothing. In verl's async trainer modes the rollout's weights were being written when the sync failed, so the
    step is not saved (``verl_hooks.emergency.decide``): the relaunch resumes from the periodic step 2, in its
    layout (transfer_queue/ included), and still ends with the uninterrupted run's weights."""
    run_dir = runs.new()
    proc = run_supervisor_with_faults(run_dir, "naive:raise@3#1", job_args=(*JOB_ARGS, *options))
    assert proc.returncode == 0, proc.stderr[-4000:]
    exited = events_of(run_dir, "attempt_exited")
    assert [(e["exit_code"], e["rule"], e["global_step"]) for e in exited] == [
        (75, "weight-sync-failure", 3),
        (0, "success", None),
    ]
    saved = ASYNC not in options
    resumed = 3 if saved else 2
    started = events_of(run_dir, "attempt_started")
    assert [(e["resume_step"], e["emergency_of"]) for e in started] == [(None, None), (resumed, 1 if saved else None)]
    emergency = exited[0]["emergency_checkpoint"]
    assert emergency["status"] == ("saved" if saved else "skipped"), emergency
    assert saved or "separate_async" in emergency["reason"], emergency
    verified = events_of(run_dir, "resume_verified")
    assert [(e["attempt"], e["resume_step"], e["first_step"]) for e in verified] == [(2, resumed, resumed + 1)]
    assert all(e["fenced"] for e in events_of(run_dir, "teardown"))
    assert not events_of(run_dir, "checkpoint_set_aside"), "every step was complete in its layout: nothing set aside"
    assert_same_end(run_dir, reference, critic_reference, options)

    layout = "megatron" if MEGATRON in options else "fsdp"
    infos = scan_checkpoints(run_dir / "checkpoints")
    steps = (2, 3, 4, 6) if saved else (2, 4, 6)
    assert [(info.step, info.complete, info.layout) for info in infos] == [(s, True, layout) for s in steps]
    for info in infos:
        assert (info.path / CRITIC_DIR).is_dir() is (CRITIC in options)
        assert (info.path / TRANSFER_QUEUE_DIR).is_dir() is (ASYNC in options)


@pytest.mark.slow
def test_a_save_cut_before_the_megatron_manifest_is_set_aside_and_the_step_before_resumed(
    runs, reference, critic_reference
) -> None:
    """What a crash inside the actor's Megatron save of step 4 leaves: its dist checkpoints and
    transformer_config.json, but not the manifest verl writes last, nor anything the trainer saves after the
    actor (critic/, data.pt, transfer_queue/, the tracker, the marker). Built from a real run's files: the job's
    fault injection reaches the weight sync only, and step 4's save comes before step 4's sync."""
    run_dir = runs.new()
    checkpoints = run_dir / "checkpoints"
    shutil.copytree(critic_reference["checkpoints"], checkpoints)
    (checkpoints / FINAL_FILE).unlink()
    shutil.rmtree(checkpoints / "global_step_6")
    step4 = checkpoints / "global_step_4"
    (step4 / ACTOR_DIR / MEGATRON_MANIFEST).unlink()
    for later in (CRITIC_DIR, TRANSFER_QUEUE_DIR):
        shutil.rmtree(step4 / later)
    (step4 / DATA_FILE).unlink()
    (step4 / CHECKPOINT_MARKER).unlink()
    (checkpoints / TRACKER_FILE).write_text("2")
    left = sorted(p.relative_to(step4).as_posix() for p in step4.rglob("*") if p.is_file())
    assert {"actor/transformer_config.json", "actor/extra/dist_ckpt/metadata.json"} <= set(left)

    proc = run_supervisor(run_dir, *FAST, job_args=(*JOB_ARGS, *ALL_OPTIONS))
    assert proc.returncode == 0, proc.stderr[-4000:]
    (moved,) = events_of(run_dir, "checkpoint_set_aside")
    assert moved["step"] == 4
    kinds = {problem.split(":")[0] for problem in moved["problems"]}
    assert CheckpointProblem.MISSING_MANIFEST.value in kinds, moved["problems"]
    renamed = Path(moved["renamed_to"])
    assert sorted(p.relative_to(renamed).as_posix() for p in renamed.rglob("*") if p.is_file()) == left
    assert [e["resume_step"] for e in events_of(run_dir, "attempt_started")] == [2]
    verified = events_of(run_dir, "resume_verified")
    assert [(e["attempt"], e["resume_step"], e["first_step"]) for e in verified] == [(1, 2, 3)]
    assert_same_end(run_dir, reference, critic_reference, ALL_OPTIONS)
