"""The store: engine, migrations, constraints and the settings table, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from click.testing import CliRunner
from sqlalchemy import func, inspect, select, text
from sqlalchemy.exc import IntegrityError, StatementError

from newsletter.cli import main
from newsletter.config import Settings
from newsletter.errors import ConfigError
from newsletter.migrate import HEAD, alembic_config, head_revision, upgrade
from newsletter.store import (
    Base,
    Delivery,
    Issue,
    SignupAttempt,
    Store,
    Subscriber,
    delivery_counts,
    get_or_create_secret_key,
    make_engine,
    open_store,
    utcnow,
)

TABLES = {"subscribers", "issues", "deliveries", "settings", "signup_attempts", "schedules"}


def _subscriber(email: str = "ann@example.com", status: str = "active") -> Subscriber:
    return Subscriber(email=email, status=status, source="cli")


def _issue() -> Issue:
    return Issue(digest_path="digests/a.md", digest_name="a.md", content_hash="0" * 64, subject="A")


def test_first_use_creates_the_newest_schema(store: Store) -> None:
    """Opening a new database applies every migration and creates every table."""
    assert store.revision() == head_revision() == HEAD
    assert set(inspect(store.engine).get_table_names()) >= TABLES


def test_models_match_the_migrations(store: Store) -> None:
    """The models and the newest migration describe the same schema (nothing to autogenerate)."""
    with store.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def test_open_store_accepts_settings(database_url: str) -> None:
    """open_store takes the Settings object every command has, and a second open keeps the data."""
    with open_store(Settings(database_url=database_url)) as first, first.begin() as session:
        session.add(_subscriber())
    with open_store(Settings(database_url=database_url)) as second, second.session() as session:
        assert session.scalar(select(Subscriber.email)) == "ann@example.com"


def test_upgrade_from_the_first_migration_keeps_data(database_url: str) -> None:
    """A database made by migration 0001, with data in it, upgrades to the newest and keeps it."""
    engine = make_engine(database_url)
    try:
        upgrade(engine, "0001")
        with engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO subscribers (email, name, status, source, created_at) "
                    "VALUES ('ann@example.com', 'Zoë', 'active', 'import', :now)"
                ),
                {"now": datetime(2024, 5, 1, 12, 0)},
            )
            connection.execute(
                text(
                    "INSERT INTO issues (digest_path, digest_name, content_hash, subject, status,"
                    " created_at) VALUES ('d/a.md', 'a.md', 'abc', 'A', 'sent', :now)"
                ),
                {"now": datetime(2024, 5, 2, 12, 0)},
            )
            connection.execute(
                text(
                    "INSERT INTO deliveries (issue_id, subscriber_id, email, status) "
                    "SELECT i.id, s.id, s.email, 'sent' FROM issues i, subscribers s"
                )
            )
            connection.execute(text("INSERT INTO settings (key, value) VALUES ('secret_key', 'k')"))
        assert "outbound_mail" not in inspect(engine).get_table_names()
    finally:
        engine.dispose()

    with open_store(database_url) as store, store.begin() as session:
        assert store.revision() == head_revision()
        subscriber = session.scalars(select(Subscriber)).one()
        assert (subscriber.email, subscriber.name, subscriber.status) == (
            "ann@example.com",
            "Zoë",
            "active",
        )
        assert subscriber.created_at == datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
        delivery = session.scalars(select(Delivery)).one()
        assert (delivery.subscriber_id, delivery.status) == (subscriber.id, "sent")
        assert get_or_create_secret_key(store.engine) == "k"
        session.add(Delivery(subscriber_id=subscriber.id, email=subscriber.email, kind="confirm"))
        session.add(SignupAttempt(key="ann@example.com"))


def test_queued_confirmations_move_into_the_one_queue(database_url: str) -> None:
    """Upgrading from 0004: queued and sent confirmations become one-off deliveries of kind
    "confirm" (attempts and times kept); one for an address no longer on the list is
    dropped; APScheduler's old job table goes."""
    engine = make_engine(database_url)
    now = datetime(2026, 11, 25, 12, 0)
    try:
        upgrade(engine, "0004")
        with engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO subscribers (email, status, source, created_at) "
                    "VALUES ('ann@example.com', 'pending', 'form', :now)"
                ),
                {"now": now},
            )
            for recipient, status in (("ann@example.com", "queued"), ("gone@example.com", "sent")):
                connection.execute(
                    text(
                        "INSERT INTO outbound_mail (recipient, subject, body, status, attempts,"
                        " created_at) VALUES (:r, 'Confirm', :body, :status, 2, :now)"
                    ),
                    {"r": recipient, "body": b"wire bytes", "status": status, "now": now},
                )
            connection.execute(text("CREATE TABLE apscheduler_jobs (id VARCHAR(191))"))
    finally:
        engine.dispose()
    with open_store(database_url) as store, store.session() as session:
        [row] = session.scalars(select(Delivery)).all()
        assert (row.issue_id, row.email, row.status, row.attempts) == (
            None,
            "ann@example.com",
            "queued",
            2,
        )
        assert row.kind == "confirm" and row.created_at == now.replace(tzinfo=UTC)
        tables = set(inspect(store.engine).get_table_names())
        assert not {"outbound_mail", "apscheduler_jobs"} & tables


def test_the_fast_path_knows_the_newest_migration() -> None:
    """The revision every command compares against without importing Alembic is the newest
    migration shipped."""
    assert head_revision() == HEAD


def test_writes_from_many_threads_never_find_the_database_locked(store: Store) -> None:
    """Read-then-write transactions from sixteen threads at once all commit: on SQLite they
    take turns in the process instead of failing with "database is locked"."""
    from threads import at_once, errors

    def work(n: int) -> None:
        for i in range(10):
            with store.write(keys=[f"k{n}"]) as session:
                count = session.scalar(select(func.count()).select_from(Subscriber))
                session.add(_subscriber(f"t{n}-{i}-{count}@example.com"))

    assert errors(at_once(16, work)) == []
    with store.session() as session:
        assert session.scalar(select(func.count()).select_from(Subscriber)) == 160


def test_migrations_downgrade_and_upgrade_again(database_url: str) -> None:
    """Every migration can be undone down to an empty database and applied again."""
    with open_store(database_url) as store:
        with store.engine.connect() as connection:
            command.downgrade(alembic_config(connection), "base")
            connection.commit()
        assert not TABLES & set(inspect(store.engine).get_table_names())
        upgrade(store.engine)
        assert store.revision() == head_revision()


def test_a_database_newer_than_the_package_is_refused(database_url: str) -> None:
    """A schema from a newer version of newsletter is a one-line error, not a crash mid-way."""
    with open_store(database_url) as store, store.engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    with pytest.raises(ConfigError, match=r"revision 9999, newer than .*upgrade newsletter"):
        open_store(database_url)


def test_processes_starting_at_once_migrate_once(database_url: str) -> None:
    """Several processes opening a new database together all succeed (the migration is locked)."""
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def open_it() -> None:
        barrier.wait()
        try:
            open_store(database_url).close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with open_store(database_url) as store:
        assert store.revision() == head_revision()


def test_sqlite_is_set_up_for_sharing(tmp_path: Path) -> None:
    """The SQLite file and its folder are created, in WAL mode with a busy timeout, even on the
    connection that ran the migrations."""
    with open_store(f"sqlite:///{tmp_path / 'new' / 'folder' / 'newsletter.db'}") as store:
        assert (tmp_path / "new" / "folder" / "newsletter.db").is_file()
        with store.engine.connect() as connection:
            pragma = {
                name: connection.exec_driver_sql(f"PRAGMA {name}").scalar()
                for name in ("journal_mode", "busy_timeout", "foreign_keys", "synchronous")
            }
    assert pragma == {
        "journal_mode": "wal",
        "busy_timeout": 30000,
        "foreign_keys": 1,
        "synchronous": 1,
    }


def test_sqlite_folder_that_cannot_be_made_is_a_config_error(tmp_path: Path) -> None:
    """A database path under a regular file is a one-line error naming the variable."""
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"^NEWSLETTER_DATABASE_URL: cannot create .*file"):
        make_engine(f"sqlite:///{tmp_path / 'file' / 'newsletter.db'}")


def test_plain_postgresql_urls_use_psycopg_3() -> None:
    """postgresql:// and postgres:// URLs use psycopg 3, the driver that is installed."""
    for url in ("postgresql://u@db.example.com/n", "postgres://u@db.example.com/n"):
        engine = make_engine(url)
        assert engine.dialect.driver == "psycopg"
        engine.dispose()


def test_unreachable_database_is_a_one_line_error() -> None:
    """A database that refuses connections is one line naming the variable, without the password."""
    with pytest.raises(ConfigError) as caught:
        open_store("postgresql+psycopg://postgres:hunter2@127.0.0.1:1/newsletter")
    message = str(caught.value)
    assert message.startswith("NEWSLETTER_DATABASE_URL: cannot open ")
    assert "hunter2" not in message and "\n" not in message


def test_timestamps_are_aware_utc(store: Store) -> None:
    """A time stored in any zone comes back as the same instant in UTC, on both backends."""
    paris = datetime(2024, 3, 1, 9, 30, tzinfo=timezone(timedelta(hours=1)))
    with store.begin() as session:
        session.add(
            Subscriber(email="a@example.com", status="active", source="cli", created_at=paris)
        )
    with store.session() as session:
        stored = session.scalar(select(Subscriber.created_at))
    assert stored == paris and stored.tzinfo == UTC


def test_naive_timestamps_are_refused(store: Store) -> None:
    """A naive datetime is a programming error, refused before it reaches the database."""
    with pytest.raises(StatementError, match="naive datetime"), store.begin() as session:
        naive = datetime(2024, 1, 1)
        session.add(
            Subscriber(email="a@example.com", status="active", source="cli", created_at=naive)
        )


def test_unknown_status_is_refused_by_the_database(store: Store) -> None:
    """CHECK constraints keep statuses honest even for code that skips the library."""
    with pytest.raises(IntegrityError), store.begin() as session:
        session.add(_subscriber(status="vip"))


def test_one_delivery_per_issue_and_subscriber(store: Store) -> None:
    """The ledger refuses a second delivery row for the same issue and subscriber."""
    with store.begin() as session:
        subscriber, issue = _subscriber(), _issue()
        session.add_all([subscriber, issue])
        session.flush()
        session.add(
            Delivery(issue_id=issue.id, subscriber_id=subscriber.id, email=subscriber.email)
        )
    with pytest.raises(IntegrityError), store.begin() as session:
        session.add(
            Delivery(issue_id=issue.id, subscriber_id=subscriber.id, email=subscriber.email)
        )


def test_deleting_a_subscriber_deletes_their_deliveries(store: Store) -> None:
    """Foreign keys are enforced (on SQLite too): deliveries go with their subscriber."""
    with store.begin() as session:
        subscriber, issue = _subscriber(), _issue()
        session.add_all([subscriber, issue])
        session.flush()
        session.add(
            Delivery(issue_id=issue.id, subscriber_id=subscriber.id, email=subscriber.email)
        )
    with store.begin() as session:
        session.execute(text("DELETE FROM subscribers"))
    with store.session() as session:
        assert session.scalars(select(Delivery)).all() == []


def test_delivery_counts_cover_every_status(store: Store) -> None:
    """An issue's live counts list every delivery status, zero where none."""
    with store.begin() as session:
        issue = _issue()
        subscribers = [_subscriber(f"s{n}@example.com") for n in range(3)]
        session.add_all([issue, *subscribers])
        session.flush()
        for subscriber, status in zip(subscribers, ["sent", "sent", "queued"], strict=True):
            session.add(
                Delivery(
                    issue_id=issue.id,
                    subscriber_id=subscriber.id,
                    email=subscriber.email,
                    status=status,
                    sent_at=utcnow() if status == "sent" else None,
                )
            )
    with store.session() as session:
        counts = delivery_counts(session, issue.id)
    assert counts == {"queued": 1, "sending": 0, "sent": 2, "failed": 0, "bounced": 0, "skipped": 0}


def test_secret_key_is_made_once_and_shared(database_url: str) -> None:
    """The generated secret key is long, stored, and the same for every process that asks."""
    with open_store(database_url) as first, open_store(database_url) as second:
        key = get_or_create_secret_key(first.engine)
        assert len(key) >= 40
        assert get_or_create_secret_key(second.engine) == key


def _cli_error(runner: CliRunner, url: str, *args: str):
    """`newsletter ARGS` with NEWSLETTER_DATABASE_URL set to ``url``."""
    return runner.invoke(main, list(args), env={"NEWSLETTER_DATABASE_URL": url})


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("mysql://news:hunter2@db.example.com/news", "'mysql' is not supported"),
        ("foo://x", "'foo' is not supported"),
        ("postgresql+psycopg2://news:hunter2@localhost/news", "driver 'psycopg2' is not available"),
        ("oracle+cx_oracle://news:hunter2@localhost/news", "'oracle' is not supported"),
    ],
)
def test_a_database_url_this_tool_cannot_use_is_one_line(
    runner: CliRunner, url: str, says: str
) -> None:
    """Another database, or a driver that is not installed: one line naming
    NEWSLETTER_DATABASE_URL, without the password, exit 2; never a traceback."""
    result = _cli_error(runner, url, "subscribers", "list")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: NEWSLETTER_DATABASE_URL: ") and says in result.stderr
    assert result.stderr.count("\n") == 1 and "hunter2" not in result.stderr
    with pytest.raises(ConfigError, match=r"^NEWSLETTER_DATABASE_URL: "):
        make_engine(url)


def test_a_file_that_is_not_a_database_is_one_line(runner: CliRunner, clean_env: Path) -> None:
    """NEWSLETTER_DATABASE_URL pointing at a text file: one line saying so, exit 2, and the
    file is left as it was."""
    (clean_env / "notes.txt").write_text("my notes\n" * 100, "utf-8")
    for args in (["subscribers", "list"], ["subscribers", "add", "ada@example.com"]):
        result = _cli_error(runner, "sqlite:///notes.txt", *args)
        assert result.exit_code == 2
        assert result.stderr == (
            "error: NEWSLETTER_DATABASE_URL: sqlite:///notes.txt is not an SQLite database "
            "(file is not a database)\n"
        )
    assert (clean_env / "notes.txt").read_text("utf-8") == "my notes\n" * 100


def test_a_read_only_sqlite_uri_reads_and_refuses_writes_in_one_line(
    runner: CliRunner, clean_env: Path
) -> None:
    """A read-only SQLite URI (mode=ro) serves reads; the first write is one line naming
    the variable, exit 2, not a traceback, and nothing changes."""
    assert (
        _cli_error(runner, "sqlite:///list.db", "subscribers", "add", "ada@example.com").exit_code
        == 0
    )
    read_only = "sqlite:///file:list.db?mode=ro&uri=true"
    listed = _cli_error(runner, read_only, "subscribers", "list", "--format", "json")
    assert listed.exit_code == 0 and "ada@example.com" in listed.stdout
    refused = _cli_error(runner, read_only, "subscribers", "add", "bob@example.com")
    assert refused.exit_code == 2
    assert refused.stderr == (
        "error: NEWSLETTER_DATABASE_URL: sqlite:///file%3Alist.db?mode=ro&uri=true is "
        "read-only (attempt to write a readonly database)\n"
    )
    again = _cli_error(runner, "sqlite:///list.db", "subscribers", "list", "--format", "json")
    assert "bob@example.com" not in again.stdout
