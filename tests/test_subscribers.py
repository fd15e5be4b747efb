"""Subscribers: validation, the status rule, add, confirm, unsubscribe, purge and listing."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from newsletter import subscribers
from newsletter.errors import InputError
from newsletter.store import (
    Delivery,
    Issue,
    SignupAttempt,
    Store,
    Subscriber,
)


def _count(store: Store, model: type = Subscriber) -> int:
    with store.session() as session:
        return session.scalar(select(func.count()).select_from(model))


@pytest.mark.parametrize(
    ("raw", "stored"),
    [
        ("Ada@Example.COM", "ada@example.com"),
        ("  ada@example.com\n", "ada@example.com"),
        ("x@MÜNCHEN.de", "x@münchen.de"),
        ("x@xn--mnchen-3ya.de", "x@münchen.de"),
        ("Zoë@Example.org", "zoë@example.org"),
    ],
)
def test_addresses_are_normalised_to_one_spelling(raw: str, stored: str) -> None:
    """Case, surrounding space and IDNA spellings of one address all normalise to the same text."""
    assert subscribers.normalise_email(raw) == stored


@pytest.mark.parametrize(
    "raw", ["", "ada", "ada@localhost", "ada@@example.com", "a b@example.com", "ada@example"]
)
def test_invalid_addresses_are_refused_naming_the_field(raw: str) -> None:
    """An address that cannot receive mail is one line naming the field (no DNS look-up)."""
    with pytest.raises(InputError, match=r"^email: ") as caught:
        subscribers.normalise_email(raw)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("raw", ["Ann\r\nBcc: x@example.net", "Ann\nB", "Ann\x00", "A\u2028B"])
def test_names_with_line_breaks_or_control_characters_are_refused(raw: str) -> None:
    """A name that could inject a mail header is refused, naming the character."""
    with pytest.raises(InputError, match=r"^name: contains a line break or control character"):
        subscribers.validate_name(raw)


def test_names_keep_any_script_and_emoji() -> None:
    """Non-ASCII names and emoji sequences (which use joiners) are kept, trimmed; blank is None."""
    assert subscribers.validate_name("  Zoë Łukasiewicz  ") == "Zoë Łukasiewicz"
    assert subscribers.validate_name("👩‍💻 Ada") == "👩‍💻 Ada"
    assert subscribers.validate_name("   ") is None
    with pytest.raises(InputError, match="longer than 200"):
        subscribers.validate_name("x" * 201)


def test_unknown_status_is_refused() -> None:
    """A status outside the five is refused with the list of valid ones."""
    assert subscribers.validate_status(" Active ") == "active"
    with pytest.raises(InputError, match=r"^status: 'vip' is not one of pending, active"):
        subscribers.validate_status("vip")


@pytest.mark.parametrize(
    ("current", "wanted", "resubscribe", "result"),
    [
        ("pending", "active", False, "active"),
        ("active", "pending", False, "active"),
        ("active", "unsubscribed", False, "unsubscribed"),
        ("unsubscribed", "active", False, None),
        ("bounced", "pending", False, None),
        ("complained", "active", True, "active"),
        ("bounced", "unsubscribed", False, "bounced"),
    ],
)
def test_status_rule(current: str, wanted: str, resubscribe: bool, result: str | None) -> None:
    """Towards less mail is always allowed, keeping the first reason; back from a stop only with
    resubscribe; active never back to pending."""
    assert subscribers.next_status(current, wanted, resubscribe) == result


def test_add_creates_an_active_confirmed_subscriber(store: Store) -> None:
    """add makes an active subscriber from the CLI, confirmed now, with the address normalised."""
    with store.begin() as session:
        added = subscribers.add(session, "Ada@Example.com", " Ada Lovelace ")
    assert (added.email, added.name, added.status, added.source) == (
        "ada@example.com",
        "Ada Lovelace",
        "active",
        "cli",
    )
    assert added.confirmed_at is not None and added.unsubscribed_at is None


def test_add_pending_waits_for_confirmation(store: Store) -> None:
    """A pending subscriber has no confirmation time until confirm() is called."""
    with store.begin() as session:
        added = subscribers.add(session, "ada@example.com", status="pending", source="form")
        assert added.confirmed_at is None
        confirmed = subscribers.confirm(session, added.id)
    assert confirmed.status == "active" and confirmed.confirmed_at is not None


def test_add_refuses_an_address_differing_only_in_case(store: Store) -> None:
    """The same address in other capitals is the same subscriber: refused, one row kept."""
    with store.begin() as session:
        subscribers.add(session, "ada@example.com")
    already = r"^ada@example.com is already a subscriber \(active\)"
    with pytest.raises(InputError, match=already), store.begin() as session:
        subscribers.add(session, "ADA@EXAMPLE.COM")
    assert _count(store) == 1


def test_add_activates_a_pending_subscriber(store: Store) -> None:
    """Adding a pending address as active confirms it on the owner's word."""
    with store.begin() as session:
        subscribers.add(session, "ada@example.com", status="pending")
        again = subscribers.add(session, "ada@example.com", "Ada")
    assert (again.status, again.name) == ("active", "Ada")


def test_add_never_resubscribes_without_consent(store: Store) -> None:
    """Someone who unsubscribed is refused unless resubscribe is given, which clears the stop."""
    with store.begin() as session:
        subscribers.remove(session, subscribers.add(session, "ada@example.com").email)
    refused = r"is unsubscribed since \d{4}-.*--resubscribe"
    with pytest.raises(InputError, match=refused), store.begin() as session:
        subscribers.add(session, "ada@example.com")
    with store.begin() as session:
        back = subscribers.add(session, "ada@example.com", resubscribe=True)
    assert (back.status, back.unsubscribed_at) == ("active", None)


def test_add_with_a_bad_name_writes_nothing(store: Store) -> None:
    """A header-injection attempt in a name is refused and the database is unchanged."""
    with pytest.raises(InputError, match=r"^name: "), store.begin() as session:
        subscribers.add(session, "ada@example.com", "Ada\r\nBcc: all@example.net")
    assert _count(store) == 0


def test_remove_keeps_the_row_as_unsubscribed(store: Store) -> None:
    """remove stops mail but keeps the row, with the time mail stopped."""
    with store.begin() as session:
        subscribers.add(session, "ada@example.com")
        removed = subscribers.remove(session, "ADA@example.com")
    assert removed.status == "unsubscribed" and removed.unsubscribed_at is not None
    assert _count(store) == 1


def test_remove_of_an_unknown_address_is_an_error(store: Store) -> None:
    """Removing an address that is not on the list says so in one line."""
    unknown = r"^nobody@example.com is not a subscriber$"
    with pytest.raises(InputError, match=unknown), store.begin() as session:
        subscribers.remove(session, "nobody@example.com")


def test_a_stopped_subscriber_keeps_the_first_reason(store: Store) -> None:
    """A bounced subscriber who is then unsubscribed stays bounced, with the original date."""
    with store.begin() as session:
        added = subscribers.add(session, "ada@example.com")
        bounced = subscribers.unsubscribe(session, added.id, status="bounced")
        stopped_at = bounced.unsubscribed_at
        again = subscribers.unsubscribe(session, added.id)
    assert (again.status, again.unsubscribed_at) == ("bounced", stopped_at)


def test_a_stale_confirm_link_does_not_resubscribe(store: Store) -> None:
    """Confirming someone who unsubscribed since leaves them unsubscribed."""
    with store.begin() as session:
        added = subscribers.add(session, "ada@example.com", status="pending")
        subscribers.unsubscribe(session, added.id)
        assert subscribers.confirm(session, added.id).status == "unsubscribed"


def test_purge_erases_the_subscriber_and_every_row_naming_them(store: Store) -> None:
    """purge deletes the subscriber, their deliveries, queued mail and rate-limit rows, and
    nobody else's; the issue's totals stay as they were."""
    with store.begin() as session:
        ada = subscribers.add(session, "ada@example.com")
        bob = subscribers.add(session, "bob@example.com")
        issue = Issue(
            digest_path="d/a.md",
            digest_name="a.md",
            content_hash="h",
            subject="A",
            status="sent",
            recipient_count=2,
            sent_count=2,
        )
        session.add(issue)
        session.flush()
        for who in (ada, bob):
            session.add(Delivery(issue_id=issue.id, subscriber_id=who.id, email=who.email))
            session.add(Delivery(subscriber_id=who.id, email=who.email, kind="confirm"))
            session.add(SignupAttempt(key=who.email))
    with store.begin() as session:
        deleted = subscribers.purge(session, "Ada@Example.com")
    assert deleted == {"subscribers": 1, "deliveries": 2, "signup_attempts": 1}
    with store.session() as session:
        assert session.scalars(select(Subscriber.email)).all() == ["bob@example.com"]
        assert session.scalars(select(Delivery.email)).all() == ["bob@example.com"] * 2
        assert session.scalars(select(SignupAttempt.key)).all() == ["bob@example.com"]
        assert session.scalar(select(Issue.sent_count)) == 2


def test_purge_of_an_unknown_address_is_an_error(store: Store) -> None:
    """Purging an address with no trace at all says so instead of pretending."""
    with pytest.raises(InputError, match="is not a subscriber"), store.begin() as session:
        subscribers.purge(session, "nobody@example.com")


def test_records_stream_in_order_and_filter_by_status(store: Store) -> None:
    """iter_records gives every field, oldest first, narrowed by status; count agrees."""
    with store.begin() as session:
        for address in ("c@example.com", "a@example.com", "b@example.com"):
            subscribers.add(session, address)
        subscribers.remove(session, "a@example.com")
    with store.session() as session:
        records = list(subscribers.iter_records(session))
        active = [r["email"] for r in subscribers.iter_records(session, "active")]
        assert subscribers.count(session) == 3 and subscribers.count(session, "active") == 2
        assert subscribers.get(session, "B@EXAMPLE.COM").email == "b@example.com"
    assert [r["email"] for r in records] == ["c@example.com", "a@example.com", "b@example.com"]
    assert set(records[0]) == set(subscribers.FIELDS)
    assert active == ["c@example.com", "b@example.com"]
