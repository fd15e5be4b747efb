"""Schema migrations: applied on first use, safely when several processes start at once.

The Alembic scripts live in ``newsletter/migrations`` (shipped inside the package, so
an installed copy can upgrade a user's database); ``env.py`` there runs them on the
connection passed in by :func:`upgrade`. Migrations never import the models: each
describes the schema as it was when written.

Alembic is imported only when a migration has to run: every command opens the store,
and a database already at :data:`HEAD` is recognised by one query.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError

from newsletter.errors import ConfigError

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
HEAD = "0006"  # the newest migration in MIGRATIONS_DIR (a test holds them equal)
_MIGRATION_LOCK = 0x6E6C6462  # any constant: the PostgreSQL advisory lock held while migrating


@cache
def _scripts() -> ScriptDirectory:
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(MIGRATIONS_DIR))


def head_revision() -> str:
    """The newest migration this version of the package ships."""
    return _scripts().get_current_head()


def alembic_config(connection: Connection) -> Config:
    """An Alembic configuration whose ``env.py`` runs on ``connection``.

    New migrations: ``alembic.command.revision(alembic_config(conn), "message",
    autogenerate=True)`` against a database at the newest revision.
    """
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply the migrations up to ``revision``; safe when several processes start at once.

    The check and the migrations run under a lock (``BEGIN IMMEDIATE`` on SQLite, an
    advisory lock on PostgreSQL), so the second process waits and then finds nothing to do.
    """
    if revision == "head" and _stored_revision(engine) == HEAD:
        return
    from alembic import command

    target = head_revision() if revision == "head" else revision
    with engine.connect() as connection:
        if _current_revision(connection) == target:
            return
        connection.rollback()
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            # SQLite migrations copy tables; with foreign keys on, dropping the old
            # subscribers table would cascade into deliveries.
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
        try:
            _lock(connection)
            if _current_revision(connection) != target:
                command.upgrade(alembic_config(connection), revision)
            connection.commit()
        except BaseException:
            connection.rollback()
            raise
        finally:
            if sqlite:
                connection.exec_driver_sql("PRAGMA foreign_keys=ON")
                connection.commit()


def _stored_revision(engine: Engine) -> str | None:
    """The revision in ``alembic_version`` by plain SQL; None when it cannot be read this
    way (a new database, or one that does not answer: Alembic's path says why)."""
    try:
        with engine.connect() as connection:
            return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
    except DBAPIError:
        return None


def _current_revision(connection: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    current = MigrationContext.configure(connection).get_current_revision()
    if current is not None and current not in {s.revision for s in _scripts().walk_revisions()}:
        raise ConfigError(
            f"NEWSLETTER_DATABASE_URL: the database is at revision {current}, newer than this "
            f"version of newsletter knows ({head_revision()}); upgrade newsletter"
        )
    return current


def _lock(connection: Connection) -> None:
    if connection.dialect.name == "sqlite":
        connection.exec_driver_sql("BEGIN IMMEDIATE")
    elif connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})


def current_revision(engine: Engine) -> str | None:
    """The migration the database is at; None for a new database."""
    with engine.connect() as connection:
        return _current_revision(connection)
