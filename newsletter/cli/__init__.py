"""The ``newsletter`` command: thin click shells over the library.

Each command lives in a module of this package that is imported only when the command
runs (or its help is shown), and imports the library it calls only inside the command,
so ``newsletter --help`` starts at once. This module owns the group and the single
place where a ``NewsletterError`` becomes one line on stderr and an exit code.
"""

from __future__ import annotations

import importlib
import sys

import click

from newsletter.errors import NewsletterError

COMMANDS = {
    "render": "render:render",
    "check": "render:check",
    "send": "send:send",
    "issues": "issues:group",
    "archive": "archive:group",
    "subscribers": "subscribers:group",
    "schedule": "schedule:group",
    "worker": "worker:worker",
    "scheduler": "worker:scheduler",
    "serve": "serve:serve",
    "preview": "preview:preview",
    "db": "db:group",
    "bounces": "bounces:group",
    "doctor": "doctor:doctor",
}


class LazyGroup(click.Group):
    """A group whose commands are imported by name when first needed (click's LazyGroup),
    and that turns every ``NewsletterError`` into one line and its exit code."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attribute = COMMANDS[name].split(":")
        return getattr(importlib.import_module(f"{__name__}.{module}"), attribute)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except NewsletterError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="newsletter")
def main() -> None:
    """Render Markdown digests into email and deliver them to your subscribers.

    Settings come from NEWSLETTER_* variables or .env (see .env.example).
    """
