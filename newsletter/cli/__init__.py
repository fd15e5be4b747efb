"""The ``newsletter`` command: thin click shells over the library.

Each submodule owns one command group; this module owns the group itself and the
single place where a ``NewsletterError`` becomes one line on stderr and an exit code.
"""

from __future__ import annotations

import sys

import click

from newsletter.config import Settings, load_settings
from newsletter.errors import NewsletterError


class _Group(click.Group):
    """A group that turns every ``NewsletterError`` into one line and its exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except NewsletterError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)


def settings(ctx: click.Context | None = None) -> Settings:
    """The validated settings for this invocation, read once and cached on the root context."""
    ctx = (ctx or click.get_current_context()).find_root()
    if not isinstance(ctx.obj, Settings):
        ctx.obj = load_settings()
    return ctx.obj


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="newsletter")
def main() -> None:
    """Render Markdown digests into email and deliver them to your subscribers.

    Settings come from NEWSLETTER_* variables or .env (see .env.example).
    """


from newsletter.cli import render as _render  # noqa: E402

_render.register(main)

from newsletter.cli import db as _db  # noqa: E402
from newsletter.cli import subscribers as _subscribers  # noqa: E402

_db.register(main)
_subscribers.register(main)

from newsletter.cli import issues as _issues  # noqa: E402
from newsletter.cli import send as _send  # noqa: E402

_send.register(main)
_issues.register(main)

from newsletter.cli import schedule as _schedule  # noqa: E402

_schedule.register(main)

from newsletter.cli import serve as _serve  # noqa: E402

_serve.register(main)

from newsletter.cli import preview as _preview  # noqa: E402

_preview.register(main)
