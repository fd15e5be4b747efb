"""`newsletter db upgrade`: create or upgrade the database schema explicitly."""

from __future__ import annotations

import click

from newsletter.cli.common import settings


@click.group(name="db")
def group() -> None:
    """Manage the database schema.

    Every command brings the schema up to date on first use; `db upgrade` does it explicitly.
    """


@group.command()
def upgrade() -> None:
    """Create the database or upgrade its schema to this version; data is kept.

    Example: newsletter db upgrade
    """
    from newsletter.migrate import head_revision
    from newsletter.store import open_store

    with open_store(settings()) as store:
        revision = store.revision()
        where = store.engine.url.render_as_string(hide_password=True)
    click.echo(f"{where}: schema at revision {revision} (newest: {head_revision()})")
