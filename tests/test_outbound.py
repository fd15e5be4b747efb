"""One-off mail: building confirmations, the queue's retries and claims, the worker thread,
and the CLI commands that send confirmations."""

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
from newsletter.outbound import OutboundOptions, OutboundWorker, deliver_outbound
from newsletter.store import OutboundMail, Store, utcnow
from newsletter.tokens import Tokens
from newsletter.transports import MemoryTransport, Outcome, from_wire

TOKENS = Tokens("test-secret-key-that-signs-links-0123456789")
FAST = OutboundOptions(retry_base=0.0, retry_max=0.0, max_attempts=3, lease=60.0)
SAMPLE = Path(__file__).resolve().parents[1] / "subscribers" / "sample.csv"


def _parse(body: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(from_wire(body), policy=email.policy.default)


def _queue(store: Store, settings: Settings, *addresses: str) -> list[int]:
    with store.begin() as session:
        return outbound.queue_confirmations(session, settings, TOKENS, addresses)


def _rows(store: Store) -> dict[str, OutboundMail]:
    with store.session() as session:
        return {row.recipient: row for row in session.scalars(select(OutboundMail))}


def test_confirmation_is_multipart_with_every_header(web_settings: Settings) -> None:
    """A confirmation has From, bare To, the list's subject, Date, Message-ID,
    Auto-Submitted, and text and HTML parts that both carry a working confirm link."""
    mail = outbound.prepare_confirmation(web_settings, TOKENS, "ada@example.com")
    message = _parse(mail.body)
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
    assert b"\n" not in mail.body.replace(b"\r\n", b"")  # wire format: CRLF only


def test_non_ascii_list_name_and_address_are_encoded(web_settings: Settings) -> None:
    """A UTF-8 list name is RFC 2047-encoded in the headers; an internationalised address
    goes through as UTF-8 (SMTPUTF8)."""
    settings = replace(web_settings, list_name="Wöchentliche Links", from_address="Wö <w@ex.de>")
    mail = outbound.prepare_confirmation(settings, TOKENS, "zoë@example.com")
    head = mail.body.split(b"\r\n\r\n")[0]
    assert b"Subject: =?utf-8?" in head and b"From: =?utf-8?" in head
    message = _parse(mail.body)
    assert message["Subject"] == "Confirm your subscription to Wöchentliche Links"
    assert message["To"] == "zoë@example.com"


def test_long_links_keep_quoted_printable_lines_short(web_settings: Settings) -> None:
    """A long site URL full of '=' (each encoded as three characters) still gives body lines
    of at most 76 characters (RFC 2045), and the link decodes exactly."""
    site = "https://news.example.com/very/long/path/" + "y" * 40 + "?a=b&c=d"
    mail = outbound.prepare_confirmation(replace(web_settings, site_url=site), TOKENS, "a@b.co")
    lines = mail.body.split(b"\r\n")
    assert max(len(line) for line in lines) <= 78  # headers included (RFC 5322)
    body = [line for line in lines if b": " not in line and not line.startswith(b"--")]
    assert max(len(line) for line in body) <= 76
    text = _parse(mail.body).get_body(("plain",)).get_content()
    token = text.split(f"{site}/confirm/")[1].split()[0]
    assert TOKENS.read_confirm(token) == "a@b.co"


def test_a_template_that_transforms_the_address_is_rendered_per_address(
    web_settings: Settings, tmp_path: Path
) -> None:
    """The mail is encoded once with placeholders only when the templates print the address
    and link as they are; a custom template that changes them still gets the real values."""
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "confirm_email.txt").write_text(
        "Confirm {{ email|upper }}{% if 'example' in email %} (example){% endif %}: "
        "{{ confirm_url }}\n"
    )
    (templates / "confirm_email.html").write_text("<p>{{ email|lower }}</p>")
    settings = replace(web_settings, templates_dir=templates)
    for address in ("ada@example.com", "bob@other.org"):
        message = _parse(outbound.prepare_confirmation(settings, TOKENS, address).body)
        text = message.get_body(("plain",)).get_content()
        suffix = " (example)" if "example" in address else ""
        assert text.startswith(f"Confirm {address.upper()}{suffix}: https://news.example.com/")
        assert message.get_body(("html",)).get_content().strip() == f"<p>{address}</p>"


def test_queued_mail_disappears_with_its_transaction(store: Store, web_settings) -> None:
    """Mail queued in a transaction that rolls back is never sent."""
    with pytest.raises(RuntimeError), store.begin() as session:
        subscribers.add(session, "ada@example.com", status="pending")
        outbound.queue_confirmations(session, web_settings, TOKENS, ["ada@example.com"])
        raise RuntimeError("the signup failed after queueing")
    assert _rows(store) == {}


def test_deliver_sends_and_marks_sent(store: Store, web_settings: Settings) -> None:
    """Each queued message goes out once with the From address as envelope sender."""
    _queue(store, web_settings, "a@example.com", "b@example.com")
    transport = MemoryTransport()
    report = deliver_outbound(store, web_settings, transport)
    assert (report.claimed, report.sent) == (2, 2)
    assert sorted(transport.recipients()) == ["a@example.com", "b@example.com"]
    assert {a.envelope_from for a in transport.attempts} == {"links@example.com"}
    assert {row.status for row in _rows(store).values()} == {"sent"}
    assert deliver_outbound(store, web_settings, transport).claimed == 0


def test_temporary_failures_are_retried_then_failed(store: Store, web_settings) -> None:
    """A 4xx is retried after a backoff, up to max_attempts, then the row is failed."""
    _queue(store, web_settings, "a@example.com")
    busy = MemoryTransport(script=lambda _: Outcome("retry", 451, "451 4.7.1 later"))
    slow = replace(FAST, retry_base=3600.0, retry_max=3600.0)
    report = deliver_outbound(store, web_settings, busy, options=slow)
    assert report.retried == 1
    row = _rows(store)["a@example.com"]
    assert row.status == "queued" and row.next_attempt_at > utcnow() + timedelta(minutes=59)
    assert deliver_outbound(store, web_settings, busy, options=slow).claimed == 0  # not due
    with store.begin() as session:
        session.execute(update(OutboundMail).values(next_attempt_at=None))
    for _ in range(3):
        deliver_outbound(store, web_settings, busy, options=FAST)
    row = _rows(store)["a@example.com"]
    assert (row.status, row.attempts, row.last_answer) == ("failed", 3, "451 4.7.1 later")


def test_user_unknown_bounces_a_pending_subscriber_only(store: Store, web_settings) -> None:
    """A 5.1.1 fails the mail and marks a pending subscriber bounced (an active one stays);
    any other 5xx just fails the mail."""
    with store.begin() as session:
        subscribers.add(session, "gone@example.com", status="pending")
        subscribers.add(session, "active@example.com")
    _queue(store, web_settings, "gone@example.com", "active@example.com", "spam@example.com")

    def script(recipient: str) -> Outcome:
        if recipient == "spam@example.com":
            return Outcome("failed", 554, "554 5.7.1 rejected as spam")
        return Outcome("bounced", 550, "550 5.1.1 user unknown")

    report = deliver_outbound(store, web_settings, MemoryTransport(script))
    assert (report.bounced, report.failed) == (2, 1)
    assert {row.status for row in _rows(store).values()} == {"failed"}
    with store.session() as session:
        assert subscribers.get(session, "gone@example.com").status == "bounced"
        assert subscribers.get(session, "active@example.com").status == "active"


def test_unreachable_server_stops_the_round(store: Store, web_settings: Settings) -> None:
    """When the server cannot be reached, the rest of the batch goes back untouched."""
    _queue(store, web_settings, *(f"r{n}@example.com" for n in range(5)))
    down = MemoryTransport(script=lambda _: Outcome("retry", None, "cannot reach SMTP server"))
    report = deliver_outbound(store, web_settings, down, options=FAST)
    assert (len(down.attempts), report.retried, report.released) == (1, 1, 4)
    assert report.unreachable == "cannot reach SMTP server"
    assert sorted(row.attempts for row in _rows(store).values()) == [0, 0, 0, 0, 1]


def test_concurrent_workers_never_send_a_message_twice(store: Store, web_settings) -> None:
    """Four workers draining one queue at once send each message exactly once."""
    ids = _queue(store, web_settings, *(f"r{n}@example.com" for n in range(120)))
    transport = MemoryTransport()

    def work() -> None:
        while deliver_outbound(store, web_settings, transport, limit=7).claimed:
            pass

    workers = [threading.Thread(target=work) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert sorted(transport.recipients()) == sorted(f"r{n}@example.com" for n in range(120))
    assert len(ids) == 120


def test_a_claim_left_by_a_dead_worker_is_taken_again(store: Store, web_settings) -> None:
    """A row claimed by a worker that died is hidden for the lease, then sent by another."""
    _queue(store, web_settings, "a@example.com")
    assert outbound._claim(store, 10, 600.0, None)  # claimed, never recorded: a crash
    transport = MemoryTransport()
    assert deliver_outbound(store, web_settings, transport).claimed == 0
    with store.begin() as session:
        session.execute(update(OutboundMail).values(next_attempt_at=utcnow()))
    assert deliver_outbound(store, web_settings, transport).sent == 1


def test_worker_sends_on_wake_and_stops_cleanly(
    store: Store, web_settings: Settings, smtp_sink
) -> None:
    """The server's worker delivers queued mail to a real SMTP server as soon as it is
    woken, and stop() ends the thread."""
    settings = replace(
        web_settings,
        smtp_host=smtp_sink.host,
        smtp_port=smtp_sink.port,
        smtp_security="none",
        smtp_timeout=5.0,
    )
    worker = OutboundWorker(store, settings, poll=30.0)
    worker.start()
    try:
        _queue(store, settings, "a@example.com", "b@example.com")
        worker.wake()
        received = smtp_sink.wait_for(2)
    finally:
        worker.stop()
    assert not worker.is_alive()
    assert sorted(r for m in received for r in m.recipients) == ["a@example.com", "b@example.com"]
    assert worker.report.sent == 2
    assert {row.status for row in _rows(store).values()} == {"sent"}


def test_prune_forgets_old_mail_only(store: Store, web_settings: Settings) -> None:
    """Sent mail older than keep_sent is deleted; recent and queued mail stays."""
    _queue(store, web_settings, "old@example.com", "new@example.com", "queued@example.com")
    with store.begin() as session:
        session.execute(
            update(OutboundMail)
            .where(OutboundMail.recipient != "queued@example.com")
            .values(status="sent")
        )
        session.execute(
            update(OutboundMail)
            .where(OutboundMail.recipient == "old@example.com")
            .values(created_at=utcnow() - timedelta(days=31))
        )
    assert outbound.prune(store) == 1
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
    assert "not sent yet" in result.stderr and "newsletter serve" in result.stderr
    from newsletter.store import open_store

    with open_store(database_url) as store:
        assert [row.status for row in _rows(store).values()] == ["queued"]
        with store.session() as session:
            assert subscribers.get(session, "ada@example.com").status == "pending"
