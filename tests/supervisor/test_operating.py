"""Operating a run: ``status`` and ``report`` from a run directory, the metrics endpoint, the webhook alerts.

The run directories are written by the real loop (driven by the fake backend and clock of test_loop.py), so the
status is read from exactly what the supervisor writes; metrics are scraped and alerts received over real HTTP.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from supervisor.cli import inspect_main
from supervisor.outcomes import ExitCode, ExitStatus
from supervisor.run.events import Backoff, EventLog, read_events
from supervisor.run.metrics import serve_metrics
from supervisor.run.notify import WebhookNotifier
from supervisor.run.report import write_report
from supervisor.run.status import read_status, render_status
from tests.supervisor.fakes import Attempt
from tests.supervisor.test_loop import WEIGHT_SYNC, supervise, weight_sync_failure
from tests.supervisor.webhook import Webhook
from verl_hooks.contract import HeartbeatKind

BEGIN, END = HeartbeatKind.SYNC_BEGIN, HeartbeatKind.SYNC_END


def syncs(*steps_at: tuple[float, int]) -> tuple[tuple[float, HeartbeatKind, dict], ...]:
    """A sync_begin at each (seconds after launch, step) and its sync_end half a second later."""
    beats = []
    for at, step in steps_at:
        beats += [(at, BEGIN, {"step": step, "backend": "naive"}), (at + 0.5, END, {"step": step, "duration_s": 0.5})]
    return tuple(beats)


def failed_then_resumed(tmp_path: Path, *overrides: str):
    """Attempt 1 syncs steps 0, 1, 2 (at 2, 4, 6 s), saves step 2 and fails at 10 s; attempt 2 resumes from step 2
    (its first sync at 3 s), syncs steps 3 to 6 and finishes at 10 s."""
    first = Attempt(
        exit=ExitStatus(code=75), runs_s=10, record=WEIGHT_SYNC, saves=(2,), beats=syncs((2, 0), (4, 1), (6, 2))
    )
    second = Attempt(
        exit=ExitStatus(code=0), runs_s=10, saves=(6,), beats=syncs((3, 2), (4, 3), (5, 4), (6, 5), (7, 6))
    )
    return supervise(tmp_path, [first, second], *overrides)


def test_status_of_a_finished_run_names_its_error_its_resume_point_and_the_time_lost(tmp_path: Path) -> None:
    run = failed_then_resumed(tmp_path)
    assert run.code is ExitCode.DONE
    status = read_status(run.run_dir, now=run.clock.wall)
    assert (status.state, status.outcome, status.exit_code) == ("finished", "done", 0)
    assert status.in_flight is None
    assert status.seconds_since_progress is None
    assert status.last_error == "WeightSyncFatalError in update_weights at step 3"
    assert status.resume_step == 6
    assert (status.restarts_used, status.restarts_left, status.max_restarts) == (1, 2, 3)
    assert status.restarts_by_rule == {"weight-sync-failure": 1}
    # Step 2 was done when attempt 1 began its sync (6 s after its launch); attempt 2 was back there 3 s after its
    # own launch, which came when attempt 1 ended (10 s: the fake clock stands still in teardown, no backoff).
    started = [a["started_at"] for a in status.attempts]
    assert started[1] - started[0] == 10
    assert status.lost_s == pytest.approx(10 + 3 - 6)
    text = render_status(status, now=run.clock.wall)
    assert set(status.written_bytes) == {"attempt logs", "Ray logs", "records"}
    assert status.written_bytes["records"] > 0, "state.json and events.jsonl"
    assert "written by the supervisor: attempt logs " in text
    assert "finished: done (exit 0)" in text
    assert "newest complete checkpoint: global_step_6" in text, "a finished run resumes from nothing"
    assert "time lost to failures: 7.0 s" in text


def test_status_of_a_run_a_signal_stopped_says_it_can_be_continued(tmp_path: Path) -> None:
    run = supervise(tmp_path, [weight_sync_failure()], signal_at={"wait": int(signal.SIGTERM)})
    assert run.code is ExitCode.INTERRUPTED_SIGTERM
    status = read_status(run.run_dir, now=run.clock.wall)
    assert (status.state, status.outcome, status.exit_code) == ("stopped", "interrupted_sigterm", 143)
    assert status.restarts_by_rule == {}, "a stop signal is not a restart"
    text = render_status(status, now=run.clock.wall)
    assert "stopped: interrupted_sigterm (exit 143); verl-supervisor on this run_dir continues it" in text
    assert "next resume from:" in text


def test_status_while_an_attempt_runs_shows_its_step_and_heartbeat_ages(tmp_path: Path) -> None:
    run = failed_then_resumed(tmp_path)
    # The run directory as it was 5 s into attempt 2: state.json rewritten as the loop had it then.
    state_path = run.run_dir / "state.json"
    state = json.loads(state_path.read_text())
    second = state["attempts"][1]
    second.update(ended_at=None, exit_code=None, action=None, rule=None, reason=None, reached_step=None)
    state.update(state="attempt_running", exit_code=None, outcome=None)
    state_path.write_text(json.dumps(state))
    beats = run.run_dir / "attempts" / "2" / "heartbeats.jsonl"
    beats.write_text("".join(line + "\n" for line in beats.read_text().splitlines()[:4]))  # steps 2 and 3 synced
    now = second["started_at"] + 7

    status = read_status(run.run_dir, now=now)
    assert status.state == "attempt_running"
    assert status.in_flight is not None
    assert (status.in_flight.attempt, status.in_flight.step) == (2, 3)
    # Beats reach the loop at its 1 s ticks: step 3's sync_end (4.5 s after the launch) was taken at 5 s.
    assert status.seconds_since_progress == pytest.approx(7 - 5)
    assert status.in_flight.heartbeat_ages_s == {"?:?": pytest.approx(2)}, "the fake's beats name no host or pid"
    assert status.restarts_by_rule == {"weight-sync-failure": 1}
    assert not status.supervisor_alive, "no supervisor holds this run directory"
    assert "NO LIVE SUPERVISOR" in render_status(status, now=now)
    assert "attempt 2 running since 7 s ago, at step 3" in render_status(status, now=now)
    assert "next resume from: global_step_6" in render_status(status, now=now)


def test_alive_beats_are_kept_as_each_processs_last_so_the_beats_file_grows_with_the_steps(tmp_path: Path) -> None:
    """A week-long attempt sends an ``alive`` beat every few seconds from each process: heartbeats.jsonl keeps the
    progress beats, alive.json the last alive of each process, and status reads the ages from it."""
    alive = tuple((0.5 + 0.5 * n, HeartbeatKind.ALIVE, {"host": "node-a", "pid": 100 + n % 2}) for n in range(400))
    attempt = Attempt(exit=ExitStatus(code=0), runs_s=250, saves=(6,), beats=(*syncs((1, 0), (2, 1)), *alive))
    run = supervise(tmp_path, [attempt])
    assert run.code is ExitCode.DONE
    beats = run.run_dir / "attempts" / "1" / "heartbeats.jsonl"
    kinds = [json.loads(line)["kind"] for line in beats.read_text().splitlines()]
    assert kinds == ["sync_begin", "sync_end", "sync_begin", "sync_end"], "no alive line"
    last = json.loads((run.run_dir / "attempts" / "1" / "alive.json").read_text())
    assert set(last) == {"node-a:100", "node-a:101"}
    started = read_status(run.run_dir).attempts[0]["started_at"]
    assert max(last.values()) == pytest.approx(started + 200, abs=1.0), "the last beat, at its loop tick"


def test_a_run_that_gave_up_counts_its_lost_time_until_its_end(tmp_path: Path) -> None:
    run = supervise(tmp_path, [weight_sync_failure(saves=())], "restart.max_restarts=0")
    assert run.code is ExitCode.BUDGET_EXHAUSTED
    status = read_status(run.run_dir, now=run.clock.wall + 100)
    (attempt,) = status.attempts
    assert status.lost_s == pytest.approx(attempt["ended_at"] - attempt["started_at"])
    assert status.restarts_by_rule == {}, "no restart followed the failure"
    assert status.restarts_left == 0


def test_status_command_prints_text_and_json_and_refuses_a_folder_without_a_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = failed_then_resumed(tmp_path)
    assert inspect_main(["status", str(run.run_dir), "--json"]) is ExitCode.DONE
    data = json.loads(capsys.readouterr().out)
    assert (data["state"], data["resume_step"], data["restarts_by_rule"]) == ("finished", 6, {"weight-sync-failure": 1})
    assert inspect_main(["status", str(run.run_dir)]) is ExitCode.DONE
    assert "last error: WeightSyncFatalError in update_weights at step 3" in capsys.readouterr().out
    assert inspect_main(["status", str(tmp_path / "nothing")]) is ExitCode.USAGE
    assert "holds no run of the supervisor" in capsys.readouterr().err


def test_report_writes_markdown_and_the_timeline_picture(tmp_path: Path) -> None:
    run = failed_then_resumed(tmp_path)
    report, picture = write_report(run.run_dir, tmp_path / "report", now=run.clock.wall)
    assert picture is not None
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = report.read_text()
    assert "- **State**: done (exit 0)" in text
    assert (
        "| 1 | fresh | 10.0 s | 75 | restart (weight-sync-failure) | WeightSyncFatalError in update_weights at step 3"
        in text
    )
    assert "| 2 | step 2 | 10.0 s | 0 | done (success) | - | step 6 |" in text
    assert "![timeline](timeline.png)" in text
    assert text.count("| run_started |") == 1


def test_report_timeline_spans_follow_the_attempts(tmp_path: Path) -> None:
    from supervisor.run.report import timeline_row

    run = failed_then_resumed(tmp_path)
    status = read_status(run.run_dir, now=run.clock.wall)
    row, origin = timeline_row(run.run_dir, status, run.clock.wall)
    starts = [a["started_at"] - origin for a in status.attempts]
    kinds = [(span.kind, round(span.start - starts[0], 1), round(span.end - starts[0], 1)) for span in row.spans]
    assert kinds[0] == ("cluster start", -0.5, 0), "the fake cluster's 0.5 s start-up, ending as attempt 1 starts"
    assert kinds[1:4] == [("start-up", 0, 2), ("training", 2, 10), ("teardown", 10, 10)]
    assert [k for k, _, _ in kinds[4:]] == ["start-up", "training", "teardown"]
    assert len(row.steps) == 3 + 5, "a tick per finished weight sync"
    assert row.failures == [pytest.approx(starts[0] + 10)]


def scrape(url: str) -> dict[str, list]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def test_metrics_are_scraped_over_http(tmp_path: Path) -> None:
    run = failed_then_resumed(tmp_path)
    server = serve_metrics(run.run_dir, "127.0.0.1", 0)
    try:
        metrics = scrape(server.url)
    finally:
        server.stop()
    values = {(s.name, s.labels.get("rule") or s.labels.get("state")): s.value for f in metrics.values() for s in f}
    assert values[("verl_supervisor_restarts_total", "weight-sync-failure")] == 1
    assert values[("verl_supervisor_attempts_total", None)] == 2
    assert values[("verl_supervisor_attempt_running", None)] == 0
    assert values[("verl_supervisor_checkpoint_step", None)] == 6
    assert values[("verl_supervisor_lost_seconds", None)] == pytest.approx(7)
    assert values[("verl_supervisor_restarts_left", None)] == 2
    assert values[("verl_supervisor_exit_code", None)] == 0
    assert values[("verl_supervisor_state", "finished")] == 1
    assert values[("verl_supervisor_state", "attempt_running")] == 0
    assert {s.labels["run_id"] for f in metrics.values() for s in f} == {read_status(run.run_dir).run_id}


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.close()


def supervise_with_webhook(tmp_path: Path, hook: Webhook, attempts, *overrides: str, timeout_s: float = 5.0):
    """The loop with a webhook notifier listening to its events, as ``verl-supervisor`` wires it."""
    notifiers = []

    def wire(events: EventLog) -> None:
        notifier = WebhookNotifier(hook.url, {"Authorization": "Bearer SECRET-TOKEN"}, timeout_s, events.emit)
        events.listeners.append(notifier.on_event)
        notifiers.append(notifier)

    run = supervise(tmp_path, attempts, *overrides, wire_events=wire)
    notifiers[0].close()
    return run


def test_webhook_is_told_of_each_restart_and_the_end(tmp_path: Path, webhook: Webhook) -> None:
    run = supervise_with_webhook(tmp_path, webhook, [weight_sync_failure(), Attempt(exit=ExitStatus(code=0))])
    assert run.code is ExitCode.DONE
    assert [body["about"] for body, _ in webhook.posts] == ["restart", "finish"]
    restart, finish = (body["text"] for body, _ in webhook.posts)
    assert "attempt 1 failed (WeightSyncFatalError in update_weights at step 3); restart 1 of 3" in restart
    assert "finished after 2 attempt(s)" in finish
    assert all(headers["Authorization"] == "Bearer SECRET-TOKEN" for _, headers in webhook.posts)
    notes = run.events("notification")
    assert [(n["about"], n["delivered"], n["status"]) for n in notes] == [("restart", True, 200), ("finish", True, 200)]
    everything = (run.run_dir / "events.jsonl").read_text() + run.console
    assert "SECRET" not in everything, "the webhook's URL and headers are secrets"


def test_webhook_is_told_when_the_run_gives_up(tmp_path: Path, webhook: Webhook) -> None:
    run = supervise_with_webhook(tmp_path, webhook, [weight_sync_failure(saves=())], "restart.max_restarts=0")
    assert run.code is ExitCode.BUDGET_EXHAUSTED
    ((body, _),) = webhook.posts
    assert body["about"] == "give_up"
    assert body["exit_code"] == 4
    assert "GAVE UP: budget_exhausted (exit 4)" in body["text"]
    assert "last error: WeightSyncFatalError in update_weights at step 3" in body["text"]


def test_a_failing_webhook_is_an_event_and_the_run_goes_on(tmp_path: Path) -> None:
    hook = Webhook(status=500)
    try:
        run = supervise_with_webhook(tmp_path, hook, [weight_sync_failure(), Attempt(exit=ExitStatus(code=0))])
    finally:
        hook.close()
    assert run.code is ExitCode.DONE
    notes = run.events("notification")
    assert [(n["delivered"], n["problem"]) for n in notes] == [(False, "HTTP 500"), (False, "HTTP 500")]
    # Read after the notifier closed: its outcomes arrive on its own thread, after the loop's last event.
    assert run.events("run_finished"), "the run ended although no alert was delivered"


def test_a_webhook_that_holds_the_request_never_blocks_the_caller(tmp_path: Path) -> None:
    hook = Webhook()
    hook.hold.clear()  # the webhook takes the request and answers only when the test lets it
    log = EventLog(tmp_path / "events.jsonl", "run", console=None)
    notifier = WebhookNotifier(hook.url, {}, 60, log.emit)
    log.listeners.append(notifier.on_event)
    try:
        log.emit(Backoff(next_attempt=2, delay_s=0.0, restarts_used=0, max_restarts=3))
        # emit has returned although the webhook holds the request: the POST runs on the notifier's thread.
        assert hook.received.acquire(timeout=10), "the alert was posted"
        assert not read_events(tmp_path / "events.jsonl")[1:], "no outcome yet: the webhook has not answered"
        hook.hold.set()
        notifier.close(timeout_s=30)
    finally:
        hook.close()
    (note,) = [e for e in read_events(tmp_path / "events.jsonl") if e["event"] == "notification"]
    assert (note["about"], note["delivered"], note["status"]) == ("restart", True, 200)


def test_a_webhook_that_never_answers_is_given_up_after_its_timeout(tmp_path: Path) -> None:
    hook = Webhook()
    hook.hold.clear()
    log = EventLog(tmp_path / "events.jsonl", "run", console=None)
    notifier = WebhookNotifier(hook.url, {}, 0.3, log.emit)
    log.listeners.append(notifier.on_event)
    try:
        log.emit(Backoff(next_attempt=2, delay_s=0.0, restarts_used=0, max_restarts=3))
        notifier.close(timeout_s=30)
    finally:
        hook.close()
    (note,) = [e for e in read_events(tmp_path / "events.jsonl") if e["event"] == "notification"]
    assert (note["delivered"], note["problem"]) == (False, "TimeoutError")


def test_an_emergency_checkpoint_is_said_by_every_view_of_the_run(tmp_path: Path, webhook: Webhook) -> None:
    """The job's record says the trainer saved the step it failed at: the attempt_exited event and its console
    line, the relaunch's attempt_started, status, report and the restart alert all say so."""
    saved = {"status": "saved", "trigger": "sync_failure", "step": 3, "reason": None, "elapsed_s": 1.5}
    record = dataclasses.replace(WEIGHT_SYNC, emergency_checkpoint=saved)
    first = Attempt(exit=ExitStatus(code=75), record=record, saves=(2, 3))
    run = supervise_with_webhook(tmp_path, webhook, [first, Attempt(exit=ExitStatus(code=0), saves=(6,))])
    assert run.code is ExitCode.DONE

    exited = run.events("attempt_exited")[0]
    assert exited["emergency_checkpoint"] == saved
    assert exited["record"]["emergency_checkpoint"] == saved
    assert "-> restart; emergency checkpoint: saved step 3 in 1.5 s" in run.console
    started = run.events("attempt_started")
    assert [(e["resume_step"], e["emergency_of"]) for e in started] == [(None, None), (3, 1)]
    assert "resuming from global_step_3 (the emergency checkpoint of attempt 1)" in run.console
    state = json.loads((run.run_dir / "state.json").read_text())
    assert state["attempts"][0]["emergency_checkpoint"] == saved

    line = "WeightSyncFatalError in update_weights at step 3 (emergency checkpoint: saved step 3 in 1.5 s)"
    assert read_status(run.run_dir, now=run.clock.wall).last_error == line
    report, _ = write_report(run.run_dir, tmp_path / "report", now=run.clock.wall)
    assert line in report.read_text()
    restart = webhook.posts[0][0]["text"]
    assert f"attempt 1 failed ({line})" in restart
