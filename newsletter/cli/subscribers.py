"""`newsletter subscribers …`: add, remove, list, import and export the list."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import click

from newsletter.cli.common import settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from newsletter.store import Store

CSV_FILE = click.Path(path_type=Path, dir_okay=False)
STATUSES = ("pending", "active", "unsubscribed", "bounced", "complained")
status_option = click.option(
    "--status", type=click.Choice(STATUSES), help="Only subscribers in this status."
)
resubscribe_option = click.option(
    "--resubscribe",
    is_flag=True,
    help="Subscribe again those who unsubscribed, bounced or complained (with their consent).",
)


@contextmanager
def _transaction() -> Iterator[Session]:
    """One transaction on the configured database: committed at the end, or nothing written."""
    from newsletter.store import open_store

    with open_store(settings()) as store, store.begin() as session:
        yield session


class _Confirmations:
    """With --pending: confirmation emails queued in the command's transaction (so they
    exist exactly when the pending rows do) and sent once it has committed."""

    def __init__(self, store: Store, pending: bool) -> None:
        self.store, self.config, self.pending = store, settings(), pending
        self.queued = 0

    def queue(self, session: Session, emails: list[str]) -> None:
        from newsletter.outbound import queue_confirmations

        if self.pending and emails:
            self.queued += queue_confirmations(session, emails)

    def send(self) -> None:
        """Send what is queued now; exit 1 if some of it must wait for a retry."""
        from newsletter.errors import DeliveryError
        from newsletter.sender import send_queued_mail

        if not self.queued:
            return
        try:
            report = send_queued_mail(self.store, self.config)
        except DeliveryError as exc:
            click.echo(
                f"error: {self.queued} confirmation email(s) not sent yet ({exc}); they stay"
                " queued and `newsletter worker` sends them",
                err=True,
            )
            sys.exit(1)
        click.echo(f"{report.sent} confirmation email{'' if report.sent == 1 else 's'} sent")
        for address, answer in report.failures:
            click.echo(f"error: confirmation email to {address} failed: {answer}", err=True)
        if report.open:
            reason = report.stopped_reason or "the server asked us to retry"
            click.echo(
                f"error: {report.open} email(s) not sent yet ({reason}); they stay queued"
                " and `newsletter worker` sends them",
                err=True,
            )
        if report.open or report.failures:
            sys.exit(1)


@click.group(name="subscribers")
def group() -> None:
    """Manage the subscriber list."""


@group.command()
@click.argument("email")
@click.option("--name", help="The subscriber's name, used in greetings.")
@click.option("--pending", is_flag=True, help="Add as pending: not mailed until they confirm.")
@resubscribe_option
def add(email: str, name: str | None, pending: bool, resubscribe: bool) -> None:
    """Add a subscriber, active unless --pending.

    Example: newsletter subscribers add ada@example.com --name "Ada Lovelace"
    """
    from newsletter import subscribers
    from newsletter.store import open_store

    status = "pending" if pending else "active"
    with open_store(settings()) as store:
        confirmations = _Confirmations(store, pending)
        with store.begin() as session:
            subscriber = subscribers.add(
                session, email, name, status=status, resubscribe=resubscribe
            )
            if subscriber.status == "pending":
                confirmations.queue(session, [subscriber.email])
        click.echo(f"{subscriber.email}: {subscriber.status}")
        confirmations.send()


@group.command()
@click.argument("email")
@click.option("--purge", is_flag=True, help="Delete them and every delivery naming them (GDPR).")
def remove(email: str, purge: bool) -> None:
    """Unsubscribe an address, or erase it with --purge.

    Without --purge the row stays, marked unsubscribed, so they are never mailed again.

    Example: newsletter subscribers remove ada@example.com --purge
    """
    from newsletter import subscribers

    with _transaction() as session:
        if purge:
            deleted = subscribers.purge(session, email)
            outcome = "purged (" + ", ".join(f"{t}: {n}" for t, n in deleted.items() if n) + ")"
        else:
            outcome = subscribers.remove(session, email).status
    click.echo(f"{subscribers.normalise_email(email)}: {outcome}")


@group.command(name="list")
@status_option
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json"]),
    default="table",
    show_default=True,
)
def list_(status: str | None, fmt: str) -> None:
    """List subscribers, every status unless --status narrows it.

    Example: newsletter subscribers list --status active --format json
    """
    from newsletter import subscriber_io, subscribers

    with _transaction() as session:
        if fmt == "csv":
            subscriber_io.export_csv(session, sys.stdout, status)
        elif fmt == "json":
            subscriber_io.export_json(session, sys.stdout, status)
        else:
            _table(subscribers.iter_records(session, status))


def _table(records: Iterator[dict]) -> None:
    """Aligned columns, streamed: the name goes last so no width has to be known in advance."""
    shown = 0
    for record in records:
        if shown == 0:
            click.echo(f"{'EMAIL':<40} {'STATUS':<12} {'SINCE':<10}  NAME")
        since = f"{record['created_at']:%Y-%m-%d}"
        row = f"{record['email']:<40} {record['status']:<12} {since:<10}  {record['name'] or ''}"
        click.echo(row.rstrip())
        shown += 1
    click.echo(f"{shown} subscriber{'' if shown == 1 else 's'}", err=True)


@group.command(name="import")
@click.argument("file", type=CSV_FILE)
@click.option("--pending", is_flag=True, help="Rows without a status become pending, not active.")
@resubscribe_option
def import_(file: Path, pending: bool, resubscribe: bool) -> None:
    """Import subscribers from a CSV file.

    The header row names the columns: `email` is required, `name` and `status` optional;
    rows without a status become active (pending with --pending).

    Exit 0 when every row was taken, 1 when some were refused (listed on stderr as
    FILE:LINE: reason; the valid rows are kept), 2 when the whole file is refused.

    Example: newsletter subscribers import subscribers/sample.csv
    """
    from newsletter import subscriber_io
    from newsletter.store import open_store

    status = "pending" if pending else "active"
    with open_store(settings()) as store:
        confirmations = _Confirmations(store, pending)  # a restored backup's pending: no mail
        with store.begin() as session:
            report = subscriber_io.import_csv(
                session, file, default_status=status, resubscribe=resubscribe
            )
            confirmations.queue(session, report.to_confirm)
        for refused in report.refused:
            click.echo(f"{file}:{refused.line}: {refused.message}", err=True)
        click.echo(f"{file}: {report.summary()}")
        confirmations.send()
    sys.exit(1 if report.refused else 0)


@group.command()
@click.argument(
    "file", type=click.Path(path_type=Path, dir_okay=False, allow_dash=True), required=False
)
@status_option
def export(file: Path | None, status: str | None) -> None:
    """Export subscribers as CSV, to FILE or stdout.

    Every field is written, and `subscribers import` reads the file back.

    Example: newsletter subscribers export backup.csv
    """
    from newsletter import subscriber_io

    with _transaction() as session:
        to_stdout = file is None or str(file) == "-"
        written = subscriber_io.export_csv(session, sys.stdout if to_stdout else file, status)
    if not to_stdout:
        click.echo(f"{file}: {written} subscribers")
