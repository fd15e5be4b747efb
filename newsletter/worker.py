"""``newsletter worker``: the one long-running process that sends and waits.

It sends one-off mail (confirmations) as soon as it is queued, runs scheduled sends
(:class:`~newsletter.scheduling.Scheduler`), reads the bounce mailbox every
``NEWSLETTER_BOUNCE_INTERVAL`` seconds and does the housekeeping of old rows. On
PostgreSQL a queued message wakes it at once (``LISTEN``/``NOTIFY``); on SQLite it looks
every ``NEWSLETTER_WORKER_POLL`` seconds. With no worker running, mail waits in the
database, never lost; any number of workers can share one PostgreSQL database.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta

from sqlalchemy import exists, or_, select

from newsletter.bounce_mailbox import Poller
from newsletter.config import Settings
from newsletter.ledger import (
    MAIL_CHANNEL,
    Takeover,
    forget_dead_journals,
    prune_one_off,
    reclaim_abandoned,
)
from newsletter.scheduling import Scheduler
from newsletter.sender import send_queued_mail
from newsletter.signing import message_signer
from newsletter.signup import prune_attempts
from newsletter.store import Delivery, Store, open_store, utcnow

log = logging.getLogger("newsletter.worker")

TICK = 1.0  # seconds between looks at the schedules
HOUSEKEEPING_EVERY = 600.0  # seconds
KEEP_ONE_OFF = timedelta(days=30)  # then sent and failed one-off mail is deleted


def mail_due(store: Store, now: datetime) -> bool:
    """Whether one-off mail is waiting to be sent now (a read, so a quiet worker writes
    nothing)."""
    with store.session() as session:
        return bool(
            session.scalar(
                select(
                    exists().where(
                        Delivery.issue_id.is_(None),
                        Delivery.status == "queued",
                        or_(Delivery.next_attempt_at.is_(None), Delivery.next_attempt_at <= now),
                    )
                )
            )
        )


class _Wakeup:
    """Waits until one-off mail may have been queued: a PostgreSQL notification, or the
    poll interval on SQLite (and whenever the listening connection is lost)."""

    def __init__(self, store: Store, poll: float, stop: threading.Event) -> None:
        self.store, self.poll, self.stop = store, poll, stop
        self._connection = None

    def wait(self, timeout: float) -> None:
        if self.store.sqlite:
            self.stop.wait(min(timeout, self.poll))
            return
        try:
            connection = self._listening()
            for _ in connection.notifies(timeout=timeout, stop_after=1):
                pass
        except Exception as exc:  # the server went away: poll until it is back
            log.warning("listening for queued mail failed (%s); polling instead", exc)
            self.close()
            self.stop.wait(min(timeout, self.poll))

    def _listening(self):
        if self._connection is None:
            raw = self.store.engine.raw_connection()
            connection = raw.driver_connection
            raw.detach()  # kept for the worker's life, never given back to the pool
            connection.autocommit = True
            connection.execute(f"LISTEN {MAIL_CHANNEL}")
            self._connection = connection
        return self._connection

    def close(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.close()
            self._connection = None


class Worker:
    """The loop of ``newsletter worker``; :meth:`run` returns once ``stop`` is set."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        stop: threading.Event,
        *,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.store, self.settings, self.stop = store, settings, stop
        self.scheduler = Scheduler(store, settings, stop=stop, clock=clock)
        self.clock = clock
        self._wakeup = _Wakeup(store, settings.worker_poll, stop)
        self.bounces = Poller(store, settings, stop)

    def run(self, on_ready: Callable[[], None] = lambda: None) -> None:
        with self.scheduler.running():
            on_ready()
            next_tick = next_housekeeping = 0.0
            while not self.stop.is_set():
                self.send_mail()
                now = time.monotonic()
                if now >= next_tick:
                    self._guarded("queued mail", self.reclaim)
                    self._guarded("scheduled sends", self.scheduler.tick)
                    self._guarded("bounce mailbox", self.bounces.tick)
                    next_tick = now + TICK
                if now >= next_housekeeping:
                    self._guarded("housekeeping", self.housekeeping)
                    next_housekeeping = now + HOUSEKEEPING_EVERY
                if not self.stop.is_set():
                    self._wakeup.wait(max(0.01, next_tick - time.monotonic()))
        self._wakeup.close()

    def send_mail(self) -> None:
        """Send the one-off mail that is due, until none is."""
        while not self.stop.is_set() and self._guarded(
            "queued mail", lambda: mail_due(self.store, self.clock())
        ):
            report = self._guarded(
                "queued mail", lambda: send_queued_mail(self.store, self.settings, self.stop)
            )
            if report is None or report.stopped_reason or report.sent + report.failed == 0:
                if report is not None and report.stopped_reason:
                    log.warning("queued mail: %s; trying again later", report.stopped_reason)
                return

    def reclaim(self) -> None:
        """Requeue one-off mail claimed by senders that died (a worker killed mid-send)."""
        with self.store.engine.connect() as db:
            reclaim_abandoned(db, None, self.scheduler.owner, Takeover.of(self.settings))

    def housekeeping(self) -> None:
        """Forget what is no longer needed: old one-off mail, old signup attempts, and the
        journals of dead senders that hold nothing any more."""
        with self.store.begin() as session:
            prune_one_off(session, KEEP_ONE_OFF)
            forget_dead_journals(session, self.scheduler.journals)
        prune_attempts(self.store)

    @staticmethod
    def _guarded(what: str, task: Callable):
        """Run ``task``; a database hiccup is logged and tried again next round."""
        try:
            return task()
        except Exception:
            log.exception("%s failed; trying again", what)
            return None


def run_worker(settings: Settings, stop: threading.Event) -> None:
    """Run until ``stop`` is set (SIGINT/SIGTERM in the CLI), then finish cleanly."""
    message_signer(settings)  # a DKIM key that cannot sign stops the worker at start
    with open_store(settings) as store:
        worker = Worker(store, settings, stop)
        worker.run(on_ready=lambda: log.info("worker started"))
    log.info("worker stopped")


@contextlib.contextmanager
def background(store: Store, settings: Settings, **options) -> Iterator[Worker]:
    """A worker in a thread of this process while the block runs (for tests and benches)."""
    stop = threading.Event()
    worker = Worker(store, settings, stop, **options)
    thread = threading.Thread(target=worker.run, name="newsletter-worker", daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        stop.set()
        thread.join(30)
