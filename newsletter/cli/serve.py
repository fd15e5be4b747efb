"""`newsletter serve`: the web app on a production WSGI server."""

from __future__ import annotations

import click

from newsletter.cli.common import settings


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0: any free."
)
@click.option(
    "--workers", type=click.IntRange(1, 64), default=1, show_default=True, help="Processes."
)
@click.option(
    "--threads",
    type=click.IntRange(1, 64),
    default=8,
    show_default=True,
    help="Request threads per process.",
)
@click.option(
    "--print-form", is_flag=True, help="Print an HTML signup form for your blog, then exit."
)
def serve(host: str, port: int, workers: int, threads: int, print_form: bool) -> None:
    """Run the web app (signup, confirm, unsubscribe) on gunicorn.

    It never sends mail itself: run `newsletter worker` beside it for confirmations.
    Behind a reverse proxy, set NEWSLETTER_TRUSTED_PROXIES. SIGINT or SIGTERM stops it.

    Example: newsletter serve --host 0.0.0.0 --port 8000
    """
    config = settings()
    if print_form:
        from newsletter.web import embed_form

        click.echo(embed_form(config), nl=False)
        return
    from newsletter import server

    server.run(
        config,
        host,
        port,
        workers=workers,
        threads=threads,
        announce=lambda url: click.echo(f"serving {config.list_name} on {url}", err=True),
    )
