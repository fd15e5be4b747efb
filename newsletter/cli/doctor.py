"""`newsletter doctor`: will mail land in the inbox? One line per check, and what to fix."""

from __future__ import annotations

import sys

import click

from newsletter.cli.common import settings

MARKS = {"ok": "✓", "warn": "!", "fail": "✗"}


def _line(name: str, status: str, message: str) -> None:
    click.echo(f"{MARKS[status]} {name}: {message}")


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
    from newsletter.doctor import FAIL, run_checks
    from newsletter.errors import NewsletterError
    from newsletter.sample import sample_issue, sample_message
    from newsletter.sender import send_test_copies
    from newsletter.store import open_store
    from newsletter.subscribers import normalise_email

    config = settings()
    address = normalise_email(send_test, "--send-test") if send_test else None
    with open_store(config) as store:
        sample = sample_message(store, config, address or "reader@example.com")
        checks = run_checks(config, sample)
        for check in checks:
            _line(check.name, check.status, check.message)
        failed = any(check.status == FAIL for check in checks)
        if address is not None:
            try:
                [(_, outcome)] = send_test_copies(store, config, sample_issue(config), [address])
            except NewsletterError as exc:
                _line("test message", "fail", f"not sent to {address}: {exc}")
                failed = True
            else:
                sent = outcome.status == "sent"
                verb = "sent" if sent else "not sent"
                _line(
                    "test message",
                    "ok" if sent else "fail",
                    f"{verb} to {address}: {outcome.answer}",
                )
                failed = failed or not sent
    sys.exit(1 if failed else 0)
