"""Short write transactions that queue in the process instead of in SQLite's busy handler.

SQLite has one writer at a time. A deferred transaction that reads and then writes fails
at once ("database is locked") when another writer committed in between, and a writer
that has to wait sleeps in SQLite's busy handler in growing steps of up to 100 ms, even
when the lock is free again a millisecond later. Under fifty concurrent signups that
sleep, not the work, is the latency. So on SQLite :func:`write_transaction` first takes
a lock shared by the threads of this process, then an exclusive ``flock`` on
``DATABASE.write-lock`` shared with the other processes that write this way (the server's
workers: the kernel wakes the next one the moment it is free), then ``BEGIN IMMEDIATE``
(the file's write lock, which any other writer waits on with the busy timeout). On
PostgreSQL rows lock
themselves; ``keys`` add transaction-scoped advisory locks, so two requests about the
same address run one after the other and a count-then-insert rate limit stays exact.

Many small requests at once (signups) go further with :func:`grouped`, a group commit:
the threads that arrive while a transaction runs are written together in the next one.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Generic, TypeVar
from weakref import WeakKeyDictionary

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from newsletter.store import SQLITE_BUSY_SECONDS, Store

Request = TypeVar("Request")
Result = TypeVar("Result")

_LOCKS: WeakKeyDictionary[Engine, tuple[threading.Lock, int | None]] = WeakKeyDictionary()
_GROUPS: WeakKeyDictionary[Engine, dict[Callable, GroupCommit]] = WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()
# One statement for all keys; unnest keeps the sorted order, so two transactions that want
# some of the same keys take them in the same order and cannot deadlock.
_ADVISORY_LOCKS = text(
    "SELECT count(pg_advisory_xact_lock(hashtextextended(key, 0))) "
    "FROM unnest(CAST(:keys AS text[])) AS key"
)


def _locks(engine: Engine) -> tuple[threading.Lock, int | None]:
    """The engine's lock for this process's threads, and the descriptor of its lock file
    for processes (None for an in-memory database, or where the file cannot be created)."""
    with _LOCKS_GUARD:
        locks = _LOCKS.get(engine)
        if locks is None:
            lock_file = _open_lock_file(engine.url.database)
            if lock_file is not None:
                weakref.finalize(engine, os.close, lock_file)
            locks = _LOCKS[engine] = (threading.Lock(), lock_file)
        return locks


def _open_lock_file(database: str | None) -> int | None:
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    try:
        return os.open(f"{database}.write-lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return None


@contextmanager
def _exclusive(locks: tuple[threading.Lock, int | None]) -> Iterator[None]:
    thread_lock, lock_file = locks
    with thread_lock:
        if lock_file is None:
            yield
            return
        _lock(lock_file)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _lock(lock_file: int) -> None:
    """Take the lock file, looking again after 0.05 ms, then ever less often up to every
    0.5 ms (a blocking flock would wait for ever on a stopped process; a longer pause costs
    signups a sixth of their throughput); after SQLITE_BUSY_SECONDS give up the way SQLite
    does ("database is locked")."""
    deadline = time.monotonic() + SQLITE_BUSY_SECONDS
    pause = 0.00005
    while True:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise sqlite3.OperationalError(
                    f"database is locked: another process held its write lock for "
                    f"{SQLITE_BUSY_SECONDS} s"
                ) from None
            time.sleep(pause)
            pause = min(pause * 2, 0.0005)


@contextmanager
def write_transaction(
    store: Store, key: str | None = None, *, keys: Iterable[str] = ()
) -> Iterator[Session]:
    """A session whose transaction holds the write lock (SQLite) or the locks of ``key`` and
    ``keys`` (PostgreSQL, taken in sorted order so two transactions cannot deadlock).

    Committed when the block ends, rolled back on error. Keep the block short: build
    messages and validate input before entering it.
    """
    engine = store.engine
    if engine.dialect.name != "sqlite":
        with store.begin() as session:
            wanted = sorted({*keys, *([key] if key is not None else [])})
            if wanted:
                session.execute(_ADVISORY_LOCKS, {"keys": wanted})
            yield session
        return
    with _exclusive(_locks(engine)), store.session() as session:
        session.connection().exec_driver_sql("BEGIN IMMEDIATE")
        try:
            yield session
        except BaseException:
            session.rollback()
            raise
        session.commit()


BatchWriter = Callable[[Session, Sequence[Request]], list[Result | Exception]]


class _Entry(Generic[Request, Result]):
    __slots__ = ("done", "error", "request", "result")

    def __init__(self, request: Request) -> None:
        self.request = request
        self.result: Result | None = None
        self.error: BaseException | None = None
        self.done = False


class GroupCommit(Generic[Request, Result]):
    """Requests from many threads, written by ``write`` in as few transactions as they allow.

    A thread that finds no transaction running writes every request waiting so far in one;
    the threads that arrive meanwhile wait, and the first of them writes all of theirs
    next. At fifty concurrent signups this turns fifty short transactions, each with its
    lock hand-over, session and commit, into a handful. ``write`` returns one result per
    request, in order; an exception in that list is raised in the requesting thread alone,
    with the other requests committed. If the transaction itself fails, each request is
    retried alone, so one request that breaks a constraint cannot fail its neighbours.
    """

    def __init__(
        self, write: BatchWriter, keys: Callable[[Request], Iterable[str]] = lambda request: ()
    ) -> None:
        self._write, self._keys = write, keys
        self._waiting: list[_Entry[Request, Result]] = []
        self._guard = threading.Lock()
        self._writer = threading.Lock()

    def submit(self, store: Store, request: Request) -> Result:
        """Write ``request`` with whatever else is waiting; its result, or its exception."""
        entry: _Entry[Request, Result] = _Entry(request)
        with self._guard:
            self._waiting.append(entry)
        with self._writer:
            if not entry.done:  # nobody took it while this thread waited: write them all
                with self._guard:
                    batch, self._waiting = self._waiting, []
                self._write_batch(store, batch)
        if entry.error is not None:
            raise entry.error
        return entry.result  # type: ignore[return-value]

    def _write_batch(self, store: Store, batch: list[_Entry[Request, Result]]) -> None:
        try:
            try:
                self._transaction(store, batch)
            except Exception as exc:
                if len(batch) == 1:
                    batch[0].error = exc
                else:
                    for entry in batch:
                        self._write_alone(store, entry)
        except BaseException as exc:  # KeyboardInterrupt and the like: nobody left hanging
            for entry in batch:
                if entry.error is None and entry.result is None:
                    entry.error = exc
            raise
        finally:
            for entry in batch:
                entry.done = True

    def _write_alone(self, store: Store, entry: _Entry[Request, Result]) -> None:
        try:
            self._transaction(store, [entry])
        except Exception as exc:
            entry.error = exc

    def _transaction(self, store: Store, batch: list[_Entry[Request, Result]]) -> None:
        requests = [entry.request for entry in batch]
        keys = {key for request in requests for key in self._keys(request)}
        with write_transaction(store, keys=keys) as session:
            results = self._write(session, requests)
            if len(results) != len(batch):  # before the commit: nothing written twice
                raise RuntimeError(
                    f"{self._write.__name__} answered {len(results)} of {len(batch)}"
                )
        for entry, result in zip(batch, results, strict=True):
            if isinstance(result, Exception):
                entry.error = result
            else:
                entry.result = result


def grouped(
    store: Store,
    write: BatchWriter,
    request: Request,
    keys: Callable[[Request], Iterable[str]] = lambda request: (),
) -> Result:
    """``request`` written by ``write`` through the store's one :class:`GroupCommit` for it."""
    group = _GROUPS.get(store.engine, {}).get(write)
    if group is None:
        with _LOCKS_GUARD:
            groups = _GROUPS.setdefault(store.engine, {})
            group = groups.get(write)
            if group is None:
                group = groups[write] = GroupCommit(write, keys)
    return group.submit(store, request)
