"""What the signup web app does to the list: sign up, confirm and unsubscribe by token.

A signup form on the open web is a tool for bots to make the list mail strangers, so:

- the answer is the same whether the address was new, pending, active or stopped, and
  :func:`signup`'s return value is for logs and tests, never for the visitor;
- a filled honeypot field (``website``) creates nothing and sends nothing;
- each client IP (IPv6: its /64) may sign up :data:`PER_IP_LIMIT` times per
  :data:`PER_IP_WINDOW` (:class:`TooManySignups`, HTTP 429), and each address gets at
  most :data:`PER_ADDRESS_LIMIT` confirmation mails per :data:`PER_ADDRESS_WINDOW` (more
  signups get the usual answer and no mail); both counts live in the database, so they
  hold across processes and restarts;
- the confirmation mail carries nothing the visitor typed except the address itself;
- who is active gets no mail again, and who bounced or complained stays so; who
  unsubscribed and fills in the form again gives fresh consent: pending, and a
  confirmation;
- a signup never changes the name of someone already on the list: an unconfirmed form
  must not rename a stranger in every later issue's ``To:`` and greeting.

Each function is one short write transaction (:meth:`newsletter.store.Store.write`);
the confirmation is built before it and queued inside it, with the subscriber change.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy import Connection, and_, bindparam, delete, func, insert, or_, select, update
from sqlalchemy.orm import Session

from newsletter import subscribers
from newsletter.config import Settings
from newsletter.errors import InputError, InvalidField
from newsletter.ledger import queue_mail
from newsletter.store import SignupAttempt, Store, Subscriber, utcnow
from newsletter.tokens import Tokens

PER_ADDRESS_LIMIT = 3
PER_ADDRESS_WINDOW = timedelta(hours=24)
PER_IP_LIMIT = 20
PER_IP_WINDOW = timedelta(hours=1)

Outcome = Literal["queued", "limited", "active", "stopped", "honeypot"]


class InvalidSignup(InvalidField):
    """A form field the visitor must correct; ``reason`` is the sentence to show."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(field, reason, reason)


class TooManySignups(InputError):
    """This client signed up too often; try again after ``retry_after`` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"too many signups from this network; try again in {retry_after} s")
        self.retry_after = retry_after


def make_tokens(settings: Settings, store: Store) -> Tokens:
    """Tokens signed with the configured key, or the one generated once and kept in the
    database (the same one ``newsletter send`` signs unsubscribe links with)."""
    return Tokens(store.secret_key(settings.secret_key))


def client_key(ip: str | None) -> str:
    """The rate-limit key of a client address: the IPv4 address, or the IPv6 /64."""
    try:
        address = ipaddress.ip_address((ip or "").strip())
    except ValueError:
        return "ip:unknown"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return f"ip:{address.ipv4_mapped}"
        return f"ip:{ipaddress.IPv6Network((address, 64), strict=False)}"
    return f"ip:{address}"


def _validated(email: str, name: str | None) -> tuple[str, str | None]:
    if not (email or "").strip():
        raise InvalidSignup("email", "Please enter your email address.")
    try:
        address = subscribers.normalise_email(email)
    except InvalidField as exc:
        raise InvalidSignup("email", f"This is not a valid email address: {exc.reason}.") from None
    try:
        return address, subscribers.validate_name(name)
    except InvalidField as exc:
        raise InvalidSignup("name", f"The name {exc.reason}.") from None


# Built once: a signup is a handful of prebuilt statements under the write lock.
_S = Subscriber.__table__
_A = SignupAttempt.__table__
_COUNTS = (
    select(_A.c.key, func.count())
    .where(
        or_(
            and_(_A.c.key == bindparam("ip"), _A.c.attempted_at > bindparam("ip_since")),
            and_(
                _A.c.key == bindparam("address"),
                _A.c.attempted_at > bindparam("address_since"),
            ),
        )
    )
    .group_by(_A.c.key)
)
_RECORD = insert(_A)
_FIND = select(_S.c.id, _S.c.status).where(_S.c.email == bindparam("email"))
_ADD = insert(_S).returning(_S.c.id)


def _retry_after(session: Session | Connection, key: str, now: datetime) -> int:
    """Seconds until the oldest attempt that counts against ``key`` leaves the window."""
    oldest_counted = session.scalar(
        select(SignupAttempt.attempted_at)
        .where(SignupAttempt.key == key, SignupAttempt.attempted_at > now - PER_IP_WINDOW)
        .order_by(SignupAttempt.attempted_at.desc())
        .offset(PER_IP_LIMIT - 1)
        .limit(1)
    )
    if oldest_counted is None:
        return 60
    return max(1, math.ceil((oldest_counted + PER_IP_WINDOW - now).total_seconds()))


def signup(
    store: Store,
    settings: Settings,
    tokens: Tokens,
    *,
    email: str,
    name: str | None = None,
    ip: str | None = None,
    website: str | None = None,
) -> Outcome:
    """Handle one form submission; the visitor sees the same answer for every outcome.

    Raises :class:`InvalidSignup` for a field to correct and :class:`TooManySignups`
    when this client is over its limit; "queued" means a confirmation awaits delivery.
    """
    if (website or "").strip():
        return "honeypot"
    address, name = _validated(email, name)
    ip_key = client_key(ip)
    with store.write(keys=[address, ip_key]) as session:
        now = utcnow()  # under the lock: attempts are recorded in the order they are counted
        db = session.connection()  # Core statements only: the ORM session's work is not needed
        counts = dict(
            db.execute(
                _COUNTS,
                {
                    "ip": ip_key,
                    "ip_since": now - PER_IP_WINDOW,
                    "address": address,
                    "address_since": now - PER_ADDRESS_WINDOW,
                },
            ).all()
        )
        if counts.get(ip_key, 0) >= PER_IP_LIMIT:
            raise TooManySignups(_retry_after(db, ip_key, now))
        attempts = [{"key": ip_key, "attempted_at": now}]
        found = db.execute(_FIND, {"email": address}).first()
        if found is None:
            row = {"email": address, "name": name, "source": "form", "created_at": now}
            row |= {"confirmed_at": None} | subscribers.status_changes(None, "pending", now)
            subscriber_id = db.scalar(_ADD, row)
        elif found.status in ("pending", "unsubscribed"):  # unsubscribed: came back, asked
            new = subscribers.next_status(found.status, "pending", resubscribe=True)
            changes = subscribers.status_changes(found.status, new, now)
            if changes:
                db.execute(update(_S).where(_S.c.id == found.id).values(changes))
            subscriber_id = found.id
        else:  # active: no mail again; bounced, complained: left alone
            db.execute(_RECORD, attempts)
            return "active" if found.status == "active" else "stopped"
        if counts.get(address, 0) >= PER_ADDRESS_LIMIT:
            db.execute(_RECORD, attempts)
            return "limited"
        db.execute(_RECORD, [*attempts, {"key": address, "attempted_at": now}])
        queue_mail(db, "confirm", [(subscriber_id, address)])
    return "queued"


def confirm(store: Store, email: str) -> Subscriber | None:
    """Activate the pending subscriber of a confirm link; None if the address is gone.

    Someone who unsubscribed since stays unsubscribed (a stale link never re-subscribes).
    """
    return _change(store, email, subscribers.confirm)


def unsubscribe(store: Store, email: str) -> Subscriber | None:
    """Stop all mail to the address of an unsubscribe link, at once; doing it twice is fine.

    None when the address is not on the list (purged): there is nothing to stop.
    """
    return _change(store, email, subscribers.unsubscribe)


def _change(
    store: Store, email: str, change: Callable[[Session, int], object]
) -> Subscriber | None:
    """Apply ``change`` to the subscriber of ``email`` in a write transaction keyed on it."""
    with store.write(keys=[email]) as session:
        subscriber = session.scalar(select(Subscriber).where(Subscriber.email == email))
        if subscriber is not None:
            change(session, subscriber.id)
        return subscriber


def lookup(store: Store, email: str) -> Subscriber | None:
    """The subscriber of a link's address, read only (what a GET may do)."""
    with store.session() as session:
        return session.scalar(select(Subscriber).where(Subscriber.email == email))


def prune_attempts(store: Store) -> int:
    """Forget signup attempts older than the longest rate-limit window."""
    cutoff = utcnow() - max(PER_ADDRESS_WINDOW, PER_IP_WINDOW)
    with store.write() as session:
        return session.execute(
            delete(SignupAttempt).where(SignupAttempt.attempted_at < cutoff)
        ).rowcount
