"""The ``schedules`` table: what runs when. ``schedule add``, ``list`` and ``cancel`` read
and write only this; running what is due is :mod:`newsletter.scheduling`'s, so these
commands never load the sending machinery.

Times without an offset are in ``NEWSLETTER_TIMEZONE`` (or the machine's); cron lines
mean what crontab means them to.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from apscheduler.triggers.cron import CronTrigger
from sqlalchemy import select
from tzlocal import get_localzone

from newsletter.config import Settings
from newsletter.digest import load_digest
from newsletter.errors import InputError
from newsletter.store import Schedule, Store, utcnow

_CRON_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


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


def next_fire(schedule: Schedule, after: datetime) -> datetime | None:
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
            next_run = s.run_at if s.kind == "once" else next_fire(s, max(last_run(s), now))
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


def last_run(schedule: Schedule) -> datetime:
    """When a cron schedule last fired (or was made): its next run comes after this."""
    return schedule.last_run_at or schedule.created_at
