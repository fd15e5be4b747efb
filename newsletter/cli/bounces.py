"""`newsletter bounces`: read returned messages, fetch the bounce mailbox, list what came back."""

from __future__ import annotations

import json
import shutil
import sys

import click

from newsletter.cli.common import settings


@click.group(name="bounces")
def group() -> None:
    """Bounces and complaints reported after the send."""


@group.command()
@click.argument("files", nargs=-1, type=click.Path(dir_okay=True, allow_dash=True))
def process(files: tuple[str, ...]) -> None:
    """Read returned messages: one .eml per FILE, an mbox, or standard input (- or none).

    DSNs, feedback reports and servers' own bounce formats are recorded and suppress
    subscribers under the bounce policy; auto-replies and unrecognised messages are
    counted and skipped. A Postfix alias can pipe bounces here:
    bounces: "|newsletter bounces process -"

    Example: newsletter bounces process returned.mbox
    """
    from newsletter.bounce_mailbox import process_files
    from newsletter.store import open_store

    with open_store(settings()) as store:
        tally = process_files(store, settings(), list(files), sys.stdin.buffer)
    click.echo(tally.summary())


@group.command()
def fetch() -> None:
    """Read the bounce mailbox (NEWSLETTER_BOUNCE_MAILBOX) once, now.

    What was read is moved to the processed folder (or deleted); exit 1 when the
    mailbox cannot be reached or refuses the login.

    Example: newsletter bounces fetch
    """
    from newsletter.bounce_mailbox import fetch as fetch_mailbox
    from newsletter.store import open_store

    config = settings()
    with open_store(config) as store:
        tally, _ = fetch_mailbox(store, config)
    click.echo(tally.summary())


@group.command(name="list")
@click.option(
    "--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True
)
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
def list_(fmt: str, limit: int) -> None:
    """Recent bounces and complaints, newest first: address, kind, issue, when, the
    server's words.

    Example: newsletter bounces list --format json
    """
    from newsletter.bounces import recent
    from newsletter.store import open_store

    with open_store(settings()) as store, store.session() as session:
        rows = recent(session, limit)
    if fmt == "json":
        click.echo(json.dumps(rows, ensure_ascii=False, indent=2))
        return
    width = shutil.get_terminal_size().columns
    click.echo(f"{'WHEN':<16}  {'KIND':<9} {'ISSUE':>5}  {'ADDRESS':<32} WORDS")
    for row in rows:
        issue = str(row["issue"]) if row["issue"] is not None else "-"
        line = (
            f"{row['at'][:16].replace('T', ' '):<16}  {row['kind']:<9} {issue:>5}  "
            f"{row['email']:<32} {row['detail']}"
        )
        click.echo(line if len(line) <= width else line[: width - 1] + "…")
