"""`newsletter render` and `newsletter check`: look at an email before anyone gets it."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from newsletter.cli.common import DIGEST, settings


@click.command()
@click.argument("digest", type=DIGEST)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write to FILE instead of stdout (written whole, or not at all).",
)
@click.option("--text", is_flag=True, help="Write the plain-text part instead of the HTML.")
def render(digest: Path, output: Path | None, text: bool) -> None:
    """Write the finished email as a sample subscriber would get it.

    Example: newsletter render digests/2024-05-03-weekly.md -o preview.html
    """
    from newsletter.digest import MUST_FIX, load_digest
    from newsletter.files import atomic_write
    from newsletter.render import SAMPLE_RECIPIENT, render_issue

    issue = render_issue(load_digest(digest), settings())
    for finding in issue.findings:
        if finding.severity == MUST_FIX:
            click.echo(f"warning: {digest}:{finding.line}: {finding.message}", err=True)
    html, plain = issue.personalize(SAMPLE_RECIPIENT)
    result = plain if text else html
    if output is None:
        click.echo(result, nl=False)
    else:
        atomic_write(output, result)


@click.command()
@click.argument("digests", nargs=-1, required=True, type=DIGEST)
@click.option("--links", "fetch_links", is_flag=True, help="Also fetch every link; dead ones fail.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="Seconds to wait for each link with --links.",
)
def check(digests: tuple[Path, ...], fetch_links: bool, timeout: float) -> None:
    """Lint digests: one `FILE:LINE: message` line per finding.

    Exit 2 when a digest cannot be rendered, 1 when something must be fixed
    before sending (with --links: a dead link), 0 when only warnings remain
    (fixed automatically, a link an earlier issue carried, an image without alt
    text, a permanent redirect).

    Example: newsletter check --links digests/*.md
    """
    from newsletter.checks import check_digests
    from newsletter.digest import MUST_FIX
    from newsletter.errors import ConfigError
    from newsletter.history import read_sent_links

    config = settings()
    try:
        sent = read_sent_links(config.database_url)
    except ConfigError as exc:
        click.echo(f"warning: {exc}; links of earlier issues not compared", err=True)
        sent = None
    worst = 0
    for result in check_digests(
        digests, config, sent=sent, fetch_links=fetch_links, timeout=timeout
    ):
        if result.error is not None:
            click.echo(str(result.error))  # a DigestError names its file and line
            worst = 2
            continue
        for finding in result.findings:
            level = "error" if finding.severity == MUST_FIX else "warning"
            click.echo(f"{result.path}:{finding.line}: {level}: {finding.message}")
            if finding.severity == MUST_FIX:
                worst = max(worst, 1)
    sys.exit(worst)
