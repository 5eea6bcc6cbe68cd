"""Stall detection from heartbeats: a pure function of the beats and the time."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

import pytest

from supervisor.config import Action, WatchdogConfig
from supervisor.job.beat import Heartbeat
from supervisor.job.heartbeats import HeartbeatServer
from supervisor.outcomes import ExitStatus
from supervisor.policy.rules import AttemptEvidence, classify
from supervisor.policy.watchdog import ProgressState, StallKind, check, progress_limit_s
from verl_hooks.contract import HeartbeatKind

CONFIG = WatchdogConfig(
    startup_timeout_s=100.0,
    step_timeout_s=50.0,
    adaptive=True,
    adaptive_multiple=5.0,
    adaptive_floor_s=10.0,
    adaptive_min_steps=3,
    driver_timeout_s=20.0,
)


def beat(kind: str, at: float, **fields) -> Heartbeat:
    return Heartbeat(kind=HeartbeatKind(kind), attempt=1, received_at=at, fields={"kind": kind, **fields})


def state_with(*beats: Heartbeat) -> ProgressState:
    state = ProgressState(started_at=0.0)
    for b in beats:
        state.observe(b)
    return state


def steps(*ends: float) -> list[Heartbeat]:
    """A completed sync at each time, steps numbered from 1."""
    return [
        b for n, t in enumerate(ends, 1) for b in (beat("sync_begin", t - 0.1, step=n), beat("sync_end", t, step=n))
    ]


def test_not_armed_until_the_first_heartbeat() -> None:
    assert check(ProgressState(started_at=0.0), CONFIG, now=10_000.0) is None


def test_startup_allowance_before_the_first_sync() -> None:
    state = state_with(beat("alive", 1.0), beat("alive", 90.0))
    assert check(state, CONFIG, now=99.0) is None
    stall = check(state_with(beat("alive", 95.0)), CONFIG, now=101.0)
    assert stall is not None
    assert stall.kind is StallKind.JOB_STALL
    assert "before its first weight sync" in stall.reason


def test_fixed_step_limit_until_enough_steps_are_seen() -> None:
    state = state_with(*steps(5.0, 6.0))
    assert progress_limit_s(state, CONFIG) == 50.0
    assert check(state, CONFIG, now=55.9) is None
    assert check(state, CONFIG, now=56.1).kind is StallKind.JOB_STALL


@pytest.mark.parametrize(
    ("ends", "limit"),
    [
        ((5.0, 6.0, 7.0, 8.0), 10.0),  # 1 s steps: 5 s, raised to the floor
        ((5.0, 9.0, 13.0, 17.0), 20.0),  # 4 s steps: 5 x 4 s
        ((5.0, 6.0, 7.0, 19.0), 50.0),  # a 12 s step: 60 s, capped by the fixed limit
    ],
)
def test_adaptive_limit_is_a_multiple_of_the_slowest_step_within_floor_and_cap(ends, limit) -> None:
    assert progress_limit_s(state_with(*steps(*ends)), CONFIG) == limit


def test_a_slow_but_progressing_job_is_not_a_stall() -> None:
    fast = steps(5.0, 6.0, 7.0, 8.0)
    slower = [beat("sync_end", t, step=n) for n, t in ((5, 16.0), (6, 24.0), (7, 32.0))]
    state = state_with(*fast, *slower)
    assert check(state, CONFIG, now=39.0) is None, "8 s steps stay under the adapted limit as they come"


def test_silence_inside_a_weight_sync_is_a_weight_sync_hang_with_its_phase() -> None:
    state = state_with(
        *steps(5.0, 6.0, 7.0, 8.0), beat("sync_begin", 9.0, step=5), beat("sync_phase", 9.1, step=5, phase="finalize")
    )
    stall = check(state, CONFIG, now=19.2)
    assert stall is not None
    assert (stall.kind, stall.phase, stall.last_step) == (StallKind.WEIGHT_SYNC_HANG, "finalize", 5)
    assert stall.heartbeat_ages_s["sync_phase"] == pytest.approx(10.1)


def test_a_frozen_driver_is_told_apart() -> None:
    state = state_with(beat("alive", 1.0), *steps(5.0, 6.0, 7.0, 8.0))
    stall = check(state, CONFIG, now=21.5)
    assert stall is not None
    assert stall.kind is StallKind.DRIVER_FROZEN


def test_disabled_watchdog_never_fires() -> None:
    disabled = WatchdogConfig(enabled=False)
    assert check(state_with(beat("alive", 0.0)), disabled, now=1e9) is None


def test_stalls_are_restarted_by_the_shipped_rules() -> None:
    from supervisor.cli import compose_config, to_supervisor_config

    config = to_supervisor_config(compose_config(["run_dir=/tmp/unused"]))
    evidence = AttemptEvidence(ExitStatus(signal=15), stalled=True)
    result = classify(evidence, config.rules, config.default_action)
    assert (result.action, result.rule) == (Action.restart, "stalled")


def test_heartbeat_server_takes_only_beats_with_its_token() -> None:
    server = HeartbeatServer()
    server.start()
    try:
        body = json.dumps({"kind": "sync_end", "attempt": 2, "step": 7}).encode()

        def post(token: str) -> int:
            request = urllib.request.Request(
                server.url, data=body, headers={"Authorization": f"Bearer {token}"}, method="POST"
            )
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            try:
                with opener.open(request, timeout=5) as response:
                    return response.status
            except urllib.error.HTTPError as error:
                return error.code

        assert post("wrong") == 401
        assert post(server.token) == 204
        beats = server.take_received()
        assert [(b.kind, b.attempt, b.step) for b in beats] == [(HeartbeatKind.SYNC_END, 2, 7)]
        assert server.take_received() == []
    finally:
        server.stop()


def raw_post(server: HeartbeatServer, body: bytes, headers: dict[str, str]) -> int:
    """A POST with exactly these bytes and headers (no client library fixing them up)."""
    import http.client

    host, port = server.url.split("//")[1].split("/")[0].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        connection.putrequest("POST", "/heartbeat", skip_accept_encoding=True)
        for name, value in headers.items():
            connection.putheader(name, value)
        connection.endheaders(body)
        return connection.getresponse().status
    finally:
        connection.close()


def test_heartbeat_server_refuses_garbage_without_affecting_the_beats() -> None:
    server = HeartbeatServer()
    server.start()
    try:
        auth = {"Authorization": f"Bearer {server.token}"}
        good = json.dumps({"kind": "alive", "attempt": 1}).encode()
        cases = [
            (b"{not json", {**auth, "Content-Length": "9"}, 400),
            (b"[1, 2]", {**auth, "Content-Length": "6"}, 400),
            (b"x", {**auth, "Content-Length": "many"}, 400),
            (b"", {**auth, "Content-Length": "0"}, 400),
            (b"x" * 10, {**auth, "Content-Length": str(10**9)}, 413),
            (good, {"Authorization": "Bearer " + "0" * 32, "Content-Length": str(len(good))}, 401),
        ]
        assert [raw_post(server, body, headers) for body, headers, _ in cases] == [code for *_, code in cases]
        assert raw_post(server, good, {**auth, "Content-Length": str(len(good))}) == 204
        assert [(b.kind, b.attempt) for b in server.take_received()] == [(HeartbeatKind.ALIVE, 1)]
    finally:
        server.stop()


def test_heartbeat_server_bounds_a_flood(monkeypatch: pytest.MonkeyPatch) -> None:
    from supervisor.job import heartbeats

    monkeypatch.setattr(heartbeats, "MAX_QUEUED", 5)
    server = HeartbeatServer()
    server.start()
    try:
        body = json.dumps({"kind": "alive", "attempt": 1}).encode()
        headers = {"Authorization": f"Bearer {server.token}", "Content-Length": str(len(body))}
        codes = [raw_post(server, body, headers) for _ in range(8)]
        assert codes == [204] * 5 + [429] * 3, "beyond the bound, refused rather than queued"
        assert len(server.take_received()) == 5
        assert raw_post(server, body, headers) == 204, "drained: accepted again"
    finally:
        server.stop()


def test_an_error_record_wakes_the_loop_waiting_on_the_driver() -> None:
    """The loop waits on the driver's exit; an error record over the channel ends that wait at once, so the
    supervisor acts on the failure without waiting for its next tick or for the driver to die."""
    import select
    import signal
    import sys
    import time

    from supervisor.mechanisms.processes import start_child

    server = HeartbeatServer()
    server.start()
    driver = start_child([sys.executable, "-c", "import time; time.sleep(60)"], env=dict(os.environ))
    try:
        headers = {"Authorization": f"Bearer {server.token}"}
        alive = json.dumps({"kind": "alive", "attempt": 1}).encode()
        assert raw_post(server, alive, {**headers, "Content-Length": str(len(alive))}) == 204
        assert select.select([server], [], [], 0)[0] == [], "an ordinary beat waits for the tick"
        record = json.dumps({"kind": "error_record", "attempt": 1, "record": {"error_type": "X"}}).encode()
        assert raw_post(server, record, {**headers, "Content-Length": str(len(record))}) == 204
        started = time.monotonic()
        assert driver.wait(30.0, wake=server) is None, "woken, not exited"
        assert time.monotonic() - started < 5.0, "woken long before the 30 s timeout"
        assert [b.kind for b in server.take_received()] == [HeartbeatKind.ALIVE, HeartbeatKind.ERROR_RECORD]
        assert select.select([server], [], [], 0)[0] == [], "drained: nothing urgent any more"
        assert driver.poll() is None
    finally:
        driver.signal_group(signal.SIGKILL)
        driver.wait(10)
        server.stop()


def test_an_emergency_save_is_never_a_stall_before_its_own_deadline() -> None:
    """A save of a large model takes far longer than a step's silence is allowed: its deadline, carried by the
    save_begin beat, governs until it ends (the supervisor must not tear a job down in the middle of its save)."""
    from supervisor.policy.watchdog import SAVE_EXIT_MARGIN_S

    failed = [*steps(10.0, 20.0, 30.0, 40.0), beat("sync_failed", 41.0, step=5, phase="update_weights", hang=False)]
    saving = state_with(*failed, beat("save_begin", 42.0, step=5, trigger="sync_failure", deadline_s=600.0))
    assert progress_limit_s(saving, CONFIG) < 600.0, "the step limit alone would end the save"
    assert check(saving, CONFIG, now=42.0 + 600.0 + SAVE_EXIT_MARGIN_S) is None

    overrun = check(saving, CONFIG, now=42.0 + 600.0 + SAVE_EXIT_MARGIN_S + 1)
    assert overrun is not None
    assert overrun.kind is StallKind.EMERGENCY_SAVE_OVERRUN
    assert "emergency save of step 5 went past its deadline" in overrun.reason

    ended = state_with(*failed, beat("save_begin", 42.0, step=5, deadline_s=600.0), beat("save_end", 50.0, step=5))
    assert check(ended, CONFIG, now=55.0) is None, "silence is judged afresh from the save's end"
    assert check(ended, CONFIG, now=50.0 + CONFIG.step_timeout_s + 1) is not None


def test_a_driver_frozen_during_a_save_is_still_caught() -> None:
    state = state_with(beat("alive", 1.0), beat("save_begin", 2.0, step=5, deadline_s=600.0))
    stall = check(state, CONFIG, now=2.0 + CONFIG.driver_timeout_s + 1)
    assert stall is not None
    assert stall.kind is StallKind.DRIVER_FROZEN


def test_the_server_answers_a_beat_with_the_save_request_only_once_asked_and_only_to_its_attempt() -> None:
    server = HeartbeatServer()
    server.start()
    try:

        def post(attempt: int = 1) -> tuple[int, bytes]:
            body = json.dumps({"kind": "alive", "attempt": attempt}).encode()
            request = urllib.request.Request(
                server.url,
                data=body,
                method="POST",
                headers={"Authorization": f"Bearer {server.token}", "Content-Type": "application/json"},
            )
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with opener.open(request, timeout=5) as response:
                return response.status, response.read()

        from verl_hooks import heartbeat

        sender = heartbeat.HeartbeatSender(server.url, server.token, attempt=1)
        assert post() == (204, b"")
        assert sender.post_now(HeartbeatKind.ALIVE)
        assert not heartbeat.save_requested()

        assert heartbeat.past_save_s() is None
        server.past_save_s = 7.5  # the run's longest save in earlier attempts, for the emergency save's deadline
        status, answer = post()
        assert (status, json.loads(answer)) == (200, {"past_save_s": 7.5})
        assert sender.post_now(HeartbeatKind.ALIVE)
        assert heartbeat.past_save_s() == 7.5
        assert not heartbeat.save_requested()

        server.request_save(1)
        status, answer = post()
        assert (status, json.loads(answer)) == (200, {"save_requested": True, "past_save_s": 7.5})
        status, answer = post(attempt=2)
        assert (status, json.loads(answer)) == (200, {"past_save_s": 7.5}), "the next attempt is not asked"
        assert sender.post_now(HeartbeatKind.SYNC_END, step=4, duration_s=0.1)
        assert heartbeat.save_requested(), "the job learns it from the answer to its own beat"
    finally:
        heartbeat._save_requested.clear()
        heartbeat._past_save_s = None
        server.stop()
