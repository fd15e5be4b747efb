"""One-off mail: the signup confirmation, queued with the signup and built when it is sent.

A confirmation is queued (a delivery of kind "confirm" without an issue,
:func:`newsletter.ledger.queue_mail`) in the same transaction that makes the subscriber
pending, so a crash can lose neither half. The web request neither builds nor sends
mail: the worker builds it as it sends it, with the same engine as an issue's send.

The message carries nothing the visitor typed but the address itself: no name in the
subject, the ``To`` header or the body, so a bot cannot put its words in front of a
stranger. It is marked ``Auto-Submitted`` (RFC 3834), so vacation replies stay away.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from newsletter.config import Settings
from newsletter.ledger import Claimed, queue_mail
from newsletter.message import one_off
from newsletter.render import template_environment
from newsletter.store import Subscriber
from newsletter.tokens import Tokens, confirm_url


def confirmation_subject(settings: Settings) -> str:
    """The subject of a confirmation: the list's name only, never what the visitor typed."""
    return f"Confirm your subscription to {settings.list_name}"


def confirmation(
    settings: Settings, tokens: Tokens, email: str, message_id: str, delivery_token: str = ""
) -> bytes:
    """The double opt-in mail for ``email`` (already normalised) from the templates
    ``confirm_email.txt`` and ``confirm_email.html``, as wire bytes."""
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
        message_id=message_id,
        extra=("Auto-Submitted: auto-generated",),
        delivery_token=delivery_token,
    )


def queue_confirmations(session: Session, emails: Iterable[str]) -> int:
    """Queue a confirmation for each subscriber address in the caller's transaction."""
    wanted = list(emails)
    ids: dict[str, int] = {}
    for start in range(0, len(wanted), 1000):
        chunk = wanted[start : start + 1000]
        ids |= dict(
            session.execute(
                select(Subscriber.email, Subscriber.id).where(Subscriber.email.in_(chunk))
            ).all()
        )
    return queue_mail(session, "confirm", [(ids[email], email) for email in wanted])


def one_off_message(
    settings: Settings, tokens: Tokens, delivery: Claimed, message_id: str, delivery_token: str = ""
) -> bytes:
    """The message of a one-off delivery, by its kind, as wire bytes."""
    if delivery.kind == "confirm":
        return confirmation(settings, tokens, delivery.email, message_id, delivery_token)
    raise ValueError(f"no message of kind {delivery.kind!r}")
