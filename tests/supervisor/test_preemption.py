"""A worker node's preemption notice: Ray drains a node the attempt holds, the job saves the step it is at, the
attempt ends as a stop and is relaunched on the nodes that remain.

The decisions from tables (``supervisor.policy.preemption``, nothing started); the loop carrying them out with the
fake backend, whose drains, nodes and save answers are scripted. On a real three-node Ray cluster:
tests/supervisor/e2e/test_preemption.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from supervisor.backends.base import NodesSeen
from supervisor.config import PreemptionConfig
from supervisor.mechanisms.ray_state import NodeInfo
from supervisor.outcomes import ExitCode, ExitStatus
from supervisor.policy.preemption import (
    NOT_THE_ATTEMPTS,
    OUR_OWN,
    AskToSave,
    Drain,
    EndNow,
    respond,
    save_window_s,
    sort_drains,
    typical_step_s,
)
from supervisor.run.events import EventLog
from supervisor.run.history import RunState
from supervisor.run.notify import WebhookNotifier
from supervisor.run.report import write_report
from supervisor.run.status import read_status, render_status
from tests.supervisor.fakes import Attempt, SaveAnswer
from tests.supervisor.test_loop import WEIGHT_SYNC, success, supervise, sync_beats
from tests.supervisor.webhook import Webhook
from verl_hooks.contract import HeartbeatKind

A, B, C, HEAD = "a" * 56, "b" * 56, "c" * 56, "h" * 56
NOW_MS = 1_800_000_000_000


# --- the decisions ---


def test_a_drain_of_a_node_the_attempt_holds_is_a_notice_and_the_others_are_said_why_not() -> None:
    found = sort_drains({A: 0, B: NOW_MS, C: 0}, holding={A, B}, own={B})
    assert found.notices == (Drain(A, 0),)
    assert found.ignored == ((Drain(B, NOW_MS), OUR_OWN), (Drain(C, 0), NOT_THE_ATTEMPTS))


@pytest.mark.parametrize(
    ("drains", "expected_s"),
    [
        ([Drain(A, NOW_MS + 30_000)], 20.0),
        ([Drain(A, NOW_MS + 60_000), Drain(B, NOW_MS + 40_000)], 30.0),
        ([Drain(A, 0), Drain(B, NOW_MS + 40_000)], 30.0),
        ([Drain(A, 0)], 120.0),
        ([Drain(A, NOW_MS + 5_000)], 0.0),
    ],
    ids=["deadline less the margin", "several: the earliest", "one without", "no deadline", "past already"],
)
def test_the_save_window(drains: list[Drain], expected_s: float) -> None:
    config = PreemptionConfig(margin_s=10.0, wait_without_deadline_s=120.0)
    assert save_window_s(drains, NOW_MS, config) == expected_s


@pytest.mark.parametrize(
    ("window_s", "step_s", "save_s", "can_ask", "saving", "expected"),
    [
        (20.0, 5.0, 10.0, True, False, AskToSave(20.0)),
        (20.0, None, None, True, False, AskToSave(20.0)),
        (20.0, 5.0, None, True, False, AskToSave(20.0)),
        (20.0, 15.0, 10.0, True, False, EndNow("")),
        (20.0, 15.0, 10.0, True, True, AskToSave(20.0)),
        (0.0, None, None, True, False, EndNow("")),
        (20.0, 1.0, 1.0, False, False, EndNow("")),
    ],
    ids=[
        "a step and a save fit",
        "nothing timed yet: ask",
        "no save timed yet: ask",
        "too short for a step and a save: end now",
        "a save under way is waited for",
        "the deadline has passed",
        "no channel to ask on",
    ],
)
def test_the_response(window_s, step_s, save_s, can_ask, saving, expected) -> None:
    got = respond(window_s, step_s, save_s, can_ask, saving)
    assert type(got) is type(expected)
    if isinstance(expected, AskToSave):
        assert got == expected


def test_the_step_time_is_the_median_interval() -> None:
    assert typical_step_s([]) is None
    assert typical_step_s([4.0, 5.0, 30.0]) == 5.0


# --- the loop ---

PREEMPTION = ("preemption.poll_s=2", "preemption.margin_s=10")
CLUSTER = [
    NodeInfo(HEAD, "head", is_head=True, resources={"CPU": 0.0}),
    NodeInfo(A, "worker-a", resources={"CPU": 4.0}),
    NodeInfo(B, "worker-b", resources={"CPU": 4.0}),
]
SAVES_STEP_5 = SaveAnswer(3.0, 5)


def running(*, answer: SaveAnswer | None = SAVES_STEP_5, **changes) -> Attempt:
    """An attempt that trains (a sync a second, saves at 2 and 4) until it is stopped, on node A (override what
    differs)."""
    script = {
        "exit": None,
        "beats": sync_beats(60),
        "saves": (2, 4),
        "holds": frozenset({A}),
        "on_save_request": answer,
        "nodes": NodesSeen(nodes=tuple(CLUSTER), demand={"CPU": 3.0}),
    }
    return Attempt(**{**script, **changes})


def with_cluster(backend) -> None:
    backend.cluster = list(CLUSTER)


def test_a_notice_saves_the_step_and_relaunches_at_once_without_spending_the_budget(tmp_path: Path) -> None:
    run = supervise(
        tmp_path,
        [running(drains=((4.5, A, 30.0),)), success()],
        *PREEMPTION,
        "restart.max_restarts=0",
        prepare_backend=with_cluster,
    )
    assert run.code is ExitCode.DONE, run.console
    (notice,) = run.events("preemption_notice")
    assert (notice["attempt"], notice["response"], notice["window_s"]) == (1, "save", pytest.approx(20.0, abs=2.1))
    assert [(n["node_id"], n["hostname"]) for n in notice["nodes"]] == [(A, "worker-a")]
    assert notice["deadline_in_s"] == pytest.approx(30.0, abs=2.1)
    assert run.backend.heartbeats.saves_requested == [1]
    (saved,) = run.events("preemption_save")
    assert saved["exited"]
    assert saved["emergency_checkpoint"]["step"] == 5
    first, second = run.events("attempt_exited")
    assert (first["action"], first["rule"], first["exit_code"]) == ("restart", "preempted", 143)
    assert "worker-a/aaaaaaaa" in first["reason"]
    assert "saved step 5" in first["reason"]
    (relaunch,) = run.events("backoff")
    assert (relaunch["delay_s"], relaunch["counted"]) == (0.0, False), "a preemption is not backed off from"
    assert "relaunch after a preemption (not counted against restart.max_restarts): attempt 2" in run.console
    assert run.events("attempt_started")[1]["resume_step"] == 5
    assert run.history().restarts_used == 0
    assert second["exit_code"] == 0


def test_without_a_deadline_the_save_is_waited_for_as_long_as_configured(tmp_path: Path) -> None:
    slow = running(drains=((4.5, A, None),), answer=SaveAnswer(100.0, 6))
    run = supervise(
        tmp_path, [slow, success()], *PREEMPTION, "preemption.wait_without_deadline_s=45", prepare_backend=with_cluster
    )
    (notice,) = run.events("preemption_notice")
    assert (notice["deadline_in_s"], notice["window_s"]) == (None, 45.0)
    (saved,) = run.events("preemption_save")
    assert not saved["exited"]
    assert saved["waited_s"] == pytest.approx(45.0, abs=1.0)
    assert "deadline" in saved["cut_short_by"]
    assert run.events("attempt_exited")[0]["rule"] == "preempted"
    assert run.events("attempt_started")[1]["resume_step"] == 4, "nothing saved: the last periodic save"


def test_a_deadline_too_short_for_a_step_and_a_save_ends_the_attempt_at_once(tmp_path: Path) -> None:
    # Steps of 8 s and a save the attempt timed at 15 s: 23 s needed, 20 s left before the deadline less the margin.
    beats = (
        *sync_beats(3, every_s=8.0),
        (17.0, HeartbeatKind.CHECKPOINT_SAVED, {"step": 2, "duration_s": 15.0}),
    )
    tight = running(drains=((20.0, A, 30.0),), beats=tuple(sorted(beats, key=lambda b: b[0])))
    run = supervise(tmp_path, [tight, success()], *PREEMPTION, prepare_backend=with_cluster)
    (notice,) = run.events("preemption_notice")
    assert notice["response"] == "end_now"
    assert "a step and a save need about 23 s" in notice["reason"]
    assert run.backend.heartbeats.saves_requested == [], "no save asked for that cannot be had"
    (saved,) = run.events("preemption_save")
    assert (saved["exited"], saved["waited_s"]) == (False, 0.0)
    assert run.events("attempt_exited")[0]["rule"] == "preempted"
    assert run.code is ExitCode.DONE


def test_several_nodes_at_once_and_a_later_notice_with_an_earlier_deadline_shorten_the_wait(tmp_path: Path) -> None:
    drains = ((4.5, A, 200.0), (4.5, C, 300.0), (9.0, B, 25.0))
    slow = running(drains=drains, holds=frozenset({A, B, C}), answer=SaveAnswer(120.0, 6))
    run = supervise(tmp_path, [slow, success()], *PREEMPTION, prepare_backend=with_cluster)
    first, later = run.events("preemption_notice")
    assert sorted(n["node_id"] for n in first["nodes"]) == [A, C], "both nodes in one notice"
    assert first["window_s"] == pytest.approx(190.0, abs=2.1)
    assert [n["node_id"] for n in later["nodes"]] == [B]
    (saved,) = run.events("preemption_save")
    assert not saved["exited"]
    assert saved["waited_s"] == pytest.approx(4.5 + 15.0, abs=3.0), "B's deadline (25 s) less the margin (10 s)"
    assert run.backend.heartbeats.saves_requested == [1], "asked once"
    assert run.events("attempt_exited")[0]["rule"] == "preempted"


def test_a_drain_of_a_node_the_attempt_does_not_use_is_said_once_and_changes_nothing(tmp_path: Path) -> None:
    first = running(drains=((3.0, C, 60.0),), answer=None, exit=ExitStatus(code=75), record=WEIGHT_SYNC, runs_s=12.0)
    run = supervise(tmp_path, [first, success()], *PREEMPTION, prepare_backend=with_cluster)
    (ignored,) = run.events("drain_ignored")
    assert (ignored["node_id"], ignored["attempt"], ignored["reason"]) == (C, 1, NOT_THE_ATTEMPTS)
    assert run.events("preemption_notice") == []
    assert run.events("attempt_exited")[0]["rule"] == "weight-sync-failure"


def test_a_notice_while_the_job_saves_after_a_failure_waits_for_that_save(tmp_path: Path) -> None:
    # The sync of step 5 failed; the trainer is saving (save_begin, a 600 s deadline) when node A is drained.
    beats = (
        *sync_beats(4),
        (5.0, HeartbeatKind.SAVE_BEGIN, {"step": 5, "trigger": "sync_failure", "deadline_s": 600.0}),
    )
    saving = running(
        drains=((6.0, A, 60.0),),
        beats=beats,
        answer=None,
        exit=ExitStatus(code=75),
        record=WEIGHT_SYNC,
        runs_s=20.0,
        saves=(2, 4, 5),
    )
    run = supervise(tmp_path, [saving, success()], *PREEMPTION, prepare_backend=with_cluster)
    (notice,) = run.events("preemption_notice")
    assert notice["response"] == "save"
    (saved,) = run.events("preemption_save")
    assert saved["exited"], "the driver ended within the window, after its own save"
    exited = run.events("attempt_exited")[0]
    assert (exited["rule"], exited["exit_code"]) == ("preempted", 75)
    assert run.events("attempt_started")[1]["resume_step"] == 5


def test_an_outage_of_the_drain_read_is_ridden_out_and_the_notice_seen_once_it_answers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def unanswered_until_10_s(backend) -> None:
        with_cluster(backend)
        backend.drains_unanswered = True
        original = backend.wait

        def wait(job, timeout_s, wake=None):
            status = original(job, timeout_s, wake)
            elapsed = backend.fake_clock.mono - backend._started_at[job.attempt]
            backend.drains_unanswered = job.attempt == 1 and elapsed < 10
            return status

        backend.wait = wait

    run = supervise(
        tmp_path, [running(drains=((3.0, A, 60.0),)), success()], *PREEMPTION, prepare_backend=unanswered_until_10_s
    )
    (notice,) = run.events("preemption_notice")
    assert notice["deadline_in_s"] < 55, "seen late, once Ray answered"
    warnings = [r.getMessage() for r in caplog.records if "draining" in r.getMessage()]
    assert len(warnings) == 2, warnings  # when the outage began, and when it ended
    assert run.code is ExitCode.DONE


def test_after_a_preemption_the_relaunch_waits_for_a_node_to_replace_the_preempted_one(tmp_path: Path) -> None:
    def one_worker_then_a_replacement(backend) -> None:
        backend.cluster = [CLUSTER[0], CLUSTER[1]]
        backend.joins = [(backend.fake_clock.mono + 60.0, NodeInfo(C, "worker-c", resources={"CPU": 4.0}))]

    first = running(drains=((4.5, A, 30.0),), nodes=NodesSeen(nodes=(CLUSTER[0], CLUSTER[1]), demand={"CPU": 3.0}))
    run = supervise(tmp_path, [first, success()], *PREEMPTION, prepare_backend=one_worker_then_a_replacement)
    (short,) = run.events("capacity_short")
    assert (short["missing"], short["wait_s"]) == ({"CPU": 3.0}, 300.0)
    (waited,) = run.events("capacity_wait")
    assert waited["met"]
    assert 50 <= waited["waited_s"] <= 62
    assert run.code is ExitCode.DONE


def test_no_replacement_within_the_wait_stops_with_exit_9_and_the_run_can_be_continued(tmp_path: Path) -> None:
    def one_worker(backend) -> None:
        backend.cluster = [CLUSTER[0], CLUSTER[1]]

    first = running(drains=((4.5, A, 30.0),), nodes=NodesSeen(nodes=(CLUSTER[0], CLUSTER[1]), demand={"CPU": 3.0}))
    run = supervise(tmp_path, [first], *PREEMPTION, "preemption.replacement_wait_s=30", prepare_backend=one_worker)
    assert run.code is ExitCode.NO_HEALTHY_CAPACITY
    (waited,) = run.events("capacity_wait")
    assert (waited["met"], waited["missing"]) == (False, {"CPU": 3.0})
    assert "preemption.replacement_wait_s=30 s" in run.events("run_finished")[0]["reason"]
    assert run.history().state is RunState.STOPPED, "continued by starting the supervisor again on the run"


def test_with_the_watch_off_drains_are_not_read(tmp_path: Path) -> None:
    ends = running(drains=((3.0, A, 30.0),), exit=ExitStatus(code=0), runs_s=12.0)
    run = supervise(tmp_path, [ends], *PREEMPTION, "preemption.watch=false", prepare_backend=with_cluster)
    assert run.backend.draining == {}, "never asked"
    assert run.events("preemption_notice") == []
    assert run.code is ExitCode.DONE


def test_status_the_report_and_the_webhook_say_it(tmp_path: Path) -> None:
    hook, notifiers = Webhook(), []

    def wire(events: EventLog) -> None:
        notifier = WebhookNotifier(hook.url, {}, 5.0, events.emit)
        events.listeners.append(notifier.on_event)
        notifiers.append(notifier)

    try:
        run = supervise(
            tmp_path,
            [running(drains=((4.5, A, 30.0),)), success()],
            *PREEMPTION,
            prepare_backend=with_cluster,
            wire_events=wire,
        )
        notifiers[0].close()
    finally:
        hook.close()
    assert [body["about"] for body, _ in hook.posts] == ["preemption", "finish"]
    alert = hook.posts[0][0]["text"]
    assert "attempt 1 PREEMPTED: Ray drained worker-a/aaaaaaaa (a preemption notice); saved step 5" in alert
    assert "not counted against the restart budget" in alert

    status = read_status(run.run_dir, now=run.clock.wall)
    (line,) = status.preemptions
    assert re.fullmatch(
        r"attempt 1: worker-a/aaaaaaaa drained by Ray \(deadline \d+ s after the notice\); saved step 5 in 1.5 s", line
    ), line
    assert f"preempted: {line}" in render_status(status, now=run.clock.wall)
    assert (status.restarts_used, status.restarts_by_rule) == (0, {}), "not a restart the budget counts"
    report, _ = write_report(run.run_dir, tmp_path / "report", now=run.clock.wall)
    assert f"- **Preempted**: {line}" in report.read_text()
