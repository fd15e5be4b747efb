"""The ledger of every message: one delivery row per (issue, subscriber), and one per one-off
message (a confirmation: no issue, a ``kind`` that says what to build when it is sent).

    queued ──claim──► sending ──server accepted──► sent
       ▲                 │ 4xx / dropped ─► queued again (next_attempt_at), or failed at last
       └──release/dead───┘ 5xx ─► failed; 5.1.x ─► bounced (and the subscriber too)

A row becomes ``sent`` only after the server accepted its message, and a claim is
taken and released row by row, never moved past rows that were fetched but not
sent. A sender holds locks that die with it (its journal's ``flock``; on PostgreSQL a
session advisory lock too), so rows claimed by a dead sender are recognised by taking
its locks and go back to ``queued``, after its journal is replayed; rows of a sender
that stopped renewing its claim for ``stale`` seconds (paused, hung) go back too, and
that sender, when it wakes, finds them gone before it sends any of them.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from base64 import b64decode, b64encode
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import (
    Connection,
    String,
    bindparam,
    cast,
    exists,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.orm import Session

from newsletter.archive_pages import place
from newsletter.config import Settings
from newsletter.errors import DeliveryError
from newsletter.journal import Journal, examine, journal_dir, owners
from newsletter.message import message_domain
from newsletter.render import InlineImage, RenderedIssue
from newsletter.store import (
    STOPPED_STATUSES,
    Delivery,
    Issue,
    Store,
    Subscriber,
    delivery_counts,
    utcnow,
)
from newsletter.subscribers import unsubscribe

OPEN_STATUSES = ("queued", "sending")
MAIL_CHANNEL = "newsletter_mail"  # PostgreSQL NOTIFY channel: one-off mail was queued
_ISSUE_LOCK = 0x6E6C6973  # PostgreSQL advisory lock held while an issue is created

Scope = int | None  # an issue's id, or None for one-off mail


def new_owner() -> str:
    """A name for one sender, recorded on the rows it claims and naming its locks."""
    return uuid.uuid4().hex


def owner_key(owner: str) -> int:
    """The PostgreSQL advisory lock key of a sender: a signed 64-bit hash of its name."""
    return int.from_bytes(hashlib.blake2b(owner.encode(), digest_size=8).digest(), signed=True)


@contextmanager
def alive_as(store: Store, owner: str, journals: Path) -> Iterator[Journal]:
    """Hold the locks that say ``owner`` is alive while the block runs: its journal's
    ``flock`` and, on PostgreSQL, a session advisory lock on a connection of its own (the
    server lets go of it when the process dies). The journal is kept if the block fails:
    the next sender replays what it holds."""
    journal = Journal(owner, journals)
    try:
        journal.open()
    except OSError as exc:
        raise DeliveryError(
            f"cannot write the send journal {journal.path}: {exc.strerror or exc}"
        ) from None
    clean = False
    try:
        with store.engine.connect() as connection:
            if not store.sqlite:
                connection.execute(select(func.pg_advisory_lock(owner_key(owner))))
                connection.commit()
            yield journal
            clean = not journal.keep
    finally:
        journal.close(keep=not clean)


def owner_alive(db: Connection | Session, owner: str, journals: Path) -> bool:
    """Whether the sender or worker ``owner`` still holds its locks."""
    if _owner_alive(db, owner):
        return True
    with examine(owner, journals) as found:
        return found.alive


@dataclass(frozen=True)
class Claimed:
    """A delivery this sender owns until it records an outcome or releases it."""

    id: int
    subscriber_id: int
    email: str
    attempts: int
    name: str | None
    mailable: bool  # the subscriber may still get it (active; for one-off mail: not stopped)
    kind: str | None  # one-off mail: what to build ("confirm"); None for an issue


def serialise_rendered(issue: RenderedIssue) -> bytes:
    """The rendered issue as stored with the issue, so a resume sends the very same email."""
    return json.dumps(
        {
            "subject": issue.subject,
            "preheader": issue.preheader,
            "html": issue.html,
            "text": issue.text,
            "images": [
                {
                    "cid": i.cid,
                    "filename": i.filename,
                    "content_type": i.content_type,
                    "data": b64encode(i.data).decode("ascii"),
                }
                for i in issue.images
            ],
        }
    ).encode("utf-8")


def load_rendered(blob: bytes) -> RenderedIssue:
    """The :class:`RenderedIssue` stored by :func:`serialise_rendered`."""
    data = json.loads(blob)
    images = tuple(
        InlineImage(i["cid"], i["filename"], i["content_type"], b64decode(i["data"]))
        for i in data["images"]
    )
    return RenderedIssue(data["subject"], data["preheader"], data["html"], data["text"], images)


def find_issue(session: Session, digest_name: str, content_hash: str) -> Issue | None:
    """The newest issue of this digest (same file name or same content), unfinished first."""
    query = (
        select(Issue)
        .where(or_(Issue.digest_name == digest_name, Issue.content_hash == content_hash))
        .where(Issue.status != "cancelled")
        .order_by((Issue.status == "sending").desc(), Issue.id.desc())
        .limit(1)
    )
    return session.scalars(query).first()


def create_issue(
    store: Store,
    *,
    digest_path: str,
    digest_name: str,
    content_hash: str,
    rendered: RenderedIssue,
    force: bool,
) -> tuple[Issue, bool]:
    """Create the issue and snapshot the active subscribers into queued deliveries.

    Returns ``(issue, created)``; when another process created an unfinished issue
    of the same digest first, that one is returned (``created`` False) to be shared.
    One transaction: either the whole ledger exists or nothing does.
    """
    with store.write() as session:
        if not store.sqlite:
            session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ISSUE_LOCK})
        existing = find_issue(session, digest_name, content_hash)
        if existing is not None and (existing.status == "sending" or not force):
            return existing, False
        now = utcnow()
        rendered, archive_columns = place(session, rendered, digest_name, content_hash, existing)
        issue = Issue(
            digest_path=digest_path,
            digest_name=digest_name,
            content_hash=content_hash,
            subject=rendered.subject,
            status="sending",
            created_at=now,
            started_at=now,
            rendered=serialise_rendered(rendered),
            **archive_columns,
        )
        session.add(issue)
        session.flush()
        snapshot = select(
            literal(issue.id), Subscriber.id, Subscriber.email, literal("queued"), literal(0)
        ).where(Subscriber.status == "active")
        columns = ["issue_id", "subscriber_id", "email", "status", "attempts"]
        session.execute(insert(Delivery).from_select(columns, snapshot))
        # Not the INSERT's rowcount: PostgreSQL's driver reports -1 for INSERT … SELECT.
        issue.recipient_count = session.scalar(
            select(func.count()).where(Delivery.issue_id == issue.id)
        )
        return issue, True


def queue_mail(session: Session | Connection, kind: str, recipients: list[tuple[int, str]]) -> int:
    """Queue one-off mail of ``kind`` to each (subscriber id, address) in the caller's
    transaction: sent once that commits; on PostgreSQL the commit also wakes the workers
    listening. How many were queued."""
    if recipients:
        now = utcnow()
        session.execute(
            _QUEUE,
            [
                {"subscriber_id": subscriber_id, "email": email, "kind": kind, "created_at": now}
                for subscriber_id, email in recipients
            ],
        )
        if _postgresql(session):
            session.execute(_NOTIFY)
    return len(recipients)


_D = Delivery.__table__
_S = Subscriber.__table__
_QUEUE = insert(_D).values(status="queued", attempts=0)
_NOTIFY = select(func.pg_notify(MAIL_CHANNEL, ""))


def _in_scope(issue_id: Scope):
    return _D.c.issue_id.is_(None) if issue_id is None else _D.c.issue_id == issue_id


def _claim_statement(one_off: bool):
    due = (
        select(_D.c.id)
        .where(_D.c.issue_id.is_(None) if one_off else _D.c.issue_id == bindparam("b_issue"))
        .where(_D.c.status == "queued")
        .where(or_(_D.c.next_attempt_at.is_(None), _D.c.next_attempt_at <= bindparam("b_now")))
        .order_by(_D.c.id)
        .limit(bindparam("b_limit"))
        .with_for_update(skip_locked=True)
    )
    returned = [_D.c.id, _D.c.subscriber_id, _D.c.email, _D.c.attempts]
    return (
        update(_D)
        .where(_D.c.id.in_(due.scalar_subquery()))
        .values(
            status="sending",
            claimed_by=bindparam("b_owner"),
            claimed_at=bindparam("b_now"),
            attempts=_D.c.attempts + 1,
        )
        .returning(*returned, _D.c.kind)
    )


# Prebuilt statements: building an ORM update per message cost more than sending it.
_CLAIM = {one_off: _claim_statement(one_off) for one_off in (False, True)}
_PEOPLE = select(_S.c.id, _S.c.name, _S.c.status).where(
    _S.c.id.in_(bindparam("b_ids", expanding=True))
)
_MARK_SENT = (
    update(_D)
    .where(
        _D.c.id.in_(bindparam("b_ids", expanding=True)),
        _D.c.status == "sending",
        _D.c.claimed_by == bindparam("b_owner"),
    )
    .values(
        status="sent",
        claimed_by=None,
        message_id=cast(_D.c.id, String) + bindparam("b_suffix"),
        sent_at=bindparam("b_sent_at"),
    )
)


def delivery_message_id(delivery_id: int, owner: str, domain: str) -> str:
    """The Message-ID of a delivery's message as ``owner`` sends it: unique, and recorded
    with the delivery without being carried from the send to the ledger."""
    return f"{delivery_id}{_id_suffix(owner, domain)}"


def _id_suffix(owner: str, domain: str) -> str:
    return f".{owner[:16]}@{domain}"


def claim(db: Connection | Session, issue_id: Scope, owner: str, limit: int) -> list[Claimed]:
    """Take up to ``limit`` queued deliveries that are due; no other sender can take them."""
    now = utcnow()
    parameters = {"b_now": now, "b_owner": owner, "b_limit": limit}
    if issue_id is not None:
        parameters["b_issue"] = issue_id
    rows = db.execute(_CLAIM[issue_id is None], parameters).all()
    db.commit()
    if not rows:
        return []
    people = {
        sid: (name, status)
        for sid, name, status in db.execute(_PEOPLE, {"b_ids": [r.subscriber_id for r in rows]})
    }
    db.commit()
    claimed = []
    for row in sorted(rows, key=lambda r: r.id):
        name, status = people.get(row.subscriber_id, (None, None))
        mailable = status == "active" or (row.kind is not None and status not in STOPPED_STATUSES)
        claimed.append(
            Claimed(row.id, row.subscriber_id, row.email, row.attempts, name, mailable, row.kind)
        )
    return claimed


def record_sent(
    db: Connection | Session, owner: str, domain: str, ids: list[int], when: datetime
) -> None:
    """Mark the deliveries ``owner`` saw accepted (by ``when``) sent, in one statement, with
    the Message-IDs they went out with; rows no longer this owner's are left alone."""
    if ids:
        parameters = {"b_ids": ids, "b_owner": owner, "b_sent_at": when}
        db.execute(_MARK_SENT, parameters | {"b_suffix": _id_suffix(owner, domain)})
        db.commit()


def mark(db: Connection | Session, delivery_id: int, owner: str, status: str, **values) -> bool:
    """Record a final or retry state for a claimed delivery; False if it was not ours any more."""
    values.setdefault("claimed_by", None)
    result = db.execute(
        update(_D)
        .where(_D.c.id == delivery_id, _D.c.status == "sending", _D.c.claimed_by == owner)
        .values(status=status, **values)
    )
    return result.rowcount == 1


def mark_bounced(db: Connection, claimed: Claimed, owner: str, answer: str) -> None:
    """A permanent user-unknown answer: the delivery and the subscriber are bounced."""
    if mark(db, claimed.id, owner, "bounced", last_answer=answer):
        with Session(bind=db) as session:
            unsubscribe(session, claimed.subscriber_id, status="bounced")
            session.flush()


def release(db: Connection | Session, delivery_ids: list[int], owner: str) -> None:
    """Give back claimed deliveries that were never sent (a stop before their turn)."""
    if delivery_ids:
        db.execute(
            update(_D)
            .where(_D.c.id.in_(delivery_ids), _D.c.claimed_by == owner, _D.c.status == "sending")
            .values(status="queued", claimed_by=None, attempts=_D.c.attempts - 1)
        )
        db.commit()


def renew(db: Connection | Session, delivery_ids: list[int], owner: str) -> set[int]:
    """Renew this sender's claim on rows it holds; the ids that are still its own (those
    taken back while it was paused must not be sent by it any more)."""
    if not delivery_ids:
        return set()
    kept = db.execute(
        update(_D)
        .where(_D.c.id.in_(delivery_ids), _D.c.claimed_by == owner, _D.c.status == "sending")
        .values(claimed_at=utcnow())
        .returning(_D.c.id)
    ).scalars()
    held = set(kept)
    db.commit()
    return held


def bound_transactions(db: Connection, seconds: int) -> None:
    """PostgreSQL ends this connection's session if it sits in an open transaction longer
    than ``seconds``: a sender paused there (a stopped process, a suspended VM) would
    otherwise hold row locks that keep everyone else from taking its rows over."""
    if _postgresql(db):
        db.exec_driver_sql(f"SET idle_in_transaction_session_timeout = {int(seconds * 1000)}")
        db.commit()


def _postgresql(db: Connection | Session) -> bool:
    bind = db if isinstance(db, Connection) else db.get_bind()
    return bind.dialect.name == "postgresql"


def _owner_alive(db: Connection | Session, owner: str) -> bool:
    """PostgreSQL: whether the sender's session still holds its advisory lock (wherever it
    runs). The try takes a transaction lock, let go at the caller's commit."""
    if not _postgresql(db):
        return False
    got = db.scalar(select(func.pg_try_advisory_xact_lock(owner_key(owner))))
    return not got


@dataclass(frozen=True)
class Takeover:
    """What taking deliveries over from other senders needs to know."""

    journals: Path  # where senders on this host keep their journals
    stale: timedelta  # how long a claim lasts without being renewed
    domain: str  # of the Message-IDs a replayed journal's messages went out with

    @classmethod
    def of(cls, settings: Settings) -> Takeover:
        return cls(
            journal_dir(settings.database_url),
            timedelta(seconds=settings.claim_timeout),
            message_domain(settings.from_address),
        )


def reclaim_abandoned(
    db: Connection | Session, issue_id: Scope, me: str, takeover: Takeover
) -> int:
    """Requeue deliveries claimed by senders that died, or that have not renewed their
    claims for ``stale``; the number of rows requeued.

    First what such a sender journaled on this host is marked sent: the server accepted
    it. What is left may or may not have reached the server: these in-flight messages are
    the only ones that can go twice.
    """
    stale_before = utcnow() - takeover.stale
    claimants = db.scalars(
        select(_D.c.claimed_by)
        .where(_in_scope(issue_id), _D.c.status == "sending", _D.c.claimed_by != me)
        .distinct()
    ).all()
    dead = []
    for owner in claimants:
        alive_elsewhere = _owner_alive(db, owner)
        with examine(owner, takeover.journals) as found:
            alive = alive_elsewhere or found.alive
            if alive and not db.scalar(
                select(exists().where(_D.c.claimed_by == owner, _D.c.claimed_at < stale_before))
            ):
                continue
            journaled = found.entries()
            if journaled:
                last = max(when for _, when in journaled)
                record_sent(db, owner, takeover.domain, [i for i, _ in journaled], last)
            found.discard()
        if not alive:
            dead.append(owner)
    result = db.execute(
        update(_D)
        .where(_in_scope(issue_id), _D.c.status == "sending", _D.c.claimed_by != me)
        .where(or_(_D.c.claimed_by.in_(dead), _D.c.claimed_at < stale_before))
        .values(status="queued", claimed_by=None)
    )
    db.commit()
    return result.rowcount


def forget_dead_journals(db: Connection | Session, journals: Path) -> int:
    """Delete the journals of dead senders and workers that hold no claim any more (what
    they journaled is in the ledger); how many."""
    forgotten = 0
    for owner in owners(journals):
        with examine(owner, journals) as found:
            if found.alive or _owner_alive(db, owner):
                continue
            if not db.scalar(select(exists().where(_D.c.claimed_by == owner))):
                found.discard()
                forgotten += 1
        db.commit()
    return forgotten


def waiting_on(
    db: Connection | Session, issue_id: Scope, owner: str
) -> tuple[int, datetime | None]:
    """Deliveries another worker may still need: queued ones (and when the first is due),
    plus those claimed by other senders, which this one takes over if they die."""
    queued, due = db.execute(
        select(func.count(), func.min(_D.c.next_attempt_at)).where(
            _in_scope(issue_id), _D.c.status == "queued"
        )
    ).one()
    elsewhere = db.scalar(
        select(func.count()).where(
            _in_scope(issue_id), _D.c.status == "sending", _D.c.claimed_by != owner
        )
    )
    db.commit()
    return queued + (elsewhere or 0), due


def open_count(session: Session, issue_id: Scope) -> int:
    """How many deliveries are still queued or being sent."""
    count = session.scalar(
        select(func.count()).where(_in_scope(issue_id), _D.c.status.in_(OPEN_STATUSES))
    )
    session.commit()
    return count or 0


def finish_if_done(session: Session, issue_id: int) -> bool:
    """Mark the issue sent once no delivery is open; idempotent, safe from many processes."""
    still_open = exists().where(Delivery.issue_id == issue_id, Delivery.status.in_(OPEN_STATUSES))
    finished = session.execute(
        update(Issue)
        .where(Issue.id == issue_id, Issue.status == "sending", ~still_open)
        .values(status="sent", finished_at=utcnow())
    ).rowcount
    if finished:
        counts = delivery_counts(session, issue_id)
        session.execute(
            update(Issue)
            .where(Issue.id == issue_id)
            .values(sent_count=counts["sent"], failed_count=counts["failed"] + counts["bounced"])
        )
    session.commit()
    return bool(finished) or session.get(Issue, issue_id).status == "sent"


def prune_one_off(session: Session, older_than: timedelta) -> int:
    """Delete one-off mail that reached a final state ``older_than`` ago: a confirmation
    link is personal data, and a week after sending it has expired anyway."""
    return session.execute(
        Delivery.__table__.delete()
        .where(_D.c.issue_id.is_(None), _D.c.status.not_in(OPEN_STATUSES))
        .where(_D.c.created_at < utcnow() - older_than)
    ).rowcount


def describe_issues(session: Session, issue_id: int | None = None) -> list[dict]:
    """Issues, newest first, with live delivery counts (queued, sent, failed, ...)."""
    query = select(Issue).order_by(Issue.id.desc())
    if issue_id is not None:
        query = query.where(Issue.id == issue_id)
    described = []
    for issue in session.scalars(query):
        counts = delivery_counts(session, issue.id)
        final = issue.status == "sent"
        described.append(
            {
                "id": issue.id,
                "subject": issue.subject,
                "digest": issue.digest_name,
                "status": issue.status,
                "recipients": issue.recipient_count,
                "queued": counts["queued"] + counts["sending"],
                "sent": issue.sent_count if final else counts["sent"],
                "failed": issue.failed_count if final else counts["failed"] + counts["bounced"],
                "skipped": counts["skipped"],
                "created_at": issue.created_at.isoformat(timespec="seconds"),
                "finished_at": issue.finished_at.isoformat(timespec="seconds")
                if issue.finished_at
                else None,
            }
        )
    return described


def failed_deliveries(
    session: Session, issue_id: int, limit: int = 50
) -> list[tuple[str, str, str]]:
    """(address, status, last answer) of an issue's failed and bounced deliveries."""
    rows = session.execute(
        select(Delivery.email, Delivery.status, Delivery.last_answer)
        .where(Delivery.issue_id == issue_id, Delivery.status.in_(("failed", "bounced")))
        .order_by(Delivery.id)
        .limit(limit)
    )
    return [(email, status, answer or "") for email, status, answer in rows]
