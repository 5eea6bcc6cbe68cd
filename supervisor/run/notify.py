"""Alerts to a webhook (``notify.webhook_url``): a Slack-compatible JSON POST on a restart, a node drained, a give-up
and the end.

The notifier listens to the run's events and hands each message to a thread of its own through a bounded queue:
a slow or failing webhook never blocks the loop, and what becomes of each message is an event of its own
(``notification``). The webhook's URL and headers are secrets (a Slack webhook's URL is its credential): they
reach no log, no event and no record.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from supervisor.run.events import AttemptExited, Backoff, NodeExcluded, Notification, RunFinished
from supervisor.run.status import error_line

MAX_QUEUED = 32


@dataclass(frozen=True)
class Message:
    about: str
    """``restart``, ``preemption``, ``node_excluded``, ``give_up``, ``finish`` or ``interrupted``."""
    text: str
    fields: dict[str, Any] = field(default_factory=dict)


def message_for(entry: Mapping[str, Any], last_exit: Mapping[str, Any] | None) -> Message | None:
    """The alert an event calls for (None: none). ``last_exit`` is the run's latest ``attempt_exited`` event."""
    run = entry.get("run_id", "?")
    error = None
    if last_exit is not None:
        error = error_line(last_exit.get("record"), last_exit.get("reason"))
    if entry["event"] == Backoff.kind and entry.get("counted") is False:  # after a preemption
        reason = last_exit.get("reason") if last_exit is not None else None
        text = (
            f"verl-supervisor run {run}: attempt {entry['next_attempt'] - 1} PREEMPTED: {reason}; "
            f"relaunching on the nodes that remain (not counted against the restart budget)"
        )
        return Message("preemption", text, {"next_attempt": entry["next_attempt"], "reason": reason})
    if entry["event"] == Backoff.kind:
        text = (
            f"verl-supervisor run {run}: attempt {entry['next_attempt'] - 1} failed ({error or 'unknown error'}); "
            f"restart {entry['restarts_used'] + 1} of {entry['max_restarts']} in {entry['delay_s']:.1f} s"
        )
        return Message("restart", text, {"next_attempt": entry["next_attempt"], "error": error})
    if entry["event"] == NodeExcluded.kind:
        node = f"{entry['hostname']}/{str(entry['node_id'])[:8]}"
        done = "drained (no attempt lands there again)" if entry["drained"] else f"NOT drained ({entry['message']})"
        text = f"verl-supervisor run {run}: node {node} {done}: {entry['reason']}"
        return Message("node_excluded", text, {"node_id": entry["node_id"], "drained": entry["drained"]})
    if entry["event"] != RunFinished.kind:
        return None
    code = entry["exit_code"]
    if code == 0:
        about, text = "finish", f"verl-supervisor run {run} finished after {entry['attempts']} attempt(s)"
    elif code in (130, 143):
        about, text = "interrupted", f"verl-supervisor run {run} was stopped ({entry['outcome']})"
    else:
        about = "give_up"
        text = f"verl-supervisor run {run} GAVE UP: {entry['outcome']} (exit {code}): {entry['reason']}"
        if error:
            text += f"; last error: {error}"
    return Message(about, text, {"exit_code": code, "outcome": entry["outcome"], "error": error})


class WebhookNotifier:
    """Posts messages off the loop's path; ``emit`` writes what became of each (never the URL or headers)."""

    def __init__(
        self,
        url: str,
        headers: Mapping[str, str],
        timeout_s: float,
        emit: Callable[[Notification], object],
        post: Callable[[str, bytes, Mapping[str, str], float], int] | None = None,
    ) -> None:
        self._url = url
        self._headers = {"Content-Type": "application/json", **headers}
        self._timeout_s = timeout_s
        self._emit = emit
        self._post = post or _post
        self._queue: queue.Queue[Message | None] = queue.Queue(maxsize=MAX_QUEUED)
        self._last_exit: Mapping[str, Any] | None = None
        self._thread = threading.Thread(target=self._deliver, name="webhook-notifier", daemon=True)
        self._thread.start()

    def on_event(self, entry: Mapping[str, Any]) -> None:
        """An EventLog listener: called with every event as written."""
        if entry["event"] == AttemptExited.kind:
            self._last_exit = entry
            return
        message = message_for(entry, self._last_exit)
        if message is None:
            return
        try:
            self._queue.put_nowait(message)
        except queue.Full:
            self._emit(Notification(message.about, delivered=False, problem="dropped: too many alerts queued"))

    def close(self, timeout_s: float | None = None) -> None:
        """Lets the queued alerts go out (the final one included), for at most ``timeout_s``."""
        deadline = time.monotonic() + (self._timeout_s * 2 if timeout_s is None else timeout_s)
        try:
            self._queue.put(None, timeout=max(0.0, deadline - time.monotonic()))
        except queue.Full:
            return
        self._thread.join(max(0.0, deadline - time.monotonic()))

    def _deliver(self) -> None:
        while True:
            message = self._queue.get()
            if message is None:
                return
            body = json.dumps({"text": message.text, "about": message.about, **message.fields}).encode()
            started = time.monotonic()
            try:
                status = self._post(self._url, body, self._headers, self._timeout_s)
                problem = None if 200 <= status < 300 else f"HTTP {status}"
            except urllib.error.HTTPError as exc:
                status, problem = exc.code, f"HTTP {exc.code}"
            except (OSError, ValueError) as exc:
                # The type only: an exception's text may carry the URL, which is the webhook's credential.
                status, problem = None, type(exc).__name__
            self._emit(
                Notification(
                    message.about,
                    delivered=problem is None,
                    status=status,
                    problem=problem,
                    duration_s=round(time.monotonic() - started, 3),
                )
            )


def _post(url: str, body: bytes, headers: Mapping[str, str], timeout_s: float) -> int:
    request = urllib.request.Request(url, data=body, headers=dict(headers), method="POST")
    with urllib.request.urlopen(request, timeout=timeout_s) as response:  # http(s) only: checked with the configuration
        return response.status
