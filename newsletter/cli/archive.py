"""`newsletter archive`: the archive of sent issues as static files."""

from __future__ import annotations

from pathlib import Path

import click

from newsletter.cli.common import settings


@click.group(name="archive")
def group() -> None:
    """The archive of sent issues (also served by `newsletter serve` at /archive)."""


@group.command()
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@click.option(
    "--base-url",
    metavar="URL",
    help="Where DIRECTORY will be published, for the feed's and previews' absolute links.",
)
def build(directory: Path, base_url: str | None) -> None:
    """Write the archive into DIRECTORY: index.html, feed.xml and a folder per issue.

    Links between the files are relative, so the folder works anywhere (a blog's build,
    or straight from disk). Only files whose content changed are rewritten, and files an
    earlier build wrote for issues no longer in the archive are removed.

    Example: newsletter archive build site/static/newsletter --base-url https://blog.example.com/newsletter/
    """
    from newsletter.archive import Archive
    from newsletter.errors import InputError
    from newsletter.store import open_store

    if base_url is not None and not base_url.startswith(("https://", "http://")):
        raise InputError(f"--base-url: {base_url!r} is not an http(s) URL")
    with open_store(settings()) as store:
        report = Archive(store, settings()).build(directory, base_url)
    click.echo(
        f"{report.issues} issue(s) in {directory}: {len(report.written)} file(s) written, "
        f"{report.unchanged} unchanged, {len(report.removed)} removed"
    )
