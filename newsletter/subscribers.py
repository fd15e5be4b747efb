"""Subscribers: validate, add, confirm, unsubscribe, purge and list them.

CSV import and export, which apply the same rules in bulk, live in ``subscriber_io``.

Every function works inside the caller's transaction (``with store.begin() as session:``)
and never commits: the web app can create a pending subscriber and queue their
confirmation mail as one unit, and a refused import leaves the database as it was.

Status changes follow one rule (:func:`next_status`): anyone may move towards less
mail (unsubscribed, bounced, complained), and who stopped keeps the first reason;
pending may become active; active never goes back to pending; and someone who stopped
mail is only subscribed again on an explicit ``resubscribe``, because an old list
re-imported must not undo an unsubscribe.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from email_validator import EmailNotValidError, validate_email
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from newsletter.errors import InputError, InvalidField
from newsletter.store import (
    SOURCES,
    STOPPED_STATUSES,
    SUBSCRIBER_STATUSES,
    Delivery,
    SignupAttempt,
    Subscriber,
    utcnow,
)

# What export writes and import reads back; the internal id is not part of a subscriber's data.
FIELDS = ("email", "name", "status", "source", "created_at", "confirmed_at", "unsubscribed_at")
NAME_MAX = 200
_FORBIDDEN_IN_NAMES = {"Cc", "Zl", "Zp"}  # control characters, line and paragraph separators
# Bidirectional controls: they make a name display as something else than it is.
_BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)


def normalise_email(raw: str, field: str = "email") -> str:
    """The one spelling stored for an address: validated, Unicode-normalised, lower-cased.

    Lower-cased as a whole because every provider treats the local part
    case-insensitively, and one spelling per person is what makes UNIQUE mean one row each.
    """
    value = (raw or "").strip()
    if not value:
        raise InvalidField(field, "empty", "it is empty")
    try:
        checked = validate_email(value, check_deliverability=False)
    except EmailNotValidError as exc:
        reason = str(exc).rstrip(".")
        raise InvalidField(field, f"{value!r} is not a valid address ({reason})", reason) from None
    return checked.normalized.lower()


def validate_name(raw: str | None, field: str = "name") -> str | None:
    """A display name safe to put in a header: no line breaks or control characters."""
    value = (raw or "").strip()
    for char in value:
        if unicodedata.category(char) in _FORBIDDEN_IN_NAMES or char in _BIDI_CONTROLS:
            raise InvalidField(
                field,
                f"contains a line break or control character (U+{ord(char):04X})",
                "has a line break or control character",
            )
    if len(value) > NAME_MAX:
        raise InvalidField(field, f"longer than {NAME_MAX} characters", "is too long")
    return value or None


def validate_status(raw: str, field: str = "status") -> str:
    """One of the subscriber statuses, whatever the case it was typed in."""
    value = (raw or "").strip().lower()
    if value not in SUBSCRIBER_STATUSES:
        raise InputError(f"{field}: {raw!r} is not one of {', '.join(SUBSCRIBER_STATUSES)}")
    return value


def next_status(current: str, wanted: str, resubscribe: bool = False) -> str | None:
    """The status a subscriber ends in when asked to become ``wanted``; None when refused."""
    if current in STOPPED_STATUSES:
        if wanted in STOPPED_STATUSES:
            return current  # the first reason, and its date, stay
        return wanted if resubscribe else None
    if wanted in STOPPED_STATUSES:
        return wanted
    return "active" if current == "active" else wanted


def status_changes(current: str | None, new: str, now: datetime) -> dict[str, Any]:
    """Column values for moving to ``new`` (``current`` None: a new row), timestamps included.

    Empty when nothing changes. ``unsubscribed_at`` records when mail stopped, for any
    stopped status; ``confirmed_at`` the latest consent.
    """
    if new == current:
        return {}
    changes: dict[str, Any] = {"status": new}
    if new == "active":
        changes |= {"confirmed_at": now, "unsubscribed_at": None}
    elif new == "pending":
        changes["unsubscribed_at"] = None
    else:
        changes["unsubscribed_at"] = now
    return changes


def _move(subscriber: Subscriber, new: str, now: datetime) -> None:
    for column, value in status_changes(subscriber.status, new, now).items():
        setattr(subscriber, column, value)


def get(session: Session, email: str) -> Subscriber | None:
    """The subscriber with this address, however it is capitalised."""
    address = normalise_email(email)
    return session.scalar(select(Subscriber).where(Subscriber.email == address))


def _require(session: Session, email: str) -> Subscriber:
    subscriber = get(session, email)
    if subscriber is None:
        raise InputError(f"{normalise_email(email)} is not a subscriber")
    return subscriber


def add(
    session: Session,
    email: str,
    name: str | None = None,
    *,
    status: str = "active",
    source: str = "cli",
    resubscribe: bool = False,
) -> Subscriber:
    """Add a subscriber, or activate a pending one; never silently re-subscribe a stopped one."""
    address, name, status = normalise_email(email), validate_name(name), validate_status(status)
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, not {source!r}")
    now = utcnow()
    existing = get(session, address)
    if existing is None:
        subscriber = Subscriber(email=address, name=name, source=source, created_at=now)
        _move(subscriber, status, now)
        session.add(subscriber)
        try:
            session.flush()
        except IntegrityError:
            raise InputError(f"{address} is already a subscriber") from None
        return subscriber
    new = next_status(existing.status, status, resubscribe)
    if new is None:
        since = f" since {existing.unsubscribed_at:%Y-%m-%d}" if existing.unsubscribed_at else ""
        raise InputError(
            f"{address} is {existing.status}{since}; subscribe them again only with their "
            "consent (--resubscribe)"
        )
    if new == existing.status:
        raise InputError(f"{address} is already a subscriber ({existing.status})")
    _move(existing, new, now)
    existing.name = name or existing.name
    return existing


def confirm(session: Session, subscriber_id: int) -> Subscriber:
    """Activate a pending subscriber; a stale link never re-subscribes someone who left."""
    subscriber = session.get(Subscriber, subscriber_id)
    if subscriber is None:
        raise InputError(f"no subscriber with id {subscriber_id}")
    if subscriber.status == "pending":
        _move(subscriber, "active", utcnow())
    return subscriber


def unsubscribe(session: Session, subscriber_id: int, status: str = "unsubscribed") -> Subscriber:
    """Stop all mail to a subscriber (``status``: unsubscribed, bounced or complained).

    The row stays, so no later import or signup mails them without their consent;
    an already stopped subscriber keeps the first reason and its date.
    """
    if status not in STOPPED_STATUSES:
        raise ValueError(f"status must be one of {STOPPED_STATUSES}, not {status!r}")
    subscriber = session.get(Subscriber, subscriber_id)
    if subscriber is None:
        raise InputError(f"no subscriber with id {subscriber_id}")
    _move(subscriber, next_status(subscriber.status, status), utcnow())
    return subscriber


def remove(session: Session, email: str) -> Subscriber:
    """Unsubscribe an address (the ``subscribers remove`` command)."""
    return unsubscribe(session, _require(session, email).id)


def purge(session: Session, email: str) -> dict[str, int]:
    """Erase every trace of an address (GDPR): the subscriber, their deliveries (mail queued
    for them included) and their signup attempts. Returns the rows deleted per table; issue
    totals stay as sent.
    """
    address = normalise_email(email)
    subscriber = get(session, address)
    deleted = {"subscribers": 0, "deliveries": 0}
    if subscriber is not None:
        deleted["deliveries"] = session.execute(
            delete(Delivery).where(Delivery.subscriber_id == subscriber.id)
        ).rowcount
        deleted["subscribers"] = session.execute(
            delete(Subscriber).where(Subscriber.id == subscriber.id)
        ).rowcount
    deleted["signup_attempts"] = session.execute(
        delete(SignupAttempt).where(SignupAttempt.key == address)
    ).rowcount
    if not any(deleted.values()):
        raise InputError(f"{address} is not a subscriber")
    return deleted


def count(session: Session, status: str | None = None) -> int:
    """How many subscribers there are, in ``status`` or in all."""
    query = select(func.count()).select_from(Subscriber)
    if status is not None:
        query = query.where(Subscriber.status == validate_status(status))
    return session.scalar(query) or 0


def iter_records(session: Session, status: str | None = None) -> Iterator[dict[str, Any]]:
    """Every subscriber as a dict of :data:`FIELDS`, oldest first, streamed in batches.

    Streams (a server-side cursor on PostgreSQL), so listing a large list takes
    the memory of one batch, not of the list.
    """
    query = select(*(getattr(Subscriber, f) for f in FIELDS)).order_by(Subscriber.id)
    if status is not None:
        query = query.where(Subscriber.status == validate_status(status))
    for row in session.execute(query.execution_options(yield_per=1000)):
        yield row._asdict()
