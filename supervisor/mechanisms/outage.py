"""A cluster API that stops answering for a while: a dashboard restarting on a KubeRay head, a connection that
drops. Its calls are asked again within a limit, and the outage is logged once when it begins and once when it
ends, not once per poll."""

from __future__ import annotations

import concurrent.futures
import logging
import re
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import tenacity

from supervisor.clock import Clock

logger = logging.getLogger(__name__)

T = TypeVar("T")

_SDK_STATUS = re.compile(r"^Request failed with status code (\d{3})\b")


def http_status(error: BaseException) -> int | None:
    """The HTTP status an error carries, as each client spells it: urllib's ``code``, requests' ``response``,
    the state client's ``status`` (``ray_wire.StateApiError``), or the Jobs SDK's message ("Request failed with
    status code 503: ...", ``SubmissionClient._raise_error`` in ray/dashboard/modules/dashboard_sdk.py)."""
    response = getattr(error, "response", None)
    for status in (
        getattr(response, "status_code", None),
        getattr(error, "status", None),
        getattr(error, "code", None),
    ):
        if isinstance(status, int) and 100 <= status < 600:
            return status
    found = _SDK_STATUS.search(str(error))
    return int(found.group(1)) if found else None


def is_transient(error: BaseException) -> bool:
    """A refused or dropped connection, a timeout, or an HTTP 5xx: the API may answer soon. An HTTP 4xx (a
    refused token, a bad request) is an answer, and asking again would not change it."""
    status = http_status(error)
    if status is not None:
        return status >= 500
    return isinstance(error, OSError)


class Unanswered(RuntimeError):
    """The API did not answer within the limit; the message names it and its last error."""


class Outage:
    """Tracks whether one API (``what``, as a message names it) answers."""

    def __init__(self, what: str, clock: Clock | None = None, poll_s: float = 0.2) -> None:
        self.what = what
        self.clock = clock or Clock()
        self.poll_s = poll_s
        self.since: float | None = None
        """When the current outage began (``clock.monotonic``); None while the API answers."""
        self.last_error = ""

    def ask(self, call: Callable[[], T]) -> T:
        """``call``'s answer; its error is noted (and logged once per outage), then raised."""
        try:
            answer = call()
        except Exception as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            if self.since is None:
                self.since = self.clock.monotonic()
                logger.warning("%s does not answer (%s); asking again", self.what, self.last_error)
            raise
        if self.since is not None:
            logger.warning("%s answers again after %.1f s", self.what, self.clock.monotonic() - self.since)
            self.since = None
        return answer

    def retried(
        self, call: Callable[[], T], limit_s: float, transient: Callable[[BaseException], bool] = is_transient
    ) -> T:
        """``call``'s answer, asked again every ``poll_s`` while its error is ``transient``, for ``limit_s`` at
        most; raises ``Unanswered`` after that, and any other error at once."""
        started = self.clock.monotonic()
        retrying = tenacity.Retrying(
            # On this clock, not tenacity's own: a test's fake clock then bounds it too.
            stop=lambda _: self.clock.monotonic() - started >= limit_s,
            wait=tenacity.wait_fixed(self.poll_s),
            retry=tenacity.retry_if_exception(transient),
            sleep=self.clock.sleep,
            reraise=False,
        )
        try:
            return retrying(self.ask, call)
        except tenacity.RetryError as exc:
            raise Unanswered(f"{self.what} did not answer for {limit_s:g} s ({self.last_error})") from exc


class BoundedCalls:
    """Calls to a client that sets no timeout of its own (Ray's Jobs SDK sends its requests without one: a
    dashboard that accepts a connection and never answers would block the caller, and the loop's watchdog with
    it, forever). Each call runs in a daemon thread and is waited for ``timeout_s``; then it raises
    ``TimeoutError`` (transient: asked again later). A thread whose call has not returned starts no other: it is
    told at once that the earlier one still hangs, so a long silence costs one thread, not one per poll."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._hanging: dict[int, concurrent.futures.Future[Any]] = {}

    def __call__(self, call: Callable[[], T], timeout_s: float | None = None) -> T:
        caller = threading.get_ident()
        limit_s = self.timeout_s if timeout_s is None else timeout_s
        with self._lock:
            earlier = self._hanging.get(caller)
            if earlier is not None and not earlier.done():
                raise TimeoutError("an earlier call has not returned yet")
            future: concurrent.futures.Future[T] = concurrent.futures.Future()
            self._hanging[caller] = future
        threading.Thread(target=_run_into, args=(call, future), name="bounded-call", daemon=True).start()
        try:
            return future.result(timeout=limit_s)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"no answer within {limit_s:g} s (ray.api_timeout_s)") from None


def _run_into(call: Callable[[], T], future: concurrent.futures.Future[T]) -> None:
    try:
        future.set_result(call())
    except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller, whatever it is
        future.set_exception(exc)
