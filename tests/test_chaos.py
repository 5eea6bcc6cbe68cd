"""The chaos campaign's own logic: its draws, its damage (judged by the supervisor's real checkpoint scan), its
verdicts. The campaign itself runs under ``-m slow`` (``--quick``)."""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from supervisor.checkpoints import choose_resume_checkpoint, read_tracker, scan_checkpoints, set_aside
from tests.conftest import REPO_ROOT
from tests.supervisor.checkpoint_files import write_step
from verl_hooks.faults import parse_fault_specs

CHAOS = REPO_ROOT / "scripts" / "chaos.py"


def load_chaos() -> ModuleType:
    spec = importlib.util.spec_from_file_location("chaos_script", CHAOS)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


chaos = load_chaos()


def test_a_run_is_drawn_the_same_every_time_and_its_guard_faults_are_valid_specs() -> None:
    plans = [chaos.draw_run(1, index) for index in range(1, 41)]
    assert plans == [chaos.draw_run(1, index) for index in range(1, 41)]
    assert plans != [chaos.draw_run(2, index) for index in range(1, 41)]
    for plan in plans:
        specs = parse_fault_specs(",".join(f.spec for f in plan.guard))
        assert len(specs) == len(plan.guard)
        assert all(spec.phase.value in (*chaos.PHASES[plan.backend], chaos.EMERGENCY_SAVE) for spec in specs)
        assert all(spec.attempt is not None and spec.step is not None for spec in specs)
        assert not any(f.kind == "kill:rollout" for f in plan.schedule if plan.backend == "naive")
    drawn = {f.kind.split(":")[0] for plan in plans for f in plan.faults}
    assert drawn == {"guard", "save", "kill", "stop", "supervisor", "damage", "heartbeat", "disk", "preempt"}
    assert any(f.kind == "guard:orphan" for plan in plans for f in plan.guard), "helpers orphaned in a sync"
    assert all(f.moment == "save" for plan in plans for f in plan.schedule if f.kind == "disk:fill")
    saves = [(f, plan) for plan in plans for f in plan.guard if f.kind.startswith("save:")]
    for save, plan in saves:
        # Drawn with a raise of the same step and attempt: the failure whose emergency save it strikes.
        where = save.spec.split("@", 1)[1]
        assert any(f.spec == f"{f.spec.split(':')[0]}:raise@{where}" for f in plan.guard), save
    killed_while_saving = [f for plan in plans for f in plan.schedule if f.moment == chaos.EMERGENCY_SAVE]
    assert killed_while_saving, "kills of the taskrunner or a trainer while it saves are drawn"
    assert {f.kind for f in killed_while_saving} <= {"kill:taskrunner", "kill:trainer"}
    assert sum(len(plan.faults) for plan in plans) >= 200, "the default campaign draws at least 200 faults"


@pytest.mark.parametrize("kind", chaos.DAMAGES)
def test_every_damage_is_passed_over_by_the_supervisor_and_set_aside_with_every_byte(tmp_path: Path, kind: str) -> None:
    root, stash = tmp_path / "checkpoints", tmp_path / "stash"
    write_step(root, 2, world_size=1, payload=2)
    write_step(root, 4, world_size=1, payload=4)
    (root / "latest_checkpointed_iteration.txt").write_text("4")

    what = chaos.damage(kind, root, stash, random.Random(3))
    assert what is not None
    damaged = chaos.hash_tree(root)

    choice = choose_resume_checkpoint(scan_checkpoints(root), read_tracker(root))
    assert choice.checkpoint is not None, choice.notes
    step_4_damaged = kind in ("truncated_shard", "empty_shard", "missing_data")
    assert choice.checkpoint.step == (2 if step_4_damaged else 4), choice.notes
    for info in choice.set_aside:
        set_aside(info)
    set_aside_steps = {"tracker_incomplete_step": [5], "step_is_file": [7]}.get(kind, [4] if step_4_damaged else [])
    assert [info.step for info in choice.set_aside] == set_aside_steps
    assert chaos.lost_files([damaged], chaos.hash_tree(root) | chaos.hash_tree(stash)) == []
    assert chaos.lost_files([damaged], {}) != [], "the check can fail"


def test_a_file_is_lost_only_when_its_content_is_nowhere_in_the_tree() -> None:
    seen = {"global_step_4/actor/model.pt": "aa", "global_step_4/data.pt": "bb"}
    renamed = {"global_step_4.incomplete-20261126T1900Z/actor/model.pt": "aa", "global_step_4/data.pt": "bb"}
    assert chaos.lost_files([seen], renamed) == []
    assert chaos.lost_files([seen], {"global_step_4/data.pt": "bb"}) == ["global_step_4/actor/model.pt"]
    moved = {"global_step_2/actor/model.pt": "aa", "global_step_4/data.pt": "bb"}
    assert chaos.lost_files([seen], moved) == ["global_step_4/actor/model.pt"], "the same bytes elsewhere are not it"
    rewritten = {"global_step_4/actor/model.pt": "cc", "global_step_4/data.pt": "bb"}
    assert chaos.lost_files([seen], rewritten) == ["global_step_4/actor/model.pt"]


def test_a_failed_attempt_is_explained_only_by_a_fault_while_it_ran_or_just_before() -> None:
    attempts = [
        {"number": 1, "started_at": 100.0, "ended_at": 130.0, "action": "restart", "rule": "a", "reason": "x"},
        {"number": 2, "started_at": 140.0, "ended_at": 200.0, "action": "restart", "rule": "b", "reason": "y"},
        {"number": 3, "started_at": 260.0, "ended_at": 300.0, "action": "done", "rule": "success", "reason": "z"},
        {"number": 4, "started_at": 300.0, "ended_at": None, "action": None},
    ]
    assert chaos.unexplained_failures(attempts, [120.0]) == ["attempt 2 (b: y)"]
    assert chaos.unexplained_failures(attempts, [130.5, 199.0]) == []
    assert chaos.unexplained_failures(attempts, [128.0]) == [], "a fault in the teardown before explains the next"
    assert chaos.unexplained_failures(attempts, [250.0]) == ["attempt 1 (a: x)", "attempt 2 (b: y)"]


@pytest.mark.parametrize(
    ("code", "finished", "weights", "ok"),
    [
        (0, {"exit_code": 0, "reason": "the job finished"}, "ref", True),
        (0, {"exit_code": 0, "reason": "the job finished"}, "other", False),
        (0, None, "ref", False),
        (4, {"exit_code": 4, "outcome": "budget_exhausted", "reason": "restart budget exhausted"}, None, True),
        (5, {"exit_code": 5, "outcome": "crash_loop", "reason": "crash loop: 4 failed attempts"}, None, True),
        (5, {"exit_code": 5, "outcome": "no_valid_checkpoint", "reason": "no valid checkpoint"}, None, True),
        (5, {"exit_code": 5, "outcome": "budget_exhausted", "reason": "crash loop"}, None, False),
        (5, {"exit_code": 5, "reason": "crash loop: no outcome named"}, None, False),
        (3, {"exit_code": 3, "outcome": "repeated_failure", "reason": "the same failure repeated"}, None, True),
        (3, {"exit_code": 3, "outcome": "job_failed", "reason": "not restarting: exit 78"}, None, False),
        (6, {"exit_code": 6, "outcome": "environment_failure", "reason": "could not be fenced"}, None, False),
        (2, {"exit_code": 0, "reason": "the job finished"}, "ref", False),
        (None, None, None, False),
    ],
)
def test_an_outcome_passes_only_as_the_fault_free_weights_or_a_documented_give_up(code, finished, weights, ok) -> None:
    assert chaos.judge_outcome(code, finished, weights, "ref")[0] is ok


def test_the_orphan_disk_and_preempt_faults_leave_a_seeds_other_draws_as_they_were(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plans = [chaos.draw_run(3, index) for index in range(1, 21)]
    monkeypatch.setattr(chaos, "ORPHAN_CHANCE", 0.0)
    monkeypatch.setattr(chaos, "DISK_FILL_CHANCE", 0.0)
    monkeypatch.setattr(chaos, "PREEMPT_CHANCE", 0.0)
    before = [chaos.draw_run(3, index) for index in range(1, 21)]
    new = ("guard:orphan", "disk:fill", "preempt:worker")
    assert [
        (tuple(f for f in p.guard if f.kind not in new), tuple(f for f in p.schedule if f.kind not in new))
        for p in plans
    ] == [(p.guard, p.schedule) for p in before]


def test_a_preempted_run_gets_three_nodes_one_preemption_with_a_drawn_deadline_and_no_orphan() -> None:
    plans = [chaos.draw_run(seed, index) for seed in (1, 2) for index in range(1, 41)]
    preempted = [p for p in plans if p.on_three_nodes]
    assert 0.1 < len(preempted) / len(plans) < 0.4, "about a quarter of the runs"
    for plan in preempted:
        (fault,) = [f for f in plan.schedule if f.kind == "preempt:worker"]
        assert fault.moment == "training"
        assert fault.deadline_s is not None
        assert chaos.PREEMPT_DEADLINE_S[0] <= fault.deadline_s <= chaos.PREEMPT_DEADLINE_S[1]
        assert "guard:orphan" not in [f.kind for f in plan.guard], "out of the supervisor's reach in address mode"
    assert any(f.kind == "guard:orphan" for p in plans if not p.on_three_nodes for f in p.guard)


def test_exit_3_passes_only_as_the_full_disk_a_disk_fill_made() -> None:
    full = {"exit_code": 3, "outcome": "job_failed", "reason": "not restarting: the checkpoint disk is full: ..."}
    other = {"exit_code": 3, "outcome": "job_failed", "reason": "not restarting: exit 78 (configuration-error)"}
    assert chaos.judge_outcome(3, full, None, "ref", disk_filled=True)[0] is True
    assert chaos.judge_outcome(3, full, None, "ref", disk_filled=False)[0] is False
    assert chaos.judge_outcome(3, other, None, "ref", disk_filled=True)[0] is False


def test_a_volume_is_filled_to_the_last_byte(tmp_path: Path) -> None:
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=False)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        said = chaos.fill_volume(mount / chaos.FILLER)
        assert shutil.disk_usage(mount).free < 4096, said
        assert said == f"{mount} filled: 2 MiB written, 0 bytes left"
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=False)


def test_the_roles_of_a_runs_processes_come_from_their_command_lines() -> None:
    cluster = "/venv/lib/python3.11/site-packages/ray/core/src/ray"
    assert chaos.role_of(f"{cluster}/raylet/raylet --raylet_socket_name=x") == "raylet"
    assert chaos.role_of(f"{cluster}/gcs/gcs_server --log_dir=x") == "gcs"
    assert chaos.role_of("python -m verl_hooks.launch -m mini_ppo.main seed=1") == "driver"
    assert chaos.role_of("python -m verl_hooks.standby mini_ppo.main") == "driver", "a standby that was launched"
    assert chaos.role_of("ray::MiniRolloutWorker") == "rollout"
    assert chaos.role_of("ray::IDLE") is None


@pytest.mark.ray
@pytest.mark.slow  # several minutes: three supervised runs with their faults, and a reference run
@pytest.mark.timeout(1800)
def test_the_quick_campaign_runs_clean_and_writes_its_report(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(CHAOS), "--quick", "--out", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=1500,
        check=False,
    )
    results = json.loads((tmp_path / "results.json").read_text())
    assert proc.returncode == 0, (tmp_path / "results.md").read_text()
    assert [run["index"] for run in results["runs"]] == [1, 2, 3]
    assert all(run["passed"] for run in results["runs"])
    assert results["meta"]["faults_fired"] >= 6
    assert "| kind | fired | runs | runs passed |" in (tmp_path / "results.md").read_text()


def test_a_jsonl_tail_reads_only_complete_lines_and_each_once(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    tail = chaos.JsonlTail(path)
    assert tail.read() == [], "no file yet"
    path.write_text('{"a": 1}\n{"b": ')
    assert tail.read() == [{"a": 1}], "the line being written waits"
    with path.open("a") as f:
        f.write('2}\n{"c": 3}\n')
    assert tail.read() == [{"a": 1}, {"b": 2}, {"c": 3}]


def test_an_idle_standby_driver_is_no_second_attempt_until_its_attempt_starts(tmp_path: Path) -> None:
    """restart.warm_standby starts attempt n+1's driver, with its marker, while attempt n trains: the monitor
    counts it from its attempt's attempt_started on, so one_attempt still catches a real overlap."""
    import os
    import uuid

    from verl_hooks.contract import ENV_ATTEMPT, ENV_RUN_ID

    run_id = uuid.uuid4().hex
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    running = subprocess.Popen(sleeper, env={**os.environ, ENV_RUN_ID: run_id, ENV_ATTEMPT: "1"})
    standby = subprocess.Popen(sleeper, env={**os.environ, ENV_RUN_ID: run_id, ENV_ATTEMPT: "2"})
    events = tmp_path / "events.jsonl"
    try:
        events.write_text(json.dumps({"event": "attempt_started", "attempt": 1}) + "\n")
        monitor = chaos.Monitor(events)
        monitor.run_id = run_id
        assert {s.pid for s in monitor.sample()} == {running.pid}, "the idle standby is not part of the run yet"
        assert monitor.overlaps == []
        with events.open("a") as f:
            f.write(json.dumps({"event": "attempt_started", "attempt": 2}) + "\n")
        assert {s.pid for s in monitor.sample()} == {running.pid, standby.pid}
        (overlap,) = monitor.overlaps
        assert "attempts ['1', '2'] alive at once" in overlap
        assert {s.pid for s in monitor.survivors()} == {running.pid, standby.pid}, "both were seen, for no_leftover"
    finally:
        for proc in (running, standby):
            proc.kill()
            proc.wait()
