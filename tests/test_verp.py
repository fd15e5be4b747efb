"""VERP tokens: short, lower-case, made again to be checked, useless when made up."""

from __future__ import annotations

import pytest

from newsletter import message
from newsletter.verp import DELIVERY_HEADER, Verp, tokens_in

VERP = Verp("secret", "bounces@example.com", "Weekly <weekly@example.com>")


@pytest.mark.parametrize("delivery_id", [1, 35, 36, 123456, 2**40])
def test_a_token_names_its_delivery_in_any_case(delivery_id: int) -> None:
    """A token gives back its delivery, lower-cased or upper-cased by a relay."""
    token = VERP.token(delivery_id)
    assert token == token.lower() and len(token) <= 27
    assert VERP.delivery_of(token) == delivery_id
    assert VERP.delivery_of(token.upper()) == delivery_id


def test_made_up_tokens_name_nothing() -> None:
    """A changed MAC, another key's token, or garbage: no delivery."""
    token = VERP.token(42)
    prefix, mac = token.split("-")
    other = Verp("another secret", "bounces@example.com", "weekly@example.com")
    assert VERP.delivery_of(f"{prefix}-{'a' * 13}") is None
    assert VERP.delivery_of(f"{int(prefix, 36) + 1:x}-{mac}") is None
    assert VERP.delivery_of(other.token(42)) is None
    assert VERP.delivery_of("") is None and VERP.delivery_of("not a token at all") is None


def test_envelope_sender_with_and_without_a_bounce_address() -> None:
    """bounces+TOKEN@domain with a bounce address; the bare From address without."""
    assert VERP.envelope_from(7) == f"bounces+{VERP.token(7)}@example.com"
    plain = Verp("secret", None, "Weekly <weekly@example.com>")
    assert plain.envelope_from(7) == "weekly@example.com"


def test_tokens_are_found_after_a_plus_in_addresses() -> None:
    """tokens_in picks VERP tokens out of header text, in order."""
    text = f"To: <bounces+{VERP.token(1)}@example.com>, x+{VERP.token(2).upper()}@example.org"
    assert tokens_in(text) == [VERP.token(1), VERP.token(2).upper()]
    assert tokens_in("someone+tag@example.com") == []


def test_the_message_builder_and_the_parser_agree_on_the_header() -> None:
    """The header the messages carry is the one bounces are searched for."""
    assert message.DELIVERY_HEADER == DELIVERY_HEADER
