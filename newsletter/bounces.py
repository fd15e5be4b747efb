"""Bounces and complaints after the send: what a report says, recorded, and who is suppressed.

Reports arrive by three routes, and all of them end here as :class:`Event` objects:
returned messages (``newsletter bounces process``, the bounce mailbox of
:mod:`newsletter.bounce_mailbox`), read by :mod:`newsletter.bounce_reports`, and provider
webhooks, read by :mod:`newsletter.bounce_webhooks`.

An event is matched to one of our deliveries by what names it: a VERP token (checked
by making it again with the secret key, so a made-up one names nothing), our
``X-Newsletter-Delivery`` header, or the original Message-ID. Only a provider that
proved who it is (a signed webhook) may name a subscriber by address alone. An event
that names no delivery of ours is counted and skipped, never guessed at.

The policy, in one transaction per event:

    hard bounce (5.x.x)   the subscriber is suppressed at once (``bounced``)
    complaint             suppressed at once (``complained``)
    soft bounce (4.x.x)   kept; ``NEWSLETTER_SOFT_BOUNCE_LIMIT`` of them in a row, over
                          different issues, suppress the subscriber (``bounced``)
    delivered             ends a run of soft bounces (kept only when it ends one)

Every event is kept once: its key is a hash of the report and the delivery, unique in
the table, so the same DSN or webhook read twice counts once.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import Connection, bindparam, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from newsletter.bounce_reports import COMPLAINT, DELIVERED, HARD, SOFT, Report, read_report
from newsletter.config import Settings
from newsletter.store import (
    STOPPED_STATUSES,
    BounceEvent,
    Delivery,
    Store,
    Subscriber,
    get_or_create_secret_key,
    utcnow,
)
from newsletter.subscribers import status_changes
from newsletter.verp import Verp

log = logging.getLogger("newsletter.bounces")

MAX_MESSAGE_BYTES = 10 * 1024 * 1024  # a bounce with its original is far smaller
BATCH = 100  # events written per transaction
LISTED_KINDS = (HARD, SOFT, COMPLAINT)
COMPLAINT_WARNING = 0.001  # Gmail and Yahoo want bulk senders under 0.3%: act well before
SUPPRESSING = {HARD: "bounced", COMPLAINT: "complained"}


@dataclass(frozen=True)
class Event:
    """One thing a report says about one recipient, and what may name the delivery."""

    kind: str  # hard, soft, complaint or delivered
    source: str  # mailbox, process, ses, postmark or mailgun
    identity: str  # names the report (a DSN's Message-ID, a webhook's event id)
    address: str | None
    status: str | None
    detail: str
    occurred_at: datetime | None = None
    tokens: tuple[str, ...] = ()
    message_ids: tuple[str, ...] = ()
    by_address: bool = False  # an authenticated provider: the address alone may match


@dataclass(frozen=True)
class Match:
    """The delivery (or, by address, the subscriber) an event is about."""

    subscriber_id: int
    email: str
    issue_id: int | None
    delivery_id: int | None


@dataclass
class Tally:
    """What a run of processing did, for its closing line."""

    messages: int = 0
    hard: int = 0
    soft: int = 0
    complaints: int = 0
    delivered: int = 0
    duplicates: int = 0
    unmatched: int = 0
    auto_replies: int = 0
    unrecognised: int = 0
    too_big: int = 0
    suppressed: int = 0
    problems: list[str] = field(default_factory=list)

    def count(self, kind: str) -> None:
        name = {HARD: "hard", SOFT: "soft", COMPLAINT: "complaints", DELIVERED: "delivered"}
        setattr(self, name[kind], getattr(self, name[kind]) + 1)

    def summary(self) -> str:
        skipped = [
            f"{n} {label}"
            for n, label in (
                (self.duplicates, "already recorded"),
                (self.unmatched, "for no delivery of ours"),
                (self.auto_replies, "auto-replies"),
                (self.unrecognised, "unrecognised"),
                (self.too_big, "too big"),
            )
            if n
        ]
        line = (
            f"{self.messages} messages: {self.hard} hard bounces, {self.soft} soft, "
            f"{self.complaints} complaints, {self.delivered} deliveries; "
            f"{self.suppressed} subscribers suppressed"
        )
        return line + (f"; skipped: {', '.join(skipped)}" if skipped else "")


def verp_for(store: Store, settings: Settings) -> Verp:
    """The token maker with the configured key, or the one kept in the database."""
    return Verp.of(settings, settings.secret_key or get_or_create_secret_key(store.engine))


class Recorder:
    """Matches events to deliveries and records them under the policy. Matched events
    are written in batches, each batch one transaction (:meth:`flush`; callers flush
    before they let go of what was read, and at the end); database errors propagate,
    and the caller keeps what it read to try again."""

    def __init__(self, store: Store, settings: Settings, batch: int = BATCH) -> None:
        self.store, self.settings, self.batch = store, settings, batch
        self.verp = verp_for(store, settings)
        self.tally = Tally()
        self._pending: list[tuple[Event, Match]] = []
        self._reader: Connection | None = None  # matching reads, one connection per batch

    def message(self, label: str, data: bytes, source: str) -> None:
        """Read one returned message and take in what it says; what cannot be used is
        logged in one line and counted."""
        if len(data) > MAX_MESSAGE_BYTES:
            self.too_big(label, len(data))
            return
        self.tally.messages += 1
        try:
            report = read_report(data)
        except Exception as exc:  # one unreadable message must not end the run
            self._skip("unrecognised", f"{label}: unreadable ({type(exc).__name__}); skipped")
            return
        if report.verdict == "auto-reply":
            self.tally.auto_replies += 1
            log.info("%s: an auto-reply; ignored", label)
            return
        if report.verdict != "report":
            self._skip("unrecognised", f"{label}: {report.reason}; skipped")
            return
        matched = sum(self.event(e) for e in events_of(report, source))
        if not matched:
            named = report.tokens[0] if report.tokens else "none"
            self._skip(
                None,
                f"{label}: a {report.kind_name} about no delivery of ours (token {named}, "
                f"{len(report.message_ids)} Message-IDs); skipped",
            )

    def too_big(self, label: str, size: int) -> None:
        """Skip a message too big to be a bounce, unread."""
        self.tally.messages += 1
        self._skip(
            "too_big",
            f"{label}: {size / 1048576:.1f} MB, more than a bounce can be "
            f"({MAX_MESSAGE_BYTES // 1048576} MB); skipped",
        )

    def event(self, event: Event) -> bool:
        """Take one event in; False when it names no delivery or subscriber of ours."""
        if self._reader is None:
            self._reader = self.store.engine.connect()
        match = find_match(self._reader, self.verp, event)
        if match is None:
            self.tally.unmatched += 1
            return False
        self._pending.append((event, match))
        if len(self._pending) >= self.batch:
            self.flush()
        return True

    def flush(self) -> Tally:
        """Write the events taken in so far, all or none; the tally so far."""
        if self._reader is not None:  # no read transaction left open beside the write
            self._reader.close()
            self._reader = None
        pending, self._pending = self._pending, []
        if not pending:
            return self.tally
        keys = sorted({f"bounces:{match.subscriber_id}" for _, match in pending})
        try:
            with self.store.write(keys=keys) as session:
                db = session.connection()
                outcomes = [self._record(db, event, match) for event, match in pending]
        except IntegrityError:  # another process recorded one of them first: one by one
            outcomes = []
            for event, match in pending:
                try:
                    with self.store.write(keys=[f"bounces:{match.subscriber_id}"]) as session:
                        outcomes.append(self._record(session.connection(), event, match))
                except IntegrityError:
                    outcomes.append("duplicate")
        for (event, _), outcome in zip(pending, outcomes, strict=True):
            if outcome == "duplicate":
                self.tally.duplicates += 1
            elif outcome != "nothing":
                self.tally.count(event.kind)
                self.tally.suppressed += outcome == "suppressed"
        return self.tally

    def _skip(self, counter: str | None, line: str) -> None:
        if counter is not None:
            setattr(self.tally, counter, getattr(self.tally, counter) + 1)
        if len(self.tally.problems) < 100:
            self.tally.problems.append(line)
        log.warning("%s", line)

    def _record(self, session: Connection, event: Event, match: Match) -> str:
        """``recorded``, ``suppressed``, ``duplicate`` or ``nothing`` (a delivery that ends
        no run of soft bounces)."""
        key = event_key(event, match)
        now = utcnow()
        if session.scalar(_EXISTING, {"key": key}):
            return "duplicate"
        if event.kind == DELIVERED and soft_streak(session, match.subscriber_id) == 0:
            return "nothing"
        session.execute(
            insert(BounceEvent.__table__),
            {
                "event_key": key,
                "subscriber_id": match.subscriber_id,
                "email": match.email,
                "issue_id": match.issue_id,
                "delivery_id": match.delivery_id,
                "kind": event.kind,
                "source": event.source,
                "status": (event.status or None) and event.status[:32],
                "detail": event.detail[:1000] or None,
                "occurred_at": min(event.occurred_at or now, now),
                "received_at": now,
            },
        )
        return self._apply(session, event.kind, match.subscriber_id)

    def _apply(self, session: Connection, kind: str, subscriber_id: int) -> str:
        """Suppress the subscriber if the policy says so. The rule of
        :func:`newsletter.subscribers.unsubscribe` in one statement: whoever stopped
        already keeps the first reason and its date."""
        wanted = SUPPRESSING.get(kind)
        if kind == SOFT and soft_streak(session, subscriber_id) >= self.settings.soft_bounce_limit:
            wanted = "bounced"
        if wanted is None:
            return "recorded"
        changed = session.execute(
            update(Subscriber.__table__)
            .where(Subscriber.id == subscriber_id, Subscriber.status.not_in(STOPPED_STATUSES))
            .values(status_changes(None, wanted, utcnow()))
        ).rowcount
        return "suppressed" if changed else "recorded"


_EXISTING = select(BounceEvent.id).where(BounceEvent.event_key == bindparam("key"))


def events_of(report: Report, source: str) -> list[Event]:
    """The events of a returned message, one per recipient finding."""
    return [
        Event(
            kind=finding.kind,
            source=source,
            identity=report.identity,
            address=finding.address,
            status=finding.status,
            detail=finding.detail,
            occurred_at=report.occurred_at,
            tokens=report.tokens,
            message_ids=report.message_ids,
        )
        for finding in report.findings
    ]


def event_key(event: Event, match: Match) -> str:
    """The same report about the same delivery, by whatever route: the same key."""
    parts = (event.identity, match.delivery_id, match.subscriber_id, event.kind, event.address)
    return hashlib.sha256("|".join(str(p) for p in parts).encode("utf-8")).hexdigest()


_DELIVERY = select(Delivery.id, Delivery.subscriber_id, Delivery.email, Delivery.issue_id)


def find_match(session: Connection | Session, verp: Verp, event: Event) -> Match | None:
    """The delivery the event names by token or Message-ID; or, for an authenticated
    provider, the subscriber with the address and their latest issue."""
    for token in event.tokens:
        delivery_id = verp.delivery_of(token)
        if delivery_id is not None:
            row = session.execute(_DELIVERY.where(Delivery.id == delivery_id)).first()
            if row is not None:
                return Match(row.subscriber_id, row.email, row.issue_id, row.id)
    for message_id in event.message_ids:
        head = message_id.split(".", 1)[0]
        if not head.isdigit() or len(head) > 19:
            continue
        row = session.execute(
            _DELIVERY.add_columns(Delivery.message_id).where(Delivery.id == int(head))
        ).first()
        if row is not None and (row.message_id or "").lower() == message_id.lower():
            return Match(row.subscriber_id, row.email, row.issue_id, row.id)
    if event.by_address and event.address:
        address = event.address.strip().lower()
        subscriber_id = session.scalar(select(Subscriber.id).where(Subscriber.email == address))
        if subscriber_id is None:
            return None
        latest = session.execute(
            _DELIVERY.where(
                Delivery.subscriber_id == subscriber_id,
                Delivery.issue_id.is_not(None),
                Delivery.status == "sent",
            )
            .order_by(Delivery.id.desc())
            .limit(1)
        ).first()
        if latest is not None:
            return Match(subscriber_id, address, latest.issue_id, latest.id)
        return Match(subscriber_id, address, None, None)
    return None


def soft_streak(session: Connection | Session, subscriber_id: int) -> int:
    """Different issues with a soft bounce since the subscriber's last delivery event."""
    last_delivered = (
        select(func.max(BounceEvent.occurred_at))
        .where(BounceEvent.subscriber_id == subscriber_id, BounceEvent.kind == DELIVERED)
        .scalar_subquery()
    )
    query = select(func.count(BounceEvent.issue_id.distinct())).where(
        BounceEvent.subscriber_id == subscriber_id,
        BounceEvent.kind == SOFT,
        (last_delivered.is_(None)) | (BounceEvent.occurred_at > last_delivered),
    )
    return session.scalar(query) or 0


def record_events(store: Store, settings: Settings, events: Iterable[Event]) -> Tally:
    """Record a webhook's events; the tally says what they did."""
    recorder = Recorder(store, settings)
    for event in events:
        recorder.event(event)
    return recorder.flush()


# Seeing it --------------------------------------------------------------------------------


def recent(session: Session, limit: int = 50, kinds: Iterable[str] = LISTED_KINDS) -> list[dict]:
    """The newest bounces and complaints first, as plain records."""
    rows = session.scalars(
        select(BounceEvent)
        .where(BounceEvent.kind.in_(tuple(kinds)))
        .order_by(BounceEvent.occurred_at.desc(), BounceEvent.id.desc())
        .limit(limit)
    )
    return [
        {
            "email": row.email,
            "kind": row.kind,
            "issue": row.issue_id,
            "at": row.occurred_at.isoformat(timespec="seconds"),
            "status": row.status,
            "detail": row.detail or "",
            "source": row.source,
        }
        for row in rows
    ]


@dataclass(frozen=True)
class IssueBounces:
    """An issue's bounce and complaint counts (subscribers, not reports) and rates."""

    sent: int
    hard: int
    soft: int
    complaints: int

    def rate(self, count: int) -> float:
        return count / self.sent if self.sent else 0.0

    @property
    def complaint_warning(self) -> str | None:
        """A warning when complaints pass 0.1% of the messages sent."""
        rate = self.rate(self.complaints)
        if rate <= COMPLAINT_WARNING:
            return None
        return (
            f"complaints are {rate:.2%} of the messages sent, over {COMPLAINT_WARNING:.1%}: "
            "Gmail and Yahoo block bulk senders at 0.3%"
        )


def issue_bounces(session: Session, issue_id: int, sent: int) -> IssueBounces:
    """Per kind, how many subscribers a report says the issue bounced or offended."""
    counts = dict(
        session.execute(
            select(BounceEvent.kind, func.count(BounceEvent.subscriber_id.distinct()))
            .where(BounceEvent.issue_id == issue_id)
            .group_by(BounceEvent.kind)
        ).all()
    )
    return IssueBounces(sent, counts.get(HARD, 0), counts.get(SOFT, 0), counts.get(COMPLAINT, 0))
