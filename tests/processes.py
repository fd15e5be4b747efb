"""Running `newsletter` as real subprocesses, the way a user or a service manager does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


def newsletter_env(database_url: str, **variables: str) -> dict[str, str]:
    """The process environment without the caller's NEWSLETTER_* settings, plus these."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    env.update(
        NEWSLETTER_DATABASE_URL=database_url,
        NEWSLETTER_SECRET_KEY="test-secret",
        NEWSLETTER_SITE_URL="https://news.example.com",
        PYTHONUNBUFFERED="1",
    )
    env.update(variables)
    return env


def run(
    args: list[str], cwd: Path, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess:
    """`newsletter ARGS…` to completion, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "newsletter", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class Background:
    """`newsletter ARGS…` running in the background, its output in a log file."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str], log: Path) -> None:
        self.log = log
        self._out = log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "newsletter", *args],
            cwd=cwd,
            env=env,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def output(self) -> str:
        return self.log.read_text("utf-8", "replace")

    def wait_for_output(self, needle: str, timeout: float = 15) -> None:
        """Block until ``needle`` appears in the process's output."""
        wait_until(lambda: needle in self.output(), timeout, f"{needle!r} in {self.log.name}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        """Send ``sig`` and wait for the exit code (SIGKILL if it does not stop in time)."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(timeout)
        finally:
            self._out.close()

    def kill(self) -> int:
        """SIGKILL: no cleanup of any kind, as a crash or an OOM kill."""
        return self.stop(signal.SIGKILL)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str = "condition") -> None:
    """Poll ``predicate`` every 20 ms; AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)
