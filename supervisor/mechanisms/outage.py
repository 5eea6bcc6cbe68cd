"""A cluster API that stops answering for a while: a dashboard restarting on a KubeRay head, a connection that
drops. Its calls are asked again within a limit, and the outage is logged once when it begins and once when it
ends, not once per poll."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import tenacity

from supervisor.clock import Clock

logger = logging.getLogger(__name__)

T = TypeVar("T")


def is_transient(error: BaseException) -> bool:
    """A refused or dropped connection, a timeout, or an HTTP 5xx: the API may answer soon. An HTTP 4xx (a
    refused token, a bad request) is an answer, and asking again would not change it."""
    response = getattr(error, "response", None)
    status = getattr(error, "code", None) if response is None else getattr(response, "status_code", None)
    if isinstance(status, int) and 400 <= status < 600:
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
