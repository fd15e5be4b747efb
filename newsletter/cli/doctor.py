"""`newsletter doctor`: will mail land in the inbox? One line per check, and what to fix."""

from __future__ import annotations

import sys

import click

from newsletter.cli.common import settings

MARKS = {"ok": "✓", "warn": "!", "fail": "✗"}


def _show(check) -> bool:
    """Print one check as its line (as soon as it is done); True if it failed."""
    click.echo(f"{MARKS[check.status]} {check.name}: {check.message}")
    return check.status == "fail"


@click.command()
@click.option(
    "--send-test",
    "send_test",
    metavar="ADDR",
    help="Also send a signed sample issue to ADDR (look at it in that inbox).",
)
def doctor(send_test: str | None) -> None:
    """Check what decides whether mail lands in the inbox: SPF, DKIM, DMARC and its
    alignment, the SMTP login and TLS, one-click unsubscribe, the site URL, the bounce
    address. Exit 0 when nothing must be fixed (warnings allowed), 1 otherwise.

    Example: newsletter doctor --send-test me@example.com
    """
    from newsletter.doctor import run_checks
    from newsletter.sample import sample_message, send_sample
    from newsletter.store import open_store
    from newsletter.subscribers import normalise_email

    config = settings()
    address = normalise_email(send_test, "--send-test") if send_test else None
    failed = False
    with open_store(config) as store:
        sample = sample_message(store, config, address or "reader@example.com")
        for check in run_checks(config, sample):
            failed = _show(check) or failed
        if address is not None:
            failed = _show(send_sample(store, config, address)) or failed
    sys.exit(1 if failed else 0)
