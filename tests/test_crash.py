"""Crash tests: real `newsletter send` processes killed mid-send, then resumed, against a
real SMTP sink running as its own process (tests/smtp_sink.py), on SQLite and PostgreSQL.

The sink appends one JSON line per accepted message and flushes it before answering
250, so the journal is the truth of what subscribers received. A message counts as in
flight at a kill when the sink took it but the killed sender never recorded it; each of
the NEWSLETTER_SMTP_CONNECTIONS workers has at most one such message, so a kill may cause
at most that many duplicates and nothing else may ever go twice.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest
from sqlalchemy import func, select

from newsletter.ledger import describe_issues
from newsletter.store import Delivery, Issue, Store
from newsletter.subscribers import add

pytestmark = pytest.mark.slow

TESTS = Path(__file__).parent
FIXTURES = TESTS / "fixtures"
SINK_SCRIPT = TESTS / "smtp_sink.py"
RECIPIENTS = 2000
CONNECTIONS = 4
STALL = 0.003  # seconds the sink waits before answering DATA: ~3 s for 2,000 messages
KILL_POINTS = (0.1, 0.5, 0.9)  # fractions of the list received when the sender is killed
TIMEOUT = 60.0  # no single wait in this file comes near it unless something hangs
SUMMARY = re.compile(r"issue (\d+): sent (\d+), failed (\d+)")


@dataclass(frozen=True)
class Copy:
    """One message the sink accepted: its journal line number, address and Message-ID."""

    line: int
    address: str
    message_id: str


class SinkProcess:
    """tests/smtp_sink.py as a subprocess; its journal is read incrementally while it runs."""

    def __init__(self, directory: Path, *options: str) -> None:
        self.journal_path = directory / "received.jsonl"
        self.journal_path.touch()
        self._log_path = directory / "sink.log"
        self._log = self._log_path.open("w", encoding="utf-8")
        command = [sys.executable, str(SINK_SCRIPT), "--port", "0"]
        command += ["--jsonl", str(self.journal_path), "--cert-dir", str(directory), *options]
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, cwd=directory
        )
        self._journal: IO[bytes] = self.journal_path.open("rb")
        self._count = 0
        self.port = self._wait_for_port()

    def _wait_for_port(self) -> int:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            found = re.search(r"listening on 127\.0\.0\.1:(\d+)", self._log_path.read_text())
            if found:
                return int(found.group(1))
            if self.process.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f"the SMTP sink did not start: {self.output()}")

    def output(self) -> str:
        """What the sink printed (its listening line, and any traceback)."""
        return self._log_path.read_text(errors="replace")

    def count(self) -> int:
        """Messages accepted so far (complete journal lines)."""
        self._count += self._journal.read().count(b"\n")
        return self._count

    def settle(self, quiet: float = 0.2) -> int:
        """The count once no message arrived for ``quiet`` seconds (after a kill, the one
        a dying connection had fully sent may still be accepted)."""
        count, since = self.count(), time.monotonic()
        while time.monotonic() - since < quiet:
            time.sleep(0.01)
            now = self.count()
            if now != count:
                count, since = now, time.monotonic()
        return count

    def wait_for(self, count: int, sender: subprocess.Popen[str]) -> int:
        """Block until ``count`` messages arrived while ``sender`` is still running."""
        deadline = time.monotonic() + TIMEOUT
        while (received := self.count()) < count:
            if sender.poll() is not None:
                out, err = sender.communicate()
                raise AssertionError(
                    f"sender exited {sender.returncode} after {received} of {count} messages:"
                    f"\n{out}{err}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"sink got {received} of {count} messages in {TIMEOUT} s")
            time.sleep(0.002)
        return received

    def copies(self) -> list[Copy]:
        """Every accepted message, in arrival order."""
        lines = self.journal_path.read_text("utf-8").splitlines()
        copies = []
        for number, line in enumerate(lines):
            entry = json.loads(line)
            [address] = entry["recipients"]
            copies.append(Copy(number, address.lower(), entry["message_id"].strip("<>")))
        return copies

    def close(self) -> None:
        """SIGTERM (the sink exits 0 on it), reap it, close every file."""
        if self.process.poll() is None:
            self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._journal.close()
        self._log.close()


class Senders:
    """`newsletter` subprocesses of one test; any still running at the end is killed and reaped."""

    def __init__(self, directory: Path, database_url: str, port: int) -> None:
        self.directory = directory
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
        self.env |= {
            "NEWSLETTER_DATABASE_URL": database_url,
            "NEWSLETTER_SMTP_HOST": "127.0.0.1",
            "NEWSLETTER_SMTP_PORT": str(port),
            "NEWSLETTER_SMTP_SECURITY": "none",
            "NEWSLETTER_SMTP_TIMEOUT": "10",
            "NEWSLETTER_SMTP_CONNECTIONS": str(CONNECTIONS),
            "NEWSLETTER_SECRET_KEY": "crash-test-secret",
            "NEWSLETTER_SITE_URL": "https://news.example.com",
            "NEWSLETTER_FROM": "Weekly <weekly@example.com>",
        }
        self._running: list[subprocess.Popen[str]] = []

    def start(self, *args: str) -> subprocess.Popen[str]:
        """Run ``newsletter ARGS`` in the test's directory, with the test's settings only."""
        process = subprocess.Popen(
            [sys.executable, "-m", "newsletter", *args],
            cwd=self.directory,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._running.append(process)
        return process

    def finish(self, process: subprocess.Popen[str]) -> tuple[int, str, str]:
        """Wait for ``process`` to exit by itself: (exit code, stdout, stderr)."""
        out, err = process.communicate(timeout=TIMEOUT)
        self._running.remove(process)
        return process.returncode, out, err

    def kill(self, process: subprocess.Popen[str]) -> None:
        """SIGKILL, then reap it: a zombie would still look alive to the next resume."""
        process.kill()
        process.communicate(timeout=TIMEOUT)
        self._running.remove(process)

    def close(self) -> None:
        for process in self._running:
            process.kill()
            process.communicate()
        self._running.clear()


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[SinkProcess]:
    """The SMTP sink process, answering DATA after a short stall; stopped after the test."""
    started = SinkProcess(tmp_path, "--stall", str(STALL))
    try:
        yield started
    finally:
        started.close()


@pytest.fixture
def senders(tmp_path: Path, database_url: str, sink: SinkProcess) -> Iterator[Senders]:
    """Starts `newsletter` subprocesses pointed at the test's database and sink."""
    group = Senders(tmp_path, database_url, sink.port)
    try:
        yield group
    finally:
        group.close()


@pytest.fixture
def subscribed(store: Store, tmp_path: Path) -> list[str]:
    """2,000 active subscribers (every other one named) and the digest in the directory."""
    shutil.copy(FIXTURES / "mojibake-digest.md", tmp_path / "digest.md")
    shutil.copy(FIXTURES / "chart.png", tmp_path / "chart.png")
    addresses = [f"reader{i:04d}@example.com" for i in range(RECIPIENTS)]
    with store.begin() as session:
        for i, address in enumerate(addresses):
            add(session, address, f"Reader {i}" if i % 2 else None)
    return addresses


def _issue_id(store: Store) -> int:
    with store.session() as session:
        [issue_id] = session.scalars(select(Issue.id)).all()
    return issue_id


def _sent(stdout: str) -> int:
    """The number of messages a `send` reported in its closing summary."""
    found = SUMMARY.search(stdout)
    assert found, stdout
    return int(found.group(2))


def _kill_points() -> list[int]:
    return [int(RECIPIENTS * fraction) for fraction in KILL_POINTS]


def _duplicates_per_kill(copies: list[Copy], boundaries: list[int]) -> list[int]:
    """For each killed run (journal lines before ``boundaries[k]``), how many of its
    addresses were sent again later: the messages that were in flight at that kill."""
    first_line: dict[str, int] = {}
    repeated: set[str] = set()
    for copy in copies:
        if copy.address in first_line:
            repeated.add(copy.address)
        else:
            first_line[copy.address] = copy.line
    per_kill = [0] * len(boundaries)
    for address in repeated:
        run = next(k for k, end in enumerate(boundaries) if first_line[address] < end)
        per_kill[run] += 1
    return per_kill


def _assert_ledger_matches(
    store: Store, issue_id: int, copies: list[Copy], last: bool = True
) -> None:
    """The issue is sent, every delivery is 'sent', and each row's Message-ID is the last
    copy that address received (``last``; else one of its copies): a row became 'sent'
    only for a message the server took."""
    with store.session() as session:
        [issue] = describe_issues(session, issue_id)
        statuses = dict(
            session.execute(
                select(Delivery.status, func.count())
                .where(Delivery.issue_id == issue_id)
                .group_by(Delivery.status)
            ).all()
        )
        recorded = dict(
            session.execute(
                select(Delivery.email, Delivery.message_id).where(Delivery.issue_id == issue_id)
            ).all()
        )
    assert issue["status"] == "sent", issue
    assert (issue["sent"], issue["failed"], issue["queued"]) == (RECIPIENTS, 0, 0), issue
    assert statuses == {"sent": RECIPIENTS}
    if last:
        assert recorded == {copy.address: copy.message_id for copy in copies}
    else:
        received: dict[str, set[str]] = {}
        for copy in copies:
            received.setdefault(copy.address, set()).add(copy.message_id)
        assert all(recorded[address] in ids for address, ids in received.items())
    assert len({copy.message_id for copy in copies}) == len(copies)  # every copy is its own


def test_sigkill_at_several_points_then_resume(
    store: Store,
    sink: SinkProcess,
    senders: Senders,
    subscribed: list[str],
    request: pytest.FixtureRequest,
) -> None:
    """SIGKILL at ~10/50/90% then resume: all 2,000 get it; only in-flight messages go twice."""
    process = senders.start("send", "digest.md", "--yes")
    boundaries = []  # journal length at each kill: lines before it came from killed runs
    for kill, kill_at in enumerate(_kill_points()):
        sink.wait_for(kill_at, process)
        senders.kill(process)
        boundaries.append(sink.settle())
        issue_id = _issue_id(store)
        if kill == 1:  # `send DIGEST` again on the unfinished issue resumes it too
            process = senders.start("send", "digest.md", "--yes")
        else:
            process = senders.start("send", "--resume", str(issue_id))
    code, out, err = senders.finish(process)
    assert code == 0, out + err
    assert "still queued 0" in out

    copies = sink.copies()
    per_kill = _duplicates_per_kill(copies, boundaries)
    received = Counter(copy.address for copy in copies)
    duplicates = len(copies) - len(received)
    report = (
        f"{len(boundaries)} SIGKILLs at {boundaries} messages received: {len(copies)} messages "
        f"for {RECIPIENTS} subscribers, {duplicates} duplicate(s), per kill {per_kill}"
    )
    print(f"\n[crash] {request.node.name}: {report}")
    assert set(received) == set(subscribed), report
    assert all(n <= CONNECTIONS for n in per_kill), report
    assert duplicates == sum(per_kill) <= len(boundaries) * CONNECTIONS, report
    assert max(received.values()) <= 2, report
    _assert_ledger_matches(store, issue_id, copies)


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_two_resumes_at_once_send_each_remaining_subscriber_once(
    store: Store,
    sink: SinkProcess,
    senders: Senders,
    subscribed: list[str],
    request: pytest.FixtureRequest,
) -> None:
    """Two `send --resume` at once after a SIGKILL: both exit 0, both send, nobody gets two."""
    first = senders.start("send", "digest.md", "--yes")
    sink.wait_for(RECIPIENTS // 10, first)
    senders.kill(first)
    killed_run = sink.settle()
    issue_id = _issue_id(store)

    resumes = [senders.start("send", "--resume", str(issue_id)) for _ in range(2)]
    results = [senders.finish(process) for process in resumes]
    for code, out, err in results:
        assert code == 0, out + err
        assert "still queued 0" in out, out

    copies = sink.copies()
    before = Counter(copy.address for copy in copies[:killed_run])
    after = Counter(copy.address for copy in copies[killed_run:])
    sent_by = [_sent(out) for _, out, _ in results]
    in_flight = set(before) & set(after)
    report = (
        f"SIGKILL at {killed_run} messages received, then two resumes sent {sent_by}: "
        f"{len(copies)} messages for {RECIPIENTS} subscribers, "
        f"{len(copies) - len(before | after)} duplicate(s) (in flight at the kill)"
    )
    print(f"\n[crash] {request.node.name}: {report}")
    assert set(before | after) == set(subscribed), report
    assert max(after.values()) == 1, report  # no address went twice after the kill
    assert max(before.values()) == 1, report
    assert len(in_flight) <= CONNECTIONS, report
    assert sum(sent_by) == len(copies) - killed_run, report
    assert min(sent_by) > 0, report  # both really worked on the issue at the same time
    _assert_ledger_matches(store, issue_id, copies)


def test_sigterm_stops_cleanly_and_resume_sends_no_duplicate(
    store: Store,
    sink: SinkProcess,
    senders: Senders,
    subscribed: list[str],
    request: pytest.FixtureRequest,
) -> None:
    """SIGTERM mid-send exits 1 naming --resume, leaves no claim; the resume adds no duplicate."""
    process = senders.start("send", "digest.md", "--yes")
    sink.wait_for(RECIPIENTS // 2, process)
    process.send_signal(signal.SIGTERM)
    code, out, err = senders.finish(process)
    stopped_at = sink.settle()
    issue_id = _issue_id(store)
    assert code == 1, out + err
    assert f"newsletter send --resume {issue_id}" in err
    assert stopped_at < RECIPIENTS, "the send finished before SIGTERM arrived"
    with store.session() as session:
        statuses = dict(
            session.execute(
                select(Delivery.status, func.count())
                .where(Delivery.issue_id == issue_id)
                .group_by(Delivery.status)
            ).all()
        )
    assert statuses == {"sent": stopped_at, "queued": RECIPIENTS - stopped_at}
    assert _sent(out) == stopped_at

    code, out, err = senders.finish(senders.start("send", "--resume", str(issue_id)))
    assert code == 0, out + err
    copies = sink.copies()
    received = Counter(copy.address for copy in copies)
    print(
        f"\n[crash] {request.node.name}: SIGTERM at {stopped_at} messages received; "
        f"{len(copies)} messages for {RECIPIENTS} subscribers, "
        f"{len(copies) - len(received)} duplicate(s)"
    )
    assert sorted(received) == subscribed
    assert set(received.values()) == {1}
    _assert_ledger_matches(store, issue_id, copies)


def _pause_outside_a_write(process: subprocess.Popen[str], store: Store) -> None:
    """SIGSTOP ``process`` at a moment it holds no SQLite write lock. A process stopped in
    the middle of a write keeps SQLite's one writer slot, and every other writer waits until
    it runs again: that is SQLite, not the sender (on PostgreSQL the server ends a session
    idle in a transaction for the claim timeout, which the other test run covers)."""
    import sqlite3

    for _ in range(200):
        process.send_signal(signal.SIGSTOP)
        if not store.sqlite:
            return
        probe = sqlite3.connect(store.engine.url.database, timeout=0, isolation_level=None)
        try:
            probe.execute("BEGIN IMMEDIATE")
            probe.execute("ROLLBACK")
            return
        except sqlite3.OperationalError:
            process.send_signal(signal.SIGCONT)
            time.sleep(0.005)
        finally:
            probe.close()
    raise AssertionError("the sender never let go of the write lock")


def test_a_sender_paused_past_the_claim_timeout_sends_nothing_twice(
    store: Store,
    sink: SinkProcess,
    senders: Senders,
    subscribed: list[str],
    request: pytest.FixtureRequest,
) -> None:
    """SIGSTOP a send (a suspended laptop), resume it elsewhere once its claims time out,
    then SIGCONT it: the woken sender finds its rows taken and starts no message; only the
    messages in flight at the pause (at most one per connection, which may complete when
    it wakes) can go twice."""
    senders.env["NEWSLETTER_CLAIM_TIMEOUT"] = "2"
    paused = senders.start("send", "digest.md", "--yes")
    sink.wait_for(RECIPIENTS // 10, paused)
    _pause_outside_a_write(paused, store)
    try:
        at_pause = sink.settle()
        issue_id = _issue_id(store)
        code, out, err = senders.finish(senders.start("send", "--resume", str(issue_id)))
        assert code == 0, out + err
        assert "still queued 0" in out
        before_wake = sink.settle()
    finally:
        paused.send_signal(signal.SIGCONT)
    code, out, err = senders.finish(paused)
    after_wake = sink.settle(quiet=1.0)
    copies = sink.copies()
    received = Counter(copy.address for copy in copies)
    report = (
        f"SIGSTOP at {at_pause} messages; resumed elsewhere: {before_wake} in all; after "
        f"SIGCONT: {after_wake}; {len(copies) - len(received)} duplicate(s)"
    )
    print(f"\n[crash] {request.node.name}: {report}; the woken sender said: {out.strip()}")
    assert after_wake - before_wake <= CONNECTIONS, report  # no new message after waking
    assert set(received) == set(subscribed), report
    assert len(copies) - len(received) <= CONNECTIONS, report
    # A message in flight at the pause may arrive after the resumer's copy of it.
    _assert_ledger_matches(store, issue_id, copies, last=False)
