"""Bounces recorded and acted on: matching, the suppression policy, idempotency, and the
`bounces process` / `bounces list` / `issues show` commands, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import logging
import mailbox
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from bounce_helpers import SECRET, send_issue, settings, status_of, subscribe
from bounce_samples import SHAPES, sample
from click.testing import CliRunner
from sqlalchemy import func, select

from newsletter.bounces import Event, Recorder, find_match
from newsletter.cli import main
from newsletter.store import BounceEvent, Subscriber
from newsletter.verp import Verp

VERP = Verp(SECRET, "bounces@example.com", "links@example.com")


def _dsn(shape: str, sent, *, token: str | None = None, bounce_to: str | None = None) -> bytes:
    token = token or VERP.token(sent.delivery_id)
    return sample(
        shape,
        bounce_to=bounce_to or f"bounces+{token}@example.com",
        recipient=sent.email,
        message_id=sent.message_id,
        token=token,
    )


def _config(store, tmp_path: Path):
    return settings(tmp_path, store.engine.url.render_as_string(hide_password=False))


def _process(store, tmp_path: Path, label: str, data: bytes) -> None:
    recorder = Recorder(store, _config(store, tmp_path))
    recorder.message(label, data, "process")
    recorder.flush()


def _events(store) -> list[BounceEvent]:
    with store.session() as session:
        return list(session.scalars(select(BounceEvent).order_by(BounceEvent.id)))


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_each_kind_of_report_does_what_it_says(store, tmp_path: Path, shape: str) -> None:
    """Postfix, Exim, Gmail, Outlook, SES, ARF and an auto-reply: each is read and acted on."""
    [sent, _] = send_issue(store, "gone@example.org", "stays@example.org")
    recorder = Recorder(store, _config(store, tmp_path))
    recorder.message(shape, _dsn(shape, sent), "process")
    recorder.flush()
    expected = SHAPES[shape][1]
    wanted_status = {"hard": "bounced", "complaint": "complained"}.get(expected, "active")
    assert status_of(store, "gone@example.org") == wanted_status
    assert status_of(store, "stays@example.org") == "active"
    events = _events(store)
    if expected is None:
        assert events == [] and recorder.tally.auto_replies == 1
        return
    [event] = events
    assert (event.kind, event.email, event.issue_id) == (expected, sent.email, sent.issue_id)
    assert event.delivery_id == sent.delivery_id and event.source == "process"
    assert event.detail  # the server's words are kept


def test_the_original_message_id_matches_when_the_envelope_was_rewritten(store, tmp_path) -> None:
    """A DSN to the plain From address, with our Message-ID in the returned headers."""
    [sent] = send_issue(store, "gone@example.org")
    data = _dsn("postfix", sent, bounce_to="links@example.com").replace(
        b"X-Newsletter-Delivery", b"X-Other"
    )
    data = data.replace(f"bounces+{VERP.token(sent.delivery_id)}".encode(), b"links")
    _process(store, tmp_path, "m", data)
    assert status_of(store, "gone@example.org") == "bounced"


def test_forged_and_unknown_tokens_change_nothing(store, tmp_path, caplog) -> None:
    """A token with a wrong MAC, or one naming no delivery, is logged once and skipped."""
    [sent] = send_issue(store, "victim@example.org")
    good = VERP.token(sent.delivery_id)
    forged = good[:-1] + ("a" if good[-1] != "a" else "b")
    unknown = VERP.token(sent.delivery_id + 1000)
    recorder = Recorder(store, _config(store, tmp_path))
    caplog.set_level(logging.WARNING, "newsletter.bounces")
    for number, token in enumerate((forged, unknown)):
        data = sample(
            "postfix",
            bounce_to=f"bounces+{token}@example.com",
            recipient=sent.email,
            message_id=f"{sent.delivery_id}.ffffffffffffffff@example.com",
            token=token,
        )
        recorder.message(f"forged {number}", data, "process")
    recorder.flush()
    assert status_of(store, "victim@example.org") == "active"
    assert _events(store) == []
    assert recorder.tally.unmatched == 2
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all(
        "\n" not in line and "no delivery of ours" in line for line in lines
    )


def test_the_same_report_twice_counts_once(store, tmp_path) -> None:
    """Reading one DSN twice (and a third time by another route) keeps one event."""
    [sent] = send_issue(store, "full@example.org")
    config = _config(store, tmp_path)
    data = _dsn("gmail", sent)
    recorder = Recorder(store, config)
    recorder.message("first", data, "process")
    recorder.message("again", data, "process")
    recorder.flush()
    _process(store, tmp_path, "from the mailbox", data)
    assert len(_events(store)) == 1
    assert recorder.tally.soft == 1 and recorder.tally.duplicates == 1


def test_soft_bounces_suppress_after_the_limit_over_different_issues(store, tmp_path) -> None:
    """Three soft bounces on three issues suppress; three on one issue do not."""
    [first] = send_issue(store, "full@example.org", subject="one")
    for copy in range(3):
        _process(store, tmp_path, "m", _dsn("gmail", first) + b"\n" * copy)
    assert status_of(store, "full@example.org") == "active"
    [second] = send_issue(store, "full@example.org", subject="two")
    _process(store, tmp_path, "m", _dsn("ses", second))
    assert status_of(store, "full@example.org") == "active"
    [third] = send_issue(store, "full@example.org", subject="three")
    _process(store, tmp_path, "m", _dsn("gmail", third))
    assert status_of(store, "full@example.org") == "bounced"


def test_a_delivery_event_resets_the_soft_bounce_count(store, tmp_path) -> None:
    """soft, soft, delivered, soft (in the order they happened): the run was broken."""
    recorder = Recorder(store, _config(store, tmp_path))
    issues = [send_issue(store, "full@example.org", subject=f"n{n}")[0] for n in range(5)]
    start = datetime(2026, 11, 1, tzinfo=UTC)

    def event(kind: str, n: int) -> Event:
        token = VERP.token(issues[n].delivery_id)
        when = start + timedelta(days=n)
        return Event(kind, "postmark", f"e{n}", None, None, kind, when, tokens=(token,))

    for kind, n in (("soft", 0), ("soft", 1), ("delivered", 2), ("soft", 3)):
        recorder.event(event(kind, n))
    recorder.flush()
    assert status_of(store, "full@example.org") == "active"
    assert recorder.tally.delivered == 1
    recorder.event(event("soft", 4))
    recorder.flush()
    assert status_of(store, "full@example.org") == "active"  # two since the delivery
    quiet = Recorder(store, _config(store, tmp_path))
    quiet.event(
        Event(
            "delivered",
            "postmark",
            "d",
            "full@example.org",
            None,
            "ok",
            start + timedelta(days=9),
            by_address=True,
        )
    )
    quiet.flush()
    assert quiet.tally.delivered == 1  # it ended a run, so it is kept
    quiet.event(
        Event(
            "delivered",
            "postmark",
            "d2",
            "full@example.org",
            None,
            "ok",
            start + timedelta(days=10),
            by_address=True,
        )
    )
    quiet.flush()
    assert quiet.tally.delivered == 1  # nothing left to reset: not kept


def test_a_later_import_or_add_does_not_reactivate(store, tmp_path) -> None:
    """A bounced subscriber stays bounced through an add without --resubscribe."""
    from newsletter.errors import InputError
    from newsletter.subscribers import add

    [sent] = send_issue(store, "gone@example.org")
    _process(store, tmp_path, "m", _dsn("postfix", sent))
    with pytest.raises(InputError, match="bounced"), store.begin() as session:
        add(session, "gone@example.org")
    assert status_of(store, "gone@example.org") == "bounced"


def test_only_authenticated_providers_match_by_address(store, tmp_path) -> None:
    """An event with nothing but an address names nobody unless the provider proved itself."""
    send_issue(store, "someone@example.org")
    verp = Verp(SECRET, None, "links@example.com")
    event = Event("hard", "process", "x", "someone@example.org", "5.1.1", "gone")
    with store.session() as session:
        assert find_match(session, verp, event) is None
        trusted = find_match(session, verp, Event(**{**event.__dict__, "by_address": True}))
    assert trusted is not None and trusted.email == "someone@example.org"


def test_a_purge_erases_the_subscribers_bounce_events(store, tmp_path) -> None:
    """GDPR: purging an address deletes its bounce history with it."""
    from newsletter.subscribers import purge

    [sent] = send_issue(store, "gone@example.org")
    _process(store, tmp_path, "m", _dsn("postfix", sent))
    with store.begin() as session:
        purge(session, "gone@example.org")
    assert _events(store) == []


def test_malformed_and_unrecognised_messages_are_counted_and_skipped(store, tmp_path) -> None:
    """A broken DSN, garbage and an empty message: one line each, nothing written."""
    send_issue(store, "reader@example.org")
    broken = (
        b"From: MAILER-DAEMON@x\nTo: bounces+zz-aaaaaaaaaaaaa@example.com\n"
        b'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\n\n'
        b"--b\nContent-Type: message/delivery-status\n\n\x00\xff garbage ;;; \n"
    )
    recorder = Recorder(store, _config(store, tmp_path))
    for number, data in enumerate((broken, b"\x00\x01\x02" * 100, b"")):
        recorder.message(f"m{number}", data, "process")
    recorder.flush()
    assert recorder.tally.unrecognised == 3 and recorder.tally.messages == 3
    assert _events(store) == [] and status_of(store, "reader@example.org") == "active"


# The commands --------------------------------------------------------------------------


@pytest.fixture
def env(db_runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("NEWSLETTER_SECRET_KEY", SECRET)
    monkeypatch.setenv("NEWSLETTER_BOUNCE_ADDRESS", "bounces@example.com")
    return db_runner


def test_process_reads_eml_files_an_mbox_and_stdin(env, store, tmp_path) -> None:
    """`bounces process` takes .eml files, an mbox (streamed) and standard input."""
    sent = send_issue(store, *(f"r{n}@example.org" for n in range(5)))
    (tmp_path / "one.eml").write_bytes(_dsn("postfix", sent[0]))
    box = mailbox.mbox(tmp_path / "returned.mbox")
    for shape, item in (("exim", sent[1]), ("outlook", sent[2]), ("autoreply", sent[3])):
        box.add(_dsn(shape, item))
    box.close()
    result = env.invoke(
        main, ["bounces", "process", str(tmp_path / "one.eml"), str(tmp_path / "returned.mbox")]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("4 messages: 3 hard bounces")
    piped = env.invoke(main, ["bounces", "process", "-"], input=_dsn("arf", sent[4]))
    assert piped.exit_code == 0 and "1 complaints" in piped.stdout
    statuses = [status_of(store, s.email) for s in sent]
    assert statuses == ["bounced", "bounced", "bounced", "active", "complained"]


def test_process_refuses_input_it_cannot_read(env, store, tmp_path) -> None:
    """A missing file is a one-line error, exit 2, and nothing is read."""
    [sent] = send_issue(store, "r@example.org")
    (tmp_path / "one.eml").write_bytes(_dsn("postfix", sent))
    result = env.invoke(
        main, ["bounces", "process", str(tmp_path / "one.eml"), str(tmp_path / "missing.eml")]
    )
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'missing.eml'}: cannot be read (No such file or directory)"
    ]
    assert status_of(store, "r@example.org") == "active"


def test_a_20_mb_message_is_skipped_unread(env, store, tmp_path, caplog) -> None:
    """A 20 MB file is logged in one line and skipped; the next message still counts."""
    [sent] = send_issue(store, "r@example.org")
    big = tmp_path / "big.eml"
    big.write_bytes(b"Subject: big\n\n" + b"x" * (20 * 1024 * 1024))
    (tmp_path / "one.eml").write_bytes(_dsn("postfix", sent))
    caplog.set_level(logging.WARNING, "newsletter.bounces")
    result = env.invoke(main, ["bounces", "process", str(big), str(tmp_path / "one.eml")])
    assert result.exit_code == 0
    assert "1 too big" in result.stdout and "1 hard bounces" in result.stdout
    [line] = [r.getMessage() for r in caplog.records if "MB" in r.getMessage()]
    assert line.startswith(f"{big}: 20.0 MB")


def test_bounces_list_as_table_and_json(env, store, tmp_path) -> None:
    """`bounces list` shows address, kind, issue, when and the server's words."""
    [hard, soft] = send_issue(store, "gone@example.org", "full@example.org")
    for shape, sent in (("postfix", hard), ("gmail", soft)):
        env.invoke(main, ["bounces", "process", "-"], input=_dsn(shape, sent))
    table = env.invoke(main, ["bounces", "list"])
    assert table.exit_code == 0
    assert "gone@example.org" in table.stdout and "550 5.1.1" in table.stdout
    rows = json.loads(env.invoke(main, ["bounces", "list", "--format", "json"]).stdout)
    assert {(r["email"], r["kind"], r["issue"]) for r in rows} == {
        ("gone@example.org", "hard", hard.issue_id),
        ("full@example.org", "soft", soft.issue_id),
    }
    assert all(r["status"] and r["at"] and r["source"] == "process" for r in rows)


def test_issues_show_gives_rates_and_warns_about_complaints(env, store, tmp_path) -> None:
    """issues show counts bounces and complaints per issue and warns past 0.1%."""
    sent = send_issue(store, *(f"r{n:03d}@example.org" for n in range(200)))
    env.invoke(main, ["bounces", "process", "-"], input=_dsn("postfix", sent[0]))
    shown = env.invoke(main, ["issues", "show", str(sent[0].issue_id)])
    assert "hard bounces: 1 (0.50% of sent)" in shown.stdout
    assert "complaints:   0 (0.00% of sent)" in shown.stdout
    assert "warning" not in shown.stderr
    env.invoke(main, ["bounces", "process", "-"], input=_dsn("arf", sent[1]))
    shown = env.invoke(main, ["issues", "show", str(sent[0].issue_id)])
    assert "complaints:   1 (0.50% of sent)" in shown.stdout
    assert shown.stderr.startswith("warning: complaints are 0.50% of the messages sent")


def test_subscriber_status_counts_are_exact(store, tmp_path) -> None:
    """Only the addresses a report names change status, on every backend."""
    sent = send_issue(store, *(f"r{n}@example.org" for n in range(10)))
    recorder = Recorder(store, _config(store, tmp_path))
    for item in sent[:3]:
        recorder.message("m", _dsn("outlook", item), "process")
    recorder.flush()
    with store.session() as session:
        counts = dict(
            session.execute(
                select(Subscriber.status, func.count()).group_by(Subscriber.status)
            ).all()
        )
    assert counts == {"active": 7, "bounced": 3}
    assert recorder.tally.suppressed == 3


def test_an_address_added_later_is_not_matched_by_an_old_token(store, tmp_path) -> None:
    """Tokens name deliveries, not addresses: subscribing someone new changes nothing."""
    subscribe(store, "new@example.org")
    [sent] = send_issue(store, "old@example.org")
    _process(store, tmp_path, "m", _dsn("postfix", sent))
    assert status_of(store, "new@example.org") == "active"
    assert status_of(store, "old@example.org") == "bounced"
