"""One-off mail such as signup confirmations: built, queued with its cause, sent after commit.

A confirmation is stored in ``outbound_mail`` in the same transaction that makes the
subscriber pending, so a crash can lose neither half; a web request never waits on
SMTP. :class:`OutboundWorker` (a thread of ``newsletter serve``) and the CLI's
:func:`drain` deliver the queue:

    queued ──claim──► send ──250──► sent
      ▲                 │ 4xx, dropped: queued again after a backoff; failed after
      └─────────────────┘ max_attempts; 5xx: failed (a 5.1.x user unknown also marks
                          a pending subscriber bounced, so bots cannot bounce mail off
                          us to addresses that do not exist)

A claim leaves the row ``queued`` but moves ``next_attempt_at`` a lease ahead: two
workers never take the same row, and a worker that dies mid-send leaves its rows to be
taken again once the lease runs out (at worst one duplicate, never a lost mail).
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from email.utils import parseaddr
from html import escape

from sqlalchemy import bindparam, delete, insert, or_, select, update
from sqlalchemy.orm import Session

from newsletter.config import Settings
from newsletter.message import (
    HeaderClock,
    WireTemplate,
    address_header,
    clean_header_value,
    encode_header,
    envelope_address,
    new_message_id,
    qp_value,
)
from newsletter.pacing import backoff
from newsletter.render import Personalizer, placeholder, template_environment
from newsletter.store import OutboundMail, Store, Subscriber, utcnow
from newsletter.subscribers import unsubscribe
from newsletter.tokens import Tokens, confirm_url
from newsletter.transports import Outcome, Transport, make_transport
from newsletter.writes import write_transaction

logger = logging.getLogger(__name__)

BATCH_SIZE = 50


@dataclass(frozen=True)
class OutboundOptions:
    """Retry policy of the queue; the defaults suit real providers, tests shrink them."""

    max_attempts: int = 8
    retry_base: float = 60.0  # seconds before the first retry, doubled after each failure
    retry_max: float = 3600.0
    lease: float = 600.0  # seconds a claimed row is hidden from other workers
    keep_sent: timedelta = timedelta(days=30)  # then sent and failed rows are deleted


@dataclass(frozen=True)
class PreparedMail:
    """A finished message, ready to be queued: ``body`` is SMTP wire bytes."""

    recipient: str
    subject: str
    body: bytes


@dataclass
class OutboundReport:
    """What one delivery round did; ``unreachable`` holds the answer if the server was not."""

    claimed: int = 0
    sent: int = 0
    retried: int = 0
    failed: int = 0
    bounced: int = 0
    released: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    unreachable: str | None = None

    def add(self, other: OutboundReport) -> None:
        """Fold another round's counts into this one."""
        for name in ("claimed", "sent", "retried", "failed", "bounced", "released"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.failures += other.failures
        self.unreachable = other.unreachable or self.unreachable


_TEXT_FIELDS = re.compile(r"@@NL_(EMAIL|CONFIRM_URL)@@")


class _Confirmation:
    """The confirmation mail rendered and encoded once per process and settings; each
    address only fills in itself, its link, the date and a Message-ID.

    That needs templates that print ``email`` and ``confirm_url`` as they are. A custom
    template that transforms them (``{{ email|lower }}``, a test on the address) is
    noticed with a probe address at start, and then rendered for each address instead.
    ``To`` is the bare address: a display name typed into a web form is never put into
    mail sent to whoever owns the address.
    """

    def __init__(self, settings: Settings, expires_days: int) -> None:
        self._values = {
            "list_name": settings.list_name,
            "site_url": settings.site_url,
            "expires_days": expires_days,
        }
        env = template_environment(settings.templates_dir)
        self._templates = (
            env.get_template("confirm_email.txt"),
            env.get_template("confirm_email.html"),
        )
        headers = [
            f"From: {address_header(*parseaddr(settings.from_address))}",
            f"To: {placeholder('to')}",
            f"Subject: {encode_header('Subject', confirmation_subject(settings))}",
            f"Date: {placeholder('date')}",
            f"Message-ID: <{placeholder('message_id')}>",
        ]
        if settings.reply_to:
            headers.append(f"Reply-To: {address_header(*parseaddr(settings.reply_to))}")
        # RFC 3834: an automatic mail, so no vacation replies to it.
        self._headers = [*headers, "Auto-Submitted: auto-generated", "MIME-Version: 1.0"]
        self._domain = envelope_address(settings.from_address).rpartition("@")[2] or "localhost"
        self._clock = HeaderClock()
        text, html = self._render(placeholder("email"), placeholder("confirm_url"))
        probe = {"email": "probe@example.invalid", "confirm_url": "https://probe.invalid/c/1"}
        filled = [Personalizer(part).fill(probe) for part in (text, html)]  # nothing to escape
        self._wire: WireTemplate | None = None
        if filled == list(self._render(probe["email"], probe["confirm_url"])):
            self._wire = WireTemplate(
                self._headers, _TEXT_FIELDS.sub(r"@@NL_TEXT_\1@@", text), html
            )

    def _render(self, email: str, url: str) -> tuple[str, str]:
        values = self._values | {"email": email, "confirm_url": url}
        return tuple(template.render(values) for template in self._templates)  # type: ignore[return-value]

    def build(self, email: str, url: str) -> bytes:
        values = {
            "to": clean_header_value(email),
            "date": self._clock.now(),
            "message_id": new_message_id(self._domain),
        }
        if self._wire is None:  # a template that transforms the values: render this one
            return WireTemplate(self._headers, *self._render(email, url)).fill(values)
        return self._wire.fill(
            values
            | {
                "email": qp_value(escape(email)),
                "confirm_url": qp_value(escape(url)),
                "text_email": qp_value(email),
                "text_confirm_url": qp_value(url),
            }
        )


_confirmation = functools.lru_cache(maxsize=8)(_Confirmation)  # built once per process


def confirmation_subject(settings: Settings) -> str:
    """The subject of a confirmation: the list's name only, never what the visitor typed."""
    return f"Confirm your subscription to {settings.list_name}"


def prepare_confirmation(settings: Settings, tokens: Tokens, email: str) -> PreparedMail:
    """The double opt-in mail for ``email`` (already normalised), from the templates
    ``confirm_email.txt`` and ``confirm_email.html``."""
    url = confirm_url(settings.site_url, tokens.confirm_token(email))
    body = _confirmation(settings, tokens.confirm_max_age // 86400).build(email, url)
    return PreparedMail(email, confirmation_subject(settings), body)


_QUEUE = insert(OutboundMail.__table__).returning(
    OutboundMail.__table__.c.id, sort_by_parameter_order=True
)


def queue(session: Session, mails: Iterable[PreparedMail]) -> list[int]:
    """Add ``mails`` to the queue in the caller's transaction (sent once that commits), in
    one statement; their row ids, in order."""
    now = utcnow()
    rows = [
        {
            "recipient": mail.recipient,
            "subject": mail.subject,
            "body": mail.body,
            "status": "queued",
            "attempts": 0,
            "created_at": now,
        }
        for mail in mails
    ]
    return list(session.scalars(_QUEUE, rows)) if rows else []


def queue_confirmations(
    session: Session, settings: Settings, tokens: Tokens, emails: Iterable[str]
) -> list[int]:
    """Queue a confirmation for each address in the caller's transaction; their row ids."""
    return queue(session, [prepare_confirmation(settings, tokens, email) for email in emails])


def _claim(
    store: Store, limit: int, lease: float, ids: list[int] | None
) -> list[tuple[int, str, bytes, int]]:
    now = utcnow()
    due = (
        select(OutboundMail.id)
        .where(OutboundMail.status == "queued")
        .where(or_(OutboundMail.next_attempt_at.is_(None), OutboundMail.next_attempt_at <= now))
        .order_by(OutboundMail.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    if ids is not None:
        due = due.where(OutboundMail.id.in_(ids))
    with write_transaction(store) as session:
        rows = session.execute(
            update(OutboundMail)
            .where(OutboundMail.id.in_(due.scalar_subquery()))
            .values(
                next_attempt_at=now + timedelta(seconds=lease),
                attempts=OutboundMail.attempts + 1,
            )
            .returning(
                OutboundMail.id, OutboundMail.recipient, OutboundMail.body, OutboundMail.attempts
            )
        ).all()
    return sorted((row.id, row.recipient, bytes(row.body), row.attempts) for row in rows)


def _bounce_pending(session: Session, address: str) -> None:
    subscriber = session.scalar(select(Subscriber).where(Subscriber.email == address))
    if subscriber is not None and subscriber.status == "pending":
        unsubscribe(session, subscriber.id, status="bounced")


_OUTBOUND = OutboundMail.__table__
_MARK = (
    update(_OUTBOUND)
    .where(_OUTBOUND.c.id == bindparam("row_id"))
    .values(
        status=bindparam("new_status"),
        last_answer=bindparam("answer"),
        sent_at=bindparam("sent"),
        next_attempt_at=bindparam("due"),
    )
)


def _record(
    store: Store,
    row_id: int,
    recipient: str,
    attempts: int,
    outcome: Outcome,
    options: OutboundOptions,
    report: OutboundReport,
    accepted: list[dict] | None = None,
) -> None:
    """Record one answer; accepted messages are only collected in ``accepted`` when given,
    to be written together by :func:`_record_accepted` (one transaction per batch)."""
    answer = outcome.answer[:500]
    now = utcnow()
    values = {"row_id": row_id, "answer": answer, "sent": None, "due": None}
    if outcome.status == "sent":
        values |= {"new_status": "sent", "sent": now}
        report.sent += 1
        if accepted is not None:
            accepted.append(values)
            return
    elif outcome.status == "retry" and attempts < options.max_attempts:
        delay = backoff(attempts, options.retry_base, options.retry_max)
        values |= {"new_status": "queued", "due": now + timedelta(seconds=delay)}
        report.retried += 1
    else:
        values["new_status"] = "failed"
        if outcome.status == "bounced":
            report.bounced += 1
        else:
            report.failed += 1
        report.failures.append((recipient, answer))
    with write_transaction(store) as session:
        session.execute(_MARK, values)
        if outcome.status == "bounced":
            _bounce_pending(session, recipient)


def _record_accepted(store: Store, accepted: list[dict]) -> None:
    """Mark a batch of accepted confirmations sent in one short write transaction."""
    if accepted:
        with write_transaction(store) as session:
            session.execute(_MARK, accepted)
        accepted.clear()


def _release(store: Store, row_ids: list[int], delay: float) -> None:
    """Give back claimed rows that were never tried, due again after ``delay`` seconds."""
    if row_ids:
        with write_transaction(store) as session:
            session.execute(
                update(OutboundMail)
                .where(OutboundMail.id.in_(row_ids), OutboundMail.status == "queued")
                .values(
                    attempts=OutboundMail.attempts - 1,
                    next_attempt_at=utcnow() + timedelta(seconds=delay),
                )
            )


def deliver_outbound(
    store: Store,
    settings: Settings,
    transport: Transport,
    limit: int = BATCH_SIZE,
    *,
    ids: list[int] | None = None,
    options: OutboundOptions | None = None,
    stop: threading.Event | None = None,
) -> OutboundReport:
    """Claim up to ``limit`` due messages (only ``ids`` if given), send each, record each.

    A server that cannot be reached stops the round: the rest of the batch goes back to
    the queue untouched, due again after ``retry_base`` seconds.
    """
    options = options or OutboundOptions()
    report = OutboundReport()
    claimed = _claim(store, limit, options.lease, ids)
    report.claimed = len(claimed)
    envelope_from = envelope_address(settings.from_address)
    accepted: list[dict] = []
    try:
        for index, (row_id, recipient, body, attempts) in enumerate(claimed):
            if stop is not None and stop.is_set():
                rest = [row[0] for row in claimed[index:]]
                _release(store, rest, 0)
                report.released += len(rest)
                break
            outcome = transport.send(envelope_from, recipient, body)
            _record(store, row_id, recipient, attempts, outcome, options, report, accepted)
            if outcome.status == "retry" and outcome.code is None:
                report.unreachable = outcome.answer
                rest = [row[0] for row in claimed[index + 1 :]]
                _release(store, rest, options.retry_base)
                report.released += len(rest)
                break
    finally:
        _record_accepted(store, accepted)
    return report


def drain(
    store: Store,
    settings: Settings,
    ids: list[int],
    transport: Transport | None = None,
    options: OutboundOptions | None = None,
) -> OutboundReport:
    """Send the queued messages ``ids`` now, in batches; what is left for later is reported
    as retried (the worker of ``newsletter serve`` picks it up when it is due)."""
    total = OutboundReport()
    own = transport is None
    transport = transport or make_transport(settings)
    try:
        for start in range(0, len(ids), BATCH_SIZE):
            round_ = deliver_outbound(
                store,
                settings,
                transport,
                BATCH_SIZE,
                ids=ids[start : start + BATCH_SIZE],
                options=options,
            )
            total.add(round_)
            if round_.unreachable:
                total.retried += len(ids) - start - round_.claimed
                break
    finally:
        if own:
            transport.close()
    return total


def prune(store: Store, options: OutboundOptions | None = None) -> int:
    """Delete sent and failed messages older than ``keep_sent``: confirmation links are
    personal data, and a week after sending they have expired anyway."""
    cutoff = utcnow() - (options or OutboundOptions()).keep_sent
    with write_transaction(store) as session:
        return session.execute(
            delete(OutboundMail)
            .where(OutboundMail.status.in_(("sent", "failed")))
            .where(OutboundMail.created_at < cutoff)
        ).rowcount


class OutboundWorker(threading.Thread):
    """Delivers the outbound queue in the background of ``newsletter serve``.

    It sends as soon as :meth:`wake` is called (after a signup commits) and polls every
    ``poll`` seconds for retries and for mail queued by other processes. While mail keeps
    coming it waits ``linger`` seconds between rounds that found less than a batch, so a
    busy signup form costs one claim and one record per batch instead of per message.
    The SMTP connection is kept while there is work and closed when the queue is empty.
    ``housekeeping`` callables run about every ``housekeeping_every`` seconds.
    """

    def __init__(
        self,
        store: Store,
        settings: Settings,
        *,
        transport_factory: Callable[[], Transport] | None = None,
        options: OutboundOptions | None = None,
        poll: float = 5.0,
        linger: float = 0.2,
        batch_size: int = BATCH_SIZE,
        housekeeping: Iterable[Callable[[Store], object]] = (),
        housekeeping_every: float = 600.0,
    ) -> None:
        super().__init__(name="newsletter-outbound", daemon=True)
        self.store, self.settings = store, settings
        self.transport_factory = transport_factory or (lambda: make_transport(settings))
        self.options = options or OutboundOptions()
        self.poll, self.linger, self.batch_size = poll, linger, batch_size
        self.housekeeping = [lambda s: prune(s, self.options), *housekeeping]
        self.housekeeping_every = housekeeping_every
        self.report = OutboundReport()
        self._wake = threading.Event()
        self._stopping = threading.Event()

    def wake(self) -> None:
        """Look at the queue now (mail was just queued)."""
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the message in hand, give the rest of the batch back, and end the thread."""
        self._stopping.set()
        self._wake.set()
        if self.is_alive():
            self.join(timeout)

    def run(self) -> None:
        transport = self.transport_factory()
        next_housekeeping = time.monotonic()
        try:
            while not self._stopping.is_set():
                self._wake.clear()
                round_ = self._round(transport)
                if round_ is not None and round_.claimed and not round_.unreachable:
                    if round_.claimed < self.batch_size:  # more may be on its way
                        self._stopping.wait(self.linger)
                    continue
                transport.close()
                if time.monotonic() >= next_housekeeping:
                    self._housekeep()
                    next_housekeeping = time.monotonic() + self.housekeeping_every
                self._wake.wait(self.poll)
        finally:
            transport.close()

    def _round(self, transport: Transport) -> OutboundReport | None:
        try:
            round_ = deliver_outbound(
                self.store,
                self.settings,
                transport,
                self.batch_size,
                options=self.options,
                stop=self._stopping,
            )
        except Exception:  # a database hiccup must not end the thread; the next poll retries
            logger.exception("outbound mail: delivery round failed")
            return None
        self.report.add(round_)
        if round_.unreachable:
            logger.warning("outbound mail: %s (retrying later)", round_.unreachable)
        return round_

    def _housekeep(self) -> None:
        for task in self.housekeeping:
            try:
                task(self.store)
            except Exception:
                logger.exception("outbound mail: housekeeping failed")
