"""DKIM signing: what receivers verify (dkimpy and Perl's Mail::DKIM against a test DNS
server), bad keys refused at start, and every kind of message signed by the engine."""

from __future__ import annotations

import email
import email.policy
import os
import random
import shutil
from pathlib import Path

import dkim
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from dkim.canonicalization import Relaxed
from dkim_keys import dkimpy_verify, perl_verify, write_key
from dns_zone import DnsZone

from newsletter.cli import main
from newsletter.config import load_settings
from newsletter.digest import load_digest
from newsletter.errors import ConfigError
from newsletter.message import Recipient, new_message_id
from newsletter.render import render_issue
from newsletter.sender import message_template
from newsletter.signing import (
    DkimSigner,
    load_key,
    message_signer,
    parse_key,
    relaxed_body,
    signing_domain,
)
from newsletter.transports import from_wire

FIXTURES = Path(__file__).parent / "fixtures"
NO_DOTENV = Path("/nonexistent/.env")
SELECTOR = "news2026"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two RSA 2048, two Ed25519, an RSA 1024 and an EC key, made once for this module."""
    folder = tmp_path_factory.mktemp("keys")
    return {
        "rsa": write_key(folder / "rsa.pem"),
        "rsa-other": write_key(folder / "rsa-other.pem"),
        "ed25519": write_key(folder / "ed25519.pem", "ed25519"),
        "ed25519-other": write_key(folder / "ed25519-other.pem", "ed25519"),
        "rsa1024": write_key(folder / "rsa1024.pem", bits=1024),
        "ec": write_key(folder / "ec.pem", "ec"),
    }


def _settings(key: Path | None, **env: str):
    base = {
        "NEWSLETTER_FROM": "Weekly Links <links@example.com>",
        "NEWSLETTER_NAME": "Weekly Links",
        "NEWSLETTER_SITE_URL": "https://news.example.com",
    }
    if key is not None:
        base |= {"NEWSLETTER_DKIM_PRIVATE_KEY": str(key), "NEWSLETTER_DKIM_SELECTOR": SELECTOR}
    return load_settings(base | env, NO_DOTENV)


@pytest.fixture(scope="module")
def issue():
    """The fixture digest rendered once: HTML with CSS lines that start with a dot."""
    return render_issue(load_digest(FIXTURES / "mojibake-digest.md"), _settings(None))


def _wire(issue, settings, name: str | None = "Zoë Łukasiewicz") -> bytes:
    template = message_template(settings, issue)
    url = "https://news.example.com/unsubscribe/abc.def"
    recipient = Recipient("reader@example.org", name, url, new_message_id("example.com"))
    return template.build(recipient)


def _record(key_path: Path) -> str:
    return load_key(key_path).dns_record()


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
def test_signed_messages_verify_and_altered_copies_fail(issue, keys, kind: str) -> None:
    """dkimpy verifies a signed issue message against the published key; a changed body,
    subject or unsubscribe link, or another key in DNS, fails."""
    settings = _settings(keys[kind])
    signed = from_wire(message_signer(settings)(_wire(issue, settings)))
    record = _record(keys[kind])
    assert signed.startswith(b"DKIM-Signature: v=1; a=")
    assert dkimpy_verify(signed, record)
    head, body = signed.split(b"\r\n\r\n", 1)
    assert not dkimpy_verify(head + b"\r\n\r\n" + body.replace(b"Browsers", b"Bowsers", 1), record)
    assert not dkimpy_verify(signed.replace(b"Subject: ", b"Subject: Re: ", 1), record)
    assert not dkimpy_verify(signed.replace(b"/unsubscribe/abc", b"/unsubscribe/xyz", 1), record)
    assert not dkimpy_verify(signed, _record(keys[f"{kind}-other"]))


def test_signature_tags_and_covered_headers(issue, keys) -> None:
    """relaxed/relaxed, d= the From domain, s= the selector, and h= covering From, To,
    Subject, Date, Message-ID, List-Unsubscribe(-Post) and the MIME headers, the
    singletons once more than present so none can be added."""
    settings = _settings(keys["rsa"])
    signed = from_wire(message_signer(settings)(_wire(issue, settings)))
    parsed = email.message_from_bytes(signed, policy=email.policy.compat32)
    tags = dkim.util.parse_tag_value(
        parsed["DKIM-Signature"].replace("\r\n", "").replace("\n", "").encode()
    )
    assert tags[b"c"] == b"relaxed/relaxed"
    assert (tags[b"d"], tags[b"s"], tags[b"a"]) == (b"example.com", b"news2026", b"rsa-sha256")
    covered = [name.strip() for name in tags[b"h"].split(b":")]
    for header in (
        b"from",
        b"to",
        b"subject",
        b"date",
        b"message-id",
        b"list-unsubscribe",
        b"list-unsubscribe-post",
        b"mime-version",
        b"content-type",
    ):
        assert header in covered, header
    for singleton in (b"from", b"to", b"subject", b"list-unsubscribe-post"):
        assert covered.count(singleton) == 2, singleton
    assert all(len(line) <= 78 for line in signed.split(b"\r\n\r\n")[0].split(b"\r\n"))


def test_perl_mail_dkim_verifies_against_a_dns_server(issue, keys) -> None:
    """Perl's Mail::DKIM (SpamAssassin's verifier) finds the key over DNS and says pass;
    an altered body or From is reported as altered."""
    settings = _settings(keys["rsa"])
    signed = from_wire(message_signer(settings)(_wire(issue, settings)))
    zone = {f"{SELECTOR}._domainkey.example.com": [_record(keys["rsa"])]}
    with DnsZone(zone) as dns:
        assert perl_verify(signed, dns.port) == ("pass", "pass")
        head, body = signed.split(b"\r\n\r\n", 1)
        altered = head + b"\r\n\r\n" + body.replace(b"Browsers", b"Bowsers", 1)
        assert perl_verify(altered, dns.port) == ("fail", "fail (body has been altered)")
        forged = signed.replace(b"From: Weekly Links", b"From: Weekly Lynx", 1)
        assert perl_verify(forged, dns.port) == ("fail", "fail (message has been altered)")
        assert (f"{SELECTOR}._domainkey.example.com", "TXT") in dns.queries


def test_dot_stuffed_lines_are_signed_as_the_receiver_stores_them(keys) -> None:
    """Lines starting with a dot (stuffed on the wire) and a leading dot in the body are
    signed as the message the receiver stores, and the wire itself is left as it was."""
    settings = _settings(keys["rsa"])
    message = (
        b"From: a@example.com\r\nTo: b@example.org\r\nSubject: dots\r\n\r\n"
        b".starts with a dot\r\n..two dots\r\nplain  spaced \t line \r\n.\r\n\r\n\r\n"
    )
    wire = b"." + message.replace(b"\r\n.", b"\r\n..")  # as transports.to_wire stuffs it
    signed_wire = message_signer(settings)(wire)
    assert signed_wire.endswith(wire)
    assert dkimpy_verify(from_wire(signed_wire), _record(keys["rsa"]))


def test_relaxed_body_matches_dkimpy_on_random_bodies() -> None:
    """The fast body canonicalisation gives exactly dkimpy's relaxed form."""
    pieces = [b" ", b"\t", b"\r\n", b"a", b"\r", b"\n", b"  ", b"b c", b".", b"=20", b" \t "]
    rng = random.Random(14)
    for _ in range(20_000):
        body = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 40)))
        assert relaxed_body(body) == Relaxed.canonicalize_body(body), body


def test_signature_timestamp_is_the_clock(issue, keys) -> None:
    """t= comes from the signer's clock, so the signature says when it was made."""
    settings = _settings(keys["ed25519"])
    signer = DkimSigner(load_key(keys["ed25519"]), SELECTOR, "example.com", clock=lambda: 1e9)
    signed = from_wire(signer(_wire(issue, settings)))
    assert b" t=1000000000;" in signed.split(b"\r\n\r\n")[0]


def test_from_domain_that_cannot_sign_is_refused(keys) -> None:
    """A From domain that is no DNS name stops signing at start, naming the variable."""
    settings = _settings(keys["rsa"], NEWSLETTER_FROM="News <news@exa$mple.com>")
    with pytest.raises(ConfigError, match=r"^NEWSLETTER_DKIM_DOMAIN: the From address's domain"):
        message_signer(settings)


def test_unconfigured_signer_leaves_bytes_alone(issue) -> None:
    """Without a key, the bytes go out exactly as built."""
    settings = _settings(None)
    wire = _wire(issue, settings)
    assert message_signer(settings)(wire) is wire


def test_signing_domain(keys) -> None:
    """d= is NEWSLETTER_DKIM_DOMAIN when set, else the From domain in ASCII."""
    assert signing_domain(_settings(keys["rsa"])) == "example.com"
    assert (
        signing_domain(_settings(keys["rsa"], NEWSLETTER_DKIM_DOMAIN="Mail.Example.COM"))
        == "mail.example.com"
    )
    assert signing_domain(_settings(None, NEWSLETTER_FROM="x <x@bücher.example>")) == (
        "xn--bcher-kva.example"
    )


def test_key_is_parsed_once_per_file_version(keys, tmp_path: Path) -> None:
    """The same file gives the same parsed key; a replaced file is read again."""
    path = tmp_path / "key.pem"
    shutil.copy(keys["rsa"], path)
    first = load_key(path)
    assert load_key(path) is first
    shutil.copy(keys["ed25519"], path)
    os.utime(path, ns=(1, 1))
    assert load_key(path).kind == "ed25519"


def _key_error(data: bytes) -> str:
    with pytest.raises(ConfigError) as info:
        parse_key(data, "/etc/newsletter/dkim.pem")
    message = str(info.value)
    assert message.startswith("NEWSLETTER_DKIM_PRIVATE_KEY: /etc/newsletter/dkim.pem ")
    assert "\n" not in message
    return message


def test_keys_that_cannot_sign_are_refused(keys) -> None:
    """Not PEM, a public key, an encrypted key, an EC key and a short RSA key are each a
    one-line error naming the variable and saying what is wrong."""
    assert "not a PEM private key" in _key_error(b"hello")
    public = load_key(keys["rsa"]).private.public_key()
    pem_public = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert "not a PEM private key" in _key_error(pem_public)
    encrypted = load_key(keys["rsa"]).private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    assert "passphrase" in _key_error(encrypted)
    assert "elliptic-curve" in _key_error(keys["ec"].read_bytes())
    assert "1024-bit RSA key" in _key_error(keys["rsa1024"].read_bytes())


def test_pkcs1_rsa_key_is_accepted(keys, tmp_path: Path) -> None:
    """The traditional "BEGIN RSA PRIVATE KEY" form (openssl genrsa) signs too."""
    traditional = load_key(keys["rsa"]).private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    assert traditional.startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    assert parse_key(traditional, "k.pem").bits == 2048


# The engine: every kind of message, through the CLI, on SQLite and PostgreSQL -------------


@pytest.fixture
def signed_env(db_runner: CliRunner, smtp_sink, clean_env: Path, keys, monkeypatch):
    """A working directory with the digest, 30 subscribers, the SMTP sink and a DKIM key."""
    for name, value in smtp_sink.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("NEWSLETTER_SITE_URL", "https://news.example.com")
    monkeypatch.setenv("NEWSLETTER_FROM", "Weekly Links <links@example.com>")
    monkeypatch.setenv("NEWSLETTER_DKIM_PRIVATE_KEY", str(keys["rsa"]))
    monkeypatch.setenv("NEWSLETTER_DKIM_SELECTOR", SELECTOR)
    shutil.copy(FIXTURES / "mojibake-digest.md", clean_env / "digest.md")
    shutil.copy(FIXTURES / "chart.png", clean_env / "chart.png")
    rows = "".join(f"reader{i:02d}@example.com,Reader {i}\n" for i in range(30))
    (clean_env / "list.csv").write_text("email,name\n" + rows, "utf-8")
    result = db_runner.invoke(main, ["subscribers", "import", "list.csv"])
    assert result.exit_code == 0, result.output
    return db_runner


def test_issue_test_copies_and_confirmations_are_all_signed(signed_env, smtp_sink, keys) -> None:
    """An issue's messages, `--to` test copies and a confirmation all verify, each with
    its own recipient's headers and body."""
    record = _record(keys["rsa"])
    result = signed_env.invoke(main, ["send", "digest.md", "--yes"])
    assert result.exit_code == 0, result.output
    result = signed_env.invoke(main, ["send", "digest.md", "--to", "me@example.org"])
    assert result.exit_code == 0, result.output
    result = signed_env.invoke(main, ["subscribers", "add", "new@example.org", "--pending"])
    assert result.exit_code == 0, result.output
    messages = smtp_sink.messages
    assert len(messages) == 32
    for message in messages:
        assert message.data.startswith(b"DKIM-Signature: "), message.recipients
        assert dkimpy_verify(message.data, record), message.recipients
    confirmation = messages[-1]
    assert confirmation.recipients == ("new@example.org",)
    assert b"Auto-Submitted: auto-generated" in confirmation.data


def test_a_key_that_cannot_sign_stops_the_send_before_anything(
    signed_env, smtp_sink, keys, monkeypatch
) -> None:
    """`send` with an EC key exits 2 naming NEWSLETTER_DKIM_PRIVATE_KEY; nothing is sent
    and no issue is recorded."""
    monkeypatch.setenv("NEWSLETTER_DKIM_PRIVATE_KEY", str(keys["ec"]))
    result = signed_env.invoke(main, ["send", "digest.md", "--yes"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: NEWSLETTER_DKIM_PRIVATE_KEY: ")
    assert "elliptic-curve" in result.stderr
    assert smtp_sink.messages == []
    listed = signed_env.invoke(main, ["issues", "list", "--format", "json"])
    assert listed.stdout.strip() == "[]"
    copies = signed_env.invoke(main, ["send", "digest.md", "--to", "me@example.org"])
    assert copies.exit_code == 2 and smtp_sink.messages == []


def test_worker_with_a_key_that_cannot_sign_stops_at_start(runner: CliRunner, keys, monkeypatch):
    """`newsletter worker` refuses to start (exit 2, the variable named) rather than log a
    failure for every confirmation it would send."""
    monkeypatch.setenv("NEWSLETTER_DKIM_PRIVATE_KEY", str(keys["rsa1024"]))
    monkeypatch.setenv("NEWSLETTER_DKIM_SELECTOR", SELECTOR)
    result = runner.invoke(main, ["worker"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: NEWSLETTER_DKIM_PRIVATE_KEY: ")
    assert "1024-bit RSA key" in result.stderr
