"""Delivering an issue: the ledger, retries, throttling, bounces, skips, against real servers."""

from __future__ import annotations

import email
import email.policy
import shutil
from pathlib import Path

import pytest
from sqlalchemy import select

from newsletter.config import load_settings
from newsletter.errors import DeliveryError, InputError
from newsletter.ledger import create_issue, describe_issues
from newsletter.sender import Sender, SendOptions, plan_send
from newsletter.store import Delivery, Subscriber, utcnow
from newsletter.subscribers import add, unsubscribe
from newsletter.transports import MemoryTransport, Outcome

FAST = SendOptions(batch_size=10, retry_base=0.05, retry_max=0.2, idle_poll=0.05)
FIXTURES = Path(__file__).parent / "fixtures"


def _settings(tmp_path: Path, **env: str):
    base = {
        "NEWSLETTER_SITE_URL": "https://news.example.com",
        "NEWSLETTER_SECRET_KEY": "test-secret",
        "NEWSLETTER_OUTBOX_DIR": str(tmp_path / "outbox"),
        "NEWSLETTER_FROM": "Weekly <weekly@example.com>",
    }
    return load_settings(base | env, dotenv_path=Path("/nonexistent"))


def _digest(tmp_path: Path) -> Path:
    shutil.copy(FIXTURES / "chart.png", tmp_path / "chart.png")
    target = tmp_path / "digest.md"
    shutil.copy(FIXTURES / "mojibake-digest.md", target)
    return target


def _subscribe(store, count: int, prefix: str = "reader") -> list[str]:
    addresses = [f"{prefix}{i:04d}@example.com" for i in range(count)]
    with store.begin() as session:
        for i, address in enumerate(addresses):
            add(session, address, f"Reader {i}" if i % 2 else None)
    return addresses


def _start(store, settings, tmp_path: Path) -> int:
    """The issue of the test digest with its ledger, not sent yet."""
    plan = plan_send(store, settings, _digest(tmp_path))
    issue, _ = create_issue(
        store,
        digest_path=str(plan.digest.path),
        digest_name=plan.digest.path.name,
        content_hash=plan.digest.content_hash,
        rendered=plan.rendered,
        force=False,
    )
    return issue.id


def deliver_issue(store, settings, issue_id: int, **options):
    return Sender(store, settings, **options).run(issue_id)


def _statuses(store, issue_id: int) -> dict[str, str]:
    with store.session() as session:
        rows = session.execute(
            select(Delivery.email, Delivery.status).where(Delivery.issue_id == issue_id)
        )
        return dict(rows.all())


def test_every_subscriber_once_over_reused_connections(store, smtp_sink, tmp_path: Path) -> None:
    """200 subscribers get exactly one message each over at most 4 SMTP connections."""
    addresses = _subscribe(store, 200)
    settings = _settings(tmp_path, **smtp_sink.env())
    issue_id = _start(store, settings, tmp_path)
    report = deliver_issue(store, settings, issue_id, options=FAST)
    assert report.finished and report.sent == 200
    received = sorted(r for m in smtp_sink.messages for r in m.recipients)
    assert received == addresses
    assert smtp_sink.connections_opened <= settings.smtp_connections + 1
    with store.session() as session:
        [issue] = describe_issues(session, issue_id)
    assert issue["status"] == "sent" and issue["sent"] == 200
    assert issue["recipients"] == 200  # not the -1 PostgreSQL's driver says for INSERT … SELECT


def test_retries_temporary_failures_until_delivered(store, smtp_sink, tmp_path: Path) -> None:
    """10% of first attempts answered 451 are retried with backoff and all get delivered."""
    addresses = _subscribe(store, 100)
    smtp_sink.fail("rcpt", "451 4.3.0 try again later", fraction=0.1, times=1)
    settings = _settings(tmp_path, **smtp_sink.env())
    report = deliver_issue(store, settings, _start(store, settings, tmp_path), options=FAST)
    assert report.finished and report.sent == 100 and report.retried >= 1
    received = [r for m in smtp_sink.messages for r in m.recipients]
    assert sorted(received) == addresses


def test_throttling_slows_the_send_and_completes(store, smtp_sink, tmp_path: Path) -> None:
    """421 after 15 messages per connection and some 454s: the pace drops, nothing fails."""
    addresses = _subscribe(store, 80)
    smtp_sink.limit_per_connection(15)
    smtp_sink.fail("rcpt", "454 4.7.0 throttled, slow down", fraction=0.05, times=2)
    settings = _settings(tmp_path, **smtp_sink.env())
    sender = Sender(store, settings, options=FAST)
    report = sender.run(_start(store, settings, tmp_path))
    assert report.finished and report.sent == 80 and report.failed == 0
    assert sender.pacer.throttles >= 1
    assert sorted(r for m in smtp_sink.messages for r in m.recipients) == addresses


def test_user_unknown_bounces_subscriber_and_others_continue(store, smtp_sink, tmp_path) -> None:
    """550 5.1.1 marks the delivery and the subscriber bounced; everyone else gets the issue."""
    addresses = _subscribe(store, 30)
    unknown = addresses[7]
    smtp_sink.fail("rcpt", "550 5.1.1 user unknown", recipients=[unknown])
    settings = _settings(tmp_path, **smtp_sink.env())
    issue_id = _start(store, settings, tmp_path)
    report = deliver_issue(store, settings, issue_id, options=FAST)
    assert report.finished and report.bounced == 1 and report.sent == 29
    assert _statuses(store, issue_id)[unknown] == "bounced"
    with store.session() as session:
        status = session.scalar(select(Subscriber.status).where(Subscriber.email == unknown))
    assert status == "bounced"


def test_permanent_failure_is_final(store, smtp_sink, tmp_path: Path) -> None:
    """A 552 at the end of DATA fails that delivery for good; the send still finishes."""
    addresses = _subscribe(store, 10)
    smtp_sink.fail("data", "552 5.3.4 message too big", recipients=[addresses[3]])
    settings = _settings(tmp_path, **smtp_sink.env())
    issue_id = _start(store, settings, tmp_path)
    report = deliver_issue(store, settings, issue_id, options=FAST)
    assert report.finished and report.failed == 1 and report.sent == 9
    assert report.failures[0][0] == addresses[3] and "552" in report.failures[0][1]


def test_connection_dropped_in_data_is_retried(store, smtp_sink, tmp_path: Path) -> None:
    """A connection dropped in the middle of DATA is replaced and the message retried."""
    addresses = _subscribe(store, 20)
    smtp_sink.drop(partial=True, recipients=[addresses[5]], times=1)
    settings = _settings(tmp_path, **smtp_sink.env())
    issue_id = _start(store, settings, tmp_path)
    report = deliver_issue(store, settings, issue_id, options=FAST)
    assert report.finished and report.sent == 20 and report.retried == 1
    assert sorted(r for m in smtp_sink.messages for r in m.recipients) == addresses


def test_wrong_password_fails_before_any_message(store, make_smtp_sink, tmp_path: Path) -> None:
    """A refused login is a DeliveryError before the first message; nothing is marked sent."""
    sink = make_smtp_sink(credentials=("user", "right"))
    _subscribe(store, 5)
    env = sink.env() | {"NEWSLETTER_SMTP_PASSWORD": "wrong"}
    settings = _settings(tmp_path, **env)
    issue_id = _start(store, settings, tmp_path)
    with pytest.raises(DeliveryError) as info:
        deliver_issue(store, settings, issue_id, options=FAST)
    assert "wrong" not in str(info.value)
    assert sink.messages == []
    assert set(_statuses(store, issue_id).values()) == {"queued"}


def test_unsubscribed_during_send_is_skipped(store, tmp_path: Path) -> None:
    """Someone who unsubscribes after the send started is skipped, not mailed."""
    addresses = _subscribe(store, 6)
    settings = _settings(tmp_path)
    issue_id = _start(store, settings, tmp_path)
    with store.begin() as session:
        leaver = session.scalar(select(Subscriber).where(Subscriber.email == addresses[2]))
        unsubscribe(session, leaver.id)
    transport = MemoryTransport()
    report = Sender(store, settings, factory=lambda: transport, options=FAST).run(issue_id)
    assert report.skipped == 1 and report.sent == 5
    assert addresses[2] not in transport.recipients()
    assert _statuses(store, issue_id)[addresses[2]] == "skipped"


def test_messages_carry_headers_and_personal_fields(store, tmp_path: Path) -> None:
    """Each message has its recipient's To, name, unsubscribe link and a unique Message-ID."""
    _subscribe(store, 4)
    settings = _settings(tmp_path)
    transport = MemoryTransport()
    Sender(store, settings, factory=lambda: transport, options=FAST).run(
        _start(store, settings, tmp_path)
    )
    ids = set()
    for attempt in transport.sent:
        message = email.message_from_bytes(
            attempt.data.replace(b"\r\n..", b"\r\n."), policy=email.policy.default
        )
        assert message["To"].addresses[0].addr_spec == attempt.recipient
        url = message["List-Unsubscribe"].strip("<>")
        assert url.startswith("https://news.example.com/unsubscribe/")
        assert url in message.get_body(("html",)).get_content()
        assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        ids.add(message["Message-ID"])
    assert len(ids) == 4


def test_retries_give_up_after_max_attempts(store, tmp_path: Path) -> None:
    """A recipient that only ever gets 4xx ends failed after max_attempts, not queued forever."""
    addresses = _subscribe(store, 3)
    settings = _settings(tmp_path)
    transport = MemoryTransport(
        lambda rcpt: Outcome("retry", 450, "450 mailbox busy") if rcpt == addresses[0] else None
    )
    options = SendOptions(
        batch_size=5, max_attempts=3, retry_base=0.01, retry_max=0.02, idle_poll=0.02
    )
    issue_id = _start(store, settings, tmp_path)
    report = Sender(store, settings, factory=lambda: transport, options=options).run(issue_id)
    assert report.finished and report.failed == 1 and report.sent == 2
    assert sum(1 for a in transport.attempts if a.recipient == addresses[0]) == 3


def test_already_sent_digest_is_refused(store, tmp_path: Path) -> None:
    """A finished issue's digest (same name or same content) is refused unless forced."""
    _subscribe(store, 2)
    settings = _settings(tmp_path)
    transport = MemoryTransport()
    Sender(store, settings, factory=lambda: transport, options=FAST).run(
        _start(store, settings, tmp_path)
    )
    with pytest.raises(InputError, match="already sent as issue"):
        plan_send(store, settings, tmp_path / "digest.md")
    renamed = tmp_path / "renamed.md"
    shutil.copy(tmp_path / "digest.md", renamed)
    with pytest.raises(InputError, match="already sent"):
        plan_send(store, settings, renamed)
    assert plan_send(store, settings, renamed, force=True).resume is None


def test_each_database_has_journals_of_its_own(tmp_path: Path, monkeypatch) -> None:
    """A worker forgets journals it takes for dead leftovers of its own database: a journal
    of another database on the same host (or in the same folder) must never be among them."""
    from newsletter.journal import journal_dir

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    folders = {
        journal_dir(url)
        for url in (
            "postgresql+psycopg://postgres@127.0.0.1:5432/test",
            "postgresql+psycopg://postgres@127.0.0.1:5432/other",
            "postgresql+psycopg://postgres@127.0.0.1:5433/test",
            f"sqlite:///{tmp_path}/a.db",
            f"sqlite:///{tmp_path}/b.db",
        )
    }
    assert len(folders) == 5
    assert journal_dir(f"sqlite:///{tmp_path}/a.db").is_relative_to(tmp_path / "journal")
    assert journal_dir("postgresql+psycopg://postgres@127.0.0.1:5432/test").is_relative_to(
        tmp_path / "state" / "newsletter" / "journal"
    )


def test_dead_senders_journal_is_replayed(store, tmp_path: Path) -> None:
    """Rows a killed sender journaled as accepted become sent; the rest are requeued; its
    journal is gone afterwards. A sender is dead when its journal's lock can be taken."""
    from datetime import timedelta

    from newsletter.journal import Journal
    from newsletter.ledger import (
        Takeover,
        claim,
        delivery_message_id,
        new_owner,
        reclaim_abandoned,
    )

    journals = tmp_path / "journals"
    _subscribe(store, 5)
    settings = _settings(tmp_path)
    issue_id = _start(store, settings, tmp_path)
    dead = new_owner()
    with store.session() as session:
        claimed = claim(session, issue_id, dead, 5)
    journal = Journal(dead, journals)
    journal.open()
    journal.accepted(claimed[0].id, 1_700_000_000.0)
    journal.accepted(claimed[1].id, 1_700_000_001.0)
    takeover = Takeover(journals, timedelta(hours=1), "example.com")
    with store.session() as session:
        assert reclaim_abandoned(session, issue_id, "me", takeover) == 0  # alive: locked
    journal.close(keep=True)  # the lock goes, the file stays: what a SIGKILL leaves
    with store.session() as session:
        assert reclaim_abandoned(session, issue_id, "me", takeover) == 3
    with store.session() as session:
        rows = session.execute(
            select(Delivery.id, Delivery.status, Delivery.message_id).order_by(Delivery.id)
        ).all()
    assert [r.status for r in rows] == ["sent", "sent", "queued", "queued", "queued"]
    assert rows[0].message_id == delivery_message_id(rows[0].id, dead, "example.com")
    assert not journal.path.exists()


def test_a_live_sender_that_stopped_renewing_loses_its_rows(store, tmp_path: Path) -> None:
    """A sender that holds its lock but has not renewed its claim for the timeout (paused,
    hung) has its rows taken over, what it journaled kept as sent; when it wakes, renewing
    tells it which rows are no longer its own."""
    from datetime import timedelta

    from sqlalchemy import update

    from newsletter.journal import Journal
    from newsletter.ledger import Takeover, claim, new_owner, reclaim_abandoned, renew

    journals = tmp_path / "journals"
    _subscribe(store, 4)
    settings = _settings(tmp_path)
    issue_id = _start(store, settings, tmp_path)
    paused = new_owner()
    journal = Journal(paused, journals)
    journal.open()
    with store.session() as session:
        claimed = claim(session, issue_id, paused, 4)
    journal.accepted(claimed[0].id, 1_700_000_000.0)
    timeout = timedelta(minutes=10)
    takeover = Takeover(journals, timeout, "example.com")
    with store.session() as session:
        assert reclaim_abandoned(session, issue_id, "me", takeover) == 0
        session.execute(update(Delivery).values(claimed_at=utcnow() - 2 * timeout))
        session.commit()
        assert reclaim_abandoned(session, issue_id, "me", takeover) == 3
        assert renew(session, [d.id for d in claimed], paused) == set()
    assert journal.path.exists()  # its owner lives: its journal is its own
    journal.close()
    assert list(_statuses(store, issue_id).values()).count("sent") == 1


def test_two_senders_in_one_process_share_an_issue(store, tmp_path: Path) -> None:
    """Two senders of one issue in one process (the scheduler's thread pool) never take
    each other's claims for a dead sender's: everyone gets exactly one message."""
    import threading
    from collections import Counter

    addresses = _subscribe(store, 60)
    settings = _settings(tmp_path)
    issue_id = _start(store, settings, tmp_path)
    transport = MemoryTransport()
    options = SendOptions(batch_size=5, idle_poll=0.01)
    senders = [
        Sender(store, settings, factory=lambda: transport, options=options) for _ in range(2)
    ]
    threads = [threading.Thread(target=s.run, args=(issue_id,)) for s in senders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert Counter(transport.recipients()) == Counter(addresses)


def test_refusal_at_mail_from_stops_the_send(store, smtp_sink, tmp_path: Path) -> None:
    """A 5xx to MAIL FROM (quota, banned sender) stops the send with rows left queued;
    no subscriber's delivery is failed for it."""
    _subscribe(store, 10)
    smtp_sink.fail("mail", "550 5.4.5 Daily user sending quota exceeded")
    settings = _settings(tmp_path, **smtp_sink.env())
    issue_id = _start(store, settings, tmp_path)
    report = deliver_issue(store, settings, issue_id, options=FAST)
    assert not report.finished and report.failed == 0
    assert "quota" in report.stopped_reason
    assert set(_statuses(store, issue_id).values()) == {"queued"}


def test_unwritable_journal_stops_before_any_message(store, tmp_path: Path, monkeypatch) -> None:
    """A journal folder that cannot be created is a one-line DeliveryError before sending."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setattr("newsletter.ledger.journal_dir", lambda url: blocker / "journal")
    _subscribe(store, 3)
    settings = _settings(tmp_path)
    transport = MemoryTransport()
    issue_id = _start(store, settings, tmp_path)
    with pytest.raises(DeliveryError, match="cannot write the send journal"):
        Sender(store, settings, factory=lambda: transport, options=FAST).run(issue_id)
    assert transport.attempts == []


def test_unsendable_address_is_not_a_dead_server(store, tmp_path: Path) -> None:
    """Local failures without a server answer do not stop the send as 'unreachable'."""
    addresses = _subscribe(store, 8)
    settings = _settings(tmp_path)
    transport = MemoryTransport(
        lambda rcpt: Outcome("failed", None, "no SMTPUTF8") if rcpt < addresses[6] else None
    )
    report = Sender(store, settings, factory=lambda: transport, options=FAST).run(
        _start(store, settings, tmp_path)
    )
    assert report.finished and report.failed == 6 and report.sent == 2


@pytest.mark.parametrize("smtputf8", [True, False])
def test_one_address_never_stops_a_send(store, make_smtp_sink, tmp_path: Path, smtputf8) -> None:
    """Named subscribers with an IDN domain and a UTF-8 local part: the IDN goes out as
    punycode; the UTF-8 local part with SMTPUTF8, or, when the server does not offer it,
    fails naming the address; everyone else is delivered and the send finishes."""
    sink = make_smtp_sink(smtputf8=smtputf8)
    people = [("Zoë", "zoe@bücher.example"), ("Jörg", "jörg@example.com"), ("Ann", "a@b.example")]
    with store.begin() as session:
        for name, address in people:
            add(session, address, name)
    settings = _settings(tmp_path, **sink.env())
    report = deliver_issue(store, settings, _start(store, settings, tmp_path), options=FAST)
    assert report.finished
    received = sorted(r for m in sink.messages for r in m.recipients)
    expected = ["a@b.example", "zoe@xn--bcher-kva.example"]
    if smtputf8:
        assert received == sorted([*expected, "jörg@example.com"]) and report.failed == 0
    else:
        assert received == expected and report.failed == 1
        [(address, answer)] = report.failures
        assert address == "jörg@example.com" and "SMTPUTF8" in answer


def test_a_greylisted_recipient_does_not_slow_the_send(store, smtp_sink, tmp_path: Path) -> None:
    """A 451 for one recipient makes that message wait and retry; the pace of the send is
    untouched, and whoever waits on retries hears of it."""
    addresses = _subscribe(store, 20)
    smtp_sink.fail("rcpt", "451 4.7.1 greylisted, try again", recipients=[addresses[3]], times=1)
    settings = _settings(tmp_path, **smtp_sink.env())
    notes: list[tuple[int, object]] = []
    waits = SendOptions(batch_size=10, retry_base=1.5, retry_max=1.5, idle_poll=0.05)
    sender = Sender(store, settings, options=waits, on_waiting=lambda *note: notes.append(note))
    report = sender.run(_start(store, settings, tmp_path))
    assert report.finished and report.sent == 20 and report.retried == 1
    assert sender.pacer.throttles == 0
    assert notes and notes[0][0] == 1
