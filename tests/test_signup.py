"""Signup rules below the web layer: client keys, concurrency, and forgetting old attempts."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func, select, update
from threads import at_once, errors

from newsletter import signup
from newsletter.config import Settings
from newsletter.store import OutboundMail, SignupAttempt, Store, Subscriber, utcnow


@pytest.mark.parametrize(
    ("ip", "key"),
    [
        ("192.0.2.7", "ip:192.0.2.7"),
        ("2001:db8:1:2:3:4:5:6", "ip:2001:db8:1:2::/64"),
        ("::ffff:192.0.2.7", "ip:192.0.2.7"),
        ("", "ip:unknown"),
        (None, "ip:unknown"),
        ("not an ip", "ip:unknown"),
    ],
)
def test_client_key(ip: str | None, key: str) -> None:
    """IPv4 counts per address, IPv6 per /64 (one home or host), anything else as unknown."""
    assert signup.client_key(ip) == key


def test_concurrent_signups_all_land(store: Store, web_settings: Settings) -> None:
    """Sixteen threads signing up at once: no 'database is locked', every address stored
    with exactly one queued confirmation."""
    tokens = signup.make_tokens(web_settings, store)

    def work(n: int) -> None:
        for i in range(8):
            outcome = signup.signup(
                store,
                web_settings,
                tokens,
                email=f"r{n}-{i}@example.com",
                ip=f"10.0.{n}.{i}",
            )
            assert outcome == "queued"

    assert errors(at_once(16, work)) == []
    with store.session() as session:
        assert session.scalar(select(func.count()).select_from(Subscriber)) == 128
        assert session.scalar(select(func.count(func.distinct(OutboundMail.recipient)))) == 128
        assert session.scalar(select(func.count()).select_from(OutboundMail)) == 128


def test_one_address_signed_up_by_many_at_once(store: Store, web_settings: Settings) -> None:
    """Ten simultaneous signups of one address make one subscriber and exactly
    PER_ADDRESS_LIMIT confirmations: the limit holds under a race."""
    tokens = signup.make_tokens(web_settings, store)

    def work(n: int) -> None:
        signup.signup(store, web_settings, tokens, email="victim@example.com", ip=f"10.1.0.{n}")

    assert errors(at_once(10, work)) == []
    with store.session() as session:
        assert session.scalar(select(func.count()).select_from(Subscriber)) == 1
        mails = session.scalar(select(func.count()).select_from(OutboundMail))
    assert mails == signup.PER_ADDRESS_LIMIT


def test_old_attempts_are_forgotten(store: Store, web_settings: Settings) -> None:
    """prune_attempts deletes attempts older than the longest window and keeps the rest."""
    tokens = signup.make_tokens(web_settings, store)
    for n in range(3):
        signup.signup(store, web_settings, tokens, email=f"a{n}@example.com", ip="192.0.2.1")
    with store.begin() as session:
        session.execute(
            update(SignupAttempt)
            .where(SignupAttempt.key == "a0@example.com")
            .values(attempted_at=utcnow() - timedelta(days=2))
        )
    assert signup.prune_attempts(store) == 1
    with store.session() as session:
        keys = sorted(session.scalars(select(SignupAttempt.key)))
    assert keys == ["a1@example.com", "a2@example.com"] + ["ip:192.0.2.1"] * 3


def test_ip_limit_holds_within_one_batch(store: Store, web_settings: Settings) -> None:
    """Twenty-five signups from one IP at once, most of them written in the same
    transaction: exactly PER_IP_LIMIT are taken, the rest are told when to come back."""
    tokens = signup.make_tokens(web_settings, store)
    outcomes: list[object] = []

    def work(n: int) -> None:
        try:
            outcomes.append(
                signup.signup(
                    store, web_settings, tokens, email=f"m{n}@example.com", ip="192.0.2.9"
                )
            )
        except signup.TooManySignups as exc:
            outcomes.append(exc)

    assert errors(at_once(signup.PER_IP_LIMIT + 5, work)) == []
    refused = [o for o in outcomes if isinstance(o, signup.TooManySignups)]
    assert outcomes.count("queued") == signup.PER_IP_LIMIT and len(refused) == 5
    assert all(3500 < exc.retry_after <= 3600 for exc in refused)
    with store.session() as session:
        assert session.scalar(select(func.count()).select_from(OutboundMail)) == signup.PER_IP_LIMIT
