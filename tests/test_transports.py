"""Transports against a real SMTP server (aiosmtpd in a thread) and a real outbox folder."""

from __future__ import annotations

import email
import json
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from email.message import EmailMessage
from email.policy import default as default_policy
from pathlib import Path

import pytest
from smtp_sink import SmtpSink, in_fraction

from newsletter.config import load_settings
from newsletter.errors import DeliveryError
from newsletter.transports import (
    MemoryTransport,
    Message,
    OutboxTransport,
    Outcome,
    SmtpTransport,
    classify,
    from_wire,
    make_transport,
    to_wire,
)

SENDER = "news@example.com"


def wire_message(to: str = "reader@example.com", body: str = "Hello.\n") -> bytes:
    """A small real message in wire format, as the message builder hands it over."""
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = SENDER, to, "Digest"
    message["Message-ID"] = f"<{to.split('@')[0]}.digest@test>"
    message.set_content(body)
    return to_wire(message.as_bytes())


def transport_for(sink: SmtpSink, **kwargs: object) -> SmtpTransport:
    options: dict = {"security": sink.tls or "none", "timeout": 5.0} | kwargs
    return SmtpTransport(sink.host, sink.port, **options)


@pytest.fixture
def transport(smtp_sink: SmtpSink) -> Iterator[SmtpTransport]:
    """A plain-text transport to the sink, closed before the sink stops."""
    with transport_for(smtp_sink) as opened:
        yield opened


def test_to_wire_makes_crlf_and_stuffs_dots() -> None:
    """Bare LF and CR become CRLF, and every line starting with a dot gets a second one."""
    assert to_wire(b".first\nmid\r\n..two\rlast") == b"..first\r\nmid\r\n...two\r\nlast"


@pytest.mark.parametrize(
    "raw", [b"plain\r\n", b".\r\n", b"..\r\n.x\r\n", b"a\r\n.\r\nb\r\n", b"", b"no newline"]
)
def test_from_wire_undoes_to_wire(raw: bytes) -> None:
    """from_wire(to_wire(m)) gives back m, lone dots and leading dots included."""
    assert from_wire(to_wire(raw)) == raw


def test_one_connection_carries_100_pipelined_messages(
    smtp_sink: SmtpSink, transport: SmtpTransport
) -> None:
    """The connection is reused, and MAIL/RCPT/DATA go in one write when PIPELINING is offered."""
    for number in range(100):
        outcome = transport.send(SENDER, f"r{number}@example.com", wire_message())
        assert outcome.status == "sent", outcome
    assert len(smtp_sink.wait_for(100)) == 100
    assert smtp_sink.connections_opened == 1
    mails = [c for c in smtp_sink.commands if c.verb == "MAIL"]
    assert len(mails) == 100 and all(c.pipelined for c in mails)


def _batch(count: int, prefix: str = "r") -> list[tuple[int, Message]]:
    return [(n, Message(SENDER, f"{prefix}{n}@example.com", wire_message())) for n in range(count)]


def test_send_all_puts_each_next_envelope_behind_the_body(
    smtp_sink: SmtpSink, transport: SmtpTransport
) -> None:
    """A run of messages costs one round trip each: the next envelope is on the wire before
    the server answers a body; each outcome comes back with its key, in order."""
    results = list(transport.send_all(_batch(5)))
    assert [key for key, _ in results] == [0, 1, 2, 3, 4]
    assert all(outcome.status == "sent" for _, outcome in results)
    received = smtp_sink.wait_for(5)
    assert [m.followed for m in received] == [True, True, True, True, False]
    assert smtp_sink.connections_opened == 1
    transport.send(SENDER, "alone@example.com", wire_message())
    assert smtp_sink.wait_for(6)[5].followed is False


def test_an_envelope_behind_a_body_that_closes_the_connection_is_sent_again(
    smtp_sink: SmtpSink, transport: SmtpTransport
) -> None:
    """421 to a body (the server closes) or a drop: the next message, whose envelope went out
    behind that body but whose body never left, goes on a new connection, not counted as a
    failure of its own."""
    smtp_sink.fail("data", "421 4.7.0 closing, too many messages", recipients=["r1@example.com"])
    results = dict(transport.send_all(_batch(4)))
    assert results[1].status == "retry" and results[1].code == 421
    assert {key: o.status for key, o in results.items() if key != 1} == {
        0: "sent",
        2: "sent",
        3: "sent",
    }
    assert sorted(r for m in smtp_sink.messages for r in m.recipients) == [
        "r0@example.com",
        "r2@example.com",
        "r3@example.com",
    ]
    assert smtp_sink.connections_opened == 2


def test_a_refused_envelope_in_a_run_leaves_the_rest_going(
    smtp_sink: SmtpSink, transport: SmtpTransport
) -> None:
    """A recipient refused in the middle of a run: its body is never sent, RSET clears the
    transaction, and the messages after it go through on the same connection."""
    smtp_sink.fail("rcpt", "550 5.1.1 user unknown", recipients=["r2@example.com"])
    results = dict(transport.send_all(_batch(5)))
    assert results[2].status == "bounced"
    assert [key for key, o in results.items() if o.status == "sent"] == [0, 1, 3, 4]
    assert smtp_sink.connections_opened == 1 and smtp_sink.command_counts()["RSET"] == 1


def test_a_failure_drawing_the_next_message_never_completes_this_one(
    smtp_sink: SmtpSink, transport: SmtpTransport
) -> None:
    """If drawing the next message fails while the server waits for a body, the connection
    is dropped: the half-sent message is never delivered."""

    def messages():
        yield 0, Message(SENDER, "first@example.com", wire_message())
        raise RuntimeError("the database went away")

    with pytest.raises(RuntimeError):
        list(transport.send_all(messages()))
    assert transport.send(SENDER, "after@example.com", wire_message()).status == "sent"
    assert [m.recipients for m in smtp_sink.wait_for(1)] == [("after@example.com",)]
    assert smtp_sink.connections_opened == 2


def test_four_worker_threads_use_four_connections(smtp_sink: SmtpSink) -> None:
    """One transport per thread is the pool: 200 messages arrive over exactly 4 connections."""

    def work(worker: int) -> None:
        with transport_for(smtp_sink) as transport:
            for number in range(50):
                address = f"w{worker}-{number}@example.com"
                assert transport.send(SENDER, address, wire_message(address)).status == "sent"

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({m.recipients for m in smtp_sink.wait_for(200)}) == 200
    assert smtp_sink.connections_opened == 4
    assert len({m.connection for m in smtp_sink.messages}) == 4


def test_without_pipelining_commands_go_one_by_one(make_smtp_sink) -> None:
    """A server that does not offer PIPELINING gets each command after the previous reply."""
    sink = make_smtp_sink(pipelining=False)
    with transport_for(sink) as transport:
        for number in range(3):
            assert transport.send(SENDER, f"r{number}@example.com", wire_message()).status == "sent"
    assert len(sink.messages) == 3
    assert not any(c.pipelined for c in sink.commands)


def test_server_stores_exactly_from_wire_of_the_data(
    smtp_sink: SmtpSink, transport: SmtpTransport
) -> None:
    """Dot-stuffed lines and 8-bit UTF-8 arrive byte for byte; a missing final CRLF is added."""
    body = ".leading dot\n..two dots\n.\nGrüße — ✓\n"
    data = wire_message(body=body)
    transport.send(SENDER, "a@example.com", data)
    transport.send(SENDER, "b@example.com", data.rstrip(b"\r\n"))
    first, second = smtp_sink.wait_for(2)
    assert first.data == from_wire(data)
    assert second.data == from_wire(data)
    parsed = email.message_from_bytes(first.data, policy=default_policy)
    assert parsed.get_content().replace("\r\n", "\n") == body
    assert "BODY=8BITMIME" in first.mail_options


def test_451_is_a_throttled_retry_and_the_retry_goes_through(
    smtp_sink: SmtpSink, transport: SmtpTransport
) -> None:
    """A 451 for one recipient (greylisting) makes that message wait without slowing the
    send; after RSET the same connection delivers the retry."""
    smtp_sink.fail("rcpt", "451 4.7.1 try later", recipients=["busy@example.com"], times=1)
    first = transport.send(SENDER, "busy@example.com", wire_message())
    assert first == Outcome("retry", 451, "451 4.7.1 try later", throttle=False)
    assert transport.send(SENDER, "busy@example.com", wire_message()).status == "sent"
    assert smtp_sink.connections_opened == 1
    assert smtp_sink.command_counts()["RSET"] == 1


def test_fraction_of_first_attempts_fail_then_all_arrive(
    smtp_sink: SmtpSink, transport: SmtpTransport
) -> None:
    """The hash-picked 10% get 451 once; retrying them delivers all 200 over one connection."""
    smtp_sink.fail("rcpt", "451 4.7.1 try later", fraction=0.1, times=1)
    addresses = [f"user{n}@example.com" for n in range(200)]
    retries = [a for a in addresses if transport.send(SENDER, a, wire_message(a)).status == "retry"]
    assert retries == [a for a in addresses if in_fraction(a, 0.1)]
    assert 5 < len(retries) < 40
    assert all(transport.send(SENDER, a, wire_message(a)).status == "sent" for a in retries)
    assert sorted(r for m in smtp_sink.messages for r in m.recipients) == sorted(addresses)
    assert smtp_sink.connections_opened == 1


def test_421_throttles_and_the_next_send_reconnects(
    smtp_sink: SmtpSink, transport: SmtpTransport
) -> None:
    """421 closes the connection: the message is retried on a new one."""
    smtp_sink.limit_per_connection(2)
    outcomes = [transport.send(SENDER, f"r{n}@example.com", wire_message()) for n in range(3)]
    assert [o.status for o in outcomes] == ["sent", "sent", "retry"]
    assert outcomes[2].code == 421 and outcomes[2].throttle
    assert transport.send(SENDER, "r2@example.com", wire_message()).status == "sent"
    assert smtp_sink.connections_opened == 2


def test_454_is_a_throttled_retry(smtp_sink: SmtpSink, transport: SmtpTransport) -> None:
    """454 4.7.0 (provider throttling) is temporary and asks us to slow down."""
    smtp_sink.fail("rcpt", "454 4.7.0 throttled")
    outcome = transport.send(SENDER, "a@example.com", wire_message())
    assert (outcome.status, outcome.code, outcome.throttle) == ("retry", 454, True)


@pytest.mark.parametrize(
    ("stage", "reply", "status"),
    [
        ("rcpt", "550 5.1.1 user unknown", "bounced"),
        ("rcpt", "550 no such user here", "bounced"),
        ("rcpt", "550 5.7.1 relaying denied", "failed"),
        ("data", "552 5.3.4 message too big", "failed"),
        ("data", "550 5.1.1 mailbox gone", "bounced"),
        ("mail", "553 5.1.8 sender rejected", "failed"),
        ("data", "452 4.3.1 insufficient storage", "retry"),
    ],
)
def test_permanent_and_temporary_answers_are_classified(
    smtp_sink: SmtpSink, transport: SmtpTransport, stage: str, reply: str, status: str
) -> None:
    """5.1.x at RCPT or after DATA bounces, other 5xx fail, 4xx retry; the connection lives on,
    with an RSET before the next message when the refusal left a transaction open (after the
    body the transaction is over, whatever the answer)."""
    smtp_sink.fail(stage, reply, times=1, recipients=None if stage == "mail" else ["a@x.test"])
    outcome = transport.send(SENDER, "a@x.test", wire_message())
    assert (outcome.status, outcome.answer, outcome.throttle) == (status, reply, False)
    assert transport.send(SENDER, "b@example.com", wire_message()).status == "sent"
    resets = 0 if stage == "data" else 1
    assert smtp_sink.connections_opened == 1 and smtp_sink.command_counts()["RSET"] == resets


def test_rejected_rcpt_under_pipelining_sends_no_body(
    smtp_sink: SmtpSink, transport: SmtpTransport
) -> None:
    """DATA fails after a refused RCPT: we report the RCPT answer and stay in sync."""
    smtp_sink.fail("rcpt", "550 5.1.1 user unknown", recipients=["gone@example.com"])
    outcome = transport.send(SENDER, "gone@example.com", wire_message())
    assert outcome == Outcome("bounced", 550, "550 5.1.1 user unknown")
    assert transport.send(SENDER, "here@example.com", wire_message()).status == "sent"
    assert [m.recipients for m in smtp_sink.messages] == [("here@example.com",)]


@pytest.mark.parametrize("partial", [False, True])
def test_connection_dropped_in_data_is_retried_on_a_new_connection(
    smtp_sink: SmtpSink, transport: SmtpTransport, partial: bool
) -> None:
    """A server that hangs up during DATA gives a retry; the next send reconnects."""
    smtp_sink.drop(partial=partial, recipients=["a@example.com"])
    big = wire_message(body="line of text\n" * 5000)
    outcome = transport.send(SENDER, "a@example.com", big)
    assert (outcome.status, outcome.code) == ("retry", None)
    assert outcome.answer.startswith("connection dropped")
    assert transport.send(SENDER, "a@example.com", big).status == "sent"
    assert smtp_sink.connections_opened == 2 and len(smtp_sink.messages) == 1


def test_stall_longer_than_timeout_is_a_retry(smtp_sink: SmtpSink) -> None:
    """A server that does not answer within the timeout costs one retry, not a hung send."""
    smtp_sink.stall(3, recipients=["slow@example.com"], times=1)
    with transport_for(smtp_sink, timeout=0.5) as transport:
        outcome = transport.send(SENDER, "slow@example.com", wire_message())
        assert (outcome.status, outcome.code) == ("retry", None)
        assert "timed out" in outcome.answer
        assert transport.send(SENDER, "fast@example.com", wire_message()).status == "sent"


def test_unsafe_address_is_refused_before_any_command(
    smtp_sink: SmtpSink, transport: SmtpTransport
) -> None:
    """An address with CR/LF could inject SMTP commands; it fails without reaching the server."""
    outcome = transport.send(SENDER, "a@example.com>\r\nRCPT TO:<b@example.com", wire_message())
    assert outcome.status == "failed"
    assert smtp_sink.commands == []


def test_non_ascii_address_uses_smtputf8(smtp_sink: SmtpSink, transport: SmtpTransport) -> None:
    """An internationalised address is sent with SMTPUTF8 when the server offers it."""
    assert transport.send(SENDER, "jörg@example.com", wire_message()).status == "sent"
    assert smtp_sink.messages[0].recipients == ("jörg@example.com",)
    assert "SMTPUTF8" in smtp_sink.messages[0].mail_options


def test_non_ascii_local_part_without_smtputf8_fails_naming_the_address(make_smtp_sink) -> None:
    """A server that does not offer SMTPUTF8 cannot take a UTF-8 local part: that message
    fails, saying whose address and why, before any command."""
    sink = make_smtp_sink(smtputf8=False)
    with SmtpTransport(sink.host, sink.port, "none", timeout=5) as transport:
        outcome = transport.send(SENDER, "jörg@example.com", wire_message())
        assert (outcome.status, outcome.code) == ("failed", None)
        assert outcome.answer.startswith("jörg@example.com: ") and "SMTPUTF8" in outcome.answer
        assert transport.send(SENDER, "ann@example.com", wire_message()).status == "sent"
    assert [m.recipients for m in sink.messages] == [("ann@example.com",)]


def test_login_succeeds_with_the_right_password(make_smtp_sink) -> None:
    """AUTH over a plain connection (security none) logs in and sends."""
    sink = make_smtp_sink(credentials=("mailer", "s3cret-pw"))
    with transport_for(sink, username="mailer", password="s3cret-pw") as transport:
        transport.check()
        assert transport.send(SENDER, "a@example.com", wire_message()).status == "sent"
    assert sink.command_counts()["AUTH"] == 1


def test_wrong_password_is_a_delivery_error_without_the_password(make_smtp_sink) -> None:
    """check() names host:port and the server's answer, never the password."""
    sink = make_smtp_sink(credentials=("mailer", "right-pw"))
    with (
        transport_for(sink, username="mailer", password="wrong-pw") as transport,
        pytest.raises(DeliveryError) as caught,
    ):
        transport.check()
    message = str(caught.value)
    assert message.startswith(f"SMTP login refused by 127.0.0.1:{sink.port}: 535")
    assert "wrong-pw" not in message and "\n" not in message


def test_username_without_auth_offered_is_a_delivery_error(smtp_sink: SmtpSink) -> None:
    """Configured credentials but a server without AUTH: refuse rather than send anonymously."""
    with (
        transport_for(smtp_sink, username="mailer", password="pw") as transport,
        pytest.raises(DeliveryError, match="does not offer AUTH"),
    ):
        transport.check()


def test_starttls_with_a_verified_certificate(make_smtp_sink, trust_tls_cert) -> None:
    """STARTTLS upgrades the connection, verifies the certificate, then logs in and sends."""
    sink = make_smtp_sink(tls="starttls", cert=trust_tls_cert, credentials=("u", "p"))
    with transport_for(sink, username="u", password="p") as transport:
        assert transport.send(SENDER, "a@example.com", wire_message()).status == "sent"
    assert sink.command_counts()["STARTTLS"] == 1 and len(sink.messages) == 1


def test_implicit_ssl_with_a_verified_certificate(make_smtp_sink, trust_tls_cert) -> None:
    """security=ssl speaks TLS from the first byte (port 465 style)."""
    sink = make_smtp_sink(tls="ssl", cert=trust_tls_cert)
    with transport_for(sink, local_hostname="client.test") as transport:
        assert transport.send(SENDER, "a@example.com", wire_message()).status == "sent"
    assert len(sink.messages) == 1


def test_untrusted_certificate_is_a_delivery_error(make_smtp_sink, tls_cert) -> None:
    """A certificate that does not verify stops the send before any message."""
    sink = make_smtp_sink(tls="ssl", cert=tls_cert)
    with transport_for(sink) as transport, pytest.raises(DeliveryError, match="TLS with"):
        transport.check()


def test_starttls_not_offered_refuses_clear_text(smtp_sink: SmtpSink) -> None:
    """security=starttls without STARTTLS on offer: check() raises, send() sends nothing."""
    with transport_for(smtp_sink, security="starttls") as transport:
        with pytest.raises(DeliveryError, match="refusing to send in clear text"):
            transport.check()
        outcome = transport.send(SENDER, "a@example.com", wire_message())
    assert (outcome.status, outcome.code) == ("retry", None)
    assert "refusing to send in clear text" in outcome.answer
    assert smtp_sink.command_counts()["MAIL"] == 0


def test_unreachable_server(make_smtp_sink) -> None:
    """check() raises naming host:port; send() reports a retry instead of raising."""
    sink = make_smtp_sink()
    sink.stop()
    with transport_for(sink) as transport:
        with pytest.raises(DeliveryError, match=f"cannot reach SMTP server 127.0.0.1:{sink.port}"):
            transport.check()
        outcome = transport.send(SENDER, "a@example.com", wire_message())
    assert (outcome.status, outcome.code) == ("retry", None)
    assert outcome.answer.startswith(f"cannot reach SMTP server 127.0.0.1:{sink.port}")


@pytest.mark.parametrize(
    ("stage", "code", "text", "expected"),
    [
        ("final", 250, "2.0.0 Ok", ("sent", False)),
        ("rcpt", 421, "4.7.0 slow down", ("retry", True)),
        ("rcpt", 450, "4.2.1 mailbox busy", ("retry", False)),
        ("rcpt", 451, "4.7.1 greylisted", ("retry", False)),
        ("final", 451, "4.3.0 try later", ("retry", False)),
        ("mail", 451, "4.7.1 rate limited", ("retry", True)),
        ("rcpt", 454, "4.7.0 TLS not available", ("retry", True)),
        ("rcpt", 551, "5.1.6 moved", ("bounced", False)),
        ("mail", 550, "5.1.1 user unknown", ("failed", False)),
        ("final", 554, "5.7.1 spam", ("failed", False)),
        ("final", 354, "go on", ("retry", False)),
    ],
)
def test_classify(stage: str, code: int, text: str, expected: tuple[str, bool]) -> None:
    """Reply codes map to outcomes as the sending contract says."""
    outcome = classify(stage, code, text.encode())
    assert (outcome.status, outcome.throttle) == expected


def test_outbox_writes_whole_eml_files_that_sort_by_time(tmp_path: Path) -> None:
    """Each message is its own parseable .eml, named by UTC time, with no temp file left."""
    outbox = OutboxTransport(tmp_path / "outbox")
    outbox.check()
    addresses = [f"r{n}@example.com" for n in range(20)]
    outcomes = [outbox.send(SENDER, a, wire_message(a, body=".dot\n")) for a in addresses]
    assert all(o.status == "sent" and o.code == 250 for o in outcomes)
    files = sorted((tmp_path / "outbox").iterdir())
    assert [f.suffix for f in files] == [".eml"] * 20
    recipients = [email.message_from_bytes(f.read_bytes())["To"] for f in files]
    assert recipients == addresses
    assert files[0].read_bytes() == from_wire(wire_message(addresses[0], body=".dot\n"))
    assert outcomes[0].answer == f"written to {files[0]}"


def test_outbox_check_clears_what_a_killed_send_left_half_written(tmp_path: Path) -> None:
    """Temporary files a killed send left in the outbox go at the next send's check; one
    being written right now by another sender stays."""
    import os
    import time

    outbox = tmp_path / "outbox"
    outbox.mkdir()
    old = outbox / ".20261130T000000.000000Z-abc.eml.x1y2.tmp"
    fresh = outbox / ".20261130T000001.000000Z-def.eml.z3w4.tmp"
    for path in (old, fresh):
        path.write_bytes(b"half a message")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    OutboxTransport(outbox).check()
    assert not old.exists() and fresh.exists()


def test_outbox_check_fails_when_the_folder_cannot_be_made(tmp_path: Path) -> None:
    """A path blocked by a file is a DeliveryError before sending starts."""
    (tmp_path / "blocked").write_text("a file")
    with pytest.raises(DeliveryError, match="not writable"):
        OutboxTransport(tmp_path / "blocked" / "outbox").check()


def test_memory_transport_scripts_answers_across_threads() -> None:
    """The in-memory transport records every attempt from many threads and plays scripts."""
    bounce = Outcome("bounced", 550, "550 5.1.1 user unknown")
    memory = MemoryTransport(lambda rcpt: bounce if rcpt.startswith("gone") else None)
    threads = [
        threading.Thread(target=memory.send, args=(SENDER, f"{p}{n}@x.test", b"m"))
        for n in range(50)
        for p in ("ok", "gone")
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(memory.attempts) == 100 and len(memory.sent) == 50
    assert all(r.startswith("ok") for r in memory.recipients())


def test_make_transport_follows_the_settings(tmp_path: Path) -> None:
    """No SMTP host means the outbox folder; a host means SMTP with its settings."""
    outbox = make_transport(load_settings({"NEWSLETTER_OUTBOX_DIR": str(tmp_path)}, tmp_path))
    assert isinstance(outbox, OutboxTransport) and outbox.directory == tmp_path
    env = {"NEWSLETTER_SMTP_HOST": "mail.test", "NEWSLETTER_SMTP_SECURITY": "ssl"}
    smtp = make_transport(load_settings(env, tmp_path))
    assert isinstance(smtp, SmtpTransport)
    assert (smtp.where, smtp.security) == ("mail.test:587", "ssl")


def test_sink_runs_as_a_process_and_logs_deliveries(tmp_path: Path) -> None:
    """The sink's CLI journals each accepted message as JSON and exits 0 on SIGTERM."""
    journal = tmp_path / "deliveries.jsonl"
    script = Path(__file__).with_name("smtp_sink.py")
    with subprocess.Popen(
        [sys.executable, str(script), "--port", "0", "--jsonl", str(journal)],
        stdout=subprocess.PIPE,
        text=True,
    ) as process:
        assert process.stdout is not None
        port = int(process.stdout.readline().strip().rsplit(":", 1)[1])
        with SmtpTransport("127.0.0.1", port, "none", timeout=5) as transport:
            for number in range(3):
                transport.send(
                    SENDER, f"r{number}@example.com", wire_message(f"r{number}@example.com")
                )
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    entries = [json.loads(line) for line in journal.read_text().splitlines()]
    assert [e["recipients"] for e in entries] == [[f"r{n}@example.com"] for n in range(3)]
    assert entries[0]["message_id"] == "<r0.digest@test>" and entries[0]["size"] > 100
