"""`newsletter schedule`: sends at a time, or on a cron; `newsletter worker` runs them."""

from __future__ import annotations

from pathlib import Path

import click

from newsletter.cli.common import DIGEST, settings


@click.group(name="schedule")
def group() -> None:
    """Schedule sends; `newsletter worker` runs them."""


@group.command()
@click.argument("digest", required=False, type=DIGEST)
@click.option("--at", "at", metavar="WHEN", help="ISO 8601 time, e.g. 2026-12-01T09:00.")
@click.option("--cron", metavar="EXPR", help='Cron line, e.g. "0 9 * * 1" (Mondays 09:00).')
@click.option(
    "--dir",
    "directory",
    type=click.Path(path_type=Path, file_okay=False),
    help="With --cron: send the newest digest in DIR never sent.",
)
def add(digest: Path | None, at: str | None, cron: str | None, directory: Path | None) -> None:
    """Schedule DIGEST at a time, or a folder of digests on a cron.

    Example: newsletter schedule add digests/2026-11-20-weekly-links.md --at 2026-12-01T09:00
    """
    from newsletter.schedules import add_cron, add_once, parse_when
    from newsletter.store import open_store

    config = settings()
    if digest is not None and at and not (cron or directory):
        when = parse_when(at, config)
        with open_store(config) as store:
            schedule_id = add_once(store, config, digest, when)
    elif cron and directory and not (digest or at):
        with open_store(config) as store:
            schedule_id = add_cron(store, config, cron, directory)
    else:
        raise click.UsageError("use either DIGEST --at WHEN, or --cron EXPR --dir DIR")
    click.echo(f"schedule {schedule_id} added; `newsletter worker` runs it")


@group.command(name="list")
def list_() -> None:
    """List schedules with their next run in local time.

    Example: newsletter schedule list
    """
    from newsletter.schedules import list_schedules
    from newsletter.store import open_store

    config = settings()
    with open_store(config) as store:
        views = list_schedules(store)
    if not views:
        click.echo("no schedules")
    for view in views:
        when = "-"
        if view.next_run:
            when = view.next_run.astimezone(config.tz).strftime("%Y-%m-%d %H:%M %Z")
        last = f"  last: {view.last_result}" if view.last_result else ""
        click.echo(f"{view.id:>4}  {view.status:<9}  next: {when:<22}  {view.what}{last}")


@group.command(name="cancel")
@click.argument("schedule_id", type=int)
def cancel_(schedule_id: int) -> None:
    """Cancel a schedule.

    Example: newsletter schedule cancel 3
    """
    from newsletter.schedules import cancel
    from newsletter.store import open_store

    with open_store(settings()) as store:
        cancel(store, schedule_id)
    click.echo(f"schedule {schedule_id} cancelled")
