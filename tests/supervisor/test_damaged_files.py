"""What a crash leaves behind never stops a run: every file of a run directory read back whatever state it is in.

The run directories are written by the real loop (the fake backend and clock of test_loop.py). Each file is then cut
at a sample of byte offsets (what a SIGKILL or a power loss in the middle of a write leaves, or a copy cut short) or
replaced by garbage, and ``status``, ``report`` and the supervisor continuing the run must each end with exit 0 or
a clear exit 2, never a traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil
import signal
from pathlib import Path

import pytest

from supervisor.cli import inspect_main
from supervisor.outcomes import ExitCode, ExitStatus
from supervisor.run.events import read_events_counted
from supervisor.run.history import RunHistory, RunState
from supervisor.run.rebuild import history_from_events
from supervisor.run.rundir import DamagedRunFile, RunDirectory
from supervisor.run.status import read_status, render_status
from tests.supervisor.fakes import Attempt
from tests.supervisor.test_loop import WEIGHT_SYNC, success, supervise, weight_sync_failure
from tests.supervisor.test_operating import failed_then_resumed
from verl_hooks.contract import EmergencyStatus

OFFSETS = 8
"""Byte offsets tried per file: spread over the file, its first and last bytes included."""
GARBAGE = (b"", b"\x00\xff\xfe garbage", b"[1, 2, 3]\n", b'{"event": "run_started"}\n', b"{}")


def offsets(size: int) -> list[int]:
    return sorted({0, 1, size - 1, *(size * i // OFFSETS for i in range(OFFSETS))} - {size})


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = failed_then_resumed(tmp_path_factory.mktemp("finished"))
    assert run.code is ExitCode.DONE
    return run.run_dir


def inspect(run_dir: Path, command: str) -> tuple[ExitCode, str]:
    out, err = io.StringIO(), io.StringIO()
    args = [command, str(run_dir)] + (["--out", str(run_dir / "report")] if command == "report" else [])
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = inspect_main(args)
    return code, out.getvalue() + err.getvalue()


def copy_of(run_dir: Path, where: Path) -> Path:
    if where.exists():
        shutil.rmtree(where)
    shutil.copytree(run_dir, where)
    return where


@pytest.mark.parametrize(
    "name",
    [
        "events.jsonl",
        # -m slow: their readers are the loop's and the beats' own (test_guard_policy.py, test_operating.py)
        pytest.param("attempts/1/error.json", marks=pytest.mark.slow),
        pytest.param("attempts/1/heartbeats.jsonl", marks=pytest.mark.slow),
    ],
)
def test_status_and_report_read_a_run_whatever_is_cut_from_its_logs(finished_run: Path, tmp_path: Path, name: str):
    whole = (finished_run / name).read_bytes()
    for offset in [*offsets(len(whole)), *(-1 - i for i in range(len(GARBAGE)))]:
        run_dir = copy_of(finished_run, tmp_path / "run")
        (run_dir / name).write_bytes(whole[:offset] if offset >= 0 else GARBAGE[-1 - offset])
        for command in ("status", "report"):
            code, said = inspect(run_dir, command)
            assert code is ExitCode.DONE, f"{command} with {name} cut at {offset}: {said}"


@pytest.mark.slow  # the default suite keeps the state file, the all-cut run and exit 2
def test_a_cut_event_line_is_skipped_and_counted_in_status(finished_run: Path, tmp_path: Path) -> None:
    run_dir = copy_of(finished_run, tmp_path / "run")
    events = run_dir / "events.jsonl"
    whole = events.read_bytes()
    events.write_bytes(whole[:-20])  # the last line (run_finished) cut short
    read = read_events_counted(events)
    assert read.damaged == 1
    assert [e["event"] for e in read.events][-1] != "run_finished"
    status = read_status(run_dir)
    assert status.damage == [
        "events.jsonl: 1 line(s) that are not a whole event skipped (an append cut short by a crash, or a garbled line)"
    ]
    assert "warning: events.jsonl: 1 line(s)" in render_status(status)
    assert status.state == "finished", "state.json is whole: the run's state is its"


def test_a_state_file_cut_anywhere_is_rebuilt_from_the_events(finished_run: Path, tmp_path: Path) -> None:
    whole = (finished_run / "state.json").read_bytes()
    reference = RunHistory.from_dict(json.loads(whole))
    for offset in [*offsets(len(whole)), *(-1 - i for i in range(len(GARBAGE)))]:
        damaged = whole[:offset] if offset >= 0 else GARBAGE[-1 - offset]
        if damaged.strip() == whole.strip():
            continue  # only the final newline cut: nothing is damaged
        run_dir = copy_of(finished_run, tmp_path / "run")
        (run_dir / "state.json").write_bytes(damaged)
        files = RunDirectory(run_dir)
        history = files.load_history()
        assert files.state_problem is not None, offset
        assert files.state_problem.startswith("state.json could not be read (it is not")
        assert same_story(history, reference), offset
        code, said = inspect(run_dir, "status")
        assert code is ExitCode.DONE, said
        assert "warning: state.json could not be read" in said
        assert inspect(run_dir, "report")[0] is ExitCode.DONE


def same_story(history: RunHistory | None, reference: RunHistory) -> bool:
    """What the supervisor decides from: the run, its attempts and their verdicts, its outcome."""

    def story(h: RunHistory) -> tuple:
        attempts = [
            (
                a.number,
                a.resumed_from_step,
                a.exit_code,
                a.signal,
                a.action,
                a.rule,
                a.reason,
                a.reached_step,
                a.error_type,
                a.phase,
                a.emergency_checkpoint,
                a.failed,
                a.resume_verified,
            )
            for a in h.attempts
        ]
        return (h.run_id, h.state, h.exit_code, h.outcome, h.supervisor_starts, h.restarts_used, attempts)

    return history is not None and story(history) == story(reference)


@pytest.mark.parametrize(
    "attempts",
    [
        pytest.param([weight_sync_failure(saves=(2,)), success()], id="failed-then-done"),
        pytest.param([Attempt(exit=ExitStatus(code=75), record=WEIGHT_SYNC, saves=(1,))] * 4, id="budget-exhausted"),
    ],
)
def test_the_events_tell_the_same_history_as_the_state_file(tmp_path: Path, attempts: list[Attempt]) -> None:
    run = supervise(tmp_path, attempts)
    reference = RunDirectory(run.run_dir).load_history()
    rebuilt = history_from_events(read_events_counted(run.run_dir / "events.jsonl").events)
    assert same_story(rebuilt, reference)
    assert rebuilt.newest_checkpoint_step == reference.newest_checkpoint_step


@pytest.mark.slow  # the default suite keeps the state file, the all-cut run and exit 2
def test_a_stopped_run_with_a_damaged_state_file_is_continued_from_the_events(tmp_path: Path) -> None:
    """``verl-supervisor run_dir=...`` on a run a signal stopped, whose state.json was then cut: it continues,
    says so, and keeps the damaged file beside the rebuilt one."""
    sigterm = int(signal.SIGTERM)
    first = supervise(tmp_path, [weight_sync_failure()], "restart.max_restarts=1", signal_at={"wait": sigterm})
    assert first.code is ExitCode.INTERRUPTED_SIGTERM
    state = first.run_dir / "state.json"
    state.write_bytes(state.read_bytes()[:100])

    again = supervise(tmp_path, [weight_sync_failure(), success()], "restart.max_restarts=1")

    assert again.code is ExitCode.DONE, again.console
    assert list(first.run_dir.glob("state.json.damaged-*")), "the damaged file is kept, renamed"
    history = again.history()
    assert history.state is RunState.FINISHED
    assert [a.rule for a in history.attempts] == ["interrupted", "weight-sync-failure", "success"]
    assert (history.restarts_used, history.supervisor_starts) == (1, 2), "the stop spent none of the budget"


def test_a_state_file_nothing_can_rebuild_ends_with_exit_2_naming_it_and_what_to_do(
    finished_run: Path, tmp_path: Path
) -> None:
    run_dir = copy_of(finished_run, tmp_path / "run")
    (run_dir / "state.json").write_text('{"run_id": ')
    (run_dir / "events.jsonl").write_bytes(b"\x00\x00")
    with pytest.raises(DamagedRunFile) as raised:
        RunDirectory(run_dir).load_history()
    assert raised.value.path == run_dir / "state.json"
    code, said = inspect(run_dir, "status")
    assert code is ExitCode.USAGE
    assert "state.json cannot be read: it is not whole JSON" in said
    assert "restore state.json from a backup, or start the run again in a new run_dir" in said
    assert "Traceback" not in said


@pytest.mark.slow  # the default suite keeps the state file, the all-cut run and exit 2
def test_a_state_file_of_another_version_is_not_rebuilt_over(finished_run: Path, tmp_path: Path) -> None:
    run_dir = copy_of(finished_run, tmp_path / "run")
    data = json.loads((run_dir / "state.json").read_text())
    (run_dir / "state.json").write_text(json.dumps({**data, "schema_version": 99}))
    code, said = inspect(run_dir, "status")
    assert code is ExitCode.USAGE
    assert "its schema_version is 99, this supervisor reads 1" in said


@pytest.mark.slow  # the default suite keeps the state file, the all-cut run and exit 2
def test_emergency_status_values_are_kept_in_the_rebuilt_history(tmp_path: Path) -> None:
    saved = {"status": EmergencyStatus.SAVED.value, "trigger": "sync_failure", "step": 3}
    record = dataclasses.replace(WEIGHT_SYNC, emergency_checkpoint=saved)
    run = supervise(tmp_path, [Attempt(exit=ExitStatus(code=75), record=record, saves=(3,)), success()])
    rebuilt = history_from_events(read_events_counted(run.run_dir / "events.jsonl").events)
    assert rebuilt.attempts[0].emergency_checkpoint == saved
    assert rebuilt.unproven_emergency_steps() == RunDirectory(run.run_dir).load_history().unproven_emergency_steps()


def test_a_run_with_its_events_state_and_error_record_all_cut_is_read_and_continued(tmp_path: Path) -> None:
    """The issue's case: a run stopped by a signal, then its events.jsonl, state.json and error.json all cut."""
    sigterm = int(signal.SIGTERM)
    first = supervise(tmp_path, [weight_sync_failure()], "restart.max_restarts=2", signal_at={"wait": sigterm})
    assert first.code is ExitCode.INTERRUPTED_SIGTERM
    (first.run_dir / "attempts" / "1" / "error.json").write_text('{"error_type": "WeightSyncFat')
    for name, cut in (("events.jsonl", 15), ("state.json", 300)):
        whole = (first.run_dir / name).read_bytes()
        (first.run_dir / name).write_bytes(whole[:-cut] if name == "events.jsonl" else whole[:cut])

    code, said = inspect(first.run_dir, "status")
    assert code is ExitCode.DONE, said
    assert "warning: state.json could not be read" in said
    assert "warning: events.jsonl: 1 line(s)" in said

    again = supervise(tmp_path, [weight_sync_failure(), success()], "restart.max_restarts=2")
    assert again.code is ExitCode.DONE, again.console
    assert [a.number for a in again.history().attempts] == [1, 2, 3]
    # The report of a stopped run draws its note at the real clock's now, which the fake clock of these runs is
    # far from: it is read once the run is finished.
    code, said = inspect(first.run_dir, "report")
    assert code is ExitCode.DONE, said


@pytest.mark.slow  # the default suite keeps the state file, the all-cut run and exit 2
def test_a_checkpoint_marker_cut_anywhere_makes_its_step_incomplete_never_an_error(tmp_path: Path) -> None:
    from supervisor.checkpoints.steps import inspect_checkpoint
    from tests.supervisor.checkpoint_files import write_step
    from verl_hooks.contract import CHECKPOINT_MARKER, CheckpointFacts, CheckpointMarker, write_checkpoint_marker

    folder = write_step(tmp_path, 3, world_size=1)
    files = {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}
    marker = write_checkpoint_marker(folder, CheckpointMarker(3, files, True, CheckpointFacts()))
    whole = marker.read_bytes()
    assert inspect_checkpoint(folder).complete
    for offset in [*offsets(len(whole)), *(-1 - i for i in range(len(GARBAGE)))]:
        damaged = whole[:offset] if offset >= 0 else GARBAGE[-1 - offset]
        if damaged.strip() == whole.strip():
            continue
        (folder / CHECKPOINT_MARKER).write_bytes(damaged)
        info = inspect_checkpoint(folder)
        assert not info.complete, offset
        assert any(CHECKPOINT_MARKER in problem for problem in info.problems), info.problems
