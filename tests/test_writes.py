"""Write transactions: the group commit that batches concurrent requests, and SQLite's
lock file that makes writers in other processes take turns."""

from __future__ import annotations

import fcntl
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from sqlalchemy import func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from threads import at_once

from newsletter import writes
from newsletter.store import SignupAttempt, Store, Subscriber, utcnow
from newsletter.writes import GroupCommit, write_transaction


class _Recorder:
    """A batch writer that notes each batch, holds the first one long enough for the other
    threads to queue up behind it, and answers ValueError for requests marked bad."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def __call__(self, session: Session, batch: Sequence[str]) -> list[str | Exception]:
        self.batches.append(list(batch))
        if len(self.batches) == 1:
            time.sleep(0.3)
        session.execute(
            insert(SignupAttempt), [{"key": key, "attempted_at": utcnow()} for key in batch]
        )
        return [ValueError(key) if key.startswith("bad") else key.upper() for key in batch]


def _attempts(store: Store) -> list[str]:
    with store.session() as session:
        return sorted(session.scalars(select(SignupAttempt.key)))


def test_concurrent_requests_share_transactions(store: Store) -> None:
    """Sixteen threads at once: each gets its own answer, in fewer transactions than requests."""
    recorder = _Recorder()
    group = GroupCommit(recorder)
    results = at_once(16, lambda n: group.submit(store, f"key{n}"))
    assert results == {n: f"KEY{n}" for n in range(16)}
    assert sorted(key for batch in recorder.batches for key in batch) == sorted(
        f"key{n}" for n in range(16)
    )
    assert len(recorder.batches) < 16
    assert max(len(batch) for batch in recorder.batches) > 1
    assert _attempts(store) == sorted(f"key{n}" for n in range(16))


def test_an_exception_answer_is_raised_in_its_own_thread_only(store: Store) -> None:
    """A request answered with an exception raises it in its thread; the other requests of
    the same transaction are answered and committed."""
    recorder = _Recorder()
    group = GroupCommit(recorder)
    results = at_once(6, lambda n: group.submit(store, "bad" if n == 3 else f"ok{n}"))
    assert isinstance(results.pop(3), ValueError)
    assert results == {n: f"OK{n}" for n in (0, 1, 2, 4, 5)}
    assert "bad" in _attempts(store)  # the writer's own choice: it wrote the row


def test_a_failed_transaction_is_retried_one_request_at_a_time(store: Store) -> None:
    """Two requests for the same new address in one batch break a UNIQUE constraint: the
    batch is rolled back and each request written alone, so one gets the IntegrityError
    and every other request still lands."""
    batches: list[list[str]] = []

    def add(session: Session, batch: Sequence[str]) -> list[str]:
        batches.append(list(batch))
        if len(batches) == 1:
            time.sleep(0.3)  # the others queue up into one batch meanwhile
        row = {"name": None, "status": "active", "source": "cli", "created_at": utcnow()}
        session.execute(insert(Subscriber), [row | {"email": email} for email in batch])
        return list(batch)

    group = GroupCommit(add)
    first = threading.Thread(target=group.submit, args=(store, "first@example.com"))
    first.start()
    time.sleep(0.1)
    emails = ["dup@example.com", "dup@example.com", "other@example.com"]
    results = at_once(3, lambda n: group.submit(store, emails[n]))
    first.join()
    assert any(len(batch) == 3 for batch in batches)
    assert sum(isinstance(result, IntegrityError) for result in results.values()) == 1
    assert sorted(r for r in results.values() if isinstance(r, str)) == [
        "dup@example.com",
        "other@example.com",
    ]
    with store.session() as session:
        assert session.scalar(select(func.count()).select_from(Subscriber)) == 3


def test_sqlite_writers_in_other_processes_wait_on_the_lock_file(
    store: Store, tmp_path: Path
) -> None:
    """While one process holds DATABASE.write-lock, another process's write transaction
    waits for it (instead of failing or sleeping in SQLite's busy handler), and goes on the
    moment it is released."""
    if store.engine.dialect.name != "sqlite":
        pytest.skip("the lock file is SQLite's")
    with write_transaction(store) as session:
        session.execute(insert(SignupAttempt), {"key": "first", "attempted_at": utcnow()})
    lock_path = Path(f"{store.engine.url.database}.write-lock")
    assert lock_path.exists()
    script = (
        "import sys, time\n"
        "from sqlalchemy import insert\n"
        "from newsletter.store import SignupAttempt, open_store, utcnow\n"
        "from newsletter.writes import write_transaction\n"
        "with open_store(sys.argv[1]) as store:\n"
        "    print('ready', flush=True)\n"
        "    with write_transaction(store) as session:\n"
        "        row = {'key': 'other', 'attempted_at': utcnow()}\n"
        "        session.execute(insert(SignupAttempt), row)\n"
        "    print('written', time.time(), flush=True)\n"
    )
    with lock_path.open("ab") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        other = subprocess.Popen(
            [sys.executable, "-c", script, str(store.engine.url)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert other.stdout is not None
        assert other.stdout.readline() == "ready\n"
        time.sleep(1.0)
        assert other.poll() is None and _attempts(store) == ["first"]
        released = time.time()
        fcntl.flock(held, fcntl.LOCK_UN)
        line = other.stdout.readline()
    other.stdout.close()
    assert other.wait(timeout=10) == 0
    assert line.startswith("written ")
    assert float(line.split()[1]) - released < 0.5
    assert _attempts(store) == ["first", "other"]


def test_a_writer_answering_the_wrong_count_writes_nothing(store: Store) -> None:
    """A batch writer that answers fewer results than requests fails before its commit, so
    the retry of each request alone cannot write anything twice."""

    def short(session: Session, batch: Sequence[str]) -> list[str]:
        session.execute(
            insert(SignupAttempt), [{"key": key, "attempted_at": utcnow()} for key in batch]
        )
        return list(batch)[:-1]

    with pytest.raises(RuntimeError, match="answered 0 of 1"):
        GroupCommit(short).submit(store, "once")
    assert _attempts(store) == []


def test_a_lock_file_held_too_long_fails_like_a_locked_database(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process that holds the lock file and never lets go (stopped, hung) makes a write
    fail with "database is locked" after the busy timeout, never hang for good."""
    if store.engine.dialect.name != "sqlite":
        pytest.skip("the lock file is SQLite's")
    monkeypatch.setattr(writes, "SQLITE_BUSY_SECONDS", 0.5)
    lock_path = Path(f"{store.engine.url.database}.write-lock")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(lock_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        started = time.monotonic()
        locked = pytest.raises(sqlite3.OperationalError, match="database is locked")
        with locked, write_transaction(store) as session:
            session.execute(insert(SignupAttempt), {"key": "k", "attempted_at": utcnow()})
        assert 0.5 <= time.monotonic() - started < 3
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    with write_transaction(store) as session:  # the lock died with its holder
        session.execute(insert(SignupAttempt), {"key": "after", "attempted_at": utcnow()})
    assert _attempts(store) == ["after"]


HOLD_LOCK = (
    "import fcntl, sys, time\n"
    "held = open(sys.argv[1], 'ab')\n"
    "fcntl.flock(held, fcntl.LOCK_EX)\n"
    "print('held', flush=True)\n"
    "time.sleep(60)\n"
)
