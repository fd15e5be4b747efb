"""The database: models, engine and sessions.

One SQLAlchemy schema serves the embedded SQLite file (the default,
``sqlite:///subscribers/newsletter.db``) and PostgreSQL (``postgresql+psycopg://…``).
The Alembic migrations in ``newsletter/migrations`` own the schema: :func:`open_store`
applies the missing ones (:mod:`newsletter.migrate`), so a new install and an upgraded
package both find the tables they expect, with their data kept.

Statuses, held by CHECK constraints:

    subscribers.status    pending       signed up, waiting for the confirmation click
                          active        gets every issue
                          unsubscribed  asked to stop; the row stays so they are never mailed again
                          bounced       the server said the address does not exist (5.1.x),
                                        a DSN said 5.x.x, or soft bounces ran over the limit
                          complained    marked an issue as spam (a feedback report, a webhook)
    issues.status         sending       created with its ledger (one delivery per active
                                        subscriber) in one transaction; unfinished, resumable
                          sent          every delivery reached a final state
                          cancelled     stopped by the user; its queued deliveries are skipped
    deliveries.status     queued → sending → sent | failed | bounced, or skipped; a delivery
                          belongs to an issue, or (``issue_id`` NULL) is one-off mail of a
                          ``kind`` (ONE_OFF_KINDS), built when it is sent

An issue's totals are columns, not derived from its deliveries, because purging a
subscriber deletes their delivery rows and an issue's history must not change with it;
:func:`delivery_counts` gives the live figures while it sends.

Timestamps are timezone-aware UTC on both backends (:class:`UtcDateTime`).
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Engine,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    insert,
    select,
    text,
    true,
)
from sqlalchemy.engine import URL, ExceptionContext, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, NoSuchModuleError
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)
from sqlalchemy.types import TypeDecorator

from newsletter.config import Settings
from newsletter.errors import ConfigError
from newsletter.migrate import current_revision, upgrade

SUBSCRIBER_STATUSES = ("pending", "active", "unsubscribed", "bounced", "complained")
STOPPED_STATUSES = ("unsubscribed", "bounced", "complained")
SOURCES = ("cli", "import", "form")
ISSUE_STATUSES = ("sending", "sent", "cancelled")
DELIVERY_STATUSES = ("queued", "sending", "sent", "failed", "bounced", "skipped")
ONE_OFF_KINDS = ("confirm",)  # what one-off mail can be: the worker builds it as it sends
BOUNCE_KINDS = ("hard", "soft", "complaint", "delivered")
BOUNCE_SOURCES = ("mailbox", "process", "ses", "postmark", "mailgun")
SCHEDULE_KINDS = ("once", "cron")
SCHEDULE_STATUSES = ("scheduled", "running", "done", "missed", "failed", "cancelled")

SECRET_KEY_SETTING = "secret_key"
DATABASE_VARIABLE = "NEWSLETTER_DATABASE_URL"
SUPPORTED_BACKENDS = ("sqlite", "postgresql")
# SQLite's error names (and extended names that start so) for what is wrong with the file.
_SQLITE_FILE_ERRORS = {
    "SQLITE_READONLY": "is read-only",
    "SQLITE_NOTADB": "is not an SQLite database",
    "SQLITE_CORRUPT": "is damaged",
    "SQLITE_CANTOPEN": "cannot be opened",
}
SQLITE_BUSY_SECONDS = 30
SQLITE_PRAGMAS = (
    f"busy_timeout={SQLITE_BUSY_SECONDS * 1000}",
    "journal_mode=WAL",
    "foreign_keys=ON",
    "synchronous=NORMAL",
)

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Row ids that may pass two billion on a busy list; SQLite needs INTEGER to autoincrement.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    """The current time, aware and in UTC, as every timestamp column expects."""
    return datetime.now(UTC)


def _one_of(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class UtcDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend: SQLite keeps no offset, so it stores UTC."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: use newsletter.store.utcnow()")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Subscriber(Base):
    """One address; ``email`` is normalised and lower-cased, so UNIQUE is case-insensitive."""

    __tablename__ = "subscribers"
    __table_args__ = (
        CheckConstraint(_one_of("status", SUBSCRIBER_STATUSES), name="status"),
        CheckConstraint(_one_of("source", SOURCES), name="source"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    name: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), index=True)
    source: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    confirmed_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    # When mail to them stopped: unsubscribed, bounced or complained.
    unsubscribed_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class Issue(Base):
    """One digest sent (or being sent) to the list."""

    __tablename__ = "issues"
    __table_args__ = (CheckConstraint(_one_of("status", ISSUE_STATUSES), name="status"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    digest_path: Mapped[str] = mapped_column(Text)
    # The file name alone: "already sent" compares names, wherever the file was sent from.
    digest_name: Mapped[str] = mapped_column(String(255), index=True)
    content_hash: Mapped[str] = mapped_column(String(64), index=True)
    subject: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="sending")
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    recipient_count: Mapped[int] = mapped_column(default=0, server_default="0")
    sent_count: Mapped[int] = mapped_column(default=0, server_default="0")
    failed_count: Mapped[int] = mapped_column(default=0, server_default="0")
    # The rendered email (JSON: subject, html, text, inline images) every delivery is made from.
    rendered: Mapped[bytes | None] = mapped_column(LargeBinary)
    # Its page in the web archive, made with it (none for an issue sent before the archive
    # existed whose email could not be read).
    archive_page: Mapped[ArchivePage | None] = relationship(
        cascade="all, delete-orphan", passive_deletes=True
    )


class ArchivePage(Base):
    """An issue's page in the web archive. Every send of one digest has the same ``slug``;
    the newest shows, if it is ``archived``. A table of its own, small columns first: the
    archive's lists scan it, and in SQLite a column behind an issue's rendered email is
    reached only by reading through the email."""

    __tablename__ = "archive_pages"
    # What is shown, and when that last changed, read from indexes alone.
    __table_args__ = (Index(None, "slug", "archived", "updated_at"), Index(None, "updated_at"))

    issue_id: Mapped[int] = mapped_column(
        ForeignKey("issues.id", ondelete="CASCADE"), primary_key=True
    )
    slug: Mapped[str] = mapped_column(String(120))
    archived: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    # When the page appeared or was last put in or taken out: the archive's Last-Modified.
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    preheader: Mapped[str | None] = mapped_column(Text)
    # What it shows (JSON, newsletter.archive's: title, content, images).
    content: Mapped[bytes] = mapped_column(LargeBinary)


class Delivery(Base):
    """The ledger of every message: one row per (issue, subscriber), so nobody gets an issue
    twice, and one row per one-off message (no issue; its ``kind`` says what to build)."""

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("issue_id", "subscriber_id"),
        CheckConstraint(_one_of("status", DELIVERY_STATUSES), name="status"),
        Index(None, "issue_id", "status"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    issue_id: Mapped[int | None] = mapped_column(ForeignKey("issues.id", ondelete="CASCADE"))
    subscriber_id: Mapped[int] = mapped_column(
        ForeignKey("subscribers.id", ondelete="CASCADE"), index=True
    )
    email: Mapped[str] = mapped_column(String(320))  # the address when the send started
    status: Mapped[str] = mapped_column(String(16), default="queued")
    attempts: Mapped[int] = mapped_column(default=0, server_default="0")
    last_answer: Mapped[str | None] = mapped_column(Text)
    message_id: Mapped[str | None] = mapped_column(String(255))
    claimed_by: Mapped[str | None] = mapped_column(Text)
    claimed_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    sent_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    created_at: Mapped[datetime | None] = mapped_column(UtcDateTime, default=utcnow)
    kind: Mapped[str | None] = mapped_column(String(16))  # one-off mail: "confirm"


class Schedule(Base):
    """A scheduled send: one digest at a time (``once``) or a folder on a cron (``cron``)."""

    __tablename__ = "schedules"
    __table_args__ = (
        CheckConstraint(_one_of("kind", SCHEDULE_KINDS), name="kind"),
        CheckConstraint(_one_of("status", SCHEDULE_STATUSES), name="status"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(8))
    digest_path: Mapped[str | None] = mapped_column(Text)
    directory: Mapped[str | None] = mapped_column(Text)
    cron: Mapped[str | None] = mapped_column(String(120))
    run_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    timezone: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="scheduled", index=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    # When a scheduler last took this schedule to run: the atomic claim between schedulers.
    last_run_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    last_issue_id: Mapped[int | None] = mapped_column(Integer)
    last_result: Mapped[str | None] = mapped_column(Text)
    # The sender running it now: another worker takes a run over only once that one is dead.
    claimed_by: Mapped[str | None] = mapped_column(Text)


class BounceEvent(Base):
    """A bounce, complaint or (when it ends a run of soft bounces) delivery, reported after
    the send by a DSN, a feedback report or a provider's webhook; ``event_key`` names the
    report, so the same one read twice is kept once."""

    __tablename__ = "bounce_events"
    __table_args__ = (
        CheckConstraint(_one_of("kind", BOUNCE_KINDS), name="kind"),
        CheckConstraint(_one_of("source", BOUNCE_SOURCES), name="source"),
        Index(None, "subscriber_id", "occurred_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    event_key: Mapped[str] = mapped_column(String(64), unique=True)
    subscriber_id: Mapped[int] = mapped_column(ForeignKey("subscribers.id", ondelete="CASCADE"))
    email: Mapped[str] = mapped_column(String(320))  # the address the report was about
    issue_id: Mapped[int | None] = mapped_column(
        ForeignKey("issues.id", ondelete="SET NULL"), index=True
    )
    delivery_id: Mapped[int | None] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"))
    kind: Mapped[str] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(String(16))
    status: Mapped[str | None] = mapped_column(String(32))  # 5.1.1, or a complaint's type
    detail: Mapped[str | None] = mapped_column(Text)  # the server's words
    occurred_at: Mapped[datetime] = mapped_column(UtcDateTime)
    received_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class Setting(Base):
    """Values the application generates once and keeps, such as the token secret key."""

    __tablename__ = "settings"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class SignupAttempt(Base):
    """One signup through the web form, keyed by address or client IP, for rate limiting."""

    __tablename__ = "signup_attempts"
    __table_args__ = (Index(None, "key", "attempted_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    key: Mapped[str] = mapped_column(String(320))
    attempted_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


# One statement for all keys; unnest keeps the sorted order, so two transactions that want
# some of the same keys take them in the same order and cannot deadlock.
_ADVISORY_LOCKS = text(
    "SELECT count(pg_advisory_xact_lock(hashtextextended(key, 0))) "
    "FROM unnest(CAST(:keys AS text[])) AS key"
)


class Store:
    """An engine and its session factory; close it (or use ``with``) to release connections."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sessionmaker = sessionmaker(engine, expire_on_commit=False)
        self.sqlite = engine.dialect.name == "sqlite"
        # SQLite has one writer at a time, and a writer that finds the file locked sleeps in
        # growing steps; threads of one process take turns here instead, woken at once.
        self.write_lock = threading.Lock() if self.sqlite else None

    def session(self) -> Session:
        """A session for reads, or for writes the caller commits itself."""
        return self.sessionmaker()

    def begin(self) -> AbstractContextManager[Session]:
        """A session in a transaction: committed when the block ends, rolled back on error."""
        return self.sessionmaker.begin()

    @contextmanager
    def write(self, keys: Iterable[str] = ()) -> Iterator[Session]:
        """A short transaction that reads and then writes, committed when the block ends.

        On SQLite it holds the write lock from the start (``BEGIN IMMEDIATE``, after this
        process's other threads), so what it read cannot change before it writes. On
        PostgreSQL rows lock themselves, and ``keys`` take transaction-scoped advisory locks
        (so two signups of one address run one after the other and a count-then-insert
        limit stays exact).
        """
        if self.write_lock is None:
            with self.begin() as session:
                wanted = sorted(set(keys))
                if wanted:
                    session.execute(_ADVISORY_LOCKS, {"keys": wanted})
                yield session
            return
        with self.write_lock, self.session() as session:
            session.connection().exec_driver_sql("BEGIN IMMEDIATE")
            try:
                yield session
            except BaseException:
                session.rollback()
                raise
            session.commit()

    def secret_key(self, configured: str | None) -> str:
        """The key that signs tokens: the configured one, or the one made once and kept in
        the database (see :func:`get_or_create_secret_key`)."""
        return configured or get_or_create_secret_key(self.engine)

    def revision(self) -> str | None:
        """The migration the database is at."""
        return current_revision(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def make_engine(url: str | URL) -> Engine:
    """An engine for ``url``: SQLite set up to be shared by processes; PostgreSQL on psycopg 3.

    A URL this tool cannot use (another database, a driver that is not installed) is a
    one-line ConfigError naming NEWSLETTER_DATABASE_URL, and so are the errors that are the
    configured database's rather than the code's (read-only, not a database at all),
    whenever they happen.
    """
    try:
        url = make_url(url)
    except ArgumentError:
        raise ConfigError(f"{DATABASE_VARIABLE}: {str(url)!r} is not a database URL") from None
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")  # psycopg2 is not a dependency
    shown = url.render_as_string(hide_password=True)
    if url.get_backend_name() not in SUPPORTED_BACKENDS:
        raise ConfigError(
            f"{DATABASE_VARIABLE}: {shown}: {url.get_backend_name()!r} is not supported; "
            "use sqlite:///PATH or postgresql+psycopg://USER@HOST/DATABASE"
        )
    try:
        if url.get_backend_name() != "sqlite":
            engine = create_engine(url, pool_pre_ping=True)
        else:
            _make_sqlite_parent(url)
            engine = create_engine(url)
            event.listen(engine, "connect", _sqlite_pragmas)
    except (NoSuchModuleError, ImportError) as exc:
        raise ConfigError(
            f"{DATABASE_VARIABLE}: {shown}: driver {url.get_driver_name()!r} is not available "
            f"({exc}); use sqlite:///PATH or postgresql+psycopg://USER@HOST/DATABASE"
        ) from None
    event.listen(engine, "handle_error", _database_errors)
    return engine


def _make_sqlite_parent(url: URL) -> None:
    if url.database and url.database != ":memory:" and not url.database.startswith("file:"):
        parent = Path(url.database).parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"{DATABASE_VARIABLE}: cannot create {parent}: {exc.strerror}"
            ) from None


def _database_errors(context: ExceptionContext) -> None:
    """Turn what is wrong with the configured SQLite file (read-only, not a database) into
    one line naming the variable, wherever it shows: often only at the first write."""
    error = context.original_exception
    name = getattr(error, "sqlite_errorname", "") if isinstance(error, sqlite3.Error) else ""
    problem = next((text for key, text in _SQLITE_FILE_ERRORS.items() if name.startswith(key)), "")
    if not problem:
        return
    engine = context.engine
    shown = engine.url.render_as_string(hide_password=True) if engine else "the database"
    raise ConfigError(f"{DATABASE_VARIABLE}: {shown} {problem} ({error})")


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    try:
        for pragma in SQLITE_PRAGMAS:
            _execute_when_unlocked(cursor, f"PRAGMA {pragma}")
    finally:
        cursor.close()


def _execute_when_unlocked(cursor: sqlite3.Cursor, statement: str) -> None:
    """Retry while the file is locked: switching a new file to WAL ignores the busy timeout."""
    deadline = time.monotonic() + SQLITE_BUSY_SECONDS
    while True:
        try:
            cursor.execute(statement)
            return
        except sqlite3.OperationalError as exc:
            busy = exc.sqlite_errorcode in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
            if not busy or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def open_store(source: Settings | str | URL) -> Store:
    """Connect to the configured database and bring its schema up to date."""
    url = source.database_url if isinstance(source, Settings) else source
    engine = make_engine(url)
    try:
        upgrade(engine)
    except DBAPIError as exc:  # cannot connect, or what answers is no database
        engine.dispose()
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        where = engine.url.render_as_string(hide_password=True)
        raise ConfigError(f"{DATABASE_VARIABLE}: cannot open {where}: {reason}") from None
    except BaseException:
        engine.dispose()
        raise
    return Store(engine)


def get_or_create_secret_key(engine: Engine) -> str:
    """The key that signs tokens when ``NEWSLETTER_SECRET_KEY`` is unset: made once, then shared.

    Every process (web app, scheduler, send) reads the same row, so links signed by one
    are accepted by the others and survive restarts.
    """
    query = select(Setting.value).where(Setting.key == SECRET_KEY_SETTING)
    with engine.begin() as connection:
        existing = connection.scalar(query)
    if existing:
        return existing
    try:
        with engine.begin() as connection:
            connection.execute(
                insert(Setting).values(key=SECRET_KEY_SETTING, value=secrets.token_urlsafe(32))
            )
    except IntegrityError:
        pass  # another process stored its key first; everyone uses that one
    with engine.begin() as connection:
        return connection.scalar(query)


def delivery_counts(session: Session, issue_id: int) -> dict[str, int]:
    """How many of an issue's deliveries are in each status, every status present."""
    rows = session.execute(
        select(Delivery.status, func.count())
        .where(Delivery.issue_id == issue_id)
        .group_by(Delivery.status)
    )
    return {status: 0 for status in DELIVERY_STATUSES} | {status: n for status, n in rows}
