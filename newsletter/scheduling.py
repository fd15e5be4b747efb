"""Scheduled sends: the ``schedules`` table (:mod:`newsletter.schedules`) says what runs
when, and any number of workers run each run once.

A worker's :class:`Scheduler` looks at it every tick (with a clock tests can set): a one-off due at
``run_at``, or a cron schedule whose next fire time after its last run has come, is
claimed with one conditional update, so of several workers exactly one wins each run,
and runs in a thread of its own. The send is the very same call as ``newsletter send``
(:func:`newsletter.sender.send_issue`), rendered from the digest as it is at send time.

A run is claimed in the name of its worker, which holds locks that die with it (see
:mod:`newsletter.ledger`): a run whose worker died is taken over by another worker (or
the same one, restarted) and its issue resumed. A run the SMTP server refused, or that
stopped with deliveries left, is tried again after :data:`RETRY_DELAY` by its worker.

Misfires are deliberate: a one-off missed while no worker ran is still sent if less
than ``NEWSLETTER_MISFIRE_GRACE`` late, otherwise marked ``missed``; cron fire times
missed while down are coalesced into one run, or reported as missed past the grace.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import select, update
from tzlocal import get_localzone

from newsletter.config import Settings
from newsletter.digest import load_digest
from newsletter.errors import DeliveryError, DigestError, NewsletterError
from newsletter.journal import journal_dir
from newsletter.ledger import alive_as, find_issue, new_owner, owner_alive
from newsletter.schedules import last_run, next_fire
from newsletter.sender import plan_send, send_issue
from newsletter.store import Issue, Schedule, Store, utcnow

log = logging.getLogger("newsletter.scheduler")

RETRY_DELAY = 60.0  # seconds before a refused or interrupted run is tried again
_SECOND = timedelta(seconds=1)


def _published(digest, path: Path) -> datetime:
    """When a post is dated: its front-matter date, a date in its file name, or its mtime."""
    for text in (str(digest.meta.get("date", "")), path.name[:10]):
        try:
            when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        except ValueError:
            continue
        return when if when.tzinfo else when.replace(tzinfo=get_localzone())
    return datetime.fromtimestamp(path.stat().st_mtime).astimezone()


def newest_unsent(store: Store, directory: Path, now: datetime | None = None) -> Path | None:
    """The newest published digest in ``directory`` never sent: drafts (``draft: true``)
    and posts dated in the future wait, as they do on the blog itself."""
    candidates = []
    now = now or utcnow()
    for path in directory.glob("*.md"):
        try:
            digest = load_digest(path)
        except DigestError as exc:
            log.warning("skipping %s", exc)
            continue
        when = _published(digest, path)
        if str(digest.meta.get("draft", "")).lower() in {"true", "yes", "1"} or when > now:
            continue
        candidates.append((when, path.name, path, digest))
    with store.session() as session:
        for _, _, path, digest in sorted(candidates, reverse=True):
            issue = find_issue(session, path.name, digest.content_hash)
            if issue is None or issue.status == "sending":
                return path
            return None  # the newest one was sent: nothing new
    return None


class Scheduler:
    """The scheduled sends of one worker: :meth:`tick` claims what is due and runs it.

    ``clock`` gives the current time (aware UTC); tests set it instead of waiting.
    """

    def __init__(
        self,
        store: Store,
        settings: Settings,
        *,
        stop: threading.Event | None = None,
        clock: Callable[[], datetime] = utcnow,
        sender_options: dict | None = None,
    ) -> None:
        self.store, self.settings, self.clock = store, settings, clock
        self.stop = stop or threading.Event()
        self.sender_options = sender_options or {}
        self.owner = new_owner()
        self.journals = journal_dir(settings.database_url)
        self.grace = timedelta(seconds=settings.misfire_grace)
        self._threads: dict[int, threading.Thread] = {}
        self._retry_at: dict[int, float] = {}

    @contextmanager
    def running(self) -> Iterator[Scheduler]:
        """Hold this worker's locks while the block runs (its claims count as alive), and
        until the runs it started have ended."""
        with alive_as(self.store, self.owner, self.journals):
            try:
                yield self
            finally:
                self.join()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the runs in progress to end."""
        for thread in list(self._threads.values()):
            thread.join(timeout)

    def tick(self) -> list[threading.Thread]:
        """Claim every run that is due now and start each in a thread; the threads."""
        started = []
        with self.store.session() as session:
            schedules = session.scalars(
                select(Schedule).where(Schedule.status.in_(("scheduled", "running")))
            ).all()
        now = self.clock()
        for schedule in schedules:
            if self.stop.is_set():
                break
            thread = self._threads.get(schedule.id)
            if thread is not None and thread.is_alive():
                continue
            if self._take(schedule, now):
                started.append(self._start(schedule.id))
        return started

    def _take(self, schedule: Schedule, now: datetime) -> bool:
        """Whether this worker runs ``schedule`` now: a run of its own due for a retry, a run
        whose worker died, or a new run it claimed."""
        if schedule.status == "running":
            if schedule.claimed_by == self.owner:
                return time.monotonic() >= self._retry_at.get(schedule.id, 0.0)
            return self._take_over(schedule)
        if schedule.kind == "once":
            return self._claim_once(schedule, now)
        return self._claim_cron(schedule, now)

    def _claim(self, schedule: Schedule, **values) -> bool:
        """The conditional update that makes a run this worker's, or nobody's."""
        with self.store.begin() as session:
            taken = session.execute(
                update(Schedule)
                .where(Schedule.id == schedule.id, Schedule.status == schedule.status)
                .where(
                    Schedule.last_run_at.is_(None)
                    if schedule.last_run_at is None
                    else Schedule.last_run_at == schedule.last_run_at
                )
                .where(
                    Schedule.claimed_by.is_(None)
                    if schedule.claimed_by is None
                    else Schedule.claimed_by == schedule.claimed_by
                )
                .values(**values)
            ).rowcount
        if not taken:
            log.info("schedule %s: taken by another worker", schedule.id)
        return bool(taken)

    def _claim_once(self, schedule: Schedule, now: datetime) -> bool:
        if schedule.run_at is None or schedule.run_at > now:
            return False
        late = now - schedule.run_at
        if late > self.grace:
            if self._claim(schedule, status="missed", last_result=_missed(late)):
                log.warning(
                    "schedule %s: missed its time %s by %s (more than "
                    "NEWSLETTER_MISFIRE_GRACE=%ss); not sent",
                    schedule.id,
                    schedule.run_at.isoformat(timespec="seconds"),
                    _duration(late),
                    self.settings.misfire_grace,
                )
            return False
        return self._claim(schedule, status="running", claimed_by=self.owner, last_run_at=now)

    def _claim_cron(self, schedule: Schedule, now: datetime) -> bool:
        first = next_fire(schedule, last_run(schedule))
        if first is None or first > now:
            return False
        fire = next_fire(schedule, max(first, now - self.grace) - _SECOND)
        if fire is None or fire > now:  # every fire time since the last run is past the grace
            if self._claim(schedule, last_run_at=now, last_result=_missed(now - first)):
                log.warning("schedule %s: missed its run at %s; not sent", schedule.id, first)
            return False
        while (following := next_fire(schedule, fire)) is not None and following <= now:
            fire = following  # runs missed while down are coalesced into the latest
        return self._claim(schedule, status="running", claimed_by=self.owner, last_run_at=fire)

    def _take_over(self, schedule: Schedule) -> bool:
        """A run whose worker is dead becomes this worker's (the issue is resumed)."""
        with self.store.session() as session:
            if not schedule.claimed_by or owner_alive(session, schedule.claimed_by, self.journals):
                return False
        if self._claim(schedule, claimed_by=self.owner):
            log.info("schedule %s: resuming a run its worker left unfinished", schedule.id)
            return True
        return False

    def _start(self, schedule_id: int) -> threading.Thread:
        thread = threading.Thread(
            target=self.run, args=(schedule_id,), name=f"newsletter-schedule-{schedule_id}"
        )
        self._threads[schedule_id] = thread
        thread.start()
        return thread

    def run(self, schedule_id: int) -> None:
        """One run of a schedule this worker holds: pick the digest, send it to the end (or
        until stopped), and record how it went."""
        with self.store.session() as session:
            schedule = session.get(Schedule, schedule_id)
            issue = session.get(Issue, schedule.last_issue_id) if schedule.last_issue_id else None
        try:
            if issue is not None and issue.status != "sending":
                self._finish(schedule, f"issue {issue.id}: {issue.status}")
                return
            path = self._digest(schedule, issue)
            if path is None:
                self._finish(schedule, f"nothing new in {schedule.directory}")
                return
            plan = plan_send(self.store, self.settings, path)
            report = send_issue(
                self.store,
                self.settings,
                plan,
                stop=self.stop,
                on_started=lambda issue_id: self._record(schedule_id, last_issue_id=issue_id),
                **self.sender_options,
            )
        except DeliveryError as exc:  # the server is down or refuses us: try again later
            self._later(schedule, f"will retry: {exc}")
            return
        except NewsletterError as exc:
            self._failed(schedule, f"error: {exc}")
            return
        except Exception as exc:  # never a run left 'running' for ever
            log.exception("schedule %s: the run failed", schedule_id)
            self._failed(schedule, f"error: {type(exc).__name__}: {exc}")
            return
        result = (
            f"issue {report.issue_id}: sent {report.sent}, failed "
            f"{report.failed + report.bounced}, skipped {report.skipped}, "
            f"still queued {report.open}"
        )
        if report.finished:
            self._finish(schedule, result)
        else:
            self._later(schedule, f"{result}; to be resumed")

    def _digest(self, schedule: Schedule, issue: Issue | None) -> Path | None:
        if issue is not None:
            return Path(issue.digest_path)
        if schedule.kind == "once":
            return Path(schedule.digest_path or "")
        return newest_unsent(self.store, Path(schedule.directory or ""), self.clock())

    def _record(self, schedule_id: int, **values) -> None:
        """Note a run's progress or outcome while this worker still holds it (a schedule
        cancelled meanwhile stays cancelled)."""
        with self.store.begin() as session:
            session.execute(
                update(Schedule)
                .where(Schedule.id == schedule_id, Schedule.claimed_by == self.owner)
                .where(Schedule.status != "cancelled")
                .values(**values)
            )

    def _finish(self, schedule: Schedule, result: str) -> None:
        log.info("schedule %s: %s", schedule.id, result)
        status = "done" if schedule.kind == "once" else "scheduled"
        self._record(
            schedule.id, status=status, claimed_by=None, last_issue_id=None, last_result=result
        )

    def _failed(self, schedule: Schedule, result: str) -> None:
        """A run that cannot succeed as things are (bad digest, already sent): say why."""
        log.error("schedule %s: %s", schedule.id, result)
        status = "failed" if schedule.kind == "once" else "scheduled"
        self._record(
            schedule.id, status=status, claimed_by=None, last_issue_id=None, last_result=result
        )

    def _later(self, schedule: Schedule, result: str) -> None:
        log.warning("schedule %s: %s; trying again in %ss", schedule.id, result, int(RETRY_DELAY))
        self._retry_at[schedule.id] = time.monotonic() + RETRY_DELAY
        self._record(schedule.id, last_result=result)


def _duration(late: timedelta) -> str:
    return str(late).split(".")[0]


def _missed(late: timedelta) -> str:
    return f"missed by {_duration(late)}; not sent"
