"""Short write transactions that queue in the process instead of in SQLite's busy handler.

SQLite has one writer at a time. A deferred transaction that reads and then writes fails
at once ("database is locked") when another writer committed in between, and a writer
that has to wait sleeps in SQLite's busy handler in growing steps of up to 100 ms, even
when the lock is free again a millisecond later. Under fifty concurrent signups that
sleep, not the work, is the latency. So on SQLite :func:`write_transaction` first takes
a lock shared by the threads of this process, then ``BEGIN IMMEDIATE`` (the file's write
lock, which other processes wait on with the busy timeout). On PostgreSQL rows lock
themselves; ``key`` adds a transaction-scoped advisory lock, so two requests about the
same address run one after the other and a count-then-insert rate limit stays exact.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from weakref import WeakKeyDictionary

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from newsletter.store import Store

_LOCKS: WeakKeyDictionary[Engine, threading.Lock] = WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _process_lock(engine: Engine) -> threading.Lock:
    with _LOCKS_GUARD:
        lock = _LOCKS.get(engine)
        if lock is None:
            lock = _LOCKS[engine] = threading.Lock()
        return lock


@contextmanager
def write_transaction(store: Store, key: str | None = None) -> Iterator[Session]:
    """A session whose transaction holds the write lock (SQLite) or ``key``'s lock (PostgreSQL).

    Committed when the block ends, rolled back on error. Keep the block short: build
    messages and validate input before entering it.
    """
    engine = store.engine
    if engine.dialect.name != "sqlite":
        with store.begin() as session:
            if key is not None:
                session.execute(
                    text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"), {"key": key}
                )
            yield session
        return
    with _process_lock(engine), store.session() as session:
        session.connection().exec_driver_sql("BEGIN IMMEDIATE")
        try:
            yield session
        except BaseException:
            session.rollback()
            raise
        session.commit()
