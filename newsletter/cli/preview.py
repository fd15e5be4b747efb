"""`newsletter preview`: watch a digest render as you write it."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import click

from newsletter.cli.common import settings, stop_on_signals


@click.command()
@click.argument("digest", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Port on 127.0.0.1 [default: 8001, or a free one when it is taken; 0: any free].",
)
@click.option("--no-open", is_flag=True, help="Do not open a browser; just print the URL.")
def preview(digest: Path, port: int | None, no_open: bool) -> None:
    """Serve a live preview of DIGEST on 127.0.0.1: the email at 600 px, at 375 px,
    in dark mode and as plain text, with what `check` finds.

    The page reloads by itself when the digest, an image beside it or a template
    changes. Ctrl-C stops it.

    Example: newsletter preview digests/2026-11-20-weekly-links.md --port 8001
    """
    from functools import partial

    from newsletter.checks import offline_findings
    from newsletter.errors import ConfigError
    from newsletter.history import read_sent_links
    from newsletter.preview import open_preview

    config = settings()
    try:
        sent = read_sent_links(config.database_url)
    except ConfigError as exc:
        click.echo(f"warning: {exc}; links of earlier issues not compared", err=True)
        sent = None
    server = open_preview(
        digest, config, port=port, extra_findings=partial(offline_findings, sent=sent)
    )
    serving = threading.Thread(target=server.serve_forever, name="preview-server", daemon=True)
    try:
        with stop_on_signals() as stop:
            serving.start()
            click.echo(f"previewing {digest} at {server.url} (Ctrl-C to stop)")
            if not no_open:
                _open_browser(server.url)
            stop.wait()
        server.shutdown()
        click.echo("preview stopped", err=True)
    finally:
        server.close()


def _open_browser(url: str) -> None:
    """Open the page unless no browser can show it (a console without a display would get
    a text browser that takes over the terminal)."""
    import webbrowser

    graphical = os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    if sys.platform.startswith("linux") and not graphical and not os.environ.get("BROWSER"):
        click.echo(f"no display to open a browser on: open {url} yourself", err=True)
        return
    threading.Thread(target=webbrowser.open, args=(url,), daemon=True).start()
