"""A local HTTP server with one route per kind of answer a link can get, in a thread.

Used by the tests of `check --links` and by bench/links.py. It records each request
(method, path, User-Agent) and the most requests it ever had in flight at once.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# path -> (status for HEAD, status for GET, Location)
ROUTES: dict[str, tuple[int, int, str | None]] = {
    "/ok": (200, 200, None),
    "/moved": (301, 301, "/ok"),
    "/moved-308": (308, 308, "/ok"),
    "/found": (302, 302, "/ok"),
    "/moved-then-gone": (301, 301, "/gone"),
    "/gone": (404, 404, None),
    "/broken": (500, 500, None),
    "/no-head": (405, 200, None),
    "/busy": (429, 429, None),
}


class LinkServer:
    """``with LinkServer(latency=0.05) as server: server.url("/ok")``; ``/slow`` answers only
    when the server stops, and every other route after ``latency`` seconds."""

    def __init__(self, latency: float = 0.0) -> None:
        self.latency = latency
        self.requests: list[tuple[str, str, str]] = []
        self.peak_in_flight = 0
        self._in_flight = 0
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def url(self, path: str) -> str:
        return self.base + path

    def start(self) -> LinkServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> LinkServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _begin(self, method: str, path: str, agent: str) -> None:
        with self._lock:
            self.requests.append((method, path, agent))
            self._in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self._in_flight)

    def _end(self) -> None:
        with self._lock:
            self._in_flight -= 1


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256
    owner: LinkServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def do_GET(self) -> None:
        self._answer(head=False)

    def _answer(self, head: bool) -> None:
        owner = self.server.owner
        owner._begin(self.command, self.path, self.headers.get("User-Agent", ""))
        try:
            if self.path == "/slow":
                owner._release.wait(60)
                status, location = 200, None
            else:
                if owner.latency:
                    time.sleep(owner.latency)
                path = self.path.split("?", 1)[0]
                if path.startswith("/page/"):
                    path = "/ok"
                head_status, get_status, location = ROUTES.get(path, (404, 404, None))
                status = head_status if head else get_status
            body = b"" if head else f"answer {status}\n".encode()
            self.send_response(status)
            if location:
                self.send_header("Location", location)
            self.send_header("Content-Length", str(len(f"answer {status}\n")))
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(body)
        finally:
            owner._end()
