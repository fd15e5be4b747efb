"""`newsletter serve` as a real subprocess, and plain HTTP to talk to it."""

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
    """A running `newsletter serve` and what it needs to be talked to."""

    url: str
    env: dict[str, str]
    cwd: Path
    process: subprocess.Popen

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
        """Send ``sig`` and wait for the exit code; SIGKILL takes its whole process tree."""
        if self.process.poll() is None:
            family = descendants(self.process.pid) if sig == signal.SIGKILL else []
            self.process.send_signal(sig)
            for pid in family:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        return self.process.wait(timeout=15)


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


def start_server(cwd: Path, smtp_env: dict[str, str]) -> Server:
    """`newsletter serve` on a free port with an SQLite file in ``cwd``, once it answers."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    env |= smtp_env | {
        "NEWSLETTER_DATABASE_URL": f"sqlite:///{cwd / 'newsletter.db'}",
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
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError((cwd / "serve.log").read_text())
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=1) as response:
                if response.status == 200:
                    return server
        except OSError:
            time.sleep(0.1)
    server.stop(signal.SIGKILL)
    raise AssertionError("newsletter serve did not answer /healthz within 20 s")


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
