"""A small world for bounce tests: subscribers with a sent issue delivery each."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from newsletter.config import load_settings
from newsletter.store import Delivery, Issue, Store, Subscriber, utcnow
from newsletter.subscribers import add

SECRET = "bounce-test-secret"
OWNER = "0123456789abcdef"


@dataclass(frozen=True)
class Sent:
    """One delivery of an issue as the ledger records it once the server took it."""

    delivery_id: int
    issue_id: int
    email: str
    message_id: str


def settings(tmp_path: Path, database_url: str, **env: str):
    base = {
        "NEWSLETTER_DATABASE_URL": database_url,
        "NEWSLETTER_SECRET_KEY": SECRET,
        "NEWSLETTER_FROM": "Weekly Links <links@example.com>",
        "NEWSLETTER_BOUNCE_ADDRESS": "bounces@example.com",
        "NEWSLETTER_OUTBOX_DIR": str(tmp_path / "outbox"),
    }
    return load_settings(base | env, dotenv_path=Path("/nonexistent"))


def subscribe(store: Store, *addresses: str) -> None:
    with store.begin() as session:
        for address in addresses:
            add(session, address)


def send_issue(store: Store, *addresses: str, subject: str = "Weekly Links") -> list[Sent]:
    """An issue, finished, with one sent delivery per address (subscribed if need be)."""
    with store.begin() as session:
        now = utcnow()
        issue = Issue(
            digest_path="/digests/d.md",
            digest_name=f"{subject}.md",
            content_hash=subject,
            subject=subject,
            status="sent",
            started_at=now,
            finished_at=now,
            recipient_count=len(addresses),
            sent_count=len(addresses),
        )
        session.add(issue)
        session.flush()
        sent = []
        for address in addresses:
            subscriber = session.query(Subscriber).filter_by(email=address).one_or_none()
            if subscriber is None:
                subscriber = add(session, address)
                session.flush()
            delivery = Delivery(
                issue_id=issue.id,
                subscriber_id=subscriber.id,
                email=address,
                status="sent",
                attempts=1,
                sent_at=now,
            )
            session.add(delivery)
            session.flush()
            delivery.message_id = f"{delivery.id}.{OWNER}@example.com"
            sent.append(Sent(delivery.id, issue.id, address, delivery.message_id))
        return sent


def status_of(store: Store, address: str) -> str:
    with store.session() as session:
        return session.query(Subscriber).filter_by(email=address).one().status
