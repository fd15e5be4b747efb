"""`newsletter serve`'s processes: the web server, the outbound mail process beside it,
and the process that watches both. Real subprocesses, a real SMTP sink."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from serving import Server, children, descendants, post


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not _alive(pid)


def _processes(server: Server) -> tuple[int, int]:
    """(web, outbound): the web process is gunicorn's master, the one with workers."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        below = [pid for pid in children(server.process.pid) if _alive(pid)]
        web = [pid for pid in below if children(pid)]
        outbound = [pid for pid in below if not children(pid)]
        if len(web) == 1 and len(outbound) == 1:
            return web[0], outbound[0]
        time.sleep(0.1)
    raise AssertionError(f"expected a web and an outbound process, found {below}")


def _sign_up(server: Server, address: str) -> None:
    answer = post(f"{server.url}/subscribe", f"email={address.replace('@', '%40')}")
    assert answer.status == 303


def test_a_signup_wakes_the_outbound_process(server: Server, smtp_sink) -> None:
    """A confirmation leaves within a second of its signup, each time, although the outbound
    process only polls every 5 s on its own: the web process wakes it."""
    time.sleep(1.5)  # past the outbound process's first look at the queue
    for n in range(3):
        started = time.monotonic()
        _sign_up(server, f"reader{n}@example.com")
        [mail] = smtp_sink.wait_for(n + 1, timeout=5)[n:]
        assert mail.recipients == (f"reader{n}@example.com",)
        assert time.monotonic() - started < 1.0
        time.sleep(1.7)


def test_outbound_process_that_dies_is_started_again(server: Server, smtp_sink) -> None:
    """SIGKILL the outbound process: serve starts a new one, which sends what was queued
    meanwhile, and the web side never noticed."""
    web, outbound = _processes(server)
    os.kill(outbound, signal.SIGKILL)
    _sign_up(server, "during@example.com")  # queued while no outbound process runs
    [mail] = smtp_sink.wait_for(1, timeout=10)
    assert mail.recipients == ("during@example.com",)
    new_web, new_outbound = _processes(server)
    assert new_web == web and new_outbound != outbound
    assert server.process.poll() is None
    log = (server.cwd / "serve.log").read_text()
    assert re.search(r"outbound mail process stopped \(exit -9\); starting it again in 1 s", log)
    assert server.stop(signal.SIGTERM) == 0


def test_serve_stops_with_exit_1_when_the_web_server_dies(server: Server) -> None:
    """If gunicorn's master dies, serve stops the outbound process and exits 1 with one
    line saying so: a service manager then restarts the whole thing."""
    web, outbound = _processes(server)
    os.kill(web, signal.SIGKILL)
    assert server.process.wait(timeout=20) == 1
    log = (server.cwd / "serve.log").read_text()
    assert "error: the web server stopped (exit -9); see its log above\n" in log
    assert _wait_gone(outbound)


def test_kill_9_of_serve_leaves_no_process_behind(server: Server) -> None:
    """A SIGKILL of serve itself cannot be passed on, so its children stop on their own:
    nothing keeps the port or sends mail for a server that is gone."""
    family = descendants(server.process.pid)
    assert len(family) >= 3  # gunicorn master, its worker, the outbound process
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(timeout=10)
    assert all(_wait_gone(pid) for pid in family)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_at_start_up_stops_it_at_once(tmp_path: Path, smtp_sink, sig) -> None:
    """A stop signal the moment serve says it is serving (before or while it starts its
    processes) is passed on to them: exit 0 within seconds, nothing left behind."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    env |= smtp_sink.env() | {"NEWSLETTER_DATABASE_URL": f"sqlite:///{tmp_path / 'n.db'}"}
    for _ in range(3):
        process = subprocess.Popen(
            [sys.executable, "-m", "newsletter", "serve", "--port", "0"],
            cwd=tmp_path,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert process.stderr is not None
        assert "serving" in process.stderr.readline()
        family = descendants(process.pid)
        process.send_signal(sig)
        started = time.monotonic()
        assert process.wait(timeout=30) == 0
        assert time.monotonic() - started < 5
        process.stderr.close()
        assert all(_wait_gone(pid) for pid in family + descendants(process.pid))
