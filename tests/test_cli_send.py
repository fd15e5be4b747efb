"""`newsletter send` and `newsletter issues` as a user runs them, against a real SMTP server."""

from __future__ import annotations

import email
import email.policy
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from newsletter.cli import main

FIXTURES = Path(__file__).parent / "fixtures"
HEADERS = (
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "List-Id",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
)


@pytest.fixture
def env(db_runner: CliRunner, smtp_sink, clean_env: Path, monkeypatch: pytest.MonkeyPatch):
    """A working directory with the digest, its image, 200 subscribers and the SMTP sink."""
    for name, value in smtp_sink.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("NEWSLETTER_SITE_URL", "https://news.example.com")
    shutil.copy(FIXTURES / "mojibake-digest.md", clean_env / "digest.md")
    shutil.copy(FIXTURES / "chart.png", clean_env / "chart.png")
    rows = "".join(f"reader{i:03d}@example.com,Reader {i}\n" for i in range(200))
    (clean_env / "list.csv").write_text("email,name\n" + rows, "utf-8")
    result = db_runner.invoke(main, ["subscribers", "import", "list.csv"])
    assert result.exit_code == 0, result.output
    return db_runner


def _issues(runner: CliRunner) -> list[dict]:
    result = runner.invoke(main, ["issues", "list", "--format", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_send_reaches_every_subscriber_once_with_headers(env: CliRunner, smtp_sink) -> None:
    """200 subscribers each get exactly one message carrying every required header."""
    result = env.invoke(main, ["send", "digest.md", "--yes"])
    assert result.exit_code == 0, result.output
    assert "sent 200, failed 0" in result.stdout
    received = sorted(r for m in smtp_sink.messages for r in m.recipients)
    assert received == [f"reader{i:03d}@example.com" for i in range(200)]
    for message in smtp_sink.messages[:20]:
        parsed = email.message_from_bytes(message.data, policy=email.policy.default)
        for header in HEADERS:
            assert parsed[header], header
        assert parsed["To"].addresses[0].addr_spec == message.recipients[0]
        assert "Unsubscribe" in parsed.get_body(("html",)).get_content()
    [issue] = _issues(env)
    assert issue["status"] == "sent" and issue["sent"] == 200


def test_second_send_is_refused(env: CliRunner, smtp_sink) -> None:
    """Sending the same digest again is refused with exit 2 and nothing is sent."""
    assert env.invoke(main, ["send", "digest.md", "--yes"]).exit_code == 0
    before = len(smtp_sink.messages)
    again = env.invoke(main, ["send", "digest.md", "--yes"])
    assert again.exit_code == 2
    assert "already sent as issue 1" in again.stderr
    assert len(smtp_sink.messages) == before


def test_test_copies_record_nothing(env: CliRunner, smtp_sink) -> None:
    """--to sends only to the given addresses and creates no issue or delivery."""
    result = env.invoke(
        main, ["send", "digest.md", "--to", "me@example.org", "--to", "Ed@Example.org"]
    )
    assert result.exit_code == 0, result.output
    assert sorted(r for m in smtp_sink.messages for r in m.recipients) == [
        "ed@example.org",
        "me@example.org",
    ]
    assert _issues(env) == []
    assert env.invoke(main, ["send", "digest.md", "--yes"]).exit_code == 0


def test_dry_run_sends_nothing(env: CliRunner, smtp_sink) -> None:
    """--dry-run says what would happen and sends and records nothing."""
    result = env.invoke(main, ["send", "digest.md", "--dry-run"])
    assert result.exit_code == 0
    assert "would send" in result.stdout and "200 subscriber(s)" in result.stdout
    assert smtp_sink.messages == [] and _issues(env) == []


def test_dry_run_of_a_finished_issue_says_what_would_happen(env: CliRunner, smtp_sink) -> None:
    """--dry-run of a digest already sent shows what would be sent and that it needs --force,
    exit 0, nothing sent."""
    assert env.invoke(main, ["send", "digest.md", "--yes"]).exit_code == 0
    before = len(smtp_sink.messages)
    result = env.invoke(main, ["send", "digest.md", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "would send" in result.stdout and "already sent as issue 1" in result.stdout
    assert "--force" in result.stdout
    assert len(smtp_sink.messages) == before and len(_issues(env)) == 1


def test_issues_list_fits_80_columns(env: CliRunner, smtp_sink, monkeypatch) -> None:
    """`issues list` is one line per issue within 80 columns, the subject cut to fit."""
    monkeypatch.setenv("COLUMNS", "80")
    assert env.invoke(main, ["send", "digest.md", "--yes"]).exit_code == 0
    result = env.invoke(main, ["issues", "list"])
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all(len(line) <= 80 for line in lines), lines
    assert lines[1].split()[:3] == ["1", "sent", "200"]


def test_refuses_without_yes_off_a_terminal(env: CliRunner, smtp_sink) -> None:
    """Without --yes and without a terminal to ask on, nothing starts."""
    result = env.invoke(main, ["send", "digest.md"])
    assert result.exit_code == 2
    assert "--yes" in result.stderr
    assert smtp_sink.messages == [] and _issues(env) == []


def test_wrong_password_exits_1_before_any_message(
    env: CliRunner, make_smtp_sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refused login: exit 1, one line without the password, no issue started."""
    sink = make_smtp_sink(credentials=("news", "right-password"))
    for name, value in sink.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("NEWSLETTER_SMTP_PASSWORD", "wrong-password")
    result = env.invoke(main, ["send", "digest.md", "--yes"])
    assert result.exit_code == 1
    assert "wrong-password" not in result.output + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert sink.messages == [] and _issues(env) == []


def test_must_fix_problems_refuse_unless_forced(env: CliRunner, smtp_sink, clean_env: Path) -> None:
    """A relative image that cannot be resolved blocks the send (exit 2) until --force."""
    (clean_env / "chart.png").unlink()
    refused = env.invoke(main, ["send", "digest.md", "--yes"])
    assert refused.exit_code == 2
    assert "chart.png" in refused.stderr and smtp_sink.messages == []
    forced = env.invoke(main, ["send", "digest.md", "--yes", "--force"])
    assert forced.exit_code == 0


@pytest.mark.parametrize(
    "args",
    [["send"], ["send", "digest.md", "--resume", "1"], ["send", "--resume", "1", "--to", "a@b.c"]],
)
def test_bad_usage_exits_2(env: CliRunner, args: list[str]) -> None:
    """DIGEST and --resume are exclusive; one of them is required."""
    assert env.invoke(main, args).exit_code == 2


def test_resume_of_unknown_issue(env: CliRunner) -> None:
    """Resuming an issue that does not exist is a one-line error, exit 2."""
    result = env.invoke(main, ["send", "--resume", "42"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: issue 42: no such issue"


def test_issues_show(env: CliRunner, smtp_sink) -> None:
    """issues show lists counts and the failed addresses with the server's answer."""
    smtp_sink.fail("rcpt", "550 5.1.1 user unknown", recipients=["reader007@example.com"])
    assert env.invoke(main, ["send", "digest.md", "--yes"]).exit_code == 0
    shown = env.invoke(main, ["issues", "show", "1"])
    assert shown.exit_code == 0
    assert "sent:         199" in shown.stdout
    assert "bounced: reader007@example.com: 550 5.1.1 user unknown" in shown.stdout


def test_dry_run_with_test_copies_sends_nothing(env: CliRunner, smtp_sink) -> None:
    """--to with --dry-run says what it would do and sends nothing."""
    result = env.invoke(main, ["send", "digest.md", "--to", "me@example.org", "--dry-run"])
    assert result.exit_code == 0
    assert "would send test copies to me@example.org" in result.stdout
    assert smtp_sink.messages == []


def test_test_copy_warns_about_must_fix_problems(env: CliRunner, smtp_sink, clean_env) -> None:
    """A test copy goes out despite a missing image, with the problem named on stderr."""
    (clean_env / "chart.png").unlink()
    result = env.invoke(main, ["send", "digest.md", "--to", "me@example.org"])
    assert result.exit_code == 0
    assert "chart.png" in result.stderr and len(smtp_sink.messages) == 1


def test_non_ascii_from_name(env: CliRunner, smtp_sink, monkeypatch: pytest.MonkeyPatch) -> None:
    """A From display name like 'Élias' is RFC 2047-encoded, not a crash."""
    monkeypatch.setenv("NEWSLETTER_FROM", "Élias Nema <elias@example.com>")
    monkeypatch.setenv("NEWSLETTER_REPLY_TO", "Zoë <zoe@example.com>")
    result = env.invoke(main, ["send", "digest.md", "--to", "me@example.org"])
    assert result.exit_code == 0, result.output
    parsed = email.message_from_bytes(smtp_sink.messages[0].data, policy=email.policy.default)
    assert str(parsed["From"]) == "Élias Nema <elias@example.com>"
    assert str(parsed["Reply-To"]) == "Zoë <zoe@example.com>"


def test_sample_subscriber_without_a_name_is_not_greeted_with_a_blank(
    db_runner: CliRunner, smtp_sink, clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The quick start's digest sent to the sample list: linus (no name) gets no greeting,
    everyone else "Hi NAME,"; nobody gets "Hi ,"."""
    root = Path(__file__).resolve().parents[1]
    for name, value in smtp_sink.env().items():
        monkeypatch.setenv(name, value)
    shutil.copytree(root / "digests", clean_env / "digests")
    imported = db_runner.invoke(
        main, ["subscribers", "import", str(root / "subscribers" / "sample.csv")]
    )
    assert imported.exit_code == 0, imported.output
    sent = db_runner.invoke(main, ["send", "digests/2026-11-20-weekly-links.md", "--yes"])
    assert sent.exit_code == 0, sent.output
    greetings = {}
    for message in smtp_sink.messages:
        parsed = email.message_from_bytes(message.data, policy=email.policy.default)
        text = parsed.get_body(("plain",)).get_content()
        assert "Hi ," not in text and "Hi ," not in parsed.get_body(("html",)).get_content()
        greetings[message.recipients[0]] = [
            line for line in text.splitlines() if line.startswith("Hi ")
        ]
    assert greetings == {
        "ada@example.com": ["Hi Ada Lovelace,"],
        "grace@example.org": ["Hi Grace Hopper,"],
        "linus@example.com": [],
        "zoe@example.org": ["Hi Zoë Łukasiewicz-Müller,"],
        "katherine@example.com": ["Hi Johnson, Katherine,"],
    }
