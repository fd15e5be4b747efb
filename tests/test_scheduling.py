"""Scheduled sends with a real `newsletter scheduler` process and a real SMTP server."""

from __future__ import annotations

import shutil
import time
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from processes import Background, newsletter_env, run, wait_until
from sqlalchemy import select

from newsletter.config import load_settings
from newsletter.errors import InputError
from newsletter.scheduling import cron_trigger, parse_when
from newsletter.store import Delivery, Schedule, open_store

FIXTURES = Path(__file__).parent / "fixtures"
pytestmark = pytest.mark.slow


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A folder with the fixture digest and its image."""
    shutil.copy(FIXTURES / "mojibake-digest.md", tmp_path / "digest.md")
    shutil.copy(FIXTURES / "chart.png", tmp_path / "chart.png")
    return tmp_path


@pytest.fixture
def env(database_url: str, smtp_sink, workdir: Path) -> dict[str, str]:
    """Settings for subprocesses: the test's database, the sink, 20 subscribers."""
    variables = newsletter_env(database_url, **smtp_sink.env())
    rows = "".join(f"reader{i:02d}@example.com\n" for i in range(20))
    (workdir / "list.csv").write_text("email\n" + rows, "utf-8")
    assert run(["subscribers", "import", "list.csv"], workdir, variables).returncode == 0
    return variables


def _at(seconds: float) -> str:
    return (datetime.now().astimezone() + timedelta(seconds=seconds)).isoformat(timespec="seconds")


def _schedule(workdir: Path, env: dict[str, str], *args: str) -> None:
    result = run(["schedule", "add", *args], workdir, env)
    assert result.returncode == 0, result.stderr


def _per_address(sink) -> Counter[str]:
    return Counter(r for m in sink.messages for r in m.recipients)


@pytest.fixture(autouse=True)
def _no_leftover_processes():
    """Whatever a failing test left running is killed, and its log closed."""
    yield
    for process in STARTED:
        if process.process.returncode is None:
            process.kill()
    STARTED.clear()


STARTED: list[Background] = []


def _scheduler(workdir: Path, env: dict[str, str], name: str = "scheduler") -> Background:
    process = Background(["scheduler"], workdir, env, workdir / f"{name}.log")
    STARTED.append(process)
    process.wait_for_output("scheduler started")
    return process


def test_send_at_time_arrives_on_time(workdir: Path, env: dict[str, str], smtp_sink) -> None:
    """A send scheduled 2 s ahead arrives within 3 s of its time; SIGTERM exits 0."""
    scheduler = _scheduler(workdir, env)
    due = time.time() + 2
    _schedule(workdir, env, "digest.md", "--at", _at(2))
    smtp_sink.wait_for(20, timeout=15)
    arrived = time.time()
    assert arrived - due < 3
    assert scheduler.stop() == 0
    assert set(_per_address(smtp_sink).values()) == {1}
    assert "scheduler stopped" in scheduler.output()


def test_restart_before_its_time_still_sends_once(workdir: Path, env, smtp_sink) -> None:
    """Scheduled, scheduler stopped and restarted before the time: the issue arrives once."""
    first = _scheduler(workdir, env, "first")
    _schedule(workdir, env, "digest.md", "--at", _at(3))
    assert first.stop() == 0
    second = _scheduler(workdir, env, "second")
    smtp_sink.wait_for(20, timeout=15)
    time.sleep(1)
    assert second.stop() == 0
    assert set(_per_address(smtp_sink).values()) == {1} and len(_per_address(smtp_sink)) == 20


def test_missed_one_off_beyond_grace_is_reported_not_sent(workdir: Path, env, smtp_sink) -> None:
    """A one-off missed by more than the grace while down is not sent, and says so."""
    _schedule(workdir, env, "digest.md", "--at", _at(3))
    time.sleep(5)
    scheduler = _scheduler(workdir, env | {"NEWSLETTER_MISFIRE_GRACE": "1"})
    scheduler.wait_for_output("missed its time")
    time.sleep(0.5)
    assert scheduler.stop() == 0
    assert smtp_sink.messages == []
    listing = run(["schedule", "list"], workdir, env).stdout
    assert "missed" in listing and "not sent" in listing


def test_missed_one_off_within_grace_runs_once_on_start(workdir: Path, env, smtp_sink) -> None:
    """A one-off missed by less than the grace runs once when the scheduler starts."""
    _schedule(workdir, env, "digest.md", "--at", _at(3))
    time.sleep(4.5)
    scheduler = _scheduler(workdir, env)
    smtp_sink.wait_for(20, timeout=15)
    assert scheduler.stop() == 0
    assert set(_per_address(smtp_sink).values()) == {1}


def test_cron_sends_newest_unsent_then_nothing(workdir: Path, env, smtp_sink) -> None:
    """A cron over a folder sends its newest unsent digest, then nothing on the next runs."""
    folder = workdir / "posts"
    folder.mkdir()
    for date, title in (("2021-01-01", "Old"), ("2021-02-01", "Newest")):
        (folder / f"{date}-post.md").write_text(f"---\ntitle: {title}\ndate: {date}\n---\nHi\n")
    _schedule(workdir, env, "--cron", "*/2 * * * * *", "--dir", str(folder))
    scheduler = _scheduler(workdir, env)
    smtp_sink.wait_for(20, timeout=15)
    scheduler.wait_for_output("nothing new", timeout=15)
    assert scheduler.stop() == 0
    assert len(smtp_sink.messages) == 20
    subjects = {m.data.split(b"Subject: ")[1].split(b"\r\n")[0] for m in smtp_sink.messages}
    assert subjects == {b"Newest"}


def test_two_schedulers_send_once(workdir: Path, env, smtp_sink, database_url: str) -> None:
    """Two schedulers on one database and one scheduled issue: everyone gets it exactly once."""
    one = _scheduler(workdir, env, "one")
    two = _scheduler(workdir, env, "two")
    _schedule(workdir, env, "digest.md", "--at", _at(2))
    smtp_sink.wait_for(20, timeout=15)
    time.sleep(1.5)
    assert one.stop() == 0 and two.stop() == 0
    counts = _per_address(smtp_sink)
    assert len(counts) == 20 and set(counts.values()) == {1}


def test_killed_scheduler_resumes_on_restart(workdir: Path, database_url: str, smtp_sink) -> None:
    """SIGKILL in the middle of a send: the restart resumes it; only in-flight messages repeat."""
    env = newsletter_env(database_url, **smtp_sink.env())
    rows = "".join(f"reader{i:03d}@example.com\n" for i in range(300))
    (workdir / "list.csv").write_text("email\n" + rows, "utf-8")
    assert run(["subscribers", "import", "list.csv"], workdir, env).returncode == 0
    smtp_sink.stall(0.02, "data")
    scheduler = _scheduler(workdir, env, "killed")
    _schedule(workdir, env, "digest.md", "--at", _at(3))
    wait_until(lambda: len(smtp_sink.messages) >= 60, 20, "a fifth of the send")
    scheduler.kill()
    at_kill = len(smtp_sink.messages)
    smtp_sink.clear_faults()
    restarted = _scheduler(workdir, env, "restarted")
    wait_until(lambda: len(_per_address(smtp_sink)) == 300, 30, "every subscriber")
    time.sleep(0.5)
    assert restarted.stop() == 0
    counts = _per_address(smtp_sink)
    duplicates = sum(n - 1 for n in counts.values())
    print(f"scheduler SIGKILL after {at_kill} messages: {duplicates} duplicate(s)")
    assert duplicates <= int(env.get("NEWSLETTER_SMTP_CONNECTIONS", "4"))
    with open_store(database_url) as store, store.session() as session:
        statuses = set(session.scalars(select(Delivery.status)))
        schedule = session.scalars(select(Schedule)).one()
    assert statuses == {"sent"} and schedule.status == "done"


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
    settings = load_settings({"NEWSLETTER_TIMEZONE": "UTC"}, Path("/nonexistent"))
    monday = datetime(2026, 11, 30, 8, 0, tzinfo=settings.tz)
    fires = []
    trigger = cron_trigger("0 9 * * 1-5", settings)
    previous = None
    for _ in range(6):
        previous = trigger.get_next_fire_time(previous, previous or monday)
        fires.append(previous.strftime("%a"))
    assert fires == ["Mon", "Tue", "Wed", "Thu", "Fri", "Mon"]
    sunday = cron_trigger("0 9 * * 0", settings).get_next_fire_time(None, monday)
    assert sunday.strftime("%a") == "Sun"
    assert cron_trigger("0 9 * * 7", settings).get_next_fire_time(None, monday) == sunday


def test_at_without_offset_uses_configured_zone() -> None:
    """An --at time without an offset is read in NEWSLETTER_TIMEZONE."""
    settings = load_settings({"NEWSLETTER_TIMEZONE": "Asia/Tokyo"}, Path("/nonexistent"))
    when = parse_when("2099-01-01T09:00", settings)
    assert when.utcoffset() == timedelta(hours=9)
    with pytest.raises(InputError):
        parse_when("2000-01-01T09:00+00:00", settings)


def test_cron_folder_skips_drafts_and_future_posts(tmp_path: Path) -> None:
    """Drafts and posts dated in the future wait; dates are compared as dates."""
    from newsletter.scheduling import newest_unsent

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


def test_refused_scheduled_send_is_retried_while_running(
    tmp_path: Path, make_smtp_sink, monkeypatch: pytest.MonkeyPatch, clean_env: Path
) -> None:
    """A scheduled send the server refuses (wrong password) is retried, not failed for good."""
    import threading

    import newsletter.scheduling as scheduling
    from newsletter.scheduling import add_once, run_scheduler
    from newsletter.subscribers import add

    sink = make_smtp_sink(credentials=("news", "right"))
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    for name, value in newsletter_env(url, **sink.env()).items():
        if name.startswith("NEWSLETTER_"):
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("NEWSLETTER_SMTP_PASSWORD", "wrong")
    monkeypatch.setattr(scheduling, "RETRY_DELAY", 0.5)
    shutil.copy(FIXTURES / "mojibake-digest.md", clean_env / "digest.md")
    shutil.copy(FIXTURES / "chart.png", clean_env / "chart.png")
    settings = load_settings()
    with open_store(url) as store:
        with store.begin() as session:
            add(session, "ada@example.com")
        add_once(
            store,
            settings,
            clean_env / "digest.md",
            datetime.now().astimezone() + timedelta(seconds=1),
        )
    stop = threading.Event()
    thread = threading.Thread(target=run_scheduler, args=(settings, stop, 0.1))
    thread.start()
    try:
        wait_until(lambda: _last_result(url).startswith("will retry"), 10, "a refused run")
        monkeypatch.setenv("NEWSLETTER_SMTP_PASSWORD", "right")
        sink.wait_for(1, timeout=10)
    finally:
        stop.set()
        thread.join(10)
    assert [m.recipients for m in sink.messages] == [("ada@example.com",)]


def _last_result(url: str) -> str:
    with open_store(url) as store, store.session() as session:
        return session.scalars(select(Schedule.last_result)).first() or ""
