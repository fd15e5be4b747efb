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
def check(digests: tuple[Path, ...]) -> None:
    """Lint digests: one `FILE:LINE: message` line per finding.

    Exit 2 when a digest cannot be rendered, 1 when something must be fixed
    before sending, 0 when everything was fixed automatically.

    Example: newsletter check digests/*.md
    """
    from newsletter.digest import MUST_FIX
    from newsletter.errors import DigestError
    from newsletter.render import check_digest

    worst = 0
    for path in digests:
        try:
            findings = check_digest(path, settings())
        except DigestError as exc:
            click.echo(f"{exc}" if str(exc).startswith(str(path)) else f"{path}: {exc}")
            worst = 2
            continue
        for finding in findings:
            level = "error" if finding.severity == MUST_FIX else "warning"
            click.echo(f"{path}:{finding.line}: {level}: {finding.message}")
            if finding.severity == MUST_FIX:
                worst = max(worst, 1)
    sys.exit(worst)
