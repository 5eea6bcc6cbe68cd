"""Every checkpoint layout verl 0.9.1 writes: a crash after each file of verl's save order reads as incomplete until
the layout's completion point, complete after it; facts from the run decide what a step must hold; a layout the
supervisor does not know is never guessed at; rotation follows the run's own limits."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from supervisor.checkpoints import (
    CheckpointProblem,
    TrackerHint,
    choose_resume_checkpoint,
    facts_from_overrides,
    inspect_checkpoint,
    plan_rotation,
    run_facts,
    scan_checkpoints,
)
from tests.supervisor import megatron_files as megatron
from tests.supervisor.checkpoint_files import write_step
from tests.verl_fixtures import StepSpec, write_fsdp_steps
from verl_hooks.contract import CheckpointFacts, CheckpointMarker, write_checkpoint_marker

P = CheckpointProblem
MEGATRON = CheckpointFacts(actor_strategy="megatron")


@pytest.mark.parametrize(
    "options",
    [{}, {"hf": True}, {"critic": True}, {"transfer_queue": True}],
    ids=["dist-ckpt", "bridge-hf", "with-critic", "async-mode-transfer-queue"],
)
def test_megatron_step_is_incomplete_after_each_file_until_its_last(tmp_path: Path, options: dict) -> None:
    files = megatron.step_writes(5, world_size=2, **options)
    facts = CheckpointFacts(
        actor_strategy="megatron",
        critic_strategy="megatron" if options.get("critic") else None,
        critic=bool(options.get("critic")),
        transfer_queue=bool(options.get("transfer_queue")),
    )
    for cut in range(len(files)):
        folder = megatron.write_files(tmp_path / f"cut{cut}" / "global_step_5", files[:cut])
        info = inspect_checkpoint(folder, facts=facts)
        assert not info.complete, f"crash after {files[cut - 1].path if cut else 'nothing'} read as complete"
    folder = megatron.write_files(tmp_path / "whole" / "global_step_5", files)
    if options.get("transfer_queue"):
        assert not inspect_checkpoint(folder, facts=facts).complete, "until transfer_queue.tmp is renamed"
        megatron.finish_transfer_queue(folder)
    assert inspect_checkpoint(folder, facts=facts).complete


def test_megatron_manifest_is_the_completion_point_even_when_everything_else_is_there(tmp_path: Path) -> None:
    folder = megatron.write_megatron_step(tmp_path, 3)
    assert inspect_checkpoint(folder).complete  # detected as Megatron without being told
    (folder / "actor" / "ckpt_contents.json").rename(folder / "actor" / "ckpt_contents.json.tmp")
    info = inspect_checkpoint(folder)
    assert info.problem_kinds == {P.MISSING_MANIFEST}
    assert info.layout == "megatron"


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda f: (f / "actor/optimizer/dist_ckpt/metadata.json").unlink(), P.MISSING_CONTENT),
        (lambda f: shutil.rmtree(f / "actor/extra"), P.MISSING_CONTENT),
        (lambda f: (f / "actor/transformer_config.json").unlink(), P.MISSING_CONTENT),
        (lambda f: (f / "actor/ckpt_contents.json").write_text("{"), P.CORRUPT_JSON),
    ],
    ids=["dist-ckpt-unfinished", "listed-directory-gone", "transformer-config-gone", "manifest-garbage"],
)
def test_megatron_pieces_the_manifest_lists_must_be_there(tmp_path: Path, damage, expected: P) -> None:
    folder = megatron.write_megatron_step(tmp_path, 3)
    damage(folder)
    assert expected in inspect_checkpoint(folder).problem_kinds


def test_megatron_manifest_of_another_step_is_a_mismatch(tmp_path: Path) -> None:
    folder = megatron.write_megatron_step(tmp_path, 3)
    manifest = folder / "actor" / "ckpt_contents.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "global_step": 2}))
    assert inspect_checkpoint(folder).problem_kinds == {P.MARKER_MISMATCH}


def test_megatron_layout_v1_is_refused_as_verl_refuses_it(tmp_path: Path) -> None:
    folder = tmp_path / "global_step_4"
    (folder / "actor" / "dist_ckpt").mkdir(parents=True)
    (folder / "actor" / "dist_ckpt" / "metadata.json").write_text("{}")
    write_step(tmp_path / "x", 1)  # a data.pt to copy
    shutil.copy(tmp_path / "x" / "global_step_1" / "data.pt", folder / "data.pt")
    info = inspect_checkpoint(folder)
    assert info.unjudgeable
    assert "layout v1" in info.problems[0]


def test_a_run_with_a_critic_needs_critic_in_every_step(tmp_path: Path) -> None:
    write_step(tmp_path, 2, critic=True)
    write_step(tmp_path, 4, critic=False)  # verl's max_critic_ckpt_to_keep rotated its critic out
    by_step = {info.step: info for info in scan_checkpoints(tmp_path)}  # inferred: step 2 holds critic/
    assert by_step[2].complete
    assert by_step[4].problem_kinds == {P.MISSING_CRITIC_DIR}
    assert choose_resume_checkpoint(list(by_step.values()), TrackerHint(4)).checkpoint.step == 2
    told = scan_checkpoints(tmp_path, facts=CheckpointFacts(critic=False))
    assert [info.complete for info in told] == [True, True], "a run without a critic does not need one"


@pytest.mark.parametrize("leftover", ["tmp-only", "tmp-beside-final"])
def test_a_transfer_queue_save_cut_before_its_rename_is_incomplete(tmp_path: Path, leftover: str) -> None:
    folder = megatron.write_megatron_step(tmp_path, 6, transfer_queue=leftover == "tmp-beside-final")
    (folder / "transfer_queue.tmp").mkdir()
    assert P.TRANSFER_QUEUE_IN_FLIGHT in inspect_checkpoint(folder).problem_kinds


def test_an_async_mode_run_needs_its_transfer_queue(tmp_path: Path) -> None:
    megatron.write_megatron_step(tmp_path, 2, transfer_queue=True)
    megatron.write_megatron_step(tmp_path, 4, transfer_queue=False)
    by_step = {info.step: info for info in scan_checkpoints(tmp_path)}
    assert by_step[2].complete
    assert by_step[4].problem_kinds == {P.MISSING_TRANSFER_QUEUE}


def test_torchtitan_checkpointer_layout_is_reported_by_name_and_never_guessed_at(tmp_path: Path) -> None:
    write_step(tmp_path, 2)
    titan = tmp_path / "global_step_4"
    (titan / "step-4").mkdir(parents=True)  # TorchTitan's checkpointer saves into <folder>/step-<N>
    (titan / "step-4" / ".metadata").write_bytes(b"dcp")
    infos = scan_checkpoints(tmp_path)
    choice = choose_resume_checkpoint(infos, TrackerHint(4))
    assert [info.step for info in choice.unjudgeable] == [4]
    assert choice.checkpoint is None, "not resumed from the older step"
    assert choice.set_aside == (), "not set aside"
    assert "step-4" in choice.notes[1]


def test_a_strategy_the_supervisor_does_not_know_is_unjudgeable(tmp_path: Path) -> None:
    folder = write_step(tmp_path, 2)
    info = inspect_checkpoint(folder, facts=CheckpointFacts(actor_strategy="veomni"))
    assert info.unjudgeable
    assert "'veomni'" in info.problems[0]


def test_an_empty_role_folder_is_incomplete_not_unknown(tmp_path: Path) -> None:
    (tmp_path / "global_step_3" / "actor").mkdir(parents=True)
    info = inspect_checkpoint(tmp_path / "global_step_3")
    assert not info.unjudgeable
    assert P.EMPTY_ROLE_DIR in info.problem_kinds


# --- the job's marker --------------------------------------------------------------------------------------------


def mark(folder: Path, step: int, *, durable: bool = True, facts: CheckpointFacts | None = None) -> None:
    files = {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}
    write_checkpoint_marker(folder, CheckpointMarker(step, files, durable, facts or CheckpointFacts()))


def test_a_durable_marker_decides_exactly(tmp_path: Path) -> None:
    folder = write_step(tmp_path, 3)
    mark(folder, 3)
    assert inspect_checkpoint(folder).marker
    assert inspect_checkpoint(folder).complete
    shard = folder / "actor" / "optim_world_size_2_rank_1.pt"
    shard.write_bytes(shard.read_bytes() + b"\0")
    assert inspect_checkpoint(folder).problem_kinds == {P.MARKER_MISMATCH}
    shard.unlink()
    assert "absent" in inspect_checkpoint(folder).problems[0]


def test_a_durable_marker_lets_a_layout_of_its_own_resume(tmp_path: Path) -> None:
    titan = tmp_path / "global_step_4"
    (titan / "step-4").mkdir(parents=True)
    (titan / "step-4" / ".metadata").write_bytes(b"dcp")
    mark(titan, 4, facts=CheckpointFacts(actor_strategy="torchtitan"))
    assert inspect_checkpoint(titan).complete, "the job said which files make the step"


def test_an_async_marker_also_waits_for_the_layouts_completion_point(tmp_path: Path) -> None:
    files = megatron.step_writes(5)
    folder = megatron.write_files(tmp_path / "global_step_5", [f for f in files if "ckpt_contents" not in f.path])
    mark(folder, 5, durable=False, facts=MEGATRON)  # on_save fired while the writes were in flight
    assert inspect_checkpoint(folder).problem_kinds == {P.MISSING_MANIFEST}
    megatron.write_files(folder, [f for f in files if "ckpt_contents" in f.path])
    assert inspect_checkpoint(folder).complete


def test_a_marker_facts_apply_to_older_steps_without_one(tmp_path: Path) -> None:
    write_step(tmp_path, 2, critic=False)
    newest = write_step(tmp_path, 4, critic=True)
    mark(newest, 4, facts=CheckpointFacts(critic=True, max_actor_ckpt_to_keep=2))
    assert run_facts(tmp_path).max_actor_ckpt_to_keep == 2
    by_step = {info.step: info for info in scan_checkpoints(tmp_path)}
    assert by_step[2].problem_kinds == {P.MISSING_CRITIC_DIR}
    assert by_step[4].complete


def test_a_garbage_marker_makes_the_step_incomplete(tmp_path: Path) -> None:
    folder = write_step(tmp_path, 3)
    (folder / "verl_supervisor_checkpoint.json").write_text("{ not json")
    assert inspect_checkpoint(folder).problem_kinds == {P.CORRUPT_JSON}


# --- what the run says ---------------------------------------------------------------------------------------------


def test_facts_from_the_users_overrides() -> None:
    facts = facts_from_overrides(
        [
            "trainer.max_actor_ckpt_to_keep=3",
            "+trainer.max_critic_ckpt_to_keep=2",
            "actor_rollout_ref.actor.strategy=megatron",
            "actor_rollout_ref.actor.checkpoint.save_contents=['model', extra]",
            "actor_rollout_ref.actor.checkpoint.async_save=True",
            "trainer.max_actor_ckpt_to_keep=4",  # the last one wins, as in Hydra
        ]
    )
    assert facts == CheckpointFacts(
        actor_strategy="megatron",
        actor_save_contents=("model", "extra"),
        async_save=True,
        max_actor_ckpt_to_keep=4,
        max_critic_ckpt_to_keep=2,
    )
    assert facts_from_overrides(["trainer.remove_previous_ckpt_in_save=true"]).max_critic_ckpt_to_keep == 1
    assert facts_from_overrides(["trainer.max_actor_ckpt_to_keep=null"]).max_actor_ckpt_to_keep is None


# --- rotation ------------------------------------------------------------------------------------------------------


def test_rotation_keeps_the_newest_complete_steps_up_to_the_resume_step(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4, 5):
        write_step(tmp_path, step, critic=True)
    (tmp_path / "global_step_5" / "data.pt").unlink()  # incomplete and newer: never touched
    infos = scan_checkpoints(tmp_path)
    plan = plan_rotation(infos, CheckpointFacts(max_actor_ckpt_to_keep=2, max_critic_ckpt_to_keep=1), 4)
    assert [(r.step, r.role) for r in plan] == [(1, "actor"), (1, "critic"), (2, "actor"), (2, "critic"), (3, "critic")]
    assert plan_rotation(infos, CheckpointFacts(), 4) == [], "no limit: nothing is removed"
    assert plan_rotation(infos, CheckpointFacts(max_actor_ckpt_to_keep=1), None) == []


def test_an_emergency_step_not_yet_resumed_and_verified_keeps_the_periodic_step_before_it(tmp_path: Path) -> None:
    """Finding 4 of the emergency save's review: step 5, written by a failing job, is to be resumed from. Until an
    attempt has loaded it and its syncs verified it, step 4 (the newest periodic save) must survive a keep of 1."""
    for step in (1, 2, 3, 4, 5):
        write_step(tmp_path, step)
    infos = scan_checkpoints(tmp_path)
    keep_one = CheckpointFacts(max_actor_ckpt_to_keep=1)
    unproven = plan_rotation(infos, keep_one, 5, unproven=frozenset({5}))
    assert [(r.step, r.role) for r in unproven] == [(1, "actor"), (2, "actor"), (3, "actor")]
    proven = plan_rotation(infos, keep_one, 5)
    assert [(r.step, r.role) for r in proven] == [(1, "actor"), (2, "actor"), (3, "actor"), (4, "actor")]


def test_an_emergency_step_is_proven_once_an_attempt_resumed_from_it_and_verified_it() -> None:
    from supervisor.run.history import AttemptRecord, RunHistory

    saved = {"status": "saved", "trigger": "step_failure", "step": 5}
    history = RunHistory("run", attempts=[AttemptRecord(1, 0.0, None, reached_step=5, emergency_checkpoint=saved)])
    assert history.unproven_emergency_steps() == {5}
    history.attempts.append(AttemptRecord(2, 1.0, 5))
    assert history.unproven_emergency_steps() == {5}, "launched from it: not yet shown sound"
    history.attempts[-1].resume_verified = True
    assert history.unproven_emergency_steps() == frozenset()
    history.attempts[-1].resume_verified = False
    history.attempts[-1].reached_step = 6  # with checkpoints.verify_resume off: a step past it was saved
    assert history.unproven_emergency_steps() == frozenset()
    skipped = {"status": "skipped", "trigger": "step_failure", "step": None}
    assert (
        RunHistory(
            "run", attempts=[AttemptRecord(1, 0.0, None, emergency_checkpoint=skipped)]
        ).unproven_emergency_steps()
        == frozenset()
    )


# --- FSDP folders written by verl's own FSDPCheckpointManager ------------------------------------------------------

FSDP_VARIANTS = {
    "default": StepSpec(Path("default"), 3),
    "model-extra": StepSpec(Path("model-extra"), 3, save_contents=("model", "extra")),
    "hf-model-only": StepSpec(Path("hf-model-only"), 3, save_contents=("hf_model",)),
    "all-and-hf-model": StepSpec(
        Path("all-and-hf-model"), 3, save_contents=("model", "optimizer", "extra", "hf_model")
    ),
    "with-critic": StepSpec(Path("with-critic"), 3, critic=True),
}


@pytest.fixture(scope="module")
def verl_fsdp_steps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("verl-fsdp")
    specs = [replace(spec, root=base / spec.root) for spec in FSDP_VARIANTS.values()]
    return dict(zip(FSDP_VARIANTS, write_fsdp_steps(specs), strict=True))


def fsdp_save_order(step_dir: Path) -> list[Path]:
    """The step's files in the order verl writes them: per role (actor, then critic) every rank's shards
    (``fsdp_checkpoint_manager.py`` lines 316-362), rank 0's ``huggingface/config.json`` then
    ``fsdp_config.json`` (lines 364-417), the full HF model (lines 419-474); then the trainer's ``data.pt``."""

    def stage(path: Path) -> tuple[int, int, str]:
        rel = path.relative_to(step_dir)
        role = {"actor": 0, "critic": 1}.get(rel.parts[0], 2)
        name = rel.as_posix()
        if role == 2:
            return role, 0, name
        inside = Path(*rel.parts[1:]).as_posix()
        if inside.endswith(".pt"):
            order = 0
        elif inside == "huggingface/config.json":
            order = 1
        elif inside == "fsdp_config.json":
            order = 2
        else:
            order = 3
        return role, order, name

    return sorted((p for p in step_dir.rglob("*") if p.is_file()), key=stage)


@pytest.mark.parametrize("variant", list(FSDP_VARIANTS))
def test_verls_fsdp_step_is_incomplete_after_each_file_until_its_last(
    verl_fsdp_steps: dict[str, Path], tmp_path: Path, variant: str
) -> None:
    spec, written = FSDP_VARIANTS[variant], verl_fsdp_steps[variant]
    facts = CheckpointFacts(
        actor_strategy="fsdp2",
        actor_save_contents=spec.save_contents,
        critic=spec.critic,
        critic_save_contents=spec.save_contents if spec.critic else None,
    )
    assert inspect_checkpoint(written, facts=facts).complete, inspect_checkpoint(written, facts=facts).problems
    order = fsdp_save_order(written)
    for cut in range(len(order)):
        folder = tmp_path / f"cut{cut}" / written.name
        for source in order[:cut]:
            target = folder / source.relative_to(written)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
        (folder / "actor").mkdir(parents=True, exist_ok=True)  # verl makes the folder before writing
        info = inspect_checkpoint(folder, facts=facts)
        assert not info.complete, f"a crash after {order[cut - 1].relative_to(written) if cut else 'mkdir'}"


def test_verls_fsdp_step_is_judged_without_being_told_its_configuration(verl_fsdp_steps: dict[str, Path]) -> None:
    for variant in FSDP_VARIANTS:
        info = inspect_checkpoint(verl_fsdp_steps[variant])
        assert info.complete, (variant, info.problems)
        assert (info.layout, info.world_size) == ("fsdp", 1)
