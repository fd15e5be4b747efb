"""`newsletter issues`: what was sent, what is sending, and how it went."""

from __future__ import annotations

import json
import shutil

import click

from newsletter.cli.common import settings


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
    from newsletter.ledger import describe_issues
    from newsletter.store import open_store

    with open_store(settings()) as store, store.session() as session:
        rows = describe_issues(session)
    if fmt == "json":
        click.echo(json.dumps(rows, ensure_ascii=False, indent=2))
        return
    width = shutil.get_terminal_size().columns
    click.echo(
        f"{'ID':>4} {'STATUS':<9} {'SENT':>7} {'FAILED':>6} {'QUEUED':>6} {'CREATED':<16}  SUBJECT"
    )
    for row in rows:
        line = (
            f"{row['id']:>4} {row['status']:<9} {row['sent']:>7} {row['failed']:>6} "
            f"{row['queued']:>6} {row['created_at'][:16].replace('T', ' '):<16}  {row['subject']}"
        )
        click.echo(line if len(line) <= width else line[: width - 1] + "…")


@group.command()
@click.argument("issue_id", type=int)
def show(issue_id: int) -> None:
    """Show one issue: counts, bounces and complaints reported after the send, and the
    addresses that failed with the server's answer.

    Example: newsletter issues show 3
    """
    from newsletter.bounces import issue_bounces
    from newsletter.errors import InputError
    from newsletter.ledger import describe_issues, failed_deliveries
    from newsletter.store import open_store

    with open_store(settings()) as store, store.session() as session:
        rows = describe_issues(session, issue_id)
        if not rows:
            raise InputError(f"issue {issue_id}: no such issue")
        failures = failed_deliveries(session, issue_id)
        returned = issue_bounces(session, issue_id, rows[0]["sent"])
    for key, value in rows[0].items():
        click.echo(f"{key + ':':13} {value}")
    for label, count in (
        ("hard bounces", returned.hard),
        ("soft bounces", returned.soft),
        ("complaints", returned.complaints),
    ):
        click.echo(f"{label + ':':13} {count} ({returned.rate(count):.2%} of sent)")
    if returned.complaint_warning:
        click.echo(f"warning: {returned.complaint_warning}", err=True)
    for email, status, answer in failures:
        click.echo(f"  {status}: {email}: {answer}")


@group.command(name="archive")
@click.argument("issue_id", type=int)
@click.option("--on/--off", "shown", default=None, help="Show the issue's page, or take it out.")
def archive_(issue_id: int, shown: bool | None) -> None:
    """Put an issue's page in the web archive or take it out; without --on/--off, tell.

    Every send of the same digest shares one page, so the choice holds for all of them.

    Example: newsletter issues archive 3 --off
    """
    from newsletter.archive import set_archived
    from newsletter.permalink import archive_url
    from newsletter.store import open_store

    config = settings()
    with open_store(config) as store:
        placed = set_archived(store, issue_id, shown)
    url = archive_url(config.site_url, placed.slug)
    if not placed.archived:
        click.echo(f"issue {issue_id}: not in the archive ({url} answers 404)")
    elif placed.shown_by is None:
        click.echo(f"issue {issue_id}: archived, but not shown: it never went to subscribers")
    elif placed.shown_by != issue_id:
        click.echo(
            f"issue {issue_id}: in the archive at {url} (as issue {placed.shown_by}, "
            "a later send of the same digest)"
        )
    else:
        click.echo(f"issue {issue_id}: in the archive at {url}")
    if not config.archive:
        click.echo("note: NEWSLETTER_ARCHIVE is off, so the archive shows nothing", err=True)
