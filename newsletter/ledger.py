"""The send ledger: one delivery row per (issue, subscriber) and its life.

    queued ──claim──► sending ──server accepted──► sent
       ▲                 │ 4xx / dropped ─► queued again (next_attempt_at), or failed at last
       └──release/stale──┘ 5xx ─► failed; 5.1.x ─► bounced (and the subscriber too)

A row becomes ``sent`` only after the server accepted its message, and a claim is
taken and released row by row, never moved past rows that were fetched but not
sent. So a process killed at any moment leaves at most its in-flight messages in
doubt: rows it claimed are ``sending`` under its name and go back to ``queued``
when it is known dead (same host, no such process) or its claim is stale.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import uuid
from base64 import b64decode, b64encode
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import (
    Connection,
    bindparam,
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

from newsletter.journal import discard, recover
from newsletter.render import InlineImage, RenderedIssue
from newsletter.store import Delivery, Issue, Store, Subscriber, delivery_counts, utcnow
from newsletter.subscribers import unsubscribe

OPEN_STATUSES = ("queued", "sending")
STALE_CLAIM = timedelta(minutes=10)
_ISSUE_LOCK = 0x6E6C6973  # PostgreSQL advisory lock held while an issue is created


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot), None if it is gone or a zombie.

    With the pid alone, a restarted container (same host name, same small pid) or a
    recycled pid would look like the dead sender still at work.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return "?"
    fields = stat.rpartition(")")[2].split()
    return None if fields[0] in {"Z", "X"} else fields[19]


def _machine() -> str:
    """This kernel boot and pid namespace: where a pid means the same process as ours."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
        namespace = "".join(ch for ch in os.readlink("/proc/self/ns/pid") if ch.isdigit())
    except OSError:
        return "?"
    return f"{boot}-{namespace}"


_LIVE_OWNERS: set[str] = set()  # senders running in this process right now
_LIVE_LOCK = threading.Lock()


def new_owner() -> str:
    """A name for a sender, recorded on the rows it claims: host, boot and pid namespace,
    pid and process start time, and a unique suffix (several senders may share a process)."""
    pid = os.getpid()
    started = _process_start(pid) or "?"
    return f"{socket.gethostname()}:{_machine()}:{pid}:{started}:{uuid.uuid4().hex[:8]}"


def register_owner(owner: str, live: bool) -> None:
    """Note that a sender of this process started or finished (see :func:`_owner_is_dead`)."""
    with _LIVE_LOCK:
        (_LIVE_OWNERS.add if live else _LIVE_OWNERS.discard)(owner)


def _owner_is_dead(owner: str, me: str) -> bool:
    """True only when ``owner`` is known to be gone; when in doubt, the stale timeout decides.

    Known gone: it ran in this very process and is not running any more, or it ran on
    this host, in this boot and pid namespace, and its pid is free or now belongs to a
    process that started at another time.
    """
    host, machine, pid, started, _ = [*owner.split(":"), "", "", "", ""][:5]
    if owner == me or host != socket.gethostname() or machine != _machine() or "?" in machine:
        return False
    if not pid.isdigit():
        return False
    if int(pid) == os.getpid() and started == _process_start(os.getpid()):
        with _LIVE_LOCK:
            return owner not in _LIVE_OWNERS
    now_started = _process_start(int(pid))
    if now_started is None:
        return True
    return "?" not in (now_started, started) and now_started != started


@dataclass(frozen=True)
class Claimed:
    """A delivery this process owns until it records an outcome or releases it."""

    id: int
    subscriber_id: int
    email: str
    attempts: int
    name: str | None
    active: bool


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


def _write_lock(connection: Connection) -> None:
    """Serialise issue creation across processes (two `send` runs started at once)."""
    if connection.dialect.name == "sqlite":
        connection.exec_driver_sql("BEGIN IMMEDIATE")
    else:
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ISSUE_LOCK})


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
    with store.engine.connect() as connection:
        _write_lock(connection)
        with Session(bind=connection, expire_on_commit=False) as session:
            existing = find_issue(session, digest_name, content_hash)
            if existing is not None and (existing.status == "sending" or not force):
                connection.rollback()
                return existing, False
            now = utcnow()
            issue = Issue(
                digest_path=digest_path,
                digest_name=digest_name,
                content_hash=content_hash,
                subject=rendered.subject,
                status="sending",
                created_at=now,
                started_at=now,
                rendered=serialise_rendered(rendered),
            )
            session.add(issue)
            session.flush()
            snapshot = select(
                literal(issue.id), Subscriber.id, Subscriber.email, literal("queued"), literal(0)
            ).where(Subscriber.status == "active")
            columns = ["issue_id", "subscriber_id", "email", "status", "attempts"]
            result = session.execute(insert(Delivery).from_select(columns, snapshot))
            issue.recipient_count = result.rowcount
            session.commit()
            connection.commit()
            return issue, True


_D = Delivery.__table__
_S = Subscriber.__table__
_DUE = (
    select(_D.c.id)
    .where(_D.c.issue_id == bindparam("b_issue"), _D.c.status == "queued")
    .where(or_(_D.c.next_attempt_at.is_(None), _D.c.next_attempt_at <= bindparam("b_now")))
    .order_by(_D.c.id)
    .limit(bindparam("b_limit"))
    .with_for_update(skip_locked=True)
)
# Prebuilt statements: building an ORM update per message cost more than sending it.
_CLAIM = (
    update(_D)
    .where(_D.c.id.in_(_DUE.scalar_subquery()))
    .values(
        status="sending",
        claimed_by=bindparam("b_owner"),
        claimed_at=bindparam("b_now"),
        attempts=_D.c.attempts + 1,
    )
    .returning(_D.c.id, _D.c.subscriber_id, _D.c.email, _D.c.attempts)
)
_PEOPLE = select(_S.c.id, _S.c.name, _S.c.status).where(
    _S.c.id.in_(bindparam("b_ids", expanding=True))
)
_MARK_SENT = (
    update(_D)
    .where(
        _D.c.id == bindparam("b_id"),
        _D.c.status == "sending",
        _D.c.claimed_by == bindparam("b_owner"),
    )
    .values(
        status="sent",
        claimed_by=None,
        last_answer=bindparam("b_answer"),
        message_id=bindparam("b_message_id"),
        sent_at=bindparam("b_sent_at"),
    )
)


def claim(db: Connection | Session, issue_id: int, owner: str, limit: int) -> list[Claimed]:
    """Take up to ``limit`` queued deliveries that are due; no other process can take them."""
    now = utcnow()
    rows = db.execute(
        _CLAIM, {"b_issue": issue_id, "b_now": now, "b_owner": owner, "b_limit": limit}
    ).all()
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
        claimed.append(
            Claimed(row.id, row.subscriber_id, row.email, row.attempts, name, status == "active")
        )
    return claimed


def record_sent(
    db: Connection | Session, owner: str, sent: list[tuple[int, str, str, datetime]]
) -> None:
    """Mark accepted deliveries sent, many in one statement and one commit.

    ``sent`` holds (delivery id, server answer, message id, time accepted); rows that
    are no longer this owner's are left alone.
    """
    if sent:
        db.execute(
            _MARK_SENT,
            [
                {"b_id": i, "b_owner": owner, "b_answer": a, "b_message_id": m, "b_sent_at": t}
                for i, a, m, t in sent
            ],
        )
        db.commit()


def mark(db: Connection | Session, delivery_id: int, owner: str, status: str, **values) -> bool:
    """Record a final or retry state for a claimed delivery; False if it was not ours any more."""
    if status != "sending":
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


def _update_claimed(db: Connection | Session, ids: list[int], owner: str, **values) -> None:
    if ids:
        db.execute(
            update(_D)
            .where(_D.c.id.in_(ids), _D.c.claimed_by == owner, _D.c.status == "sending")
            .values(**values)
        )
        db.commit()


def release(db: Connection | Session, delivery_ids: list[int], owner: str) -> None:
    """Give back claimed deliveries that were never sent (a stop before their turn)."""
    _update_claimed(
        db, delivery_ids, owner, status="queued", claimed_by=None, attempts=_D.c.attempts - 1
    )


def touch(db: Connection | Session, delivery_ids: list[int], owner: str) -> None:
    """Renew this process's claim on rows it still holds, so they never look abandoned."""
    _update_claimed(db, delivery_ids, owner, claimed_at=utcnow())


def reclaim_abandoned(
    db: Connection | Session, issue_id: int, me: str = "", journals: Path | None = None
) -> int:
    """Requeue deliveries claimed by a process that died (same host) or went silent.

    A dead same-host sender's journal is replayed first: what the server accepted is
    marked sent. What is left may or may not have reached the server before the
    crash: these in-flight messages are the only ones that can go twice.
    """
    owners = db.scalars(
        select(_D.c.claimed_by)
        .where(_D.c.issue_id == issue_id, _D.c.status == "sending")
        .distinct()
    ).all()
    dead = [owner for owner in owners if owner and _owner_is_dead(owner, me)]
    for owner in dead:
        replayed = recover(owner, journals)
        record_sent(db, owner, [(i, "250 (from the journal)", m, t) for i, m, t in replayed])
        discard(owner, journals)
    stale_before = utcnow() - STALE_CLAIM
    result = db.execute(
        update(_D)
        .where(_D.c.issue_id == issue_id, _D.c.status == "sending")
        .where(or_(_D.c.claimed_by.in_(dead), _D.c.claimed_at < stale_before))
        .values(status="queued", claimed_by=None)
    )
    db.commit()
    return result.rowcount


def next_due(session: Session, issue_id: int) -> tuple[int, datetime | None]:
    """How many deliveries are still open, and when the earliest queued one is due."""
    open_count, due = session.execute(
        select(func.count(), func.min(Delivery.next_attempt_at)).where(
            Delivery.issue_id == issue_id, Delivery.status.in_(OPEN_STATUSES)
        )
    ).one()
    session.commit()
    return open_count, due


def waiting_on(session: Session, issue_id: int, owner: str) -> tuple[int, datetime | None]:
    """Deliveries another worker may still need: queued ones (and when the first is due),
    plus those claimed by other processes, which this one takes over if they die."""
    queued, due = session.execute(
        select(func.count(), func.min(Delivery.next_attempt_at)).where(
            Delivery.issue_id == issue_id, Delivery.status == "queued"
        )
    ).one()
    elsewhere = session.scalar(
        select(func.count()).where(
            Delivery.issue_id == issue_id,
            Delivery.status == "sending",
            Delivery.claimed_by != owner,
        )
    )
    session.commit()
    return queued + (elsewhere or 0), due


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


def describe_issues(session: Session, issue_id: int | None = None) -> list[dict]:
    """Issues, newest first, with live delivery counts (queued, sent, failed, ...)."""
    query = select(Issue).order_by(Issue.id.desc())
    if issue_id is not None:
        query = query.where(Issue.id == issue_id)
    described = []
    for issue in session.scalars(query):
        counts = delivery_counts(session, issue.id)
        described.append(
            {
                "id": issue.id,
                "subject": issue.subject,
                "digest": issue.digest_name,
                "status": issue.status,
                "recipients": issue.recipient_count,
                "queued": counts["queued"] + counts["sending"],
                "sent": counts["sent"] if issue.status != "sent" else issue.sent_count,
                "failed": counts["failed"] + counts["bounced"]
                if issue.status != "sent"
                else issue.failed_count,
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
