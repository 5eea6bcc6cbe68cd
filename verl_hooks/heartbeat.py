"""Progress heartbeats from the job to its supervisor, and stack dumps on request.

Heartbeats are small JSON POSTs to ``$VERL_SUPERVISOR_HEARTBEAT_URL`` (with the run's bearer token), sent
from a background thread: the supervisor may be on another machine than the worker that sends them, and HTTP
reaches it from any node in every Ray mode without the supervisor being part of the Ray cluster. Sending never
blocks or fails the job: a full queue or an unreachable supervisor drops the beat.

The kinds and what each carries are the contract's (``verl_hooks.contract.HeartbeatKind``): ``alive`` from the
driver, the ``sync_*`` beats from the guard around each weight sync, and ``error_record``, the launcher's error
record sent synchronously before the driver exits (with ``ray.mode=jobs`` the driver may run where the
supervisor's record file cannot be written).

When ``$VERL_SUPERVISOR_STACKS_DIR`` is set, SIGUSR1 makes the process write the Python stacks of all its
threads there (``faulthandler``: works while a C call holds the GIL and needs no ptrace permission).
"""

from __future__ import annotations

import faulthandler
import http.client
import json
import logging
import os
import queue
import signal
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import IO, Any

from verl_hooks import settings
from verl_hooks.contract import (
    PAST_SAVE_FIELD,
    SAVE_REQUEST_FIELD,
    ErrorRecord,
    HeartbeatKind,
    heartbeat_payload,
)

logger = logging.getLogger(__name__)

SEND_TIMEOUT_S = 2.0
"""How long one post may take; a beat that does not arrive in time is dropped."""


class HeartbeatSender:
    """Posts beats in order from one daemon thread; drops them rather than ever slowing the job down."""

    def __init__(self, url: str, token: str, attempt: int) -> None:
        self.url = url
        self._token = token
        self._attempt = attempt
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=1024)
        # No proxies: a proxy configured for the internet must not carry beats meant for the supervisor.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self._warned = False
        threading.Thread(target=self._run, name="verl-hooks-heartbeat", daemon=True).start()

    def send(self, kind: HeartbeatKind, **fields: Any) -> None:
        try:
            self._queue.put_nowait(heartbeat_payload(kind, self._attempt, **fields))
        except queue.Full:
            pass

    def post_now(self, kind: HeartbeatKind, **fields: Any) -> bool:
        """Send one message synchronously, bypassing the queue; True if the supervisor took it."""
        beat = heartbeat_payload(kind, self._attempt, **fields)
        try:
            self._post(beat)
            return True
        except (OSError, http.client.HTTPException) as exc:
            logger.warning("verl_hooks: could not send %s to %s: %s", kind, self.url, exc)
            return False

    def _post(self, beat: dict[str, Any]) -> None:
        request = urllib.request.Request(
            self.url,
            data=json.dumps(beat).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self._token}"},
            method="POST",
        )
        with self._opener.open(request, timeout=SEND_TIMEOUT_S) as response:
            answer = response.read()
        if answer:
            _take_answer(answer)

    def _run(self) -> None:
        while True:
            beat = self._queue.get()
            try:
                self._post(beat)
            except (OSError, http.client.HTTPException) as exc:
                if not self._warned:
                    logger.warning("verl_hooks: heartbeat to %s failed (%s); later failures are silent", self.url, exc)
                    self._warned = True


def _take_answer(answer: bytes) -> None:
    """What the supervisor says in its answer to a beat: a request to save and stop, the run's longest save."""
    global _past_save_s
    try:
        data = json.loads(answer)
    except ValueError:
        return
    if not isinstance(data, dict):
        return
    if data.get(SAVE_REQUEST_FIELD) is True:
        _save_requested.set()
    past = data.get(PAST_SAVE_FIELD)
    if isinstance(past, int | float) and not isinstance(past, bool) and past > 0:
        _past_save_s = float(past)


# Set once an answer of the supervisor asked this job to save at its next safe point and stop.
_save_requested = threading.Event()
_past_save_s: float | None = None


def past_save_s() -> float | None:
    """The longest save of the run's earlier attempts, as the supervisor's answers said (None: not said)."""
    return _past_save_s


def save_requested() -> bool:
    """Whether the supervisor has asked the job to save and stop (learnt from its answers to this process's beats)."""
    return _save_requested.is_set()


_lock = threading.Lock()
_sender: HeartbeatSender | None = None
_sender_resolved = False


def _get_sender() -> HeartbeatSender | None:
    global _sender, _sender_resolved
    with _lock:
        if not _sender_resolved:
            channel = settings.heartbeat_channel()
            if channel is not None:
                _sender = HeartbeatSender(channel.url, channel.token, channel.attempt)
            _sender_resolved = True
        return _sender


def beat(kind: HeartbeatKind, **fields: Any) -> None:
    """Send one heartbeat if a supervisor is listening; otherwise do nothing."""
    sender = _get_sender()
    if sender is not None:
        sender.send(kind, **fields)


def send_now(kind: HeartbeatKind, **fields: Any) -> bool:
    """Send one heartbeat and wait for the supervisor to take it (bounded); False if none took it."""
    sender = _get_sender()
    return sender is not None and sender.post_now(kind, **fields)


def send_record(record: ErrorRecord) -> bool:
    """Post an error record to the supervisor and wait for it to arrive (bounded): the driver may be on a
    machine where the supervisor's record file cannot be written, and it is about to exit."""
    sender = _get_sender()
    if sender is None:
        return False
    return sender.post_now(HeartbeatKind.ERROR_RECORD, record=record.to_dict())


def start_alive_beats() -> None:
    """In the driver: an ``alive`` beat every interval, so that a frozen driver (SIGSTOP) is noticed."""
    if _get_sender() is None:
        return
    interval = settings.heartbeat_interval_s()

    def loop() -> None:
        while True:
            beat(HeartbeatKind.ALIVE)
            time.sleep(interval)

    threading.Thread(target=loop, name="verl-hooks-alive", daemon=True).start()


_stack_file: IO[str] | None = None


def enable_stack_dumps() -> None:
    """Dump every thread's Python stack to the attempt's stacks folder on SIGUSR1 (once per process)."""
    global _stack_file
    folder = settings.stacks_dir()
    if not folder or _stack_file is not None:
        return
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        _stack_file = open(Path(folder) / f"{socket.gethostname()}-{os.getpid()}.txt", "w")  # noqa: SIM115
        faulthandler.register(signal.SIGUSR1, file=_stack_file, all_threads=True, chain=False)
    except (OSError, ValueError, RuntimeError) as exc:
        logger.warning("verl_hooks: stack dumps on SIGUSR1 unavailable: %s", exc)
