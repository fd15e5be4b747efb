"""The bounce settings: parsed once, and a bad value is one line naming the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from newsletter.config import load_settings
from newsletter.errors import ConfigError


def _load(**env: str):
    return load_settings(env, dotenv_path=Path("/nonexistent"))


def test_defaults_leave_everything_off() -> None:
    """Unset: no VERP, no mailbox, no webhook; 300 s and 3 soft bounces."""
    settings = _load()
    assert settings.bounce_address is None and settings.bounce_mailbox is None
    assert (settings.bounce_interval, settings.soft_bounce_limit) == (300, 3)
    assert settings.sns_topic_arns == () and settings.webhook_secret_mailgun is None


def test_a_mailbox_url_is_parsed_without_showing_its_password() -> None:
    """imaps://user:password@host/FOLDER?move_to=Done, with the password kept out of sight."""
    mailbox = _load(
        NEWSLETTER_BOUNCE_MAILBOX="imaps://bounce%40example.com:p%3Ass@mail.example.com/Bounces?move_to=Done"
    ).bounce_mailbox
    assert (mailbox.scheme, mailbox.host, mailbox.port) == ("imaps", "mail.example.com", 993)
    assert (mailbox.username, mailbox.password) == ("bounce@example.com", "p:ss")
    assert (mailbox.folder, mailbox.move_to, mailbox.delete) == ("Bounces", "Done", False)
    assert "p:ss" not in str(mailbox) and "p:ss" not in repr(mailbox)
    assert _load(NEWSLETTER_BOUNCE_MAILBOX="imap://u:p@h?delete=yes").bounce_mailbox.delete
    pop = _load(NEWSLETTER_BOUNCE_MAILBOX="pop3s://u:p@h").bounce_mailbox
    assert (pop.port, pop.delete) == (995, True)


@pytest.mark.parametrize(
    ("name", "value", "words"),
    [
        ("NEWSLETTER_BOUNCE_ADDRESS", "Bounces <bounces@example.com>", "bare address"),
        ("NEWSLETTER_BOUNCE_ADDRESS", "bounces", "bare address"),
        ("NEWSLETTER_BOUNCE_MAILBOX", "https://u:p@mail.example.com", "is not one of"),
        ("NEWSLETTER_BOUNCE_MAILBOX", "imaps://mail.example.com/INBOX", "needs a user"),
        ("NEWSLETTER_BOUNCE_MAILBOX", "imaps://u:secret@mail.example.com:x/", "not a number"),
        ("NEWSLETTER_BOUNCE_MAILBOX", "imaps://u:secret@h/INBOX?junk=1", "unknown option"),
        ("NEWSLETTER_BOUNCE_INTERVAL", "soon", "not a whole number"),
        ("NEWSLETTER_SOFT_BOUNCE_LIMIT", "0", "below the minimum"),
        ("NEWSLETTER_WEBHOOK_SECRET_POSTMARK", "no-colon", "user:password"),
        ("NEWSLETTER_WEBHOOK_SNS_TOPIC_ARN", "arn:aws:sqs:us-east-1:1:q", "SNS topic ARN"),
    ],
)
def test_bad_values_are_one_line_naming_the_variable(name: str, value: str, words: str) -> None:
    """Each bad bounce setting is refused in one line that names it (never a password)."""
    with pytest.raises(ConfigError) as info:
        _load(**{name: value})
    message = str(info.value)
    assert message.startswith(f"{name}: ") and words in message and "\n" not in message
    assert "secret" not in message
