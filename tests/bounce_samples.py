"""Returned messages of our own making, shaped like the real ones of each kind of server:
tests/fixtures/bounces/*.eml with the addresses and ids of a test filled in."""

from __future__ import annotations

from pathlib import Path
from string import Template

FOLDER = Path(__file__).parent / "fixtures" / "bounces"

# shape -> (what it is, the kind of finding it holds, or None when it must be ignored)
SHAPES = {
    "postfix": ("Postfix DSN, user unknown", "hard"),
    "exim": ("Exim's own text bounce (no DSN part), user unknown", "hard"),
    "gmail": ("Gmail DSN, mailbox full: Action failed but Status 4.2.2", "soft"),
    "outlook": ("Exchange Online NDR, 5.1.10 recipient not found", "hard"),
    "ses": ("Amazon SES DSN, 4.4.7 expired; envelope rewritten by the relay", "soft"),
    "arf": ("Yahoo feedback report (ARF), recipient redacted", "complaint"),
    "autoreply": ("an out-of-office reply", None),
}


def sample(
    shape: str,
    *,
    bounce_to: str,
    recipient: str,
    message_id: str,
    token: str,
    plain_from: str = "links@example.com",
    subject: str = "Weekly Links #12",
) -> bytes:
    """The ``shape`` fixture filled in; ``message_id`` without angle brackets."""
    text = Template((FOLDER / f"{shape}.eml").read_text("utf-8")).substitute(
        bounce_to=bounce_to,
        recipient=recipient,
        message_id=message_id,
        token=token,
        plain_from=plain_from,
        subject=subject,
        delivery_header="X-Newsletter-Delivery",
    )
    return text.encode("utf-8")
