"""The archive's library: slugs made unique at creation, what is shown, the feed, the
static export and old issues brought in by the migration; on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

import feedparser
import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import selectinload

from newsletter.archive import FEED_ENTRIES, PAGE_SIZE, Archive, StaticLinks, listing, set_archived
from newsletter.config import Settings, load_settings
from newsletter.digest import load_digest
from newsletter.errors import ConfigError, InputError
from newsletter.ledger import create_issue, finish_if_done, load_rendered, serialise_rendered
from newsletter.migrate import upgrade
from newsletter.render import render_issue
from newsletter.store import ArchivePage, Issue, Store, make_engine, open_store

SITE = "https://news.example.com"
SAMPLE = Path(__file__).resolve().parents[1] / "digests" / "2026-11-20-weekly-links.md"


@pytest.fixture
def settings(database_url: str) -> Settings:
    return load_settings(
        {
            "NEWSLETTER_DATABASE_URL": database_url,
            "NEWSLETTER_SITE_URL": SITE,
            "NEWSLETTER_NAME": "Weekly Links",
            "NEWSLETTER_TIMEZONE": "UTC",
        },
        Path("/nonexistent"),
    )


def _write(folder: Path, name: str, title: str, extra: str = "", body: str = "Hello.") -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'---\ntitle: "{title}"\n{extra}\n---\n{body}\n', "utf-8")
    return path


def _send(store: Store, settings: Settings, path: Path, force: bool = False) -> Issue:
    """Create the issue of the digest at ``path``, as a send does; with no subscribers it is
    finished at once."""
    digest = load_digest(path)
    issue, created = create_issue(
        store,
        digest_path=str(path),
        digest_name=path.name,
        content_hash=digest.content_hash,
        rendered=render_issue(digest, settings),
        force=force,
    )
    assert created
    with store.session() as session:
        finish_if_done(session, issue.id)
        query = select(Issue).options(selectinload(Issue.archive_page))
        return session.scalars(query.where(Issue.id == issue.id)).one()


def _slugs(store: Store) -> list[str]:
    with store.session() as session:
        return [entry.slug for entry in listing(session, None).entries]


def test_two_digests_asking_for_one_slug_get_two_pages(store, settings, tmp_path) -> None:
    """The second digest with a taken slug gets '-2', and its email links to that page."""
    first = _send(store, settings, _write(tmp_path, "a.md", "A", "slug: weekly"))
    second = _send(store, settings, _write(tmp_path, "b.md", "B", "slug: weekly"))
    assert (first.archive_page.slug, second.archive_page.slug) == ("weekly", "weekly-2")
    email = load_rendered(second.rendered)
    assert f"{SITE}/archive/weekly-2" in email.html
    assert email.text.startswith(f"View in browser: {SITE}/archive/weekly-2\n")
    assert f'{SITE}/archive/weekly"' not in email.html
    assert _slugs(store) == ["weekly-2", "weekly"]


def test_sending_a_digest_again_keeps_one_page(store, settings, tmp_path) -> None:
    """--force (edited, or renamed with the same content) reuses the page; the newest
    send is what it shows, in the place of the newest send."""
    path = _write(tmp_path, "2026-11-20-links.md", "Links", body="First version.")
    first = _send(store, settings, path)
    _send(store, settings, _write(tmp_path, "other.md", "Other"))
    _write(tmp_path, "2026-11-20-links.md", "Links", body="Second version.")
    again = _send(store, settings, path, force=True)
    renamed = tmp_path / "renamed.md"
    renamed.write_bytes(path.read_bytes())
    third = _send(store, settings, renamed, force=True)
    slugs = {issue.archive_page.slug for issue in (first, again, third)}
    assert slugs == {"2026-11-20-links"}
    assert f"{SITE}/archive/2026-11-20-links" in load_rendered(third.rendered).html
    assert _slugs(store) == ["2026-11-20-links", "other"]
    archive = Archive(store, settings)
    with store.session() as session:
        shown = listing(session, 1).entries[0]
        assert shown.id == third.id
        assert "Second version." in archive.content(session, shown).body


def test_the_list_is_paginated_newest_first(store, settings, tmp_path) -> None:
    """/archive pages hold PAGE_SIZE issues each; a page past the last does not exist."""
    count = PAGE_SIZE * 2 + 3
    for n in range(count):
        _send(store, settings, _write(tmp_path, f"issue-{n:02d}.md", f"Issue {n}"))
    with store.session() as session:
        pages = [listing(session, page) for page in (1, 2, 3)]
        assert listing(session, 4) is None and listing(session, 0) is None
    assert [p.pages for p in pages] == [3, 3, 3]
    slugs = [e.slug for p in pages for e in p.entries]
    assert slugs == [f"issue-{n:02d}" for n in reversed(range(count))]
    assert [len(p.entries) for p in pages] == [PAGE_SIZE, PAGE_SIZE, 3]


def test_an_issue_taken_out_leaves_every_page(store, settings, tmp_path) -> None:
    """`issues archive --off` hides the page (every send of it); --on brings it back."""
    first = _send(store, settings, _write(tmp_path, "a.md", "A"))
    again = _send(store, settings, tmp_path / "a.md", force=True)
    _send(store, settings, _write(tmp_path, "b.md", "B"))
    placed = set_archived(store, first.id, False)
    assert not placed.archived and placed.shown_by is None
    assert _slugs(store) == ["b"]
    placed = set_archived(store, first.id, True)
    assert placed.archived and placed.shown_by == again.id
    assert _slugs(store) == ["b", "a"]
    with pytest.raises(InputError, match="issue 999: no such issue"):
        set_archived(store, 999, False)


def test_front_matter_archive_false_is_never_shown(store, settings, tmp_path) -> None:
    """An issue sent with `archive: false` has no page, until someone puts it in."""
    issue = _send(store, settings, _write(tmp_path, "a.md", "A", "archive: false"))
    assert _slugs(store) == []
    assert "View in browser" not in load_rendered(issue.rendered).html
    set_archived(store, issue.id, True)
    assert _slugs(store) == ["a"]


def test_the_feed_has_the_newest_issues_in_full(store, settings, tmp_path) -> None:
    """feedparser reads the Atom feed: the newest issues, newest first, each with its
    page's link, summary and whole content."""
    for n in range(FEED_ENTRIES + 2):
        _write(tmp_path, f"n{n:02d}.md", f"Issue {n}", f"description: About {n}", f"Text {n}.")
        _send(store, settings, tmp_path / f"n{n:02d}.md")
    archive = Archive(store, settings)
    with store.session() as session:
        from newsletter.archive import Links

        feed = feedparser.parse(archive.feed(session, Links(SITE)))
    assert not feed.bozo, feed.bozo_exception
    assert feed.feed.title == "Weekly Links"
    assert len(feed.entries) == FEED_ENTRIES
    newest = feed.entries[0]
    last = FEED_ENTRIES + 1
    assert newest.title == f"Issue {last}"
    assert newest.link == f"{SITE}/archive/n{last:02d}"
    assert newest.summary == f"About {last}"
    assert f"Text {last}." in newest.content[0].value
    assert feed.entries[-1].title == "Issue 2"


def test_a_static_build_writes_only_what_changed(store, settings, tmp_path) -> None:
    """The export has an index, the feed, a folder per issue with its images; a second
    build rewrites nothing; a new issue rewrites only the index, feed and its folder."""
    folder = tmp_path / "digests"
    digest = _write(folder, "2026-11-20-weekly-links.md", "x")
    digest.write_bytes(SAMPLE.read_bytes())
    (folder / "2026-11-20-open-rates.png").write_bytes(
        (SAMPLE.parent / "2026-11-20-open-rates.png").read_bytes()
    )
    _send(store, settings, digest)
    _send(store, settings, _write(folder, "second.md", "Second"))
    out = tmp_path / "site"
    archive = Archive(store, settings)
    first = archive.build(out)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    image = [f for f in files if f.endswith(".png")]
    assert files == sorted(
        [
            ".newsletter-archive.json",
            "index.html",
            "feed.xml",
            "style.css",
            "2026-11-20-weekly-links/index.html",
            *image,
            "second/index.html",
        ]
    )
    assert len(image) == 1 and image[0].startswith("2026-11-20-weekly-links/")
    assert first.issues == 2 and len(first.written) == 6  # and the manifest
    page = (out / "2026-11-20-weekly-links/index.html").read_text("utf-8")
    assert 'href="../index.html"' in page and 'href="../style.css"' in page
    assert f'src="../{image[0]}"' in page
    assert 'href="second/index.html"' in (out / "index.html").read_text("utf-8")
    before = {f: (out / f).stat().st_mtime_ns for f in files}

    again = archive.build(out)
    assert again.written == [] and again.unchanged == 6
    assert {f: (out / f).stat().st_mtime_ns for f in files} == before

    _send(store, settings, _write(folder, "third.md", "Third"))
    third = archive.build(out)
    assert sorted(third.written) == ["feed.xml", "index.html", "third/index.html"]
    assert all((out / f).stat().st_mtime_ns == before[f] for f in files if "second" in f)


def test_a_static_build_removes_what_was_taken_out(store, settings, tmp_path) -> None:
    """A page taken out of the archive leaves the export at the next build, and files of
    the user's in the folder stay."""
    issue = _send(store, settings, _write(tmp_path, "a.md", "A"))
    _send(store, settings, _write(tmp_path, "b.md", "B"))
    out = tmp_path / "site"
    Archive(store, settings).build(out)
    (out / "notes.txt").write_text("mine", "utf-8")
    set_archived(store, issue.id, False)
    report = Archive(store, settings).build(out)
    assert report.removed == ["a/index.html"]
    assert not (out / "a").exists() and (out / "b" / "index.html").exists()
    assert (out / "notes.txt").read_text("utf-8") == "mine"
    assert "a/index.html" not in (out / "index.html").read_text("utf-8")


def test_a_static_build_never_overwrites_a_file_it_did_not_write(store, settings, tmp_path):
    """A blog's own index.html in the way stops the build before anything is written."""
    _send(store, settings, _write(tmp_path, "a.md", "A"))
    out = tmp_path / "blog"
    out.mkdir()
    (out / "index.html").write_text("<h1>My blog</h1>", "utf-8")
    with pytest.raises(InputError, match=r"blog/index\.html: is in the way"):
        Archive(store, settings).build(out)
    assert sorted(p.name for p in out.iterdir()) == ["index.html"]
    assert (out / "index.html").read_text("utf-8") == "<h1>My blog</h1>"


def test_a_static_build_with_a_base_url_has_absolute_feed_links(store, settings, tmp_path):
    """--base-url gives the exported feed and previews links a reader can follow."""
    _send(store, settings, _write(tmp_path, "a.md", "A"))
    out = tmp_path / "site"
    Archive(store, settings).build(out, "https://blog.example.com/newsletter")
    feed = feedparser.parse((out / "feed.xml").read_bytes())
    assert feed.entries[0].link == "https://blog.example.com/newsletter/a/"
    page = (out / "a" / "index.html").read_text("utf-8")
    assert '<meta property="og:url" content="https://blog.example.com/newsletter/a/">' in page
    links = StaticLinks(SITE, None, 1)
    assert links.absolute(links.issue("a")) is None


def test_no_build_while_the_archive_is_off(store, settings, tmp_path) -> None:
    """NEWSLETTER_ARCHIVE=off: building is a one-line error naming the variable."""
    from dataclasses import replace

    with pytest.raises(ConfigError, match="NEWSLETTER_ARCHIVE is off"):
        Archive(store, replace(settings, archive=False)).build(tmp_path / "site")
    assert not (tmp_path / "site").exists()


@pytest.mark.parametrize("value", ["maybe", "2"])
def test_a_bad_archive_setting_names_the_variable(value: str) -> None:
    """NEWSLETTER_ARCHIVE takes on or off; anything else is a one-line error."""
    with pytest.raises(ConfigError, match=r"^NEWSLETTER_ARCHIVE: .* is not on or off$"):
        load_settings({"NEWSLETTER_ARCHIVE": value}, Path("/nonexistent"))
    assert not load_settings({"NEWSLETTER_ARCHIVE": "OFF"}, Path("/nonexistent")).archive


def test_issues_sent_before_the_archive_get_pages(database_url: str, settings, tmp_path) -> None:
    """The migration gives old issues slugs (one per digest) and pages made from the email
    they kept, with no personal field and no footer."""
    rendered = render_issue(load_digest(SAMPLE), settings)
    blob = serialise_rendered(rendered)
    engine = make_engine(database_url)
    try:
        upgrade(engine, "0005")
        with engine.begin() as connection:
            for name, digest_hash, status in [
                ("2026-11-20-weekly-links.md", "h1", "sent"),
                ("2026-11-20-weekly-links.md", "h2", "sent"),  # sent again
                ("index.md", "h3", "sent"),
                ("cancelled.md", "h4", "cancelled"),
            ]:
                connection.execute(
                    text(
                        "INSERT INTO issues (digest_path, digest_name, content_hash, subject,"
                        " status, created_at, started_at, rendered) VALUES (:path, :name, :hash,"
                        " :subject, :status, :now, :now, :blob)"
                    ),
                    {
                        "path": f"/d/{name}",
                        "name": name,
                        "hash": digest_hash,
                        "subject": rendered.subject,
                        "status": status,
                        "now": datetime(2026, 1, 2, 3, 4),
                        "blob": blob,
                    },
                )
    finally:
        engine.dispose()
    with open_store(database_url) as store:
        with store.session() as session:
            slugs = session.scalars(select(ArchivePage.slug).order_by(ArchivePage.issue_id)).all()
        assert slugs == [
            "2026-11-20-weekly-links",
            "2026-11-20-weekly-links",
            "email-that-renders-video-in-digests-and-tidy-data",
        ]  # a cancelled issue gets no page
        assert _slugs(store) == [slugs[2], slugs[0]]
        archive = Archive(store, settings)
        with store.session() as session:
            entry = listing(session, 1).entries[1]
            page = archive.content(session, entry)
            html = archive.issue_page(entry, page, StaticLinks(SITE, None, 1))
    assert page.title == rendered.page.title
    assert page.description == rendered.preheader
    assert "Email that renders everywhere" in page.body
    assert "@@NL_" not in html and "style=" not in page.body
    assert "View in browser" not in html and "You are receiving" not in html
    assert len(page.images) == 1
    assert next(iter(page.images)) in html


def test_the_migration_goes_down_and_up_again(database_url: str) -> None:
    """0007 can be undone and redone on a database with issues in it."""
    engine = make_engine(database_url)
    try:
        upgrade(engine)
        with engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO issues (digest_path, digest_name, content_hash, subject,"
                    " status, created_at) VALUES ('/a.md', 'a.md', 'h', 'A', 'sent', :now)"
                ),
                {"now": datetime(2026, 1, 2)},
            )
        from alembic import command

        from newsletter.migrate import alembic_config

        with engine.begin() as connection:
            command.downgrade(alembic_config(connection), "0005")
        upgrade(engine)
        with engine.connect() as connection:
            pages = connection.execute(text("SELECT count(*) FROM archive_pages")).scalar()
        assert pages == 0  # no rendered email kept: nothing to show
    finally:
        engine.dispose()


def test_pages_hold_no_personal_field(store, settings, tmp_path) -> None:
    """{{ name }} and {{ email }} in a digest read neutrally on its page."""
    body = "Hi {{ name }}, you are {{ email }}."
    _send(store, settings, _write(tmp_path, "a.md", "A", body=body))
    archive = Archive(store, settings)
    with store.session() as session:
        entry = listing(session, 1).entries[0]
        html = archive.issue_page(
            entry, archive.content(session, entry), StaticLinks(SITE, None, 1)
        )
    assert "Hi reader, you are ." in html and "@@NL_" not in html


def test_build_output_is_the_same_on_every_run(store, settings, tmp_path) -> None:
    """Two builds into two folders give identical bytes (nothing depends on the clock)."""
    _send(store, settings, _write(tmp_path, "a.md", "A"))
    for out in ("one", "two"):
        Archive(store, settings).build(tmp_path / out)
    for name in ("index.html", "feed.xml", "a/index.html", ".newsletter-archive.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    manifest = json.loads((tmp_path / "one" / ".newsletter-archive.json").read_bytes())
    assert "a/index.html" in manifest
    assert os.stat(tmp_path / "one" / "a" / "index.html").st_mode & 0o777 == 0o644
