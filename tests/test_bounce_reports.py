"""Reading returned messages on their own: DSN fields, feedback reports, flufl.bounce for the
rest, auto-replies; no database."""

from __future__ import annotations

import base64

import pytest
from bounce_samples import SHAPES, sample

from newsletter.bounce_reports import read_report

TOKEN = "1a-abcdefghijklm"


def _sample(shape: str, **overrides: str) -> bytes:
    values = {
        "bounce_to": f"bounces+{TOKEN}@example.com",
        "recipient": "gone@example.org",
        "message_id": "42.0123456789abcdef@example.com",
        "token": TOKEN,
    }
    return sample(shape, **(values | overrides))


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_each_shape_is_read(shape: str) -> None:
    """Each fixture gives its kind, the recipient and what names the delivery."""
    report = read_report(_sample(shape))
    expected = SHAPES[shape][1]
    if expected is None:
        assert report.verdict == "auto-reply" and report.findings == ()
        return
    [finding] = report.findings
    assert report.verdict == "report" and finding.kind == expected
    assert TOKEN in report.tokens
    if shape != "arf":
        assert finding.address == "gone@example.org"
    assert finding.detail


def test_status_decides_whatever_action_says() -> None:
    """Action failed with Status 4.2.2 is soft; Action delayed with 5.0.0 is hard."""
    gmail = _sample("gmail")
    assert read_report(gmail).findings[0].kind == "soft"
    flipped = gmail.replace(b"Status: 4.2.2", b"Status: 5.0.0").replace(
        b"Action: failed", b"Action: delayed"
    )
    assert read_report(flipped).findings[0].kind == "hard"


def test_a_base64_encoded_delivery_status_part_is_read() -> None:
    """Some servers encode the machine-readable part; it is decoded first."""
    fields = (
        b"Reporting-MTA: dns; mx.example.net\n\nFinal-Recipient: rfc822; gone@example.org\n"
        b"Action: failed\nStatus: 5.1.1\nDiagnostic-Code: smtp; 550 5.1.1 no such user\n"
    )
    data = (
        f"To: bounces+{TOKEN}@example.com\nMessage-ID: <x@mx>\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\n\n'
        "--b\nContent-Type: message/delivery-status\nContent-Transfer-Encoding: base64\n\n"
        f"{base64.encodebytes(fields).decode()}\n--b--\n"
    ).encode()
    [finding] = read_report(data).findings
    assert (finding.kind, finding.address, finding.status) == ("hard", "gone@example.org", "5.1.1")


def test_feedback_reports_that_are_not_complaints_are_not() -> None:
    """A DMARC failure report (Feedback-Type auth-failure) is no complaint."""
    report = read_report(
        _sample("arf").replace(b"Feedback-Type: abuse", b"Feedback-Type: auth-failure")
    )
    assert report.verdict == "unrecognised" and "auth-failure" in report.reason


def test_an_ip_address_is_not_a_status_code() -> None:
    """10.5.1.1 in a text bounce is no 5.1.1."""
    data = _sample("exim").replace(b"550 5.1.1", b"550 mailbox unavailable at 10.4.2.2")
    [finding] = read_report(data).findings
    assert finding.kind == "hard" and finding.status is None


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff\xfe\x00garbage",
        b"Content-Type: multipart/report; report-type=delivery-status\n\nno boundary",
        b'Content-Type: multipart/report; boundary="x"\n\n--x\nContent-Type: message/rfc822\n\n',
        b"From: MAILER-DAEMON@x\nSubject: Undelivered Mail\n\n" + b"\n" * 5000,
    ],
)
def test_malformed_messages_are_unrecognised_not_errors(data: bytes) -> None:
    """Broken input never raises: it is unrecognised, with a reason."""
    report = read_report(data)
    assert report.verdict == "unrecognised" and report.reason
