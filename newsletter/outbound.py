"""One-off mail: the signup confirmation, built when the signup happens and queued with it.

A confirmation is queued (a delivery without an issue, :func:`newsletter.ledger.queue_mail`)
in the same transaction that makes the subscriber pending, so a crash can lose neither
half, and a web request never waits on SMTP: the worker sends it, with the same engine
as an issue's send.

The message carries nothing the visitor typed but the address itself: no name in the
subject, the ``To`` header or the body, so a bot cannot put its words in front of a
stranger. It is marked ``Auto-Submitted`` (RFC 3834), so vacation replies stay away.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from newsletter.config import Settings
from newsletter.ledger import queue_mail
from newsletter.message import one_off
from newsletter.render import template_environment
from newsletter.store import Subscriber
from newsletter.tokens import Tokens, confirm_url


def confirmation_subject(settings: Settings) -> str:
    """The subject of a confirmation: the list's name only, never what the visitor typed."""
    return f"Confirm your subscription to {settings.list_name}"


def confirmation(settings: Settings, tokens: Tokens, email: str) -> tuple[bytes, str]:
    """The double opt-in mail for ``email`` (already normalised) from the templates
    ``confirm_email.txt`` and ``confirm_email.html``: wire bytes and Message-ID."""
    values = {
        "list_name": settings.list_name,
        "site_url": settings.site_url,
        "expires_days": tokens.confirm_max_age // 86400,
        "email": email,
        "confirm_url": confirm_url(settings.site_url, tokens.confirm_token(email)),
    }
    env = template_environment(settings.templates_dir)
    return one_off(
        from_address=settings.from_address,
        reply_to=settings.reply_to,
        to=email,
        subject=confirmation_subject(settings),
        text=env.get_template("confirm_email.txt").render(values),
        html=env.get_template("confirm_email.html").render(values),
        extra=("Auto-Submitted: auto-generated",),
    )


def queue_confirmations(
    session: Session, settings: Settings, tokens: Tokens, emails: Iterable[str]
) -> list[int]:
    """Queue a confirmation for each subscriber address in the caller's transaction."""
    wanted = list(emails)
    ids = dict(
        session.execute(
            select(Subscriber.email, Subscriber.id).where(Subscriber.email.in_(wanted))
        ).all()
    )
    queued = []
    for email in wanted:
        body, message_id = confirmation(settings, tokens, email)
        queued.append(queue_mail(session, ids[email], email, body, message_id))
    return queued
