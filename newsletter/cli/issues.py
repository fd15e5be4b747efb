"""`newsletter issues`: what was sent, what is sending, and how it went."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table

from newsletter.cli import settings
from newsletter.errors import InputError
from newsletter.ledger import describe_issues, failed_deliveries
from newsletter.store import open_store

COLUMNS = (
    "id",
    "status",
    "sent",
    "failed",
    "queued",
    "skipped",
    "recipients",
    "created_at",
    "subject",
)


@click.group(name="issues")
def group() -> None:
    """Issues with their status and delivery counts."""


@group.command(name="list")
@click.option(
    "--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True
)
def list_(fmt: str) -> None:
    """List every issue, newest first, with queued, sent and failed counts.

    Example: newsletter issues list --format json
    """
    with open_store(settings()) as store, store.session() as session:
        rows = describe_issues(session)
    if fmt == "json":
        click.echo(json.dumps(rows, ensure_ascii=False, indent=2))
        return
    table = Table(*COLUMNS)
    for row in rows:
        table.add_row(*(str(row[column]) for column in COLUMNS))
    Console().print(table)


@group.command()
@click.argument("issue_id", type=int)
def show(issue_id: int) -> None:
    """Show one issue: counts, and the addresses that failed with the server's answer.

    Example: newsletter issues show 3
    """
    with open_store(settings()) as store, store.session() as session:
        rows = describe_issues(session, issue_id)
        if not rows:
            raise InputError(f"issue {issue_id}: no such issue")
        failures = failed_deliveries(session, issue_id)
    for key, value in rows[0].items():
        click.echo(f"{key + ':':13} {value}")
    for email, status, answer in failures:
        click.echo(f"  {status}: {email}: {answer}")


def register(main: click.Group) -> None:
    """Add ``issues`` to the ``newsletter`` group."""
    main.add_command(group)
