"""`check` without the network: links an earlier sent issue carried, images without alt text,
and a database that cannot be read; on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from newsletter.cli import main
from newsletter.config import load_settings
from newsletter.digest import load_digest
from newsletter.history import link_key, read_sent_links
from newsletter.ledger import serialise_rendered
from newsletter.render import render_issue
from newsletter.store import Issue, Store

EARLIER = """---
title: Issue one
---
* [A tool](https://tools.example.com/widget)
* [A talk](https://talks.example.com/watch?v=1)
"""

UNFINISHED = """---
title: Issue two, still sending
---
* [Draft](https://drafts.example.com/only-here)
"""

NEW = """---
title: Issue three
---
Intro.

* [The tool again](http://www.tools.example.com/widget/?utm_source=feed)
* [Something new](https://new.example.com/)
* [Draft](https://drafts.example.com/only-here)

![](diagram.png)

![A chart of opens](chart.png)

<img src="https://cdn.example.com/banner.png" alt="  ">
"""


def _record_issue(store: Store, path: Path, status: str, when: datetime) -> int:
    """An issue as `send` stores it: the rendered email as JSON, with its status."""
    digest = load_digest(path)
    rendered = render_issue(digest, load_settings({}, dotenv_path=path.parent / ".env"))
    with store.begin() as session:
        issue = Issue(
            digest_path=str(path),
            digest_name=path.name,
            content_hash=hashlib.sha256(digest.source.encode()).hexdigest(),
            subject=rendered.subject,
            status=status,
            created_at=when,
            started_at=when,
            finished_at=when if status == "sent" else None,
            rendered=serialise_rendered(rendered),
        )
        session.add(issue)
        session.flush()
        return issue.id


@pytest.fixture
def sent_history(store: Store, clean_env: Path, fixtures_dir: Path) -> dict[str, int]:
    """One sent issue, one still sending, and the new digest with its images beside it."""
    (clean_env / "earlier.md").write_text(EARLIER, "utf-8")
    (clean_env / "unfinished.md").write_text(UNFINISHED, "utf-8")
    (clean_env / "new.md").write_text(NEW, "utf-8")
    for name in ("chart.png", "diagram.png"):
        (clean_env / name).write_bytes((fixtures_dir / "chart.png").read_bytes())
    sent = _record_issue(store, clean_env / "earlier.md", "sent", datetime(2026, 11, 6, tzinfo=UTC))
    sending = _record_issue(store, clean_env / "unfinished.md", "sending", datetime.now(UTC))
    return {"sent": sent, "sending": sending}


def test_repeated_link_and_missing_alt_text_are_warnings(
    db_runner: CliRunner, sent_history: dict[str, int]
) -> None:
    """A link a sent issue carried (written differently) is a warning naming that issue;
    links only in unsent issues are not; images without alt text are warnings; exit 0."""
    result = db_runner.invoke(main, ["check", "new.md"])
    assert result.exit_code == 0, result.output
    issue = sent_history["sent"]
    assert result.stdout.splitlines() == [
        "new.md:6: warning: link http://www.tools.example.com/widget/?utm_source=feed was "
        f"already sent in issue {issue} 'Issue one' on 2026-11-06",
        "new.md:10: warning: image 'diagram.png' has no alt text (shown when images are "
        "blocked, read aloud by screen readers)",
        "new.md:14: warning: image 'https://cdn.example.com/banner.png' has no alt text "
        "(shown when images are blocked, read aloud by screen readers)",
    ]
    assert result.stderr == ""


def test_the_sent_digest_itself_repeats_nothing(
    db_runner: CliRunner, sent_history: dict[str, int]
) -> None:
    """Checking the digest an issue was sent from does not call its own links repeated."""
    result = db_runner.invoke(main, ["check", "earlier.md"])
    assert result.exit_code == 0, result.output
    assert result.stdout == ""


def test_preview_warnings_include_repeated_links(
    sent_history: dict[str, int], database_url: str, clean_env: Path
) -> None:
    """The findings the preview page shows come from the same offline check."""
    from newsletter.checks import offline_findings

    sent = read_sent_links(database_url)
    digest = load_digest(clean_env / "new.md")
    issue = render_issue(digest, load_settings({}, dotenv_path=clean_env / ".env"))
    messages = [finding.message for finding in offline_findings(digest, issue, sent)]
    assert any("already sent in issue" in message for message in messages)


def test_unreadable_sqlite_database_is_one_warning(runner: CliRunner, clean_env: Path) -> None:
    """A database file that is not a database: one warning line on stderr, and the check
    still runs and reports the digest's own findings."""
    (clean_env / "broken.db").write_bytes(b"this is not an SQLite file" * 100)
    (clean_env / "new.md").write_text(NEW, "utf-8")
    env = {"NEWSLETTER_DATABASE_URL": f"sqlite:///{clean_env / 'broken.db'}"}
    result = runner.invoke(main, ["check", "new.md"], env=env)
    assert result.exit_code == 1, result.output  # the images beside it are missing
    warnings = result.stderr.splitlines()
    assert len(warnings) == 1
    assert warnings[0].startswith("warning: NEWSLETTER_DATABASE_URL: ")
    assert "not an SQLite database" in warnings[0]
    assert warnings[0].endswith("links of earlier issues not compared")
    assert "new.md:10: warning: image 'diagram.png' has no alt text" in result.stdout


def test_unreachable_postgres_is_one_warning(runner: CliRunner, clean_env: Path) -> None:
    """A PostgreSQL server that does not answer: one warning line, the check goes on."""
    import socket

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        (clean_env / "d.md").write_text("# Title\n\n[x](https://example.com/)\n", "utf-8")
        env = {"NEWSLETTER_DATABASE_URL": f"postgresql+psycopg://nobody@127.0.0.1:{port}/none"}
        result = runner.invoke(main, ["check", "d.md"], env=env)
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "cannot read" in lines[0] and f":{port}/none" in lines[0]


def test_missing_sqlite_file_is_not_created(runner: CliRunner, clean_env: Path) -> None:
    """With no database yet nothing was sent: no warning, and `check` creates no file."""
    (clean_env / "d.md").write_text("# Title\n\n[x](https://example.com/)\n", "utf-8")
    result = runner.invoke(main, ["check", "d.md"])
    assert result.exit_code == 0 and result.output == ""
    assert sorted(p.name for p in clean_env.iterdir()) == ["d.md"]


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ("https://example.com/a", "http://www.example.com/a/"),
        ("https://example.com/a?x=1&utm_source=rss", "https://EXAMPLE.com/a?x=1#top"),
        ("https://example.com:443/a", "https://example.com/a"),
    ],
)
def test_link_key_ignores_what_does_not_change_the_page(one: str, other: str) -> None:
    """Scheme, www., case of the host, default port, trailing slash, fragment and tracking
    parameters do not make a different link."""
    assert link_key(one) == link_key(other)


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ("https://example.com/a", "https://example.com/b"),
        ("https://example.com/a?id=1", "https://example.com/a?id=2"),
        ("https://example.com/A", "https://example.com/a"),
        ("https://example.com:8080/a", "https://example.com/a"),
    ],
)
def test_link_key_keeps_what_does(one: str, other: str) -> None:
    """Path, query values, path case and a non-default port make a different link."""
    assert link_key(one) != link_key(other)
