"""The bounce mailbox on a real Dovecot: IMAPS, IMAP with STARTTLS and POP3S; messages moved
or deleted once read; a mailbox that refuses us is one line in the log, never a crash."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import pytest
from bounce_helpers import SECRET, send_issue, settings, status_of
from bounce_samples import sample
from click.testing import CliRunner
from dovecot import Dovecot, installed

from newsletter.bounce_mailbox import Poller
from newsletter.cli import main
from newsletter.verp import Verp

VERP = Verp(SECRET, "bounces@example.com", "links@example.com")


@pytest.fixture(scope="session")
def dovecot(tls_cert):
    """One Dovecot for the session on free loopback ports, with the test certificate."""
    if not installed():
        if os.environ.get("CI"):
            pytest.fail("CI needs Dovecot (apt-get install dovecot-imapd dovecot-pop3d)")
        pytest.skip("Dovecot is not installed")
    with Dovecot(tls_cert.cert, tls_cert.key) as server:
        yield server


@pytest.fixture
def mailbox_user(dovecot, trust_tls_cert) -> tuple[str, str]:
    """A fresh mail user whose INBOX is the bounce mailbox; our client trusts the cert."""
    return dovecot.add_user()


def _dsn(shape: str, sent) -> bytes:
    token = VERP.token(sent.delivery_id)
    return sample(
        shape,
        bounce_to=f"bounces+{token}@example.com",
        recipient=sent.email,
        message_id=sent.message_id,
        token=token,
    )


def _runner(monkeypatch, database_url: str, mailbox: str) -> CliRunner:
    for name, value in {
        "NEWSLETTER_DATABASE_URL": database_url,
        "NEWSLETTER_SECRET_KEY": SECRET,
        "NEWSLETTER_BOUNCE_MAILBOX": mailbox,
    }.items():
        monkeypatch.setenv(name, value)
    return CliRunner()


def test_fetch_over_imaps_suppresses_and_moves(
    dovecot, mailbox_user, store, database_url, clean_env, monkeypatch
) -> None:
    """DSNs delivered into the mailbox: `bounces fetch` suppresses and moves every message."""
    user, _ = mailbox_user
    sent = send_issue(store, *(f"r{n}@example.org" for n in range(5)))
    for shape, item in zip(("postfix", "outlook", "arf", "gmail", "autoreply"), sent, strict=True):
        dovecot.append(user, "INBOX", _dsn(shape, item))
    dovecot.append(user, "INBOX", b"From: someone@example.org\nSubject: hello\n\nnot a bounce\n")
    runner = _runner(monkeypatch, database_url, dovecot.url("imaps", user, tail="/INBOX"))
    result = runner.invoke(main, ["bounces", "fetch"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("6 messages: 2 hard bounces, 1 soft, 1 complaints")
    statuses = [status_of(store, s.email) for s in sent]
    assert statuses == ["bounced", "bounced", "complained", "active", "active"]
    assert dovecot.uids(user, "INBOX") == []
    assert len(dovecot.uids(user, "Processed")) == 6
    again = runner.invoke(main, ["bounces", "fetch"])
    assert again.stdout.startswith("0 messages")


def test_fetch_over_starttls_and_delete(
    dovecot, mailbox_user, store, database_url, clean_env, monkeypatch
) -> None:
    """imap:// upgrades with STARTTLS; delete=yes deletes what was read."""
    user, _ = mailbox_user
    [sent] = send_issue(store, "gone@example.org")
    dovecot.append(user, "Bounces", _dsn("exim", sent))
    url = dovecot.url("imap", user, tail="/Bounces?delete=yes")
    result = _runner(monkeypatch, database_url, url).invoke(main, ["bounces", "fetch"])
    assert result.exit_code == 0, result.output
    assert status_of(store, "gone@example.org") == "bounced"
    assert dovecot.uids(user, "Bounces") == [] and dovecot.uids(user, "Processed") == []


def test_fetch_over_pop3s(dovecot, mailbox_user, store, database_url, clean_env, monkeypatch):
    """pop3s:// reads the maildrop and deletes what it read."""
    user, _ = mailbox_user
    sent = send_issue(store, "gone@example.org", "spam@example.org")
    dovecot.append(user, "INBOX", _dsn("ses", sent[0]).replace(b"4.4.7", b"5.1.1"))
    dovecot.append(user, "INBOX", _dsn("arf", sent[1]))
    result = _runner(monkeypatch, database_url, dovecot.url("pop3s", user)).invoke(
        main, ["bounces", "fetch"]
    )
    assert result.exit_code == 0, result.output
    assert status_of(store, "gone@example.org") == "bounced"
    assert status_of(store, "spam@example.org") == "complained"
    assert dovecot.uids(user, "INBOX") == []


def test_a_mailbox_refusing_login_is_one_line_and_exit_1(
    dovecot, mailbox_user, store, database_url, clean_env, monkeypatch
) -> None:
    """A wrong password: one line naming the mailbox (never the password), exit 1."""
    user, _ = mailbox_user
    [sent] = send_issue(store, "gone@example.org")
    dovecot.append(user, "INBOX", _dsn("postfix", sent))
    url = dovecot.url("imaps", user, password="wrong-secret")
    result = _runner(monkeypatch, database_url, url).invoke(main, ["bounces", "fetch"])
    assert result.exit_code == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: imaps://{user}@127.0.0.1:{dovecot.imaps}/INBOX: login refused")
    assert "wrong-secret" not in result.output
    assert status_of(store, "gone@example.org") == "active"
    assert len(dovecot.uids(user, "INBOX")) == 1


def test_a_20_mb_message_is_skipped_unread_and_moved(
    dovecot, mailbox_user, store, database_url, clean_env, monkeypatch, caplog
) -> None:
    """A 20 MB message is judged by its size alone, logged in one line and moved away."""
    user, _ = mailbox_user
    [sent] = send_issue(store, "gone@example.org")
    dovecot.append(user, "INBOX", b"Subject: big\r\n\r\n" + b"x" * (20 * 1024 * 1024))
    dovecot.append(user, "INBOX", _dsn("postfix", sent))
    caplog.set_level(logging.WARNING, "newsletter.bounces")
    result = _runner(monkeypatch, database_url, dovecot.url("imaps", user)).invoke(
        main, ["bounces", "fetch"]
    )
    assert result.exit_code == 0, result.output
    assert "1 too big" in result.stdout
    assert status_of(store, "gone@example.org") == "bounced"
    [line] = [r.getMessage() for r in caplog.records if "MB" in r.getMessage()]
    assert "UID 1: 20.0 MB" in line
    assert len(dovecot.uids(user, "Processed")) == 2


def test_the_worker_polls_the_mailbox_and_survives_a_refusal(
    dovecot, mailbox_user, store, database_url, tmp_path: Path, caplog
) -> None:
    """The worker's poller reads bounces every interval; a refused login is one log line
    per round and the next round is tried."""
    user, _ = mailbox_user
    [sent] = send_issue(store, "gone@example.org")
    caplog.set_level(logging.INFO, "newsletter.bounces")
    stop = threading.Event()
    refused = Poller(
        store,
        settings(
            tmp_path,
            database_url,
            NEWSLETTER_BOUNCE_MAILBOX=dovecot.url("imaps", user, password="nope"),
            NEWSLETTER_BOUNCE_INTERVAL="1",
        ),
        stop,
    )
    assert refused.tick() is None
    assert refused.tick() is None  # not due yet: no second attempt within the interval
    refused.next_round = 0.0
    assert refused.tick() is None
    failures = [r.getMessage() for r in caplog.records if "login refused" in r.getMessage()]
    assert len(failures) == 2 and all("\n" not in f for f in failures)
    assert all("trying again in 1 s" in f for f in failures)

    from newsletter.worker import background

    config = settings(
        tmp_path,
        database_url,
        NEWSLETTER_BOUNCE_MAILBOX=dovecot.url("imaps", user),
        NEWSLETTER_BOUNCE_INTERVAL="1",
    )
    with background(store, config):
        dovecot.append(user, "INBOX", _dsn("postfix", sent))
        deadline = time.monotonic() + 60
        while status_of(store, "gone@example.org") != "bounced" and time.monotonic() < deadline:
            time.sleep(0.2)
    assert status_of(store, "gone@example.org") == "bounced"


def test_a_database_failure_leaves_the_messages_for_the_next_round(
    dovecot, mailbox_user, store, database_url, tmp_path: Path, caplog
) -> None:
    """With the events table gone mid-life, a round logs one line and moves nothing;
    the next round, with the table back, records each report once."""
    from sqlalchemy import text

    user, _ = mailbox_user
    sent = send_issue(store, "gone@example.org", "spam@example.org")
    dovecot.append(user, "INBOX", _dsn("postfix", sent[0]))
    dovecot.append(user, "INBOX", _dsn("arf", sent[1]))
    config = settings(tmp_path, database_url, NEWSLETTER_BOUNCE_MAILBOX=dovecot.url("imaps", user))
    poller = Poller(store, config, threading.Event())
    caplog.set_level(logging.WARNING, "newsletter.bounces")
    with store.engine.begin() as connection:
        connection.execute(text("ALTER TABLE bounce_events RENAME TO bounce_events_away"))
    try:
        assert poller.tick() is None
    finally:
        with store.engine.begin() as connection:
            connection.execute(text("ALTER TABLE bounce_events_away RENAME TO bounce_events"))
    [line] = [r.getMessage() for r in caplog.records if "trying again" in r.getMessage()]
    assert "\n" not in line and line.startswith("bounce mailbox imaps://")
    assert len(dovecot.uids(user, "INBOX")) == 2
    assert status_of(store, "gone@example.org") == "active"
    poller.next_round = 0.0
    tally = poller.tick()
    assert (tally.hard, tally.complaints) == (1, 1)
    assert status_of(store, "gone@example.org") == "bounced"
    assert dovecot.uids(user, "INBOX") == []
