"""A cluster API that stops answering for a while is asked again within a limit, and said so once."""

from __future__ import annotations

import logging
import threading
import urllib.error

import pytest
import requests

from supervisor.mechanisms.outage import BoundedCalls, Outage, Unanswered, is_transient
from supervisor.mechanisms.processes import wait_for
from supervisor.mechanisms.ray_wire import StateApiError
from tests.supervisor.fakes import FakeClock


class Flaky:
    """Refuses the first ``refusals`` calls, then answers."""

    def __init__(self, refusals: int, error: Exception | None = None) -> None:
        self.refusals = refusals
        self.error = error or ConnectionRefusedError("connection refused")
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.refusals:
            raise self.error
        return "SUCCEEDED"


def test_an_outage_shorter_than_the_limit_is_asked_through_and_logged_once_each_way(caplog) -> None:
    clock = FakeClock()
    outage = Outage("the Ray Jobs API at http://head:8265", clock.clock(), poll_s=0.2)
    flaky = Flaky(refusals=10)
    with caplog.at_level(logging.WARNING, logger="supervisor.mechanisms.outage"):
        assert outage.retried(flaky, limit_s=5) == "SUCCEEDED"
    assert flaky.calls == 11
    assert clock.sleeps == [0.2] * 10
    assert [r.getMessage() for r in caplog.records] == [
        "the Ray Jobs API at http://head:8265 does not answer (ConnectionRefusedError: connection refused); "
        "asking again",
        "the Ray Jobs API at http://head:8265 answers again after 2.0 s",
    ]
    assert outage.since is None


def test_an_outage_past_the_limit_names_the_api_and_its_last_error() -> None:
    clock = FakeClock()
    outage = Outage("the Ray Jobs API at http://head:8265", clock.clock(), poll_s=0.2)
    with pytest.raises(Unanswered) as raised:
        outage.retried(Flaky(refusals=1000), limit_s=1)
    assert str(raised.value) == (
        "the Ray Jobs API at http://head:8265 did not answer for 1 s (ConnectionRefusedError: connection refused)"
    )
    assert clock.mono - 1000.0 == pytest.approx(1.0, abs=0.21), "not asked past the limit"
    assert outage.since is not None, "the outage goes on until an answer"


def test_an_error_that_is_not_transient_is_raised_at_once() -> None:
    outage = Outage("the Ray Jobs API", FakeClock().clock())
    refused = Flaky(refusals=1, error=RuntimeError("Request failed with status code 400: bad entrypoint"))
    with pytest.raises(RuntimeError, match="status code 400"):
        outage.retried(refused, limit_s=5)
    assert refused.calls == 1


def _requests_error(status: int | None) -> requests.RequestException:
    if status is None:
        return requests.ConnectionError("Max retries exceeded: connection refused")
    response = requests.Response()
    response.status_code = status
    return requests.HTTPError(f"{status} Error", response=response)


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (ConnectionRefusedError("refused"), True),
        (TimeoutError("timed out"), True),
        (urllib.error.URLError(ConnectionRefusedError("refused")), True),
        (urllib.error.HTTPError("http://head:8265", 503, "Service Unavailable", {}, None), True),
        (urllib.error.HTTPError("http://head:8265", 401, "Unauthorized", {}, None), False),
        (_requests_error(None), True),
        (_requests_error(502), True),
        (_requests_error(403), False),
        (RuntimeError("Request failed with status code 503: Service Unavailable."), True),
        (RuntimeError("Request failed with status code 404: Job verl-supervisor-x-1 does not exist."), False),
        (StateApiError("HTTP 502 Bad Gateway from /api/v0/actors: ...", 502), True),
        (StateApiError("HTTP 401 Unauthorized from /api/v0/actors: ...", 401), False),
        (StateApiError("the state API failed to list actors: ..."), False),
        (ValueError("bad json"), False),
    ],
)
def test_only_what_may_answer_soon_is_asked_again(error: BaseException, transient: bool) -> None:
    assert is_transient(error) is transient


def test_a_call_that_never_returns_is_given_up_and_costs_one_thread() -> None:
    bounded = BoundedCalls(timeout_s=0.2)
    release = threading.Event()
    calls = []

    def hangs() -> str:
        calls.append("hangs")
        release.wait(30)
        return "late"

    with pytest.raises(TimeoutError, match=r"no answer within 0\.2 s"):
        bounded(hangs)
    with pytest.raises(TimeoutError, match="an earlier call has not returned yet"):
        bounded(hangs)
    assert calls == ["hangs"], "the second call started nothing while the first still hangs"
    release.set()

    def answers() -> bool:
        try:
            return bounded(lambda: "answered") == "answered"
        except TimeoutError:  # the released call is still on its way out
            return False

    assert wait_for(answers, 5), "once the hung call returned, calls are made again"
    with pytest.raises(ValueError, match="its own error"):
        bounded(lambda: (_ for _ in ()).throw(ValueError("its own error")))
