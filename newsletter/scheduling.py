"""Scheduled sends with APScheduler 3, its jobs kept in the subscribers' database.

A job carries only a schedule id and calls :func:`run_schedule`, which takes the
schedule with an atomic conditional update first: with two schedulers on one
database by mistake, the loser logs and stops. The send itself is the very same
library call as ``newsletter send`` (plan, create the ledger, deliver), rendered
from the digest as it is at send time.

Misfires are deliberate: a one-off send missed while the scheduler was down runs
once on start if it is less than ``NEWSLETTER_MISFIRE_GRACE`` late, otherwise it is
marked ``missed`` and reported; cron runs missed while down are coalesced into one.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_MISSED, JobExecutionEvent
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.date import DateTrigger
from sqlalchemy import delete, or_, select, update
from tzlocal import get_localzone

from newsletter.config import Settings, load_settings
from newsletter.digest import load_digest
from newsletter.errors import DeliveryError, DigestError, InputError, NewsletterError
from newsletter.ledger import find_issue
from newsletter.sender import Sender, check_transport, content_hash, plan_send, start_send
from newsletter.store import Issue, Schedule, Store, open_store, utcnow

log = logging.getLogger("newsletter.scheduler")

JOB_FUNCTION = "newsletter.scheduling:run_schedule"
CLAIM_GAP = timedelta(seconds=30)  # two schedulers firing one run are seconds apart, not minutes
_CRON_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_STOP = threading.Event()  # set when the scheduler process is asked to stop
_RUNNING: dict[str, BackgroundScheduler] = {}  # the scheduler of this process, while it runs
RETRY_DELAY = 60.0  # seconds before an interrupted or refused scheduled send is tried again


@dataclass(frozen=True)
class ScheduleView:
    """A schedule as `schedule list` shows it."""

    id: int
    kind: str
    what: str
    status: str
    next_run: datetime | None
    last_result: str | None


def _job_id(schedule_id: int) -> str:
    return f"schedule-{schedule_id}"


def _zone(settings: Settings):
    return settings.tz or get_localzone()


def parse_when(value: str, settings: Settings, now: datetime | None = None) -> datetime:
    """An ISO 8601 time; without an offset it is in NEWSLETTER_TIMEZONE (or the machine's)."""
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        raise InputError(
            f"--at: {value!r} is not an ISO 8601 time (e.g. 2026-12-01T09:00)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=_zone(settings))
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


def cron_trigger(expression: str, settings: Settings) -> CronTrigger:
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
            timezone=_zone(settings),
        )
    except (ValueError, KeyError) as exc:
        raise InputError(f"--cron: {expression!r} is not a valid cron expression ({exc})") from None


def _scheduler(store: Store, settings: Settings) -> BackgroundScheduler:
    return BackgroundScheduler(
        jobstores={"default": SQLAlchemyJobStore(engine=store.engine), "memory": MemoryJobStore()},
        job_defaults={
            "coalesce": True,
            "max_instances": 1,
            "misfire_grace_time": settings.misfire_grace,
        },
        timezone=_zone(settings),
    )


class _Jobs:
    """A paused scheduler, for the CLI to add, list and remove jobs without running them."""

    def __init__(self, store: Store, settings: Settings) -> None:
        self.scheduler = _scheduler(store, settings)

    def __enter__(self) -> BackgroundScheduler:
        self.scheduler.start(paused=True)
        return self.scheduler

    def __exit__(self, *exc_info: object) -> None:
        self.scheduler.shutdown(wait=False)


def _add(store: Store, settings: Settings, schedule: Schedule, trigger) -> int:
    """Store the schedule, then its job; a job that cannot be stored leaves no schedule."""
    with store.begin() as session:
        session.add(schedule)
        session.flush()
        schedule_id = schedule.id
    try:
        with _Jobs(store, settings) as jobs:
            jobs.add_job(
                JOB_FUNCTION,
                trigger,
                args=[schedule_id],
                id=_job_id(schedule_id),
                replace_existing=True,
            )
    except BaseException:
        with store.begin() as session:
            session.execute(delete(Schedule).where(Schedule.id == schedule_id))
        raise
    return schedule_id


def add_once(store: Store, settings: Settings, digest: Path, when: datetime) -> int:
    """Schedule one digest at ``when``; the digest must exist and be readable now."""
    load_digest(digest)
    schedule = Schedule(
        kind="once",
        digest_path=str(digest.resolve()),
        run_at=when,
        timezone=settings.timezone,
        status="scheduled",
    )
    return _add(store, settings, schedule, DateTrigger(run_date=when))


def add_cron(store: Store, settings: Settings, expression: str, directory: Path) -> int:
    """Schedule a folder: each run sends its newest digest that was never sent."""
    trigger = cron_trigger(expression, settings)
    if not directory.is_dir():
        raise InputError(f"--dir: {directory} is not a directory")
    schedule = Schedule(
        kind="cron",
        directory=str(directory.resolve()),
        cron=expression,
        timezone=settings.timezone,
        status="scheduled",
    )
    return _add(store, settings, schedule, trigger)


def list_schedules(store: Store, settings: Settings) -> list[ScheduleView]:
    """Every schedule with its next run (in the scheduler's zone) and its last result."""
    with _Jobs(store, settings) as jobs:
        next_runs = {job.id: job.next_run_time for job in jobs.get_jobs()}
    with store.session() as session:
        schedules = session.scalars(select(Schedule).order_by(Schedule.id)).all()
    return [
        ScheduleView(
            s.id,
            s.kind,
            s.digest_path if s.kind == "once" else f"newest unsent in {s.directory} ({s.cron})",
            s.status,
            next_runs.get(_job_id(s.id)),
            s.last_result,
        )
        for s in schedules
    ]


def cancel(store: Store, settings: Settings, schedule_id: int) -> None:
    """Cancel a schedule that has not started; a running send is finished, not cut."""
    with store.begin() as session:
        schedule = session.get(Schedule, schedule_id)
        if schedule is None:
            raise InputError(f"schedule {schedule_id}: no such schedule")
        if schedule.status not in {"scheduled", "missed", "failed"} and schedule.kind == "once":
            raise InputError(f"schedule {schedule_id} is {schedule.status}; it cannot be cancelled")
        schedule.status = "cancelled"
    with _Jobs(store, settings) as jobs:
        if jobs.get_job(_job_id(schedule_id)) is not None:
            jobs.remove_job(_job_id(schedule_id))


def _claim_gap(schedule: Schedule, settings: Settings) -> timedelta:
    """How long after one run another scheduler's run of it counts as the same one:
    30 s, or half the cron's interval when it fires more often than once a minute."""
    trigger = cron_trigger(schedule.cron, settings)
    first = trigger.get_next_fire_time(None, utcnow())
    second = trigger.get_next_fire_time(first, first + timedelta(seconds=1))
    return min(CLAIM_GAP, (second - first) / 2) if first and second else CLAIM_GAP


def _claim(store: Store, settings: Settings, schedule_id: int) -> Schedule | None:
    """Take the schedule for this run, atomically; None when another scheduler has it."""
    now = utcnow()
    with store.begin() as session:
        schedule = session.get(Schedule, schedule_id)
        if schedule is None or schedule.status in {"cancelled", "done"}:
            return None
        query = update(Schedule).where(Schedule.id == schedule_id)
        if schedule.kind == "once":
            query = query.where(Schedule.status == "scheduled")
        else:
            query = query.where(
                or_(
                    Schedule.last_run_at.is_(None),
                    Schedule.last_run_at < now - _claim_gap(schedule, settings),
                )
            )
        taken = session.execute(query.values(last_run_at=now, status="running")).rowcount
        if not taken:
            return None
        session.refresh(schedule)
        session.expunge(schedule)
        return schedule


def _published(digest, path: Path) -> datetime:
    """When a post is dated: its front-matter date, a date in its file name, or its mtime."""
    for text in (str(digest.meta.get("date", "")), path.name[:10]):
        try:
            when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        except ValueError:
            continue
        return when if when.tzinfo else when.replace(tzinfo=get_localzone())
    return datetime.fromtimestamp(path.stat().st_mtime).astimezone()


def newest_unsent(store: Store, directory: Path) -> Path | None:
    """The newest published digest in ``directory`` never sent: drafts (``draft: true``)
    and posts dated in the future wait, as they do on the blog itself."""
    candidates = []
    now = utcnow()
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
            issue = find_issue(session, path.name, content_hash(digest))
            if issue is None or issue.status == "sending":
                return path
            return None  # the newest one was sent: nothing new
    return None


def _finish(store: Store, schedule_id: int, **values) -> None:
    """Record a run's outcome; a schedule cancelled meanwhile stays cancelled."""
    with store.begin() as session:
        session.execute(
            update(Schedule)
            .where(Schedule.id == schedule_id, Schedule.status != "cancelled")
            .values(**values)
        )


def _after_run(schedule: Schedule) -> str:
    """A one-off is done after its run; a cron schedule waits for its next time."""
    return "done" if schedule.kind == "once" else "scheduled"


def run_schedule(schedule_id: int) -> None:
    """The job: claim the schedule, pick the digest, send it to the end (or until stopped)."""
    settings = load_settings()
    with open_store(settings) as store:
        schedule = _claim(store, settings, schedule_id)
        if schedule is None:
            log.info("schedule %s: taken by another scheduler or no longer active", schedule_id)
            return
        _run(store, settings, schedule)


def _run(store: Store, settings: Settings, schedule: Schedule) -> None:
    once = schedule.kind == "once"
    path = Path(schedule.digest_path) if once else newest_unsent(store, Path(schedule.directory))
    if path is None:
        log.info("schedule %s: nothing new in %s", schedule.id, schedule.directory)
        _finish(store, schedule.id, status="scheduled", last_result="nothing new to send")
        return
    try:
        plan = plan_send(store, settings, path)
        sender = Sender(store, settings, stop=_STOP)
        check_transport(sender.factory)
    except DeliveryError as exc:  # the server is down or refuses us: try again later
        log.error("schedule %s: %s; retrying in %ss", schedule.id, exc, int(RETRY_DELAY))
        _finish(store, schedule.id, last_result=f"will retry: {exc}")
        _retry_later(schedule.id)
        return
    except NewsletterError as exc:
        _failed(store, schedule, exc)
        return
    try:
        issue_id = start_send(store, plan)
        _finish(store, schedule.id, last_issue_id=issue_id)
        log.info("schedule %s: sending %s as issue %s", schedule.id, path.name, issue_id)
        report = sender.run(issue_id)
    except NewsletterError as exc:
        _failed(store, schedule, exc)
        return
    result = (
        f"issue {issue_id}: sent {report.sent}, failed {report.failed + report.bounced}, "
        f"skipped {report.skipped}, still queued {report.open}"
    )
    log.info("schedule %s: %s", schedule.id, result)
    if report.finished:
        _finish(store, schedule.id, status=_after_run(schedule), last_result=result)
    else:
        _finish(store, schedule.id, last_result=f"{result}; to be resumed")
        _retry_later(schedule.id)


def _failed(store: Store, schedule: Schedule, exc: NewsletterError) -> None:
    """A run that cannot succeed as things are (bad digest, already sent): say why."""
    log.error("schedule %s: %s", schedule.id, exc)
    status = "failed" if schedule.kind == "once" else "scheduled"
    _finish(store, schedule.id, status=status, last_result=f"error: {exc}")


def _retry_later(schedule_id: int) -> None:
    """Resume this schedule's send after ``RETRY_DELAY``, unless the scheduler is stopping
    (then the next start resumes it)."""
    scheduler = _RUNNING.get("scheduler")
    if scheduler is None or _STOP.is_set():
        return
    scheduler.add_job(
        resume_interrupted,
        DateTrigger(run_date=utcnow() + timedelta(seconds=RETRY_DELAY)),
        args=[schedule_id],
        id=f"resume-{schedule_id}",
        replace_existing=True,
        jobstore="memory",
    )


def resume_interrupted(schedule_id: int) -> None:
    """On start: finish a scheduled send that a stop or a crash left unfinished."""
    settings = load_settings()
    with open_store(settings) as store:
        with store.session() as session:
            schedule = session.get(Schedule, schedule_id)
            issue = session.get(Issue, schedule.last_issue_id) if schedule.last_issue_id else None
        if issue is None:
            _run(store, settings, schedule)
            return
        if issue.status != "sending":
            _finish(store, schedule_id, status=_after_run(schedule))
            return
        log.info("schedule %s: resuming issue %s", schedule_id, issue.id)
        sender = Sender(store, settings, stop=_STOP)
        try:
            check_transport(sender.factory)
            report = sender.run(issue.id)
        except DeliveryError as exc:
            log.error("schedule %s: %s; retrying in %ss", schedule_id, exc, int(RETRY_DELAY))
            _retry_later(schedule_id)
            return
        if report.finished:
            _finish(
                store,
                schedule_id,
                status=_after_run(schedule),
                last_result=f"issue {issue.id}: finished after being resumed",
            )
        else:
            _retry_later(schedule_id)


def _on_missed(store: Store, settings: Settings, event: JobExecutionEvent) -> None:
    if not event.job_id.startswith("schedule-"):
        return
    schedule_id = int(event.job_id.removeprefix("schedule-"))
    late = utcnow() - event.scheduled_run_time
    log.warning(
        "schedule %s: missed its time %s by %s (more than NEWSLETTER_MISFIRE_GRACE=%ss); not sent",
        schedule_id,
        event.scheduled_run_time.isoformat(timespec="seconds"),
        str(late).split(".")[0],
        settings.misfire_grace,
    )
    with store.begin() as session:
        schedule = session.get(Schedule, schedule_id)
        if schedule is not None and schedule.kind == "once" and schedule.status == "scheduled":
            schedule.status = "missed"
            schedule.last_result = f"missed by {str(late).split('.')[0]}; not sent"


def run_scheduler(settings: Settings, stop: threading.Event, poll: float = 1.0) -> None:
    """Run until ``stop`` is set: fire due jobs, resume interrupted sends, stop cleanly."""
    _STOP.clear()
    with open_store(settings) as store:
        scheduler = _scheduler(store, settings)
        scheduler.add_listener(lambda e: _on_missed(store, settings, e), EVENT_JOB_MISSED)
        scheduler.add_listener(
            lambda e: log.error("job %s failed: %s", e.job_id, e.exception), EVENT_JOB_ERROR
        )
        with store.session() as session:
            running = session.scalars(select(Schedule.id).where(Schedule.status == "running"))
            interrupted = list(running)
        _RUNNING["scheduler"] = scheduler
        scheduler.start(paused=True)
        jobs = scheduler.get_jobs(jobstore="default")
        for job in jobs:  # the grace in force is this process's, not the one at `schedule add`
            job.modify(misfire_grace_time=settings.misfire_grace)
        scheduler.resume()
        log.info("scheduler started; %d job(s) in the database", len(jobs))
        for schedule_id in interrupted:
            scheduler.add_job(
                resume_interrupted,
                args=[schedule_id],
                id=f"resume-{schedule_id}",
                replace_existing=True,
                jobstore="memory",
            )
        try:
            while not stop.wait(poll):
                scheduler.wakeup()  # notice jobs that `schedule add` wrote from another process
        finally:
            _STOP.set()
            scheduler.shutdown(wait=True)
            _RUNNING.clear()
            log.info("scheduler stopped")
