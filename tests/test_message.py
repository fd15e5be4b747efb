"""One recipient's message: headers, parts, escaping, wire format."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage
from pathlib import Path

import pytest

from newsletter.config import load_settings
from newsletter.digest import load_digest, parse_digest
from newsletter.message import MessageTemplate, Recipient, new_message_id, qp_value
from newsletter.render import render_issue

SETTINGS = load_settings({"NEWSLETTER_SITE_URL": "https://news.example.com"}, Path("/nonexistent"))


def _template(issue) -> MessageTemplate:
    return MessageTemplate(
        issue,
        from_address="Weekly Links <links@example.com>",
        list_name="Weekly Links",
        site_url=SETTINGS.site_url,
        reply_to="editor@example.com",
    )


def _parse(wire: bytes) -> EmailMessage:
    unstuffed = wire.replace(b"\r\n..", b"\r\n.")
    return email.message_from_bytes(unstuffed, policy=email.policy.default)  # type: ignore[return-value]


def _recipient(
    name: str | None = "Ada", url: str = "https://news.example.com/unsubscribe/tok"
) -> Recipient:
    return Recipient("ada@example.org", name, url, new_message_id("example.com"))


@pytest.fixture(scope="module")
def sample_issue():
    return render_issue(
        load_digest(Path(__file__).parent / "fixtures" / "mojibake-digest.md"), SETTINGS
    )


def test_every_required_header(sample_issue) -> None:
    """From, To, Subject, Date, Message-ID, Reply-To, List-Id and RFC 8058 headers are set."""
    message = _parse(_template(sample_issue).build(_recipient()))
    assert message["From"] == "Weekly Links <links@example.com>"
    assert message["To"] == "Ada <ada@example.org>"
    assert message["Subject"] == "📺 Browsers, Video and Metrics"
    assert message["Date"].endswith(" +0000")  # not the obsolete "GMT" zone
    assert message["Message-ID"].endswith("@example.com>")
    assert message["Reply-To"] == "editor@example.com"
    assert message["List-Id"] == "Weekly Links <weekly-links.news.example.com>"
    assert message["List-Unsubscribe"] == "<https://news.example.com/unsubscribe/tok>"
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


def test_structure_with_inline_image(sample_issue) -> None:
    """alternative(text, related(html, image)) when the digest has a local image."""
    assert sample_issue.images
    message = _parse(_template(sample_issue).build(_recipient()))
    kinds = [part.get_content_type() for part in message.walk()]
    assert kinds == [
        "multipart/alternative",
        "text/plain",
        "multipart/related",
        "text/html",
        "image/png",
    ]
    image = next(p for p in message.walk() if p.get_content_type() == "image/png")
    assert image.get_content() == sample_issue.images[0].data
    assert f"cid:{sample_issue.images[0].cid}" in message.get_body(("html",)).get_content()


def test_personal_fields_escaped_and_header_safe(sample_issue) -> None:
    """A hostile name is escaped in HTML, RFC 2047-encoded in To, and never breaks a header."""
    name = "Zoë <script>x</script>\r\nBcc: victim@example.com"
    message = _parse(_template(sample_issue).build(_recipient(name)))
    assert "Bcc" not in message
    assert "victim" not in str(message["Bcc"] or "")
    assert message["To"].addresses[0].addr_spec == "ada@example.org"
    html = message.get_body(("html",)).get_content()
    text = message.get_body(("plain",)).get_content()
    assert "&lt;script&gt;" in html and "<script>" not in html
    assert "Zoë <script>x</script>  Bcc" in text


def test_long_values_are_wrapped_not_split(sample_issue) -> None:
    """Unsubscribe URLs longer than a QP line survive intact in both parts and the header."""
    url = "https://news.example.com/unsubscribe/" + "A1b2-_." * 30 + "=="
    wire = _template(sample_issue).build(_recipient(url=url))
    assert max(len(line) for line in wire.split(b"\r\n")) < 998
    message = _parse(wire)
    assert message["List-Unsubscribe"] == f"<{url}>"
    assert f'href="{url}"' in message.get_body(("html",)).get_content()
    assert url in message.get_body(("plain",)).get_content()


def test_dot_stuffing_and_crlf(tmp_path: Path) -> None:
    """Lines starting with '.' are doubled on the wire; every line ends in CRLF."""
    issue = render_issue(parse_digest("# T\n\n.hidden\n..two\n", tmp_path / "d.md"), SETTINGS)
    wire = _template(issue).build(_recipient())
    assert b"\n" not in wire.replace(b"\r\n", b"")
    for line in wire.split(b"\r\n"):
        assert not line.startswith(b".") or line.startswith(b"..")
    text = _parse(wire).get_body(("plain",)).get_content().replace("\r\n", "\n")
    assert "\n.hidden\n..two\n" in text


def test_unique_message_ids(sample_issue) -> None:
    """Each recipient's copy has its own Message-ID."""
    template = _template(sample_issue)
    ids = {_parse(template.build(_recipient()))["Message-ID"] for _ in range(50)}
    assert len(ids) == 50


def test_qp_value_never_starts_a_line_with_a_dot() -> None:
    """An encoded value cannot start a line with '.', so stuffing the template once is enough."""
    for value in [".leading", "x" * 75 + ".after-wrap", "é" * 40]:
        for line in qp_value(value).split("\r\n"):
            assert not line.startswith(".")
            assert len(line) <= 76


def test_no_name_means_bare_address(sample_issue) -> None:
    """A subscriber without a name gets a plain address in To."""
    assert _parse(_template(sample_issue).build(_recipient(None)))["To"] == "ada@example.org"


def test_internationalised_addresses_in_the_to_header(sample_issue) -> None:
    """An IDN domain goes out as punycode (with a name, quoted or encoded as it needs); a
    UTF-8 local part stays UTF-8 (it travels only with SMTPUTF8)."""
    template = _template(sample_issue)
    cases = [
        ("Zoë Ñ", "zoe@bücher.example", "zoe@xn--bcher-kva.example"),
        ("Smith, Ann", "ann@bücher.example", "ann@xn--bcher-kva.example"),
        ("Jörg", "jörg@example.com", "jörg@example.com"),
    ]
    for name, address, wire in cases:
        data = template.build(Recipient(address, name, "https://news.example.com/u/t", "i@x"))
        message = email.message_from_string(data.decode("utf-8"), policy=email.policy.default)
        assert message["To"].addresses[0].addr_spec == wire
        assert message["To"].addresses[0].display_name == name


@pytest.mark.parametrize(("name", "greeting"), [(None, None), ("", None), ("Ada", "Hi Ada,")])
def test_greeting_only_for_a_recipient_with_a_name(name: str | None, greeting) -> None:
    """The wire copy of a subscriber without a name has no "Hi ," in either part."""
    sample = Path(__file__).resolve().parents[1] / "digests" / "2026-11-20-weekly-links.md"
    message = _parse(_template(render_issue(load_digest(sample), SETTINGS)).build(_recipient(name)))
    text = message.get_body(("plain",)).get_content()
    html = message.get_body(("html",)).get_content()
    assert "Hi ," not in text + html and "@@NL_" not in text + html
    if greeting:
        assert greeting in text.splitlines() and f">{greeting}</p>" in html
    else:
        assert "Hi " not in text and "nl-greeting" not in html
