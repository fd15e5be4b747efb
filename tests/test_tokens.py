"""Signed confirm and unsubscribe tokens."""

from __future__ import annotations

import time

import pytest

from newsletter.tokens import InvalidToken, Tokens


def test_unsubscribe_token_round_trip_and_never_expires() -> None:
    """An unsubscribe token names its address (lower-cased), with no expiry."""
    tokens = Tokens("secret", confirm_max_age=0)
    token = tokens.unsubscribe_token("Zoë@Example.com")
    assert tokens.read_unsubscribe(token) == "zoë@example.com"
    assert "/" not in token and "+" not in token


@pytest.mark.parametrize("bad", ["", "x", "not.a.token", "é", "a" * 500])
def test_malformed_tokens_are_invalid(bad: str) -> None:
    """Garbage of any shape is InvalidToken, never another exception."""
    tokens = Tokens("secret")
    with pytest.raises(InvalidToken):
        tokens.read_unsubscribe(bad)
    with pytest.raises(InvalidToken):
        tokens.read_confirm(bad)


def test_forged_token_is_invalid() -> None:
    """A token signed with another key, or altered, is refused."""
    token = Tokens("other").unsubscribe_token("a@example.com")
    with pytest.raises(InvalidToken):
        Tokens("secret").read_unsubscribe(token)
    good = Tokens("secret").unsubscribe_token("a@example.com")
    with pytest.raises(InvalidToken):
        Tokens("secret").read_unsubscribe("b" + good[1:])


def test_kinds_are_not_interchangeable() -> None:
    """An unsubscribe token does not confirm, and a confirm token does not unsubscribe."""
    tokens = Tokens("secret")
    with pytest.raises(InvalidToken):
        tokens.read_confirm(tokens.unsubscribe_token("a@example.com"))
    with pytest.raises(InvalidToken):
        tokens.read_unsubscribe(tokens.confirm_token("a@example.com"))


def test_confirm_token_expires() -> None:
    """A confirm token older than its maximum age is refused as expired."""
    tokens = Tokens("secret", confirm_max_age=1)
    token = tokens.confirm_token("a@example.com")
    assert tokens.read_confirm(token) == "a@example.com"
    time.sleep(2.1)
    with pytest.raises(InvalidToken, match="expired"):
        tokens.read_confirm(token)
