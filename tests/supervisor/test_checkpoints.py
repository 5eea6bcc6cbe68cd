"""Tests of supervisor.checkpoints against real verl-layout folders written with torch.save."""

from __future__ import annotations

import builtins
import os
import struct
import zipfile
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import torch

from supervisor.checkpoints import (
    TRACKER_FILE,
    CheckpointInfo,
    CheckpointProblem,
    ResumeChoice,
    TrackerHint,
    VerifyLevel,
    choose_resume_checkpoint,
    inspect_checkpoint,
    read_tracker,
    scan_checkpoints,
    set_aside,
)
from tests.supervisor.checkpoint_files import write_step

P = CheckpointProblem
NOW = datetime(2026, 11, 23, 21, 19, 0, tzinfo=timezone.utc)


def write_tracker(root: Path, content: str | bytes) -> None:
    data = content.encode() if isinstance(content, str) else content
    (root / TRACKER_FILE).write_bytes(data)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path, with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def payload_span(path: Path, member_suffix: str) -> tuple[int, int]:
    """Start and end offsets in ``path`` of the stored bytes of the member whose name ends with the suffix."""
    with zipfile.ZipFile(path) as archive:
        info = next(m for m in archive.infolist() if m.filename.endswith(member_suffix))
    with path.open("rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    start = info.header_offset + 30 + name_len + extra_len
    return start, start + info.compress_size


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def info(step: int, *problems: str, world_size: int | None = 2) -> CheckpointInfo:
    return CheckpointInfo(step, Path(f"/nonexistent/ckpt/global_step_{step}"), world_size, tuple(problems))


# --- complete folders ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("verify", list(VerifyLevel))
@pytest.mark.parametrize(("world_size", "critic"), [(1, False), (2, False), (4, False), (2, True)])
def test_complete_folder(tmp_path: Path, world_size: int, critic: bool, verify: VerifyLevel) -> None:
    folder = write_step(tmp_path, 5, world_size, critic=critic)
    (folder / "actor" / "notes.txt").write_text("an unknown file is fine")

    result = inspect_checkpoint(folder, verify=verify)

    assert result.problems == ()
    assert result.complete
    assert result.step == 5
    assert result.path == folder
    assert result.world_size == world_size


# --- damaged folders ----------------------------------------------------------------------------------------------


def _remove(rel: str) -> Callable[[Path], None]:
    return lambda folder: (folder / rel).unlink()


def _empty(rel: str) -> Callable[[Path], None]:
    return lambda folder: (folder / rel).write_bytes(b"")


def _half(rel: str) -> Callable[[Path], None]:
    return lambda folder: truncate_half(folder / rel)


def _add_world_size_4(folder: Path) -> None:
    for rank in range(4):
        for kind in ("model", "optim", "extra_state"):
            torch.save({"stale": rank}, folder / "actor" / f"{kind}_world_size_4_rank_{rank}.pt")


def _plain_zip(folder: Path) -> None:
    with zipfile.ZipFile(folder / "actor" / "optim_world_size_2_rank_0.pt", "w") as archive:
        archive.writestr("hello.txt", "a zip, but not a torch.save archive")


def _remove_actor(folder: Path) -> None:
    for path in sorted((folder / "actor").rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    (folder / "actor").rmdir()


def _only_extras_in_actor(folder: Path) -> None:
    for path in (folder / "actor").glob("*.pt"):
        path.unlink()


def _flip_in_pickle(folder: Path) -> None:
    path = folder / "actor" / "model_world_size_2_rank_1.pt"
    start, end = payload_span(path, "/data.pkl")
    flip_byte(path, (start + end) // 2)


def _zero_padded_name(folder: Path) -> None:
    """verl opens ``..._world_size_2_rank_1.pt`` exactly; a zero-padded spelling is an unknown file to it."""
    shard = folder / "actor" / "model_world_size_2_rank_1.pt"
    shard.rename(shard.with_name("model_world_size_02_rank_01.pt"))


def _garbage(folder: Path) -> None:
    (folder / "actor" / "optim_world_size_2_rank_1.pt").write_bytes(b"x" * 100)


def _out_of_range_rank(folder: Path) -> None:
    torch.save({}, folder / "actor" / "model_world_size_2_rank_2.pt")


def _critic_without_shards(folder: Path) -> None:
    for path in (folder / "critic").glob("*.pt"):
        path.unlink()


A = "actor/"
C = "critic/"
WS2 = "world_size_2_rank_"

# damage, critic?, expected problem, text that the problem of that kind must contain
DAMAGES = [
    pytest.param(_remove(f"{A}model_{WS2}1.pt"), False, P.MISSING_RANK_FILE, f"{A}model_{WS2}1.pt", id="no_model_r1"),
    pytest.param(_remove(f"{A}optim_{WS2}0.pt"), False, P.MISSING_RANK_FILE, f"{A}optim_{WS2}0.pt", id="no_optim_r0"),
    pytest.param(
        _remove(f"{A}extra_state_{WS2}1.pt"), False, P.MISSING_RANK_FILE, f"extra_state_{WS2}1", id="no_extra"
    ),
    pytest.param(_zero_padded_name, False, P.MISSING_RANK_FILE, f"{A}model_{WS2}1.pt", id="zero_padded_name"),
    pytest.param(_add_world_size_4, False, P.MIXED_WORLD_SIZES, "world sizes [2, 4]", id="mixed_world_sizes"),
    pytest.param(_empty(f"{A}extra_state_{WS2}0.pt"), False, P.EMPTY_FILE, f"{A}extra_state_{WS2}0.pt", id="zero_byte"),
    pytest.param(_half(f"{A}model_{WS2}1.pt"), False, P.CORRUPT_ARCHIVE, f"{A}model_{WS2}1.pt", id="truncated_shard"),
    pytest.param(_garbage, False, P.CORRUPT_ARCHIVE, f"{A}optim_{WS2}1.pt", id="garbage_shard"),
    pytest.param(_plain_zip, False, P.CORRUPT_ARCHIVE, "not a torch.save archive", id="zip_not_torch"),
    pytest.param(_flip_in_pickle, False, P.CORRUPT_ARCHIVE, f"{A}model_{WS2}1.pt", id="pickle_bit_flip"),
    pytest.param(_out_of_range_rank, False, P.RANK_OUT_OF_RANGE, "rank 2 >= world size 2", id="rank_out_of_range"),
    pytest.param(_remove("data.pt"), False, P.MISSING_DATA, "global_step_7/data.pt", id="missing_data"),
    pytest.param(_empty("data.pt"), False, P.EMPTY_FILE, "global_step_7/data.pt", id="zero_byte_data"),
    pytest.param(_half("data.pt"), False, P.CORRUPT_ARCHIVE, "global_step_7/data.pt", id="truncated_data"),
    pytest.param(_remove_actor, False, P.MISSING_ACTOR_DIR, "global_step_7/actor", id="missing_actor_dir"),
    pytest.param(_only_extras_in_actor, False, P.NO_RANK_FILES, "global_step_7/actor", id="actor_without_shards"),
    pytest.param(_remove(f"{C}model_{WS2}1.pt"), True, P.MISSING_RANK_FILE, f"{C}model_{WS2}1.pt", id="critic_no_rank"),
    pytest.param(_empty(f"{C}optim_{WS2}0.pt"), True, P.EMPTY_FILE, f"{C}optim_{WS2}0.pt", id="critic_zero_byte"),
    pytest.param(_critic_without_shards, True, P.NO_RANK_FILES, "global_step_7/critic", id="critic_without_shards"),
]


@pytest.mark.parametrize("verify", list(VerifyLevel))
@pytest.mark.parametrize(("damage", "critic", "expected", "text"), DAMAGES)
def test_damaged_folder_is_incomplete(
    tmp_path: Path,
    damage: Callable[[Path], None],
    critic: bool,
    expected: CheckpointProblem,
    text: str,
    verify: VerifyLevel,
) -> None:
    folder = write_step(tmp_path, 7, 2, critic=critic)
    assert inspect_checkpoint(folder, verify=verify).complete  # the damage, not the helper, makes it incomplete
    damage(folder)

    result = inspect_checkpoint(folder, verify=verify)

    assert not result.complete
    assert expected in result.problem_kinds
    matching = [p for p in result.problems if p.startswith(f"{expected.value}: ")]
    assert any(text in p for p in matching), result.problems


def test_problems_name_file_and_kind(tmp_path: Path) -> None:
    folder = write_step(tmp_path, 3, 2)
    (folder / "actor" / "optim_world_size_2_rank_1.pt").unlink()

    result = inspect_checkpoint(folder)

    assert result.problems == ("missing_rank_file: global_step_3/actor/optim_world_size_2_rank_1.pt",)
    assert result.problem_kinds == frozenset({P.MISSING_RANK_FILE})
    assert result.world_size == 2


def test_mixed_world_sizes_has_no_single_world_size(tmp_path: Path) -> None:
    folder = write_step(tmp_path, 3, 2)
    _add_world_size_4(folder)

    result = inspect_checkpoint(folder)

    assert result.world_size is None
    assert result.problem_kinds == frozenset({P.MIXED_WORLD_SIZES})


def test_payload_bit_flip_caught_only_by_crc(tmp_path: Path) -> None:
    folder = write_step(tmp_path, 9, 2, payload=4096)
    shard = folder / "actor" / "model_world_size_2_rank_0.pt"
    start, end = payload_span(shard, "/data/0")
    middle = shard.stat().st_size // 2
    assert start < middle < end  # the middle of the file lies inside the tensor's bytes
    flip_byte(shard, middle)

    structure = inspect_checkpoint(folder, verify=VerifyLevel.structure)
    crc = inspect_checkpoint(folder, verify=VerifyLevel.crc)

    assert structure.complete, structure.problems
    assert not crc.complete
    assert crc.problem_kinds == frozenset({P.CORRUPT_ARCHIVE})
    assert "model_world_size_2_rank_0.pt" in crc.problems[0]
    assert "bad CRC-32" in crc.problems[0]


@pytest.mark.parametrize("verify", list(VerifyLevel))
def test_truncated_in_half_is_corrupt_at_both_levels(tmp_path: Path, verify: VerifyLevel) -> None:
    folder = write_step(tmp_path, 9, 2, payload=4096)
    truncate_half(folder / "actor" / "model_world_size_2_rank_0.pt")

    result = inspect_checkpoint(folder, verify=verify)

    assert result.problem_kinds == frozenset({P.CORRUPT_ARCHIVE})


def test_several_problems_are_all_reported(tmp_path: Path) -> None:
    folder = write_step(tmp_path, 4, 2)
    (folder / "actor" / "model_world_size_2_rank_1.pt").unlink()
    (folder / "actor" / "optim_world_size_2_rank_0.pt").write_bytes(b"")
    (folder / "data.pt").unlink()

    result = inspect_checkpoint(folder)

    assert result.problem_kinds == frozenset({P.MISSING_RANK_FILE, P.EMPTY_FILE, P.MISSING_DATA})
    assert len(result.problems) == 3


def test_inspect_rejects_a_name_that_is_not_a_step(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="global_step_<N>"):
        inspect_checkpoint(tmp_path / "global_step_3.incomplete-20261123T211900Z")


# --- scanning -----------------------------------------------------------------------------------------------------


def test_scan_sorts_numerically_and_ignores_other_names(tmp_path: Path) -> None:
    for step in (10, 2, 3):
        write_step(tmp_path, step, 1)
    for name in (
        "global_step_3.incomplete-20261123T211900Z",
        "global_step_x",
        "global_step_",
        "global_step_05",
        "global_step_\u0663",  # ARABIC-INDIC DIGIT THREE: a digit to `\d`, not to verl
        "global_step_4_old",
        "ckpt_global_step_8",
    ):
        (tmp_path / name / "actor").mkdir(parents=True)
    write_tracker(tmp_path, "10")

    result = scan_checkpoints(tmp_path)

    assert [i.step for i in result] == [2, 3, 10]
    assert [i.path.name for i in result] == ["global_step_2", "global_step_3", "global_step_10"]
    assert all(i.complete for i in result)


def test_scan_reports_incomplete_and_non_directory_entries(tmp_path: Path) -> None:
    write_step(tmp_path, 1, 2)
    (write_step(tmp_path, 2, 2) / "data.pt").unlink()
    (tmp_path / "global_step_3").write_text("a file, not a folder")

    result = scan_checkpoints(tmp_path)

    assert [(i.step, i.complete) for i in result] == [(1, True), (2, False), (3, False)]
    assert result[1].problem_kinds == frozenset({P.MISSING_DATA})
    assert result[2].problem_kinds == frozenset({P.NOT_A_DIRECTORY})


def test_scan_passes_verify_level_on(tmp_path: Path) -> None:
    shard = write_step(tmp_path, 1, 1, payload=4096) / "actor" / "model_world_size_1_rank_0.pt"
    flip_byte(shard, sum(payload_span(shard, "/data/0")) // 2)

    assert scan_checkpoints(tmp_path)[0].complete
    assert not scan_checkpoints(tmp_path, verify=VerifyLevel.crc)[0].complete


@pytest.mark.parametrize("make_root", [lambda p: p / "does_not_exist", lambda p: p], ids=["missing", "empty"])
def test_scan_of_missing_or_empty_root(tmp_path: Path, make_root: Callable[[Path], Path]) -> None:
    assert scan_checkpoints(make_root(tmp_path)) == []


# --- tracker ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "step", "problem"),
    [
        ("6", 6, None),
        ("6\n", 6, None),
        (" 12 \n", 12, None),
        ("0", 0, None),
        ("", None, "not an integer"),
        ("abc", None, "not an integer"),
        ("-3", None, "not an integer"),
        ("1e3", None, "not an integer"),
        ("4 5", None, "not an integer"),
        (b"\xff\xfe6", None, "not an integer"),
        ("7" * 5000, None, "not an integer"),
    ],
)
def test_read_tracker(tmp_path: Path, content: str | bytes, step: int | None, problem: str | None) -> None:
    write_tracker(tmp_path, content)

    hint = read_tracker(tmp_path)

    assert hint.step == step
    if problem is None:
        assert hint.problem is None
    else:
        assert hint.problem is not None
        assert hint.problem.startswith(problem)


def test_read_tracker_missing(tmp_path: Path) -> None:
    hint = read_tracker(tmp_path)

    assert hint.step is None
    assert hint.problem is not None
    assert hint.problem.startswith("missing")


def test_read_tracker_unreadable(tmp_path: Path) -> None:
    (tmp_path / TRACKER_FILE).mkdir()

    hint = read_tracker(tmp_path)

    assert hint.step is None
    assert hint.problem is not None
    assert hint.problem.startswith("unreadable")


# --- choosing (pure) ----------------------------------------------------------------------------------------------

BROKEN = "missing_data: global_step_N/data.pt"


def test_newest_complete_wins_and_newer_incomplete_are_set_aside() -> None:
    infos = [info(8, BROKEN), info(2), info(6), info(1, BROKEN), info(4), info(7, BROKEN)]

    choice = choose_resume_checkpoint(infos, TrackerHint(6))

    assert choice.checkpoint is infos[2]
    assert [i.step for i in choice.set_aside] == [7, 8]
    assert any("global_step_1 is incomplete but older" in n for n in choice.notes)
    assert not any("global_step_1" in n and "set aside" in n for n in choice.notes)
    assert "tracker agrees: step 6" in choice.notes


@pytest.mark.parametrize(
    ("steps", "tracker", "chosen", "aside", "note"),
    [
        # tracker names a folder rotation (or anything else) deleted
        ([(4, True), (6, True)], TrackerHint(9), 6, [], "tracker names step 9 but global_step_9 is missing"),
        # tracker lags behind the newest complete folder
        ([(4, True), (6, True)], TrackerHint(4), 6, [], "tracker says 4 but 6 is complete and newer"),
        # tracker names the half-written newest folder
        ([(4, True), (6, False)], TrackerHint(6), 4, [6], "tracker names step 6 but global_step_6 is incomplete"),
        # tracker unusable: the choice does not depend on it
        ([(4, True), (6, False)], TrackerHint(None, "not an integer: 'x'"), 4, [6], "tracker ignored: not an integer"),
        ([(4, True)], TrackerHint(None, "missing: /ckpt/t.txt"), 4, [], "tracker ignored: missing"),
        # nothing complete: start from scratch, set aside every incomplete folder
        ([(3, False), (5, False)], TrackerHint(5), None, [3, 5], "no complete checkpoint among 2 folder(s)"),
        ([], TrackerHint(None, "missing: /ckpt/t.txt"), None, [], "no checkpoint folders found"),
    ],
)
def test_choice_table(
    steps: list[tuple[int, bool]], tracker: TrackerHint, chosen: int | None, aside: list[int], note: str
) -> None:
    infos = [info(step) if ok else info(step, BROKEN) for step, ok in steps]

    choice = choose_resume_checkpoint(infos, tracker)

    assert (choice.checkpoint.step if choice.checkpoint else None) == chosen
    assert [i.step for i in choice.set_aside] == aside
    assert any(note in n for n in choice.notes), choice.notes


def test_choice_touches_no_file(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"file access: {args}")

    infos = [info(1), info(2, BROKEN), info(3, BROKEN)]
    for name in ("stat", "lstat", "scandir", "listdir", "open"):
        monkeypatch.setattr(os, name, forbidden)
    monkeypatch.setattr(builtins, "open", forbidden)

    choice = choose_resume_checkpoint(infos, TrackerHint(3))

    monkeypatch.undo()
    assert isinstance(choice, ResumeChoice)
    assert choice.checkpoint is infos[0]


# --- end to end on real folders -----------------------------------------------------------------------------------


def test_scan_choose_set_aside_end_to_end(tmp_path: Path) -> None:
    write_step(tmp_path, 2, 2, critic=True)
    (write_step(tmp_path, 4, 2, critic=True) / "critic" / "optim_world_size_2_rank_1.pt").unlink()
    write_step(tmp_path, 6, 2, critic=True)
    truncate_half(write_step(tmp_path, 8, 2, critic=True) / "actor" / "model_world_size_2_rank_0.pt")
    write_tracker(tmp_path, "8")

    choice = choose_resume_checkpoint(scan_checkpoints(tmp_path), read_tracker(tmp_path))
    moved = [set_aside(i, now=NOW) for i in choice.set_aside]

    assert choice.checkpoint is not None
    assert choice.checkpoint.step == 6
    assert moved == [tmp_path / "global_step_8.incomplete-20261123T211900Z"]
    assert "tracker names step 8 but global_step_8 is incomplete" in choice.notes
    rescan = scan_checkpoints(tmp_path)
    assert [(i.step, i.complete) for i in rescan] == [(2, True), (4, False), (6, True)]
    again = choose_resume_checkpoint(rescan, read_tracker(tmp_path))
    assert again.checkpoint is not None
    assert again.checkpoint.step == 6
    assert again.set_aside == ()


# --- set_aside ----------------------------------------------------------------------------------------------------


def test_set_aside_keeps_every_byte_and_hides_the_folder_from_scan(tmp_path: Path) -> None:
    write_step(tmp_path, 3, 2)
    folder = write_step(tmp_path, 7, 2, critic=True)
    (folder / "actor" / "model_world_size_2_rank_1.pt").unlink()
    before = snapshot(folder)
    target = inspect_checkpoint(folder)

    new_path = set_aside(target, now=NOW)

    assert new_path == tmp_path / "global_step_7.incomplete-20261123T211900Z"
    assert not folder.exists()
    assert snapshot(new_path) == before
    assert len(before) > 10
    assert [i.step for i in scan_checkpoints(tmp_path)] == [3]


def test_set_aside_twice_in_the_same_second_gets_distinct_names(tmp_path: Path) -> None:
    first_bytes = snapshot(write_step(tmp_path, 7, 1))
    first = set_aside(inspect_checkpoint(tmp_path / "global_step_7"), now=NOW)
    second_bytes = snapshot(write_step(tmp_path, 7, 2))
    second = set_aside(inspect_checkpoint(tmp_path / "global_step_7"), now=NOW)
    third_bytes = snapshot(write_step(tmp_path, 7, 4))
    third = set_aside(inspect_checkpoint(tmp_path / "global_step_7"), now=NOW)

    assert first.name == "global_step_7.incomplete-20261123T211900Z"
    assert second.name == "global_step_7.incomplete-20261123T211900Z-1"
    assert third.name == "global_step_7.incomplete-20261123T211900Z-2"
    assert [snapshot(first), snapshot(second), snapshot(third)] == [first_bytes, second_bytes, third_bytes]
    assert scan_checkpoints(tmp_path) == []


def _take_with_file(path: Path) -> None:
    path.write_text("someone else's")


def _take_with_empty_dir(path: Path) -> None:
    path.mkdir()


def _take_with_full_dir(path: Path) -> None:
    path.mkdir()
    (path / "kept.txt").write_text("someone else's")


@pytest.mark.parametrize("take", [_take_with_file, _take_with_empty_dir, _take_with_full_dir])
@pytest.mark.parametrize("entry_is_file", [False, True], ids=["folder", "stray_file"])
def test_set_aside_never_replaces_an_existing_name(
    tmp_path: Path, take: Callable[[Path], None], entry_is_file: bool
) -> None:
    if entry_is_file:
        (tmp_path / "global_step_5").write_text("a stray file named like a step")
    else:
        write_step(tmp_path, 5, 1)
    entry = tmp_path / "global_step_5"
    taken = tmp_path / "global_step_5.incomplete-20261123T211900Z"
    take(taken)
    before_entry = snapshot(tmp_path) if entry_is_file else snapshot(entry)
    before_taken = snapshot(taken) if taken.is_dir() else taken.read_bytes()

    new_path = set_aside(inspect_checkpoint(entry), now=NOW)

    assert new_path.name == "global_step_5.incomplete-20261123T211900Z-1"
    assert (snapshot(taken) if taken.is_dir() else taken.read_bytes()) == before_taken
    if entry_is_file:
        assert new_path.read_text() == "a stray file named like a step"
        assert "global_step_5" in before_entry
    else:
        assert snapshot(new_path) == before_entry
    assert not entry.exists()


@pytest.mark.parametrize(
    "now",
    [
        NOW,
        datetime(2026, 11, 23, 22, 19, 0, tzinfo=timezone(timedelta(hours=1))),
        datetime(2026, 11, 23, 21, 19, 0),  # naive: taken as UTC
    ],
    ids=["utc", "plus_one_hour", "naive"],
)
def test_set_aside_stamp_is_utc(tmp_path: Path, now: datetime) -> None:
    folder = write_step(tmp_path, 1, 1)

    assert set_aside(inspect_checkpoint(folder), now=now).name == "global_step_1.incomplete-20261123T211900Z"


def test_set_aside_default_time_is_now(tmp_path: Path) -> None:
    folder = write_step(tmp_path, 1, 1)
    before = datetime.now(timezone.utc).replace(microsecond=0)

    new_path = set_aside(inspect_checkpoint(folder))

    stamp = new_path.name.removeprefix("global_step_1.incomplete-")
    moment = datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
    assert before <= moment <= datetime.now(timezone.utc)


def test_set_aside_of_a_vanished_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        set_aside(CheckpointInfo(3, tmp_path / "global_step_3", None, (BROKEN,)), now=NOW)
    assert list(tmp_path.iterdir()) == []
