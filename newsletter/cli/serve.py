"""`newsletter serve`: the signup web app on a production WSGI server."""

from __future__ import annotations

import click

from newsletter import server, web
from newsletter.cli import settings


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0: any free."
)
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=server.DEFAULT_WORKERS,
    show_default=True,
    help="Worker processes.",
)
@click.option(
    "--threads",
    type=click.IntRange(1, 64),
    default=server.DEFAULT_THREADS,
    show_default=True,
    help="Request threads per worker process.",
)
@click.option(
    "--print-form", is_flag=True, help="Print an HTML signup form for your blog, then exit."
)
def serve(host: str, port: int, workers: int, threads: int, print_form: bool) -> None:
    """Run the signup web app (gunicorn) and send confirmation emails in the background.

    Signup form, double opt-in confirmation and one-click unsubscribe, at
    NEWSLETTER_SITE_URL. Behind a reverse proxy, set NEWSLETTER_TRUSTED_PROXIES.
    SIGINT or SIGTERM stops it cleanly. The scheduler is `newsletter scheduler`.

    Example: newsletter serve --host 0.0.0.0 --port 8000
    """
    config = settings()
    if print_form:
        click.echo(web.embed_form(config), nl=False)
        return
    server.run(
        config,
        host,
        port,
        workers=workers,
        threads=threads,
        announce=lambda url: click.echo(f"serving {config.list_name} on {url}", err=True),
    )


def register(main: click.Group) -> None:
    """Add ``serve`` to the ``newsletter`` group."""
    main.add_command(serve)
