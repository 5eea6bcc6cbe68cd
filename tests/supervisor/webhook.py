"""A local webhook server for the tests of the supervisor's alerts."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Webhook:
    """A local webhook: records each POST; ``status`` is its answer; ``hold`` blocks its answers until set."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.posts: list[tuple[dict, dict]] = []
        self.hold = threading.Event()
        self.hold.set()
        self.received = threading.Semaphore(0)
        webhook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                webhook.posts.append((body, dict(self.headers)))
                webhook.received.release()
                webhook.hold.wait(30)
                self.send_response(webhook.status)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/SECRET-PART"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.hold.set()
        self.server.shutdown()
        self.server.server_close()
