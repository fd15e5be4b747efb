"""Signup rules below the web layer: client keys, concurrency, and forgetting old attempts."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func, select, update
from threads import at_once, errors

from newsletter import signup
from newsletter.config import Settings
from newsletter.store import Delivery, SignupAttempt, Store, Subscriber, utcnow


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
        assert session.scalar(select(func.count(func.distinct(Delivery.email)))) == 128
        assert session.scalar(select(func.count()).select_from(Delivery)) == 128


def test_one_address_signed_up_by_many_at_once(store: Store, web_settings: Settings) -> None:
    """Ten simultaneous signups of one address make one subscriber and exactly
    PER_ADDRESS_LIMIT confirmations: the limit holds under a race."""
    tokens = signup.make_tokens(web_settings, store)

    def work(n: int) -> None:
        signup.signup(store, web_settings, tokens, email="victim@example.com", ip=f"10.1.0.{n}")

    assert errors(at_once(10, work)) == []
    with store.session() as session:
        assert session.scalar(select(func.count()).select_from(Subscriber)) == 1
        mails = session.scalar(select(func.count()).select_from(Delivery))
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


def test_ip_limit_holds_under_a_race(store: Store, web_settings: Settings) -> None:
    """Twenty-five signups from one IP at once: exactly PER_IP_LIMIT are taken, the rest
    are told when to come back."""
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
        assert session.scalar(select(func.count()).select_from(Delivery)) == signup.PER_IP_LIMIT


def test_a_signup_never_renames_someone_on_the_list(store: Store, web_settings: Settings) -> None:
    """A second signup of a known address with another name (even one the per-address limit
    holds back) leaves the stored name as it was."""
    tokens = signup.make_tokens(web_settings, store)
    signup.signup(store, web_settings, tokens, email="ada@example.com", name="Ada", ip="10.0.0.1")
    for n in range(signup.PER_ADDRESS_LIMIT + 1):
        signup.signup(
            store, web_settings, tokens, email="ada@example.com", name=f"Eve {n}", ip="10.0.0.2"
        )
    with store.session() as session:
        assert session.scalar(select(Subscriber.name)) == "Ada"


@pytest.mark.parametrize("control", ["\u202e", "\u202a", "\u2066", "\u2069", "\u200f"])
def test_names_with_bidi_controls_are_refused(store, web_settings, control: str) -> None:
    """A name that would display as something else than it is (bidi controls) is refused
    like other control characters, and nothing is stored."""
    tokens = signup.make_tokens(web_settings, store)
    with pytest.raises(signup.InvalidSignup) as refused:
        signup.signup(
            store, web_settings, tokens, email="a@example.com", name=f"Ada{control}evE", ip="::1"
        )
    assert refused.value.field == "name"
    assert refused.value.reason == "The name has a line break or control character."
    with store.session() as session:
        assert session.scalar(select(func.count()).select_from(Subscriber)) == 0
