"""Scheduled sends: the ``schedules`` table says what runs when, and any number of workers
run each run once.

``schedule add``, ``list`` and ``cancel`` only read and write that table. A worker's
:class:`Scheduler` looks at it every tick (with a clock tests can set): a one-off due at
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
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from apscheduler.triggers.cron import CronTrigger
from sqlalchemy import select, update
from tzlocal import get_localzone

from newsletter.config import Settings
from newsletter.digest import load_digest
from newsletter.errors import DeliveryError, DigestError, InputError, NewsletterError
from newsletter.journal import journal_dir
from newsletter.ledger import alive_as, find_issue, new_owner, owner_alive
from newsletter.sender import plan_send, send_issue
from newsletter.store import Issue, Schedule, Store, utcnow

log = logging.getLogger("newsletter.scheduler")

RETRY_DELAY = 60.0  # seconds before a refused or interrupted run is tried again
_CRON_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_SECOND = timedelta(seconds=1)


@dataclass(frozen=True)
class ScheduleView:
    """A schedule as `schedule list` shows it."""

    id: int
    kind: str
    what: str
    status: str
    next_run: datetime | None
    last_result: str | None


def _zone(name: str | None) -> ZoneInfo:
    return ZoneInfo(name) if name else get_localzone()


def parse_when(value: str, settings: Settings, now: datetime | None = None) -> datetime:
    """An ISO 8601 time; without an offset it is in NEWSLETTER_TIMEZONE (or the machine's)."""
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        raise InputError(
            f"--at: {value!r} is not an ISO 8601 time (e.g. 2026-12-01T09:00)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=_zone(settings.timezone))
    if when <= (now or utcnow()):
        raise InputError(f"--at: {value} is in the past")
    return when


def _weekday_set(field: str) -> set[int]:
    """The crontab weekdays (0 or 7 = Sunday) a day-of-week field names."""
    days: set[int] = set()
    names = {name: index for index, name in enumerate(_CRON_DAYS)}
    for part in field.lower().split(","):
        base, _, step_text = part.partition("/")
        step = int(step_text) if step_text else 1
        if base == "*":
            low, high = 0, 6
        else:
            low_text, _, high_text = base.partition("-")
            low = names[low_text] if low_text in names else int(low_text)
            high = (
                (names[high_text] if high_text in names else int(high_text))
                if high_text
                else (6 if step_text else low)
            )
        if not (0 <= low <= 7 and 0 <= high <= 7 and step >= 1):
            raise ValueError(f"day of week {part!r} out of range")
        days.update(day % 7 for day in range(low, high + 1, step))
    return days


def cron_trigger(expression: str, timezone: str | None) -> CronTrigger:
    """A trigger for a standard 5-field crontab line (Sunday is 0 or 7, as cron means it).

    A sixth leading field, seconds, is accepted too ("*/30 * * * * *").

    APScheduler 3's own ``from_crontab`` counts weekdays from Monday, so "1-5" would
    silently mean Tuesday to Saturday; the day-of-week field is translated to names.
    """
    fields = expression.split()
    try:
        if len(fields) not in (5, 6):
            raise ValueError("a cron expression has 5 fields: minute hour day month weekday")
        second = fields.pop(0) if len(fields) == 6 else "0"
        minute, hour, day, month, weekday = fields
        days = (
            weekday
            if weekday == "*"
            else ",".join(_CRON_DAYS[d] for d in sorted(_weekday_set(weekday)))
        )
        return CronTrigger(
            second=second,
            minute=minute,
            hour=hour,
            day=day,
            month=month,
            day_of_week=days,
            timezone=_zone(timezone),
        )
    except (ValueError, KeyError) as exc:
        raise InputError(f"--cron: {expression!r} is not a valid cron expression ({exc})") from None


def _next_fire(schedule: Schedule, after: datetime) -> datetime | None:
    """A cron schedule's first fire time strictly after ``after``."""
    trigger = cron_trigger(schedule.cron or "", schedule.timezone)
    return trigger.get_next_fire_time(None, after + timedelta(microseconds=1))


def add_once(store: Store, settings: Settings, digest: Path, when: datetime) -> int:
    """Schedule one digest at ``when``; the digest must exist and be readable now."""
    load_digest(digest)
    return _insert(
        store,
        Schedule(
            kind="once",
            digest_path=str(digest.resolve()),
            run_at=when,
            timezone=settings.timezone,
            status="scheduled",
        ),
    )


def add_cron(store: Store, settings: Settings, expression: str, directory: Path) -> int:
    """Schedule a folder: each run sends its newest digest that was never sent."""
    cron_trigger(expression, settings.timezone)
    if not directory.is_dir():
        raise InputError(f"--dir: {directory} is not a directory")
    return _insert(
        store,
        Schedule(
            kind="cron",
            directory=str(directory.resolve()),
            cron=expression,
            timezone=settings.timezone,
            status="scheduled",
            created_at=utcnow(),
        ),
    )


def _insert(store: Store, schedule: Schedule) -> int:
    with store.begin() as session:
        session.add(schedule)
        session.flush()
        return schedule.id


def list_schedules(store: Store, now: datetime | None = None) -> list[ScheduleView]:
    """Every schedule with its next run and its last result."""
    now = now or utcnow()
    with store.session() as session:
        schedules = session.scalars(select(Schedule).order_by(Schedule.id)).all()
    views = []
    for s in schedules:
        next_run = None
        if s.status == "scheduled":
            next_run = s.run_at if s.kind == "once" else _next_fire(s, max(_last(s), now))
        what = s.digest_path if s.kind == "once" else f"newest unsent in {s.directory} ({s.cron})"
        views.append(ScheduleView(s.id, s.kind, what or "", s.status, next_run, s.last_result))
    return views


def cancel(store: Store, schedule_id: int) -> None:
    """Cancel a schedule; a one-off already running is finished, not cut."""
    with store.begin() as session:
        schedule = session.get(Schedule, schedule_id)
        if schedule is None:
            raise InputError(f"schedule {schedule_id}: no such schedule")
        if schedule.kind == "once" and schedule.status not in {"scheduled", "missed", "failed"}:
            raise InputError(f"schedule {schedule_id} is {schedule.status}; it cannot be cancelled")
        schedule.status = "cancelled"


def _last(schedule: Schedule) -> datetime:
    """When a cron schedule last fired (or was made): its next run comes after this."""
    return schedule.last_run_at or schedule.created_at


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
        first = _next_fire(schedule, _last(schedule))
        if first is None or first > now:
            return False
        fire = _next_fire(schedule, max(first, now - self.grace) - _SECOND)
        if fire is None or fire > now:  # every fire time since the last run is past the grace
            if self._claim(schedule, last_run_at=now, last_result=_missed(now - first)):
                log.warning("schedule %s: missed its run at %s; not sent", schedule.id, first)
            return False
        while (following := _next_fire(schedule, fire)) is not None and following <= now:
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
