"""`newsletter serve` and `newsletter worker` as real subprocesses side by side, as a
service manager runs them, and plain HTTP to talk to them."""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from newsletter import subscribers
from newsletter.store import open_store


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Server:
    """A running `newsletter serve` (and its `newsletter worker`, unless started without)."""

    url: str
    env: dict[str, str]
    cwd: Path
    process: subprocess.Popen
    worker: subprocess.Popen | None = None

    def status(self, address: str) -> str | None:
        with open_store(self.env["NEWSLETTER_DATABASE_URL"]) as store, store.session() as session:
            found = subscribers.get(session, address)
            return found.status if found else None

    def newsletter(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "newsletter", *args],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send ``sig`` to serve (and the worker) and wait for serve's exit code; SIGKILL
        takes the whole process tree."""
        if self.worker is not None:
            stop(self.worker, sig)
        return stop(self.process, sig)

    def start_worker(self) -> subprocess.Popen:
        """`newsletter worker` beside the server, once it says it started."""
        self.worker = start_worker(self.cwd, self.env)
        return self.worker


def stop(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
    """Send ``sig`` and wait for the exit code; SIGKILL takes the whole process tree."""
    if process.poll() is None:
        family = descendants(process.pid) if sig == signal.SIGKILL else []
        process.send_signal(sig)
        for pid in family:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    return process.wait(timeout=timeout)


def start_worker(cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    """`newsletter worker` in ``cwd``, its output in worker.log, once it says it started."""
    log_path = cwd / "worker.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "newsletter", "worker"],
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 60
    while b"worker started" not in log_path.read_bytes():
        if process.poll() is not None or time.monotonic() > deadline:
            stop(process, signal.SIGKILL)
            raise AssertionError(f"newsletter worker did not start:\n{log_path.read_text()}")
        time.sleep(0.05)
    return process


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (Linux /proc)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(child) for child in (task / "children").read_text().split()]
    return found


def descendants(pid: int) -> list[int]:
    """Children, grandchildren and so on of ``pid``."""
    below = children(pid)
    return below + [pid for child in below for pid in descendants(child)]


def start_server(
    cwd: Path, smtp_env: dict[str, str], database_url: str | None = None, worker: bool = True
) -> Server:
    """`newsletter serve` on a free port (an SQLite file in ``cwd`` unless ``database_url``),
    once it answers, and `newsletter worker` beside it unless ``worker`` is False."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    env |= smtp_env | {
        "NEWSLETTER_DATABASE_URL": database_url or f"sqlite:///{cwd / 'newsletter.db'}",
        "NEWSLETTER_SITE_URL": url,
        "NEWSLETTER_NAME": "Weekly Links",
        "NEWSLETTER_FROM": "Weekly Links <links@example.com>",
        "NEWSLETTER_ASSET_BASE_URL": "https://blog.example.com/posts/",
    }
    with (cwd / "serve.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "newsletter", "serve", "--port", str(port)],
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = Server(url, env, cwd, process)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError((cwd / "serve.log").read_text())
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=1) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(0.1)
    else:
        server.stop(signal.SIGKILL)
        raise AssertionError("newsletter serve did not answer /healthz within 60 s")
    if worker:
        try:
            server.start_worker()
        except BaseException:
            server.stop(signal.SIGKILL)
            raise
    return server


@dataclass(frozen=True)
class Answer:
    """An HTTP answer, redirects not followed."""

    status: int
    headers: dict[str, str]
    body: bytes


def post(url: str, body: str) -> Answer:
    """POST a form-encoded body with http.client: no cookie jar, no redirect following."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        connection.request(
            "POST",
            parts.path,
            body=body,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        response = connection.getresponse()
        return Answer(response.status, dict(response.getheaders()), response.read())
    finally:
        connection.close()
