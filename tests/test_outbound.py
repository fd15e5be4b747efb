"""One-off mail: confirmations built and queued with their subscriber change, sent by the
same engine as issues (retries, bounces, claims), and the CLI commands that send them."""

from __future__ import annotations

import email
import email.policy
import threading
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select, update

from newsletter import outbound, subscribers
from newsletter.cli import main
from newsletter.config import Settings
from newsletter.ledger import claim, new_owner, prune_one_off
from newsletter.sender import Sender, SendOptions
from newsletter.store import Delivery, Store, utcnow
from newsletter.tokens import Tokens
from newsletter.transports import MemoryTransport, Outcome, from_wire

TOKENS = Tokens("test-secret-key-that-signs-links-0123456789")
FAST = SendOptions(retry_base=0.0, retry_max=0.0, max_attempts=3, idle_poll=0.05)
SAMPLE = Path(__file__).resolve().parents[1] / "subscribers" / "sample.csv"


def _parse(body: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(from_wire(body), policy=email.policy.default)


def _body(settings: Settings, address: str) -> bytes:
    return outbound.confirmation(settings, TOKENS, address, "1.abc@example.com")


def _queue(store: Store, settings: Settings, *addresses: str) -> int:
    """Pending subscribers with a queued confirmation each."""
    with store.begin() as session:
        for address in addresses:
            if subscribers.get(session, address) is None:
                subscribers.add(session, address, status="pending")
        return outbound.queue_confirmations(session, addresses)


def _rows(store: Store) -> dict[str, Delivery]:
    with store.session() as session:
        query = select(Delivery).where(Delivery.issue_id.is_(None))
        return {row.email: row for row in session.scalars(query)}


def _send(store: Store, settings: Settings, transport, options: SendOptions = FAST, **kw):
    """One round of the one-off queue, as the worker runs it, over ``transport``."""
    sender = Sender(store, settings, lambda: transport, options, connections=1, **kw)
    return sender.run(None)


def test_confirmation_is_multipart_with_every_header(web_settings: Settings) -> None:
    """A confirmation has From, bare To, the list's subject, Date, Message-ID,
    Auto-Submitted, and text and HTML parts that both carry a working confirm link."""
    body = _body(web_settings, "ada@example.com")
    message = _parse(body)
    assert message["From"] == "Weekly Links <links@example.com>"
    assert message["To"] == "ada@example.com"
    assert message["Subject"] == "Confirm your subscription to Weekly Links"
    assert message["Date"] and message["Message-ID"].endswith("@example.com>")
    assert message["Auto-Submitted"] == "auto-generated"
    assert message.get_content_type() == "multipart/alternative"
    text = message.get_body(("plain",)).get_content()
    html = message.get_body(("html",)).get_content()
    link = text.split("https://news.example.com/confirm/")[1].split()[0]
    assert TOKENS.read_confirm(link) == "ada@example.com"
    assert f"/confirm/{link}" in html
    assert b"\n" not in body.replace(b"\r\n", b"")  # wire format: CRLF only


def test_non_ascii_list_name_and_address_are_encoded(web_settings: Settings) -> None:
    """A UTF-8 list name is RFC 2047-encoded in the headers; an internationalised address
    goes through as UTF-8 (SMTPUTF8)."""
    settings = replace(web_settings, list_name="Wöchentliche Links", from_address="Wö <w@ex.de>")
    body = _body(settings, "zoë@example.com")
    head = body.split(b"\r\n\r\n")[0]
    assert b"Subject: =?utf-8?" in head and b"From: =?utf-8?" in head
    message = _parse(body)
    assert message["Subject"] == "Confirm your subscription to Wöchentliche Links"
    assert message["To"] == "zoë@example.com"


def test_long_links_keep_quoted_printable_lines_short(web_settings: Settings) -> None:
    """A long site URL full of '=' (each encoded as three characters) still gives body lines
    of at most 76 characters (RFC 2045), and the link decodes exactly."""
    site = "https://news.example.com/very/long/path/" + "y" * 40 + "?a=b&c=d"
    body = _body(replace(web_settings, site_url=site), "a@b.co")
    lines = body.split(b"\r\n")
    assert max(len(line) for line in lines) <= 78  # headers included (RFC 5322)
    content = [line for line in lines if b": " not in line and not line.startswith(b"--")]
    assert max(len(line) for line in content) <= 76
    text = _parse(body).get_body(("plain",)).get_content()
    token = text.split(f"{site}/confirm/")[1].split()[0]
    assert TOKENS.read_confirm(token) == "a@b.co"


def test_a_custom_template_gets_the_real_values(web_settings: Settings, tmp_path: Path) -> None:
    """A template that transforms the address or tests it is rendered for each address."""
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "confirm_email.txt").write_text(
        "Confirm {{ email|upper }}{% if 'example' in email %} (example){% endif %}: "
        "{{ confirm_url }}\n"
    )
    (templates / "confirm_email.html").write_text("<p>{{ email|lower }}</p>")
    settings = replace(web_settings, templates_dir=templates)
    for address in ("ada@example.com", "bob@other.org"):
        message = _parse(_body(settings, address))
        text = message.get_body(("plain",)).get_content()
        suffix = " (example)" if "example" in address else ""
        assert text.startswith(f"Confirm {address.upper()}{suffix}: https://news.example.com/")
        assert message.get_body(("html",)).get_content().strip() == f"<p>{address}</p>"


def test_queued_mail_disappears_with_its_transaction(store: Store, web_settings) -> None:
    """Mail queued in a transaction that rolls back is never sent."""
    with pytest.raises(RuntimeError), store.begin() as session:
        subscribers.add(session, "ada@example.com", status="pending")
        outbound.queue_confirmations(session, ["ada@example.com"])
        raise RuntimeError("the signup failed after queueing")
    assert _rows(store) == {}


def test_deliver_sends_and_marks_sent(store: Store, web_settings: Settings) -> None:
    """Each queued confirmation is built and goes out once, with the From address as
    envelope sender; its row records the Message-ID it went out with."""
    _queue(store, web_settings, "a@example.com", "b@example.com")
    transport = MemoryTransport()
    report = _send(store, web_settings, transport)
    assert report.sent == 2 and report.open == 0
    assert sorted(transport.recipients()) == ["a@example.com", "b@example.com"]
    assert {a.envelope_from for a in transport.attempts} == {"links@example.com"}
    rows = _rows(store)
    assert {row.status for row in rows.values()} == {"sent"}
    for attempt in transport.attempts:
        message = _parse(attempt.data)
        assert message["Message-ID"] == f"<{rows[attempt.recipient].message_id}>"
        assert message["Subject"] == "Confirm your subscription to Weekly Links"
    assert _send(store, web_settings, transport).sent == 0


def test_temporary_failures_are_retried_then_failed(store: Store, web_settings) -> None:
    """A 4xx is retried after a backoff, up to max_attempts, then the row is failed; a
    one-off round does not wait for a retry that is not due."""
    _queue(store, web_settings, "a@example.com")
    busy = MemoryTransport(script=lambda _: Outcome("retry", 451, "451 4.7.1 later"))
    slow = replace(FAST, retry_base=3600.0, retry_max=3600.0)
    report = _send(store, web_settings, busy, slow)
    assert report.retried == 1 and report.open == 1
    row = _rows(store)["a@example.com"]
    assert row.status == "queued" and row.next_attempt_at > utcnow() + timedelta(minutes=59)
    assert _send(store, web_settings, busy, slow).retried == 0  # not due: nothing tried
    for _ in range(3):
        with store.begin() as session:
            session.execute(update(Delivery).values(next_attempt_at=None))
        _send(store, web_settings, busy)
    row = _rows(store)["a@example.com"]
    assert (row.status, row.attempts, row.last_answer) == ("failed", 3, "451 4.7.1 later")


def test_user_unknown_bounces_the_subscriber(store: Store, web_settings) -> None:
    """A 5.1.1 bounces the mail and the pending subscriber; any other 5xx just fails it."""
    _queue(store, web_settings, "gone@example.com", "spam@example.com")

    def script(recipient: str) -> Outcome:
        if recipient == "spam@example.com":
            return Outcome("failed", 554, "554 5.7.1 rejected as spam")
        return Outcome("bounced", 550, "550 5.1.1 user unknown")

    report = _send(store, web_settings, MemoryTransport(script))
    assert (report.bounced, report.failed) == (1, 1)
    assert {e: r.status for e, r in _rows(store).items()} == {
        "gone@example.com": "bounced",
        "spam@example.com": "failed",
    }
    with store.session() as session:
        assert subscribers.get(session, "gone@example.com").status == "bounced"
        assert subscribers.get(session, "spam@example.com").status == "pending"


def test_mail_for_someone_who_left_is_skipped(store: Store, web_settings) -> None:
    """A confirmation queued for someone who has since been removed is not sent."""
    _queue(store, web_settings, "left@example.com")
    with store.begin() as session:
        subscribers.remove(session, "left@example.com")
    transport = MemoryTransport()
    assert _send(store, web_settings, transport).skipped == 1
    assert transport.attempts == []


def test_unreachable_server_stops_the_round(store: Store, web_settings: Settings) -> None:
    """When the server cannot be reached, the round stops and the rest stays queued."""
    _queue(store, web_settings, *(f"r{n}@example.com" for n in range(8)))
    down = MemoryTransport(script=lambda _: Outcome("retry", None, "cannot reach SMTP server"))
    options = replace(FAST, max_connection_failures=2, retry_base=3600.0, retry_max=3600.0)
    report = _send(store, web_settings, down, options)
    assert len(down.attempts) == 2 and report.open == 8
    assert report.stopped_reason == "the SMTP server cannot be reached"
    assert sorted(row.status for row in _rows(store).values()) == ["queued"] * 8


def test_concurrent_workers_never_send_a_message_twice(store: Store, web_settings) -> None:
    """Four workers draining one queue at once send each message exactly once."""
    _queue(store, web_settings, *(f"r{n}@example.com" for n in range(120)))
    transport = MemoryTransport()
    options = replace(FAST, batch_size=7)
    workers = [
        threading.Thread(target=_send, args=(store, web_settings, transport, options))
        for _ in range(4)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert sorted(transport.recipients()) == sorted(f"r{n}@example.com" for n in range(120))


def test_a_claim_left_by_a_dead_sender_is_taken_again(store: Store, web_settings) -> None:
    """A row claimed by a sender that died (it holds no lock) is sent by the next round."""
    _queue(store, web_settings, "a@example.com")
    with store.engine.connect() as db:
        assert claim(db, None, new_owner(), 10)  # claimed, never recorded: a crash
    transport = MemoryTransport()
    assert _send(store, web_settings, transport).sent == 1
    assert transport.recipients() == ["a@example.com"]


def test_prune_forgets_old_mail_only(store: Store, web_settings: Settings) -> None:
    """Sent one-off mail older than the limit is deleted; recent and queued mail stays."""
    _queue(store, web_settings, "old@example.com", "new@example.com", "queued@example.com")
    with store.begin() as session:
        session.execute(
            update(Delivery).where(Delivery.email != "queued@example.com").values(status="sent")
        )
        session.execute(
            update(Delivery)
            .where(Delivery.email == "old@example.com")
            .values(created_at=utcnow() - timedelta(days=31))
        )
    with store.begin() as session:
        assert prune_one_off(session, timedelta(days=30)) == 1
    assert sorted(_rows(store)) == ["new@example.com", "queued@example.com"]


# The CLI sends confirmations too ---------------------------------------------------------


@pytest.fixture
def smtp_runner(db_runner: CliRunner, smtp_sink, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    """A CLI runner on a fresh database whose SMTP server is the test sink."""
    for name, value in smtp_sink.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("NEWSLETTER_SITE_URL", "https://news.example.com")
    return db_runner


def test_add_pending_sends_a_confirmation(smtp_runner: CliRunner, smtp_sink) -> None:
    """`subscribers add --pending` mails one confirmation at once; an active add mails none."""
    result = smtp_runner.invoke(main, ["subscribers", "add", "ada@example.com", "--pending"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "ada@example.com: pending\n1 confirmation email sent\n"
    [message] = smtp_sink.wait_for(1)
    assert message.recipients == ("ada@example.com",)
    assert b"https://news.example.com/confirm/" in message.data
    assert smtp_runner.invoke(main, ["subscribers", "add", "bob@example.com"]).exit_code == 0
    assert len(smtp_sink.messages) == 1


def test_import_pending_sends_one_confirmation_each(smtp_runner: CliRunner, smtp_sink) -> None:
    """`subscribers import --pending` mails each new pending row once; a plain import none."""
    result = smtp_runner.invoke(main, ["subscribers", "import", str(SAMPLE), "--pending"])
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith("5 confirmation emails sent\n")
    assert sorted(r for m in smtp_sink.wait_for(5) for r in m.recipients) == sorted(
        line.split(",")[0] for line in SAMPLE.read_text().splitlines()[1:]
    )
    again = smtp_runner.invoke(main, ["subscribers", "import", str(SAMPLE), "--pending"])
    assert again.exit_code == 0 and "confirmation" not in again.stdout
    assert len(smtp_sink.messages) == 5


def test_unreachable_server_keeps_the_confirmation_queued(
    smtp_runner: CliRunner, monkeypatch: pytest.MonkeyPatch, database_url: str
) -> None:
    """With the SMTP server down, `add --pending` keeps the subscriber and the queued mail,
    says so on stderr and exits 1."""
    monkeypatch.setenv("NEWSLETTER_SMTP_PORT", "9")
    result = smtp_runner.invoke(main, ["subscribers", "add", "ada@example.com", "--pending"])
    assert result.exit_code == 1
    assert "not sent yet" in result.stderr and "newsletter worker" in result.stderr
    from newsletter.store import open_store

    with open_store(database_url) as store:
        assert [row.status for row in _rows(store).values()] == ["queued"]
        with store.session() as session:
            assert subscribers.get(session, "ada@example.com").status == "pending"
