"""`newsletter schedule` and `newsletter scheduler`: sends at a time, or on a cron."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from newsletter.cli import settings
from newsletter.cli.render import DIGEST
from newsletter.cli.send import stop_on_signals
from newsletter.errors import InputError
from newsletter.scheduling import (
    add_cron,
    add_once,
    cancel,
    list_schedules,
    parse_when,
    run_scheduler,
)
from newsletter.store import open_store


@click.group(name="schedule")
def group() -> None:
    """Schedule sends; `newsletter scheduler` runs them."""


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
    config = settings()
    if digest is not None and at and not (cron or directory):
        with open_store(config) as store:
            schedule_id = add_once(store, config, digest, parse_when(at, config))
    elif cron and directory and not (digest or at):
        with open_store(config) as store:
            schedule_id = add_cron(store, config, cron, directory)
    else:
        raise click.UsageError("use either DIGEST --at WHEN, or --cron EXPR --dir DIR")
    click.echo(f"schedule {schedule_id} added; `newsletter scheduler` runs it")


@group.command(name="list")
def list_() -> None:
    """List schedules with their next run in local time.

    Example: newsletter schedule list
    """
    config = settings()
    with open_store(config) as store:
        views = list_schedules(store, config)
    if not views:
        click.echo("no schedules")
    for view in views:
        when = view.next_run.strftime("%Y-%m-%d %H:%M %Z") if view.next_run else "-"
        last = f"  last: {view.last_result}" if view.last_result else ""
        click.echo(f"{view.id:>4}  {view.status:<9}  next: {when:<22}  {view.what}{last}")


@group.command(name="cancel")
@click.argument("schedule_id", type=int)
def cancel_(schedule_id: int) -> None:
    """Cancel a schedule.

    Example: newsletter schedule cancel 3
    """
    config = settings()
    with open_store(config) as store:
        cancel(store, config, schedule_id)
    click.echo(f"schedule {schedule_id} cancelled")


@click.command()
def scheduler() -> None:
    """Run scheduled sends until stopped (SIGINT/SIGTERM stop it cleanly).

    Run one per database; a second one by mistake never sends an issue twice.

    Example: newsletter scheduler
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    config = settings()
    with stop_on_signals() as stop:
        run_scheduler(config, stop)


def register(main: click.Group) -> None:
    """Add ``schedule`` and ``scheduler`` to the ``newsletter`` group."""
    main.add_command(group)
    main.add_command(scheduler)


__all__ = ["InputError", "register"]
