"""Scheduled sends: the Scheduler driven tick by tick with a clock the test sets, against a
real SMTP server and real databases; and `newsletter worker` as a real process, given
generous deadlines and schedules that are already due (nothing races the clock)."""

from __future__ import annotations

import logging
import shutil
import threading
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from processes import Background, newsletter_env, run, wait_until
from sqlalchemy import select, update

from newsletter import scheduling
from newsletter.config import Settings, load_settings
from newsletter.errors import InputError
from newsletter.schedules import (
    add_cron,
    add_once,
    cancel,
    cron_trigger,
    list_schedules,
    parse_when,
)
from newsletter.scheduling import Scheduler, newest_unsent
from newsletter.sender import SendOptions
from newsletter.store import Delivery, Schedule, Store, open_store
from newsletter.subscribers import add

FIXTURES = Path(__file__).parent / "fixtures"
T0 = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)  # a Monday
FAST = {"options": SendOptions(batch_size=10, retry_base=0.05, retry_max=0.2, idle_poll=0.05)}


class Clock:
    """The time the scheduler sees: set by the test, never read off the wall."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A folder with the fixture digest and its image."""
    shutil.copy(FIXTURES / "mojibake-digest.md", tmp_path / "digest.md")
    shutil.copy(FIXTURES / "chart.png", tmp_path / "chart.png")
    return tmp_path


@pytest.fixture
def settings(database_url: str, smtp_sink, workdir: Path) -> Settings:
    env = newsletter_env(database_url, **smtp_sink.env()) | {"NEWSLETTER_TIMEZONE": "UTC"}
    return load_settings(env, dotenv_path=workdir / ".env")


@pytest.fixture
def readers(store: Store) -> list[str]:
    addresses = [f"reader{i:02d}@example.com" for i in range(20)]
    with store.begin() as session:
        for address in addresses:
            add(session, address)
    return addresses


def _scheduler(store: Store, settings: Settings, clock: Clock) -> Scheduler:
    return Scheduler(store, settings, clock=clock, sender_options=FAST)


def _tick(scheduler: Scheduler) -> int:
    """One tick, its runs waited for; how many runs it started."""
    threads = scheduler.tick()
    for thread in threads:
        thread.join(60)
    return len(threads)


def _per_address(sink) -> Counter[str]:
    return Counter(r for m in sink.messages for r in m.recipients)


def _schedule(store: Store, schedule_id: int) -> Schedule:
    with store.session() as session:
        return session.get(Schedule, schedule_id)


def test_one_off_runs_at_its_time_once(store, settings, workdir, readers, smtp_sink) -> None:
    """Not a second early, once when due, never again: everyone gets it exactly once."""
    clock = Clock(T0 - timedelta(seconds=1))
    schedule_id = add_once(store, settings, workdir / "digest.md", T0)
    scheduler = _scheduler(store, settings, clock)
    with scheduler.running():
        assert _tick(scheduler) == 0
        clock.advance(seconds=1)
        assert _tick(scheduler) == 1
        clock.advance(hours=1)
        assert _tick(scheduler) == 0
    assert _per_address(smtp_sink) == Counter(readers)
    schedule = _schedule(store, schedule_id)
    assert schedule.status == "done" and "sent 20" in schedule.last_result


def test_two_workers_ticking_together_send_once(store, settings, workdir, readers, smtp_sink):
    """Two schedulers on one database, ticking at the same moment: one run, one copy each."""
    clock = Clock(T0)
    add_once(store, settings, workdir / "digest.md", T0)
    schedulers = [_scheduler(store, settings, clock) for _ in range(2)]
    barrier = threading.Barrier(2)
    started: list[int] = []

    def tick(scheduler: Scheduler) -> None:
        with scheduler.running():
            barrier.wait()
            started.append(_tick(scheduler))

    threads = [threading.Thread(target=tick, args=(s,)) for s in schedulers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(started) == [0, 1]
    assert _per_address(smtp_sink) == Counter(readers)


def test_the_loser_of_a_claim_logs_one_line_and_goes_on(
    store, settings, workdir, readers, caplog
) -> None:
    """A run another worker took is normal: one line at INFO, no traceback, and the losing
    scheduler still runs what comes next."""
    clock = Clock(T0)
    first = add_once(store, settings, workdir / "digest.md", T0)
    winner, loser = (_scheduler(store, settings, clock) for _ in range(2))
    with winner.running(), loser.running():
        stale = _schedule(store, first)  # what the loser read before the winner claimed
        assert _tick(winner) == 1
        with caplog.at_level(logging.INFO, logger="newsletter.scheduler"):
            assert loser._take(stale, clock()) is False
        shutil.copy(workdir / "digest.md", workdir / "second.md")
        (workdir / "second.md").write_text("---\ntitle: Second\n---\nNew text.\n", "utf-8")
        add_once(store, settings, workdir / "second.md", T0 + timedelta(minutes=1))
        clock.advance(minutes=1)
        assert _tick(loser) == 1
    lines = [r for r in caplog.records if "taken by another worker" in r.getMessage()]
    assert len(lines) == 1 and lines[0].exc_info is None


@pytest.mark.parametrize(
    ("late", "sent"), [(timedelta(minutes=30), True), (timedelta(hours=2), False)]
)
def test_one_off_missed_while_down(store, settings, workdir, readers, smtp_sink, late, sent):
    """Found late by a scheduler starting up: sent within NEWSLETTER_MISFIRE_GRACE (one hour),
    reported as missed and not sent beyond it."""
    schedule_id = add_once(store, settings, workdir / "digest.md", T0)
    scheduler = _scheduler(store, settings, Clock(T0 + late))
    with scheduler.running():
        _tick(scheduler)
    schedule = _schedule(store, schedule_id)
    if sent:
        assert _per_address(smtp_sink) == Counter(readers) and schedule.status == "done"
    else:
        assert smtp_sink.messages == [] and schedule.status == "missed"
        assert schedule.last_result == "missed by 2:00:00; not sent"


def _posts(folder: Path) -> None:
    folder.mkdir()
    for date, title in (("2026-11-01", "Old"), ("2026-11-20", "Newest")):
        (folder / f"{date}-post.md").write_text(f"---\ntitle: {title}\ndate: {date}\n---\nHi\n")


def _subjects(sink) -> set[bytes]:
    return {m.data.split(b"Subject: ")[1].split(b"\r\n")[0] for m in sink.messages}


def test_cron_sends_the_newest_unsent_then_nothing(store, settings, workdir, readers, smtp_sink):
    """Each Monday 09:00 the folder's newest unsent post goes out; the next Monday, nothing."""
    folder = workdir / "posts"
    _posts(folder)
    clock = Clock(T0 - timedelta(days=2))  # Saturday
    schedule_id = add_cron(store, settings, "0 9 * * 1", folder)
    with store.begin() as session:
        session.execute(update(Schedule).values(created_at=clock()))
    scheduler = _scheduler(store, settings, clock)
    with scheduler.running():
        assert _tick(scheduler) == 0
        clock.advance(days=2)  # Monday 09:00
        assert _tick(scheduler) == 1
        assert _tick(scheduler) == 0
        clock.advance(days=7)
        assert _tick(scheduler) == 1
    assert len(smtp_sink.messages) == 20 and _subjects(smtp_sink) == {b"Newest"}
    schedule = _schedule(store, schedule_id)
    assert schedule.status == "scheduled" and schedule.last_result.startswith("nothing new")


def test_cron_runs_missed_while_down_are_coalesced(store, settings, workdir, readers, smtp_sink):
    """An hourly cron whose worker was down for five hours (inside the grace of a day) runs
    once, not five times."""
    folder = workdir / "posts"
    _posts(folder)
    settings = load_settings(
        {
            **newsletter_env(settings.database_url, **smtp_sink.env()),
            "NEWSLETTER_MISFIRE_GRACE": "86400",
        },
        dotenv_path=workdir / ".env",
    )
    add_cron(store, settings, "0 * * * *", folder)
    with store.begin() as session:
        session.execute(update(Schedule).values(created_at=T0 - timedelta(hours=5, minutes=30)))
    scheduler = _scheduler(store, settings, Clock(T0))
    with scheduler.running():
        assert _tick(scheduler) == 1
        assert _tick(scheduler) == 0
    with store.session() as session:
        assert session.scalar(select(Schedule.last_run_at)) == T0
    assert _per_address(smtp_sink) == Counter(readers)


def test_list_add_and_cancel_never_move_a_run(store, settings, workdir, readers, smtp_sink):
    """`schedule list`, `add` and `cancel` while a cron run is overdue only read or change the
    schedules they name: the overdue run still happens when a worker looks."""
    folder = workdir / "posts"
    _posts(folder)
    cron = add_cron(store, settings, "0 9 * * 1", folder)
    with store.begin() as session:
        session.execute(update(Schedule).values(created_at=T0 - timedelta(days=1)))
    before = {v.id: v.next_run for v in list_schedules(store, T0 + timedelta(minutes=5))}
    other = add_once(store, settings, workdir / "digest.md", T0 + timedelta(days=30))
    cancel(store, other)
    assert before[cron] == T0 + timedelta(days=7)  # overdue now: the next one is shown
    assert _schedule(store, cron).last_run_at is None
    scheduler = _scheduler(store, settings, Clock(T0 + timedelta(minutes=5)))
    with scheduler.running():
        assert _tick(scheduler) == 1
    assert _per_address(smtp_sink) == Counter(readers)
    assert _schedule(store, other).status == "cancelled"


def test_refused_run_is_retried_then_sent(
    store, settings, workdir, readers, make_smtp_sink, monkeypatch
) -> None:
    """A run the server refuses (wrong password) says "will retry" and is tried again by its
    worker; once the password is right, it goes out."""
    from dataclasses import replace

    sink = make_smtp_sink(credentials=("news", "right"))
    wrong = replace(
        settings,
        smtp_port=sink.port,
        smtp_username="news",
        smtp_password="wrong",
        smtp_security="none",
    )
    monkeypatch.setattr(scheduling, "RETRY_DELAY", 0.0)
    schedule_id = add_once(store, wrong, workdir / "digest.md", T0)
    scheduler = _scheduler(store, wrong, Clock(T0))
    with scheduler.running():
        assert _tick(scheduler) == 1
        refused = _schedule(store, schedule_id)
        assert refused.status == "running" and refused.last_result.startswith("will retry")
        assert "wrong" not in refused.last_result
        scheduler.settings = replace(wrong, smtp_password="right")
        assert _tick(scheduler) == 1
    assert len(sink.messages) == 20 and _schedule(store, schedule_id).status == "done"


def test_unexpected_error_fails_the_run_and_it_can_be_cancelled(
    store, settings, workdir, readers, monkeypatch
) -> None:
    """A run that breaks in a way nobody foresaw ends `failed` with the reason (not `running`
    for ever), and can be cancelled."""

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(scheduling, "plan_send", broken)
    schedule_id = add_once(store, settings, workdir / "digest.md", T0)
    scheduler = _scheduler(store, settings, Clock(T0))
    with scheduler.running():
        assert _tick(scheduler) == 1
    failed = _schedule(store, schedule_id)
    assert failed.status == "failed" and failed.last_result == "error: RuntimeError: disk on fire"
    cancel(store, schedule_id)
    assert _schedule(store, schedule_id).status == "cancelled"


def test_a_run_whose_worker_died_is_taken_over(store, settings, workdir, readers, smtp_sink):
    """A run claimed by a worker that died (its locks are gone) is resumed by another; one
    whose worker lives is left alone."""
    from newsletter.ledger import new_owner

    schedule_id = add_once(store, settings, workdir / "digest.md", T0)
    alive = _scheduler(store, settings, Clock(T0))
    with alive.running():
        with store.begin() as session:
            session.execute(update(Schedule).values(status="running", claimed_by=alive.owner))
        other = _scheduler(store, settings, Clock(T0))
        with other.running():
            assert _tick(other) == 0  # its worker lives
        with store.begin() as session:
            session.execute(update(Schedule).values(claimed_by=new_owner()))  # a dead one
        with other.running():
            assert _tick(other) == 1
    assert _per_address(smtp_sink) == Counter(readers)
    assert _schedule(store, schedule_id).status == "done"


# `newsletter worker` as a real process ---------------------------------------------------


@pytest.fixture
def env(database_url: str, smtp_sink, workdir: Path, store: Store, readers) -> dict[str, str]:
    """Settings for subprocesses: the test's database (20 subscribers) and the sink."""
    return newsletter_env(database_url, **smtp_sink.env())


def _due_now(store: Store, workdir: Path, env: dict[str, str]) -> int:
    """A one-off that fell due a moment ago: a worker starting now runs it at once."""
    settings = load_settings(env, dotenv_path=workdir / ".env")
    return add_once(
        store, settings, workdir / "digest.md", datetime.now(UTC) - timedelta(seconds=1)
    )


STARTED: list[Background] = []


@pytest.fixture(autouse=True)
def _no_leftover_processes():
    """Whatever a failing test left running is killed, and its log closed."""
    yield
    for process in STARTED:
        if process.process.returncode is None:
            process.kill()
    STARTED.clear()


def _worker(workdir: Path, env: dict[str, str], name: str = "worker", command="worker"):
    process = Background([command], workdir, env, workdir / f"{name}.log")
    STARTED.append(process)
    process.wait_for_output("worker started", timeout=60)
    return process


@pytest.mark.slow
@pytest.mark.parametrize("command", ["worker", "scheduler"])
def test_worker_process_sends_a_due_schedule(workdir, env, store, smtp_sink, command) -> None:
    """`newsletter worker` (or its old name) sends a due schedule once; SIGTERM exits 0."""
    schedule_id = _due_now(store, workdir, env)
    worker = _worker(workdir, env, command=command)
    smtp_sink.wait_for(20, timeout=60)
    wait_until(lambda: _schedule(store, schedule_id).status == "done", 60, "the run recorded")
    assert worker.stop() == 0
    assert set(_per_address(smtp_sink).values()) == {1}
    assert "worker stopped" in worker.output()


@pytest.mark.slow
def test_killed_worker_resumes_on_restart(workdir, database_url, smtp_sink, store) -> None:
    """SIGKILL in the middle of a scheduled send: the restart resumes it; only in-flight
    messages repeat."""
    env = newsletter_env(database_url, **smtp_sink.env())
    with store.begin() as session:
        for i in range(300):
            add(session, f"reader{i:03d}@example.com")
    smtp_sink.stall(0.02, "data")
    schedule_id = _due_now(store, workdir, env)
    worker = _worker(workdir, env, "killed")
    wait_until(lambda: len(smtp_sink.messages) >= 60, 60, "a fifth of the send")
    worker.kill()
    at_kill = len(smtp_sink.messages)
    smtp_sink.clear_faults()
    restarted = _worker(workdir, env, "restarted")
    wait_until(lambda: _schedule(store, schedule_id).status == "done", 60, "the run finished")
    assert restarted.stop() == 0
    counts = _per_address(smtp_sink)
    duplicates = sum(n - 1 for n in counts.values())
    print(f"worker SIGKILL after {at_kill} messages: {duplicates} duplicate(s)")
    assert len(counts) == 300
    assert duplicates <= int(env.get("NEWSLETTER_SMTP_CONNECTIONS", "4"))
    with store.session() as session:
        assert set(session.scalars(select(Delivery.status))) == {"sent"}


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_two_worker_processes_run_one_scheduled_send_once(workdir, env, store, smtp_sink):
    """Two `newsletter worker` processes on one PostgreSQL database and a due schedule:
    everyone gets it exactly once."""
    first, second = _worker(workdir, env, "one"), _worker(workdir, env, "two")
    schedule_id = _due_now(store, workdir, env)
    wait_until(lambda: _schedule(store, schedule_id).status == "done", 60, "the run finished")
    assert first.stop() == 0 and second.stop() == 0
    counts = _per_address(smtp_sink)
    assert len(counts) == 20 and set(counts.values()) == {1}


@pytest.mark.slow
def test_workers_started_together_on_a_new_database_all_run(tmp_path, database_url, smtp_sink):
    """Three workers started at the same moment on a database nobody opened yet: each comes
    up (no table is created twice) and stops with exit 0."""
    env = newsletter_env(database_url, **smtp_sink.env())
    workers = [Background(["worker"], tmp_path, env, tmp_path / f"w{n}.log") for n in range(3)]
    STARTED.extend(workers)
    for worker in workers:
        worker.wait_for_output("worker started", timeout=60)
    assert [worker.stop() for worker in workers] == [0, 0, 0]
    assert not any("Traceback" in worker.output() for worker in workers)


# Bad input and the pieces ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["digest.md", "--at", "next tuesday"], "--at: 'next tuesday' is not an ISO 8601 time"),
        (["digest.md", "--at", "2020-01-01T09:00"], "--at: 2020-01-01T09:00 is in the past"),
        (["--cron", "61 * * * *", "--dir", "."], "--cron: '61 * * * *' is not a valid cron"),
        (["--cron", "0 9 * *", "--dir", "."], "is not a valid cron expression"),
        (["missing.md", "--at", "2099-01-01T09:00"], "missing.md: no such file"),
        (["--cron", "0 9 * * 1", "--dir", "nowhere"], "--dir: nowhere is not a directory"),
    ],
)
def test_bad_input_schedules_nothing(workdir: Path, env, args: list[str], message: str) -> None:
    """Each bad input: one line naming the field, exit 2, and nothing scheduled."""
    result = run(["schedule", "add", *args], workdir, env)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert run(["schedule", "list"], workdir, env).stdout.strip() == "no schedules"


def test_crontab_weekdays_mean_what_cron_means() -> None:
    """ "1-5" is Monday to Friday and 0 and 7 are Sunday, unlike APScheduler 3's from_crontab."""
    monday = datetime(2026, 11, 30, 8, 0, tzinfo=UTC)
    fires = []
    trigger = cron_trigger("0 9 * * 1-5", "UTC")
    previous = None
    for _ in range(6):
        previous = trigger.get_next_fire_time(previous, previous or monday)
        fires.append(previous.strftime("%a"))
    assert fires == ["Mon", "Tue", "Wed", "Thu", "Fri", "Mon"]
    sunday = cron_trigger("0 9 * * 0", "UTC").get_next_fire_time(None, monday)
    assert sunday.strftime("%a") == "Sun"
    assert cron_trigger("0 9 * * 7", "UTC").get_next_fire_time(None, monday) == sunday


def test_at_without_offset_uses_configured_zone() -> None:
    """An --at time without an offset is read in NEWSLETTER_TIMEZONE; the past is refused."""
    settings = load_settings({"NEWSLETTER_TIMEZONE": "Asia/Tokyo"}, Path("/nonexistent"))
    when = parse_when("2026-12-01T09:00", settings, now=T0)
    assert when.utcoffset() == timedelta(hours=9)
    with pytest.raises(InputError, match="in the past"):
        parse_when("2026-12-01T09:00", settings, now=T0 + timedelta(days=1))


def test_cron_folder_skips_drafts_and_future_posts(tmp_path: Path) -> None:
    """Drafts and posts dated in the future wait; dates are compared as dates."""
    folder = tmp_path / "posts"
    folder.mkdir()
    posts = {
        "a.md": "---\ntitle: Sent\ndate: 2024-05-01\n---\nx\n",
        "b.md": "---\ntitle: Newest published\ndate: 2024-05-02T08:00:00+02:00\n---\nx\n",
        "c.md": "---\ntitle: Draft\ndate: 2024-05-08\ndraft: true\n---\nx\n",
        "d.md": "---\ntitle: Future\ndate: 2999-01-01\n---\nx\n",
        "2024-04-30-e.md": "---\ntitle: Dated by its name\n---\nx\n",
    }
    for name, text in posts.items():
        (folder / name).write_text(text, "utf-8")
    with open_store(f"sqlite:///{tmp_path / 'db.sqlite'}") as store:
        assert newest_unsent(store, folder) == folder / "b.md"
