"""A receiver that misbehaves on purpose, for the push tests: a real HTTP server on loopback.

It answers every request with the status it is set to (changeable while it runs), or not at
all (`status=None`: it holds the request until stopped, bounded), and keeps the status it gave
each request, so a test can count what the aggregator sent and what it sent again.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOLD_AT_MOST_S = 60.0


class Receiver:
    def __init__(self, status: int | None) -> None:
        self.status = status
        self.answered: list[int | None] = []  # per request, in arrival order
        self._lock = threading.Lock()
        self._release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                status = receiver.status
                with receiver._lock:
                    receiver.answered.append(status)
                if status is None:
                    receiver._release.wait(HOLD_AT_MOST_S)
                    return  # the connection closes without an answer
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_POST = do_PUT = do_DELETE = _answer  # http.server looks them up by these names

            def log_message(self, format: str, *args: object) -> None:  # quiet: pytest shows the failures
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="receiver", daemon=True)

    def requests(self, *statuses: int | None) -> int:
        """How many requests were answered with one of `statuses` (every request when none is given)."""
        with self._lock:
            return sum(1 for status in self.answered if not statuses or status in statuses)

    def start(self) -> Receiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(10)
