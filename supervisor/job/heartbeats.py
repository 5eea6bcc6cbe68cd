"""The supervisor's end of the heartbeat channel: a small HTTP server that only takes beats from its own run.

Why HTTP: the job's workers may run on other machines than the supervisor, and in the Jobs API mode the
supervisor is not even a Ray driver; a POST to a known address reaches it from any node in every Ray mode.
A bearer token generated per supervisor process keeps other users of a shared machine from feeding it beats;
bodies are bounded in size and refused unless they are JSON objects; the beats accepted are bounded in rate and
in number waiting, so that neither garbage nor a flood reaches the loop (each refusal is a 4xx, never a crash).
The server only queues what it receives; the supervisor's loop takes what it received, so all decisions stay in the
one loop. An error record also makes ``fileno()`` readable: the loop, waiting on the driver, wakes at once to act
on it instead of at its next tick.
"""

from __future__ import annotations

import hmac
import json
import os
import queue
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from supervisor.job.beat import Heartbeat
from verl_hooks.contract import PAST_SAVE_FIELD, SAVE_REQUEST_FIELD, HeartbeatKind, heartbeat_kind

MAX_BODY_BYTES = 65536
MAX_QUEUED = 10_000
"""Beats waiting for the loop (it takes them every tick); beyond this a beat is refused with 429."""
RATE_PER_S = 500.0
BURST = 2_000
"""The token bucket for accepted beats: a job sends a few per second; thousands are a bug or an attack."""


class _TokenBucket:
    def __init__(self, rate_per_s: float, burst: int) -> None:
        self._rate, self._burst = rate_per_s, float(burst)
        self._tokens, self._at = float(burst), time.monotonic()
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
            self._at = now
            if self._tokens < 1:
                return False
            self._tokens -= 1
            return True


class HeartbeatServer:
    def __init__(self, listen_host: str = "127.0.0.1", advertise_host: str | None = None) -> None:
        self.token = secrets.token_hex(16)  # a secret: goes only into the job's environment
        self._queue: queue.Queue[Heartbeat] = queue.Queue(maxsize=MAX_QUEUED)
        self._bucket = _TokenBucket(RATE_PER_S, BURST)
        self._server = ThreadingHTTPServer((listen_host, 0), _handler_for(self))
        self._server.daemon_threads = True
        self._advertise_host = advertise_host or listen_host
        self._thread = threading.Thread(target=self._server.serve_forever, name="heartbeat-server", daemon=True)
        self._urgent = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._save_requested: set[int] = set()  # attempts; written by the loop, read by the handler threads
        self.past_save_s: float | None = None
        """The run's longest save in its earlier attempts, said to the job in every answer (``PAST_SAVE_FIELD``)."""

    @property
    def url(self) -> str:
        return f"http://{self._advertise_host}:{self._server.server_address[1]}/heartbeat"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        os.close(self._urgent)

    def fileno(self) -> int:
        """Readable once an error record has arrived that ``take_received`` has not returned yet."""
        return self._urgent

    def request_save(self, attempt: int) -> None:
        """From now on, every accepted beat of ``attempt`` is answered with the request to save at the next safe
        point and stop (``SAVE_REQUEST_FIELD``): only the run's own processes, which hold the token, ever learn
        of it, and the next attempt (after a preemption) is not asked."""
        self._save_requested = self._save_requested | {attempt}

    def save_requested(self, attempt: int) -> bool:
        return attempt in self._save_requested

    def answer(self, attempt: object = None) -> dict[str, object]:
        """What an accepted beat of ``attempt`` is answered with (nothing: 204)."""
        answer: dict[str, object] = {}
        if attempt in self._save_requested:
            answer[SAVE_REQUEST_FIELD] = True
        if self.past_save_s is not None:
            answer[PAST_SAVE_FIELD] = self.past_save_s
        return answer

    def take_received(self) -> list[Heartbeat]:
        """The beats received since the last call, in order."""
        try:
            os.eventfd_read(self._urgent)
        except BlockingIOError:
            pass  # nothing urgent arrived
        beats = []
        while True:
            try:
                beats.append(self._queue.get_nowait())
            except queue.Empty:
                return beats

    def _accept(self, payload: dict[str, Any]) -> bool:
        """Queue one beat; False when the rate or the queue's bound refuses it."""
        if not self._bucket.take():
            return False
        attempt = payload.get("attempt")
        beat = Heartbeat(
            kind=heartbeat_kind(payload),
            attempt=attempt if isinstance(attempt, int) and not isinstance(attempt, bool) else None,
            received_at=time.monotonic(),
            fields=payload,
        )
        try:
            self._queue.put_nowait(beat)
        except queue.Full:
            return False
        if beat.kind is HeartbeatKind.ERROR_RECORD:
            os.eventfd_write(self._urgent, 1)
        return True


def _handler_for(server: HeartbeatServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            if self.path != "/heartbeat":
                self._reply(404)
                return
            given = self.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {server.token}".encode()):
                self._reply(401)
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if not 0 < length <= MAX_BODY_BYTES:
                self._reply(413 if length > MAX_BODY_BYTES else 400)
                return
            try:
                payload = json.loads(self.rfile.read(length))
            except ValueError:
                self._reply(400)
                return
            if not isinstance(payload, dict):
                self._reply(400)
                return
            if not server._accept(payload):
                self._reply(429)
            elif answer := server.answer(payload.get("attempt")):
                self._reply(200, json.dumps(answer).encode())
            else:
                self._reply(204)

        def _reply(self, code: int, body: bytes = b"") -> None:
            self.send_response(code)
            if body:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if body:
                self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per beat on the console would drown the events

    return Handler
