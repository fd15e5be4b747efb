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
  confirmation.

Each function is one short write transaction (:func:`newsletter.writes.write_transaction`);
the confirmation is built before it and queued inside it, with the subscriber change.
Concurrent signups share their transaction (a group commit, :func:`newsletter.writes.grouped`).
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy import and_, bindparam, delete, func, insert, or_, select, update
from sqlalchemy.orm import Session

from newsletter import outbound, subscribers
from newsletter.config import Settings
from newsletter.errors import InputError
from newsletter.store import SignupAttempt, Store, Subscriber, get_or_create_secret_key, utcnow
from newsletter.tokens import Tokens
from newsletter.writes import grouped, write_transaction

PER_ADDRESS_LIMIT = 3
PER_ADDRESS_WINDOW = timedelta(hours=24)
PER_IP_LIMIT = 20
PER_IP_WINDOW = timedelta(hours=1)

Outcome = Literal["queued", "limited", "active", "stopped", "honeypot"]


class InvalidSignup(InputError):
    """A form field the visitor must correct; ``field`` names it, ``reason`` says why."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


class TooManySignups(InputError):
    """This client signed up too often; try again after ``retry_after`` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"too many signups from this network; try again in {retry_after} s")
        self.retry_after = retry_after


def make_tokens(settings: Settings, store: Store) -> Tokens:
    """Tokens signed with the configured key, or the one generated once and kept in the
    database (the same one ``newsletter send`` signs unsubscribe links with)."""
    return Tokens(settings.secret_key or get_or_create_secret_key(store.engine))


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
    except InputError as exc:
        detail = re.search(r"\((.+)\)$", str(exc))
        reason = "This is not a valid email address" + (f": {detail[1]}." if detail else ".")
        raise InvalidSignup("email", reason) from None
    try:
        return address, subscribers.validate_name(name)
    except InputError as exc:
        problem = "is too long" if "longer" in str(exc) else "has a line break or control character"
        raise InvalidSignup("name", f"The name {problem}.") from None


@dataclass(frozen=True)
class _Signup:
    """A validated form submission with its confirmation mail, built before any lock."""

    address: str
    name: str | None
    ip_key: str
    mail: outbound.PreparedMail


# Built once: each batch of signups runs them under the write lock.
_ATTEMPTS = SignupAttempt.__table__
_RECENT = (
    select(_ATTEMPTS.c.key, func.count())
    .where(
        or_(
            and_(
                _ATTEMPTS.c.key.in_(bindparam("ips", expanding=True)),
                _ATTEMPTS.c.attempted_at > bindparam("ip_since"),
            ),
            and_(
                _ATTEMPTS.c.key.in_(bindparam("addresses", expanding=True)),
                _ATTEMPTS.c.attempted_at > bindparam("address_since"),
            ),
        )
    )
    .group_by(_ATTEMPTS.c.key)
)
_RECORD_ATTEMPTS = insert(_ATTEMPTS)
_SUBSCRIBERS = Subscriber.__table__
_FIND = select(_SUBSCRIBERS.c.email, _SUBSCRIBERS.c.status).where(
    _SUBSCRIBERS.c.email.in_(bindparam("emails", expanding=True))
)
_ADD = insert(_SUBSCRIBERS)


def _retry_after(session: Session, key: str, now: datetime) -> int:
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


def _write_signups(session: Session, batch: Sequence[_Signup]) -> list[Outcome | TooManySignups]:
    """Apply a batch of signups in order, as if one after the other, in a few statements.

    Two reads (the attempts that count, the subscribers who exist) and one insert per
    table, whatever the batch size; counts and statuses are carried forward in Python so
    the third signup of an address in one batch sees the first two. The rules are
    :mod:`newsletter.subscribers`' (:func:`~newsletter.subscribers.next_status`,
    ``status_changes``).
    """
    now = utcnow()
    counts: Counter[str] = Counter(
        dict(
            session.execute(
                _RECENT,
                {
                    "ips": sorted({each.ip_key for each in batch}),
                    "ip_since": now - PER_IP_WINDOW,
                    "addresses": sorted({each.address for each in batch}),
                    "address_since": now - PER_ADDRESS_WINDOW,
                },
            ).all()
        )
    )
    statuses: dict[str, str] = dict(
        session.execute(_FIND, {"emails": sorted({each.address for each in batch})}).all()
    )
    added: dict[str, dict] = {}
    renamed: dict[str, dict] = {}
    attempts: list[dict] = []
    mails: list[outbound.PreparedMail] = []
    results: list[Outcome | TooManySignups] = []
    limited_ips: set[str] = set()
    for each in batch:
        if counts[each.ip_key] >= PER_IP_LIMIT:
            limited_ips.add(each.ip_key)
            results.append(TooManySignups(60))  # its wait is read once the batch is written
            continue
        counts[each.ip_key] += 1
        attempts.append({"key": each.ip_key, "attempted_at": now})
        outcome = _apply(each, statuses.get(each.address), now, added, renamed)
        statuses.setdefault(each.address, "pending")
        if outcome is None and counts[each.address] >= PER_ADDRESS_LIMIT:
            outcome = "limited"
        if outcome is None:
            counts[each.address] += 1
            attempts.append({"key": each.address, "attempted_at": now})
            mails.append(each.mail)
        results.append(outcome or "queued")
    if added:
        session.execute(_ADD, list(added.values()))
    for address, values in renamed.items():
        session.execute(update(_SUBSCRIBERS).where(_SUBSCRIBERS.c.email == address).values(values))
    if attempts:
        session.execute(_RECORD_ATTEMPTS, attempts)
    outbound.queue(session, mails)
    waits = {key: _retry_after(session, key, now) for key in limited_ips}
    return [
        TooManySignups(waits[each.ip_key]) if isinstance(result, TooManySignups) else result
        for each, result in zip(batch, results, strict=True)
    ]


def _apply(
    each: _Signup, status: str | None, now: datetime, added: dict, renamed: dict
) -> Outcome | None:
    """Record the subscriber change of one signup in ``added`` (new rows) or ``renamed``
    (changes to existing rows); None when a confirmation is due."""
    if status is None:
        row = {"email": each.address, "name": each.name, "source": "form", "created_at": now}
        added[each.address] = (
            row | {"confirmed_at": None} | subscribers.status_changes(None, "pending", now)
        )
        return None
    if status in ("pending", "unsubscribed"):  # unsubscribed: they came back, asked
        new = subscribers.next_status(status, "pending", resubscribe=True)
        values = subscribers.status_changes(status, new, now)
        if each.name:
            values["name"] = each.name
        if each.address in added:  # signed up earlier in this batch: not yet written
            added[each.address] |= values
        elif values:
            renamed.setdefault(each.address, {}).update(values)
        return None
    # Active: never renamed by an unconfirmed form. Bounced, complained: left alone.
    return "active" if status == "active" else "stopped"


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
    The write joins those of concurrent signups in one transaction
    (:func:`newsletter.writes.grouped`).
    """
    if (website or "").strip():
        return "honeypot"
    address, name = _validated(email, name)
    mail = outbound.prepare_confirmation(settings, tokens, address)
    request = _Signup(address, name, client_key(ip), mail)
    return grouped(store, _write_signups, request, keys=lambda each: [each.address])


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
    with write_transaction(store, key=email) as session:
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
    with write_transaction(store) as session:
        return session.execute(
            delete(SignupAttempt).where(SignupAttempt.attempted_at < cutoff)
        ).rowcount
