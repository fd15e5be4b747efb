"""`newsletter serve` (gunicorn, web only) and `newsletter worker` as the real processes a
service manager runs, against a real SMTP sink."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from processes import wait_until
from serving import Server, descendants, free_port, post, start_server, stop


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_gone(pid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not _alive(pid)


def _sign_up(server: Server, address: str) -> None:
    answer = post(f"{server.url}/subscribe", f"email={address.replace('@', '%40')}")
    assert answer.status == 303


def test_serve_never_sends_the_worker_does(tmp_path: Path, smtp_sink) -> None:
    """With no worker running, a signup's confirmation waits in the queue (serve sends
    nothing); a worker started later sends it, once."""
    server = start_server(tmp_path, smtp_sink.env(), worker=False)
    try:
        _sign_up(server, "early@example.com")
        time.sleep(1.0)
        assert smtp_sink.messages == []
        server.start_worker()
        [mail] = smtp_sink.wait_for(1, timeout=30)
        assert mail.recipients == ("early@example.com",)
        assert server.stop(signal.SIGTERM) == 0
        assert server.worker.returncode == 0
    finally:
        server.stop(signal.SIGKILL)
    assert len(smtp_sink.messages) == 1


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_signup_wakes_the_worker_on_postgresql(tmp_path, smtp_sink, database_url) -> None:
    """On PostgreSQL the signup's commit notifies the worker: confirmations go out although
    its own poll is half a minute apart."""
    env = smtp_sink.env() | {"NEWSLETTER_WORKER_POLL": "30"}
    server = start_server(tmp_path, env, database_url=database_url)
    try:
        time.sleep(1.5)  # past the worker's first look at the queue
        for n in range(3):
            _sign_up(server, f"reader{n}@example.com")
            [mail] = smtp_sink.wait_for(n + 1, timeout=20)[n:]
            assert mail.recipients == (f"reader{n}@example.com",)
        assert server.stop(signal.SIGTERM) == 0
    finally:
        server.stop(signal.SIGKILL)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signals_end_serve_and_worker_cleanly(tmp_path: Path, smtp_sink, sig) -> None:
    """SIGTERM or SIGINT: serve and the worker exit 0 and leave no process behind."""
    server = start_server(tmp_path, smtp_sink.env())
    family = descendants(server.process.pid)
    assert family, "gunicorn runs its worker processes under serve"
    assert server.stop(sig) == 0 and server.worker.returncode == 0
    assert all(_wait_gone(pid) for pid in family)
    assert "Traceback" not in (tmp_path / "serve.log").read_text()
    assert "Traceback" not in (tmp_path / "worker.log").read_text()


def test_kill_9_of_serve_leaves_no_process_behind(tmp_path: Path, smtp_sink) -> None:
    """A SIGKILL of serve cannot be passed on, so gunicorn's workers leave on their own:
    nothing keeps the port for a server that is gone."""
    server = start_server(tmp_path, smtp_sink.env(), worker=False)
    family = descendants(server.process.pid)
    assert family
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(timeout=30)
    assert all(_wait_gone(pid) for pid in family)


def _serve(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    env["NEWSLETTER_DATABASE_URL"] = f"sqlite:///{tmp_path / 'n.db'}"
    return subprocess.run(
        [sys.executable, "-m", "newsletter", "serve", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_port_in_use_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """A port another program holds: one line naming the address, exit 2."""
    import socket

    port = free_port()
    with socket.create_server(("127.0.0.1", port)):
        result = _serve(tmp_path, "--port", str(port))
    assert result.returncode == 2
    assert result.stderr == f"error: cannot listen on 127.0.0.1:{port}: Address already in use\n"


def test_a_host_that_is_no_address_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """`--host 999.1.1.1`: one line naming --host, exit 2 (not "Unknown error -2")."""
    result = _serve(tmp_path, "--host", "999.1.1.1", "--port", "0")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --host: cannot listen on 999.1.1.1")
    assert "Unknown error" not in result.stderr


def test_worker_killed_mid_confirmations_loses_none(tmp_path: Path, smtp_sink) -> None:
    """SIGKILL the worker while confirmations are queued: a new worker sends every one."""
    server = start_server(tmp_path, smtp_sink.env(), worker=False)
    try:
        for n in range(5):
            _sign_up(server, f"queued{n}@example.com")
        smtp_sink.stall(0.3, "data")
        server.start_worker()
        smtp_sink.wait_for(1, timeout=30)
        stop(server.worker, signal.SIGKILL)
        smtp_sink.clear_faults()
        server.start_worker()
        wanted = {f"queued{n}@example.com" for n in range(5)}
        wait_until(
            lambda: {r for m in smtp_sink.messages for r in m.recipients} == wanted,
            30,
            "every confirmation",
        )
        assert len(smtp_sink.messages) <= 6  # at most the one in flight at the kill twice
    finally:
        server.stop(signal.SIGKILL)
