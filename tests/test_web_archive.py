"""The archive after real sends (the CLI against the SMTP sink), through Flask's test client,
on SQLite and PostgreSQL: what is listed, what a page holds, the feed, and bad addresses."""

from __future__ import annotations

import email
import email.policy
import re
import shutil
from email.utils import format_datetime
from pathlib import Path

import feedparser
import pytest
from click.testing import CliRunner
from flask.testing import FlaskClient

from newsletter.cli import main
from newsletter.config import load_settings
from newsletter.store import open_store
from newsletter.web import create_app

SITE = "https://news.example.com"
DIGESTS = Path(__file__).resolve().parents[1] / "digests"
SAMPLE = "2026-11-20-weekly-links.md"
SLUG = "2026-11-20-weekly-links"
READERS = [f"reader{i}@example.com" for i in range(5)] + ["zoë@bücher.example"]


@pytest.fixture
def sent(db_runner: CliRunner, smtp_sink, clean_env: Path, monkeypatch: pytest.MonkeyPatch):
    """The sample digest sent to six subscribers through the CLI; a second digest sent only
    as `--to` test copies and a dry run; a third sent with `archive: false`."""
    for name, value in smtp_sink.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("NEWSLETTER_SITE_URL", SITE)
    monkeypatch.setenv("NEWSLETTER_NAME", "Weekly Links")
    for name in (SAMPLE, "2026-11-20-open-rates.png"):
        shutil.copy(DIGESTS / name, clean_env / name)
    (clean_env / "test-only.md").write_text('---\ntitle: "Only a test"\n---\nDraft.\n', "utf-8")
    (clean_env / "private.md").write_text(
        '---\ntitle: "Members only"\narchive: false\n---\nSecret words.\n', "utf-8"
    )
    rows = "".join(f"{address},Reader {n}\n" for n, address in enumerate(READERS))
    (clean_env / "list.csv").write_text("email,name\n" + rows, "utf-8")
    for args in (
        ["subscribers", "import", "list.csv"],
        ["send", SAMPLE, "--yes"],
        ["send", "test-only.md", "--to", "editor@example.com"],
        ["send", "test-only.md", "--dry-run"],
        ["send", "private.md", "--yes"],
    ):
        result = db_runner.invoke(main, args)
        assert result.exit_code == 0, (args, result.output)
    return db_runner


@pytest.fixture
def web(sent: CliRunner) -> FlaskClient:
    """The web app of `newsletter serve` on the database the sends used."""
    settings = load_settings()
    store = open_store(settings)
    yield create_app(settings, store).test_client()
    store.close()


def _parsed(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)


def _received(smtp_sink, address: str) -> email.message.EmailMessage:
    """The sample issue as ``address`` got it."""
    [message] = [
        parsed
        for m in smtp_sink.messages
        if address in m.recipients
        and "Email that renders" in (parsed := _parsed(m.data))["Subject"]
    ]
    return message


def test_the_archive_lists_what_went_to_subscribers(web: FlaskClient) -> None:
    """The sent issue is listed with its date, subject and preheader; test copies, dry runs
    and an `archive: false` issue are not."""
    answer = web.get("/archive")
    page = answer.get_data(as_text=True)
    assert answer.status_code == 200
    assert f'href="/archive/{SLUG}"' in page
    assert "Email that renders, video in digests, and tidy data" in page
    assert "Why table layouts still matter" in page  # the preheader
    assert re.search(r'<time datetime="\d{4}-\d\d-\d\dT', page)
    assert "Only a test" not in page and "Members only" not in page
    assert page.count("<article>") == 1


def test_an_issue_page_holds_the_digest_and_nobody_s_details(web: FlaskClient, smtp_sink) -> None:
    """The page has the digest's text, the list's name and the signup link, and no
    subscriber's address, name or unsubscribe token, for every address of the send."""
    answer = web.get(f"/archive/{SLUG}")
    page = answer.get_data(as_text=True)
    assert answer.status_code == 200
    assert "Email that renders everywhere" in page and "Video in digests" in page
    assert "Weekly Links" in page and 'href="/"' in page
    recipients = {r for m in smtp_sink.messages for r in m.recipients}
    assert len(recipients) == len(READERS) + 1  # the readers and the test copy's editor
    for message in smtp_sink.messages:
        token = _parsed(message.data)["List-Unsubscribe"].strip("<>").rsplit("/", 1)[1]
        assert len(token) > 20 and token not in page
    for address in recipients:
        assert address not in page and address.split("@")[0] not in page
    assert "Reader 1" not in page and "unsubscribe" not in page.lower()
    assert "@@NL_" not in page and "<script" not in page and "style=" not in page


def test_the_view_in_browser_link_opens_the_page(web: FlaskClient, smtp_sink) -> None:
    """Each email's "View in browser" link (HTML and text) resolves to the issue's page."""
    message = _received(smtp_sink, READERS[0])
    html = message.get_body(("html",)).get_content()
    text = message.get_body(("plain",)).get_content()
    href = re.search(r'<a href="([^"]+)"[^>]*>View in browser</a>', html)[1]
    assert text.splitlines()[0] == f"View in browser: {href}"
    assert href == f"{SITE}/archive/{SLUG}"
    answer = web.get(href.removeprefix(SITE))
    assert answer.status_code == 200
    assert "<h1>📬 Email that renders" in answer.get_data(as_text=True)


def test_the_page_has_the_headers_of_a_page_to_share(web: FlaskClient) -> None:
    """The signup pages' CSP (images from https allowed), no framing, a feed link and
    OpenGraph title and description."""
    answer = web.get(f"/archive/{SLUG}")
    csp = answer.headers["Content-Security-Policy"]
    assert csp.startswith("default-src 'none'; style-src 'self'; img-src 'self' data: https:;")
    assert "frame-ancestors 'none'" in csp and answer.headers["X-Frame-Options"] == "DENY"
    page = answer.get_data(as_text=True)
    assert '<link rel="alternate" type="application/atom+xml"' in page
    assert '<meta property="og:title" content="📬 Email that renders' in page
    assert '<meta property="og:description" content="Why table layouts' in page
    assert f'<link rel="canonical" href="{SITE}/archive/{SLUG}">' in page
    assert web.get("/archive/style.css").status_code == 200


def test_unchanged_pages_answer_304(web: FlaskClient) -> None:
    """ETag and Last-Modified on the list, a page, an image and the feed; a conditional
    request for what did not change gets 304 with no body."""
    for path in ("/archive", f"/archive/{SLUG}", "/feed.xml"):
        first = web.get(path)
        assert first.status_code == 200 and first.headers["ETag"]
        assert first.headers["Last-Modified"]
        again = web.get(path, headers={"If-None-Match": first.headers["ETag"]})
        assert (again.status_code, again.data) == (304, b"")
        since = web.get(path, headers={"If-Modified-Since": first.headers["Last-Modified"]})
        assert since.status_code == 304
        other = web.get(path, headers={"If-None-Match": '"something-else"'})
        assert other.status_code == 200


def test_a_page_taken_out_changes_the_list(web: FlaskClient, sent: CliRunner) -> None:
    """`issues archive ID --off` makes the page 404 and the list's validators change, so a
    cached copy is not reused; --on brings it back."""
    listed = web.get("/archive")
    result = sent.invoke(main, ["issues", "archive", "1", "--off"])
    assert result.exit_code == 0, result.output
    assert f"issue 1: not in the archive ({SITE}/archive/{SLUG} answers 404)" in result.output
    assert web.get(f"/archive/{SLUG}").status_code == 404
    assert web.get("/latest").status_code == 404
    stale = web.get("/archive", headers={"If-None-Match": listed.headers["ETag"]})
    assert stale.status_code == 200 and SLUG not in stale.get_data(as_text=True)
    result = sent.invoke(main, ["issues", "archive", "1", "--on"])
    assert result.output == f"issue 1: in the archive at {SITE}/archive/{SLUG}\n"
    assert web.get(f"/archive/{SLUG}").status_code == 200


def test_issues_archive_tells_and_refuses(sent: CliRunner) -> None:
    """Without --on/--off it only tells; an unknown issue is a one-line error, exit 2."""
    assert sent.invoke(main, ["issues", "archive", "2"]).output.startswith(
        "issue 2: not in the archive"
    )
    result = sent.invoke(main, ["issues", "archive", "42", "--off"])
    assert (result.exit_code, result.output) == (2, "error: issue 42: no such issue\n")


def test_the_feed_parses_with_the_right_entries(web: FlaskClient) -> None:
    """feedparser reads /feed.xml: one entry, the sent issue, with its whole content."""
    answer = web.get("/feed.xml")
    assert answer.mimetype == "application/atom+xml"
    feed = feedparser.parse(answer.data)
    assert not feed.bozo, feed.bozo_exception
    assert feed.feed.title == "Weekly Links"
    assert [entry.link for entry in feed.entries] == [f"{SITE}/archive/{SLUG}"]
    content = feed.entries[0].content[0].value
    assert "Email that renders everywhere" in content and "@example.com" not in content
    assert f"{SITE}/archive/{SLUG}/img1." in content  # the inline image, by absolute URL


def test_latest_redirects_to_the_newest(web: FlaskClient) -> None:
    """/latest is a 302 to the page of the newest shown issue."""
    answer = web.get("/latest")
    assert (answer.status_code, answer.headers["Location"]) == (302, f"/archive/{SLUG}")


def test_inline_images_are_served_beside_the_page(web: FlaskClient) -> None:
    """The chart that went inside the email as cid: is a file next to the page."""
    page = web.get(f"/archive/{SLUG}").get_data(as_text=True)
    source = re.search(rf'src="(/archive/{SLUG}/img1\.[^"]+)"', page)[1]
    image = web.get(source)
    assert image.status_code == 200 and image.mimetype == "image/png"
    assert image.data == (DIGESTS / "2026-11-20-open-rates.png").read_bytes()
    assert web.get(f"/archive/{SLUG}/img9.png").status_code == 404


@pytest.mark.parametrize(
    "path",
    [
        "/archive/no-such-issue",
        "/archive/members-only",
        "/archive/private",
        "/archive/test-only",
        "/archive/..",
        "/archive/../web.py",
        "/archive/..%2f..%2fetc%2fpasswd",
        "/archive/%2e%2e%2fnewsletter.db",
        f"/archive/{SLUG}%2f..",
        f"/archive/{SLUG}/..%2f..%2fsubscribers%2fnewsletter.db",
        f"/archive/{SLUG.upper()}",
        "/archive?page=2",
        "/archive?page=0",
        "/archive?page=-1",
        "/archive?page=abc",
        "/archive?page=99999999999999999999",
    ],
)
def test_bad_addresses_are_a_404_page(web: FlaskClient, path: str) -> None:
    """Unknown slugs, hidden issues, path tricks and pages past the end: the 404 page."""
    answer = web.get(path)
    assert answer.status_code == 404
    assert "Page not found" in answer.get_data(as_text=True)


def test_a_page_address_with_a_slash_leads_to_the_page(web: FlaskClient) -> None:
    """The static export's folder form /archive/SLUG/ redirects to the page."""
    answer = web.get(f"/archive/{SLUG}/")
    assert (answer.status_code, answer.headers["Location"]) == (301, f"/archive/{SLUG}")


def test_archive_off_answers_404_everywhere(sent: CliRunner, monkeypatch) -> None:
    """NEWSLETTER_ARCHIVE=off: every archive route is the 404 page, the rest still works."""
    monkeypatch.setenv("NEWSLETTER_ARCHIVE", "off")
    settings = load_settings()
    with open_store(settings) as store:
        client = create_app(settings, store).test_client()
        for path in ("/archive", f"/archive/{SLUG}", "/feed.xml", "/latest", "/archive/style.css"):
            assert client.get(path).status_code == 404, path
        assert client.get("/").status_code == 200


def test_archive_build_from_the_command_line(sent: CliRunner, clean_env: Path) -> None:
    """`archive build DIR` writes the export and says what it did; bad input is exit 2."""
    result = sent.invoke(main, ["archive", "build", "site"])
    assert result.exit_code == 0, result.output
    assert result.output == "1 issue(s) in site: 5 file(s) written, 0 unchanged, 0 removed\n"
    again = sent.invoke(main, ["archive", "build", "site"])
    assert again.output == "1 issue(s) in site: 0 file(s) written, 5 unchanged, 0 removed\n"
    (clean_env / "afile").write_text("x", "utf-8")
    refused = sent.invoke(main, ["archive", "build", "afile"])
    assert refused.exit_code == 2 and "afile" in refused.output
    bad = sent.invoke(main, ["archive", "build", "out", "--base-url", "ftp://x"])
    assert bad.exit_code == 2
    assert bad.output == "error: --base-url: 'ftp://x' is not an http(s) URL\n"
    assert not (clean_env / "out").exists()


def test_last_modified_is_when_the_issue_went_out(web: FlaskClient, sent: CliRunner) -> None:
    """A page's Last-Modified is its issue's time, not the time of the request."""
    from newsletter.store import ArchivePage

    with open_store(load_settings()) as store, store.session() as session:
        created = session.get(ArchivePage, 1).updated_at
    answer = web.get(f"/archive/{SLUG}")
    assert answer.headers["Last-Modified"] == format_datetime(created.replace(microsecond=0), True)


def test_a_new_send_shows_at_once(web: FlaskClient, sent: CliRunner, clean_env: Path) -> None:
    """Pages kept by the running app give way to a new send: the list, the feed and
    /latest show it on the next request."""
    before = web.get("/archive")
    assert web.get("/feed.xml").status_code == 200
    (clean_env / "next.md").write_text('---\ntitle: "Next week"\n---\nMore links.\n', "utf-8")
    result = sent.invoke(main, ["send", "next.md", "--yes"])
    assert result.exit_code == 0, result.output
    after = web.get("/archive", headers={"If-None-Match": before.headers["ETag"]})
    assert after.status_code == 200 and 'href="/archive/next"' in after.get_data(as_text=True)
    feed = feedparser.parse(web.get("/feed.xml").data)
    assert [e.title for e in feed.entries][:1] == ["Next week"]
    assert web.get("/latest").headers["Location"] == "/archive/next"
