"""VERP through a real send: every MAIL FROM names its delivery, a DSN to one of them
suppresses exactly that subscriber, and the next send skips them."""

from __future__ import annotations

import email
import re
import shutil
from pathlib import Path

from bounce_samples import sample
from click.testing import CliRunner
from sqlalchemy import select

from newsletter.cli import main
from newsletter.config import load_settings
from newsletter.ledger import queue_mail
from newsletter.sender import SendOptions, plan_send, send_issue, send_queued_mail
from newsletter.store import Delivery, Subscriber
from newsletter.subscribers import add
from newsletter.verp import Verp

FIXTURES = Path(__file__).parent / "fixtures"
SECRET = "verp-send-secret"
FAST = SendOptions(batch_size=10, retry_base=0.05, retry_max=0.2, idle_poll=0.05)
VERP_ADDRESS = re.compile(r"bounces\+([0-9a-z]+-[a-z2-7]{13})@example\.com")


def _settings(tmp_path: Path, database_url: str, sink_env: dict, **extra: str):
    return load_settings(
        {
            "NEWSLETTER_DATABASE_URL": database_url,
            "NEWSLETTER_SITE_URL": "https://news.example.com",
            "NEWSLETTER_SECRET_KEY": SECRET,
            "NEWSLETTER_FROM": "Weekly <weekly@example.com>",
            "NEWSLETTER_OUTBOX_DIR": str(tmp_path / "outbox"),
            **sink_env,
            **extra,
        },
        dotenv_path=Path("/nonexistent"),
    )


def _digest(tmp_path: Path, title: str) -> Path:
    shutil.copy(FIXTURES / "chart.png", tmp_path / "chart.png")
    target = tmp_path / f"{title}.md"
    text = (FIXTURES / "mojibake-digest.md").read_text("utf-8")
    target.write_text(text.replace("title:", f"title: {title} —", 1), "utf-8")
    return target


def _send(store, settings, path: Path):
    return send_issue(store, settings, plan_send(store, settings, path), options=FAST)


def test_verp_send_bounce_and_skip(store, database_url, smtp_sink, tmp_path, monkeypatch) -> None:
    """Distinct VERP senders per message; one DSN suppresses exactly its subscriber."""
    addresses = [f"reader{n:02d}@example.org" for n in range(12)]
    with store.begin() as session:
        for address in addresses:
            add(session, address)
    settings = _settings(
        tmp_path, database_url, smtp_sink.env(), NEWSLETTER_BOUNCE_ADDRESS="bounces@example.com"
    )
    report = _send(store, settings, _digest(tmp_path, "first"))
    assert report.sent == 12
    verp = Verp(SECRET, "bounces@example.com", settings.from_address)
    senders = {}
    with store.session() as session:
        ids = dict(session.execute(select(Delivery.email, Delivery.id)).all())
    for received in smtp_sink.messages:
        [recipient] = received.recipients
        token = VERP_ADDRESS.fullmatch(received.mail_from).group(1)
        assert verp.delivery_of(token) == ids[recipient]
        headers = email.message_from_bytes(received.data)
        assert headers["X-Newsletter-Delivery"] == token
        senders[recipient] = (received.mail_from, token, headers["Message-ID"].strip("<>"))
    assert len({mail_from for mail_from, _, _ in senders.values()}) == 12

    victim = addresses[5]
    mail_from, token, message_id = senders[victim]
    dsn = sample(
        "postfix", bounce_to=mail_from, recipient=victim, message_id=message_id, token=token
    )
    for name, value in {
        "NEWSLETTER_DATABASE_URL": database_url,
        "NEWSLETTER_SECRET_KEY": SECRET,
    }.items():
        monkeypatch.setenv(name, value)
    result = CliRunner().invoke(main, ["bounces", "process", "-"], input=dsn)
    assert result.exit_code == 0, result.output
    with store.session() as session:
        statuses = dict(session.execute(select(Subscriber.email, Subscriber.status)).all())
    assert {a for a, s in statuses.items() if s != "active"} == {victim}
    assert statuses[victim] == "bounced"

    before = len(smtp_sink.messages)
    second = _send(store, settings, _digest(tmp_path, "second"))
    assert second.sent == 11
    later = [r for m in smtp_sink.messages[before:] for r in m.recipients]
    assert sorted(later) == sorted(set(addresses) - {victim})


def test_without_a_bounce_address_mail_from_is_the_from_address(
    store, database_url, smtp_sink, tmp_path
) -> None:
    """Unset NEWSLETTER_BOUNCE_ADDRESS: MAIL FROM stays the From address; the header stays."""
    with store.begin() as session:
        add(session, "reader@example.org")
    settings = _settings(tmp_path, database_url, smtp_sink.env())
    assert _send(store, settings, _digest(tmp_path, "plain")).sent == 1
    [received] = smtp_sink.messages
    assert received.mail_from == "weekly@example.com"
    assert email.message_from_bytes(received.data)["X-Newsletter-Delivery"]


def test_confirmations_carry_verp_and_the_header(store, database_url, smtp_sink, tmp_path) -> None:
    """One-off mail goes through the same engine: a VERP sender and our header too."""
    with store.begin() as session:
        subscriber = add(session, "new@example.org", status="pending")
        session.flush()
        queue_mail(session, "confirm", [(subscriber.id, subscriber.email)])
    settings = _settings(
        tmp_path, database_url, smtp_sink.env(), NEWSLETTER_BOUNCE_ADDRESS="bounces@example.com"
    )
    assert send_queued_mail(store, settings).sent == 1
    [received] = smtp_sink.messages
    token = VERP_ADDRESS.fullmatch(received.mail_from).group(1)
    assert email.message_from_bytes(received.data)["X-Newsletter-Delivery"] == token
