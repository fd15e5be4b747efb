"""The archive in Debian's chromium: served pages at phone and desktop widths, and the
static export opened from disk with its links followed."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_browser_email import PLACEHOLDER_IMAGE, WIDEST_OVERFLOW
from werkzeug.serving import make_server

from newsletter.archive import Archive
from newsletter.config import Settings, load_settings
from newsletter.sender import plan_send, send_issue
from newsletter.store import Store, open_store
from newsletter.subscribers import add
from newsletter.web import create_app

pytestmark = pytest.mark.browser

DIGESTS = Path(__file__).resolve().parents[1] / "digests"
SLUG = "2026-11-20-weekly-links"
LONG_TITLE = "A digest with a rather long title about Supercalifragilisticexpialidocious tooling"


@pytest.fixture
def site(clean_env: Path) -> Iterator[tuple[Settings, Store]]:
    """Two issues really sent (to the outbox) on an SQLite database."""
    settings = load_settings(
        {
            "NEWSLETTER_DATABASE_URL": f"sqlite:///{clean_env / 'news.db'}",
            "NEWSLETTER_OUTBOX_DIR": str(clean_env / "outbox"),
            "NEWSLETTER_SITE_URL": "https://news.example.com",
            "NEWSLETTER_NAME": "Weekly Links",
            "NEWSLETTER_SECRET_KEY": "a-secret-for-the-archive-browser-tests-0123",
        },
        clean_env / ".env",
    )
    for name in (f"{SLUG}.md", "2026-11-20-open-rates.png"):
        (clean_env / name).write_bytes((DIGESTS / name).read_bytes())
    (clean_env / "2026-11-27-long.md").write_text(
        f'---\ntitle: "{LONG_TITLE}"\ndescription: "https://example.com/a/very/long/'
        'unbroken/address/that/must/wrap/on/a/phone/screen/somehow"\n---\n'
        "| a | b | c | d | e | f |\n|---|---|---|---|---|---|\n"
        "| wide table cell one | two | three | four | five | six six six six |\n\n"
        "```\nA code line that is much longer than a phone screen is wide, kept as written.\n```\n",
        "utf-8",
    )
    with open_store(settings) as store:
        with store.begin() as session:
            add(session, "ann@example.com", "Ann")
        for name in (f"{SLUG}.md", "2026-11-27-long.md"):
            report = send_issue(store, settings, plan_send(store, settings, clean_env / name))
            assert report.sent == 1
        yield settings, store


@pytest.fixture
def served(site) -> Iterator[str]:
    """The web app on a real local HTTP server in a thread; its base URL."""
    settings, store = site
    server = make_server("127.0.0.1", 0, create_app(settings, store), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(timeout=10)


def _page(browser, width: int):
    """A page at ``width`` whose https images (video thumbnails) are a local placeholder,
    and the console errors it logs (a CSP violation is one)."""
    context = browser.new_context(viewport={"width": width, "height": 900}, device_scale_factor=1)
    page = context.new_page()
    page.route(
        "https://**/*",
        lambda route: route.fulfill(status=200, content_type="image/png", body=PLACEHOLDER_IMAGE),
    )
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    return context, page, errors


@pytest.mark.parametrize("width", [375, 1280])
def test_served_pages_fit_the_screen(browser, served: str, artifacts_dir: Path, width: int):
    """/archive and an issue page: screenshots under tests/artifacts/, nothing wider than
    a phone's screen, the stylesheet applied, the inline image shown, no CSP complaint."""
    context, page, errors = _page(browser, width)
    try:
        for name, path in (("index", "/archive"), ("issue", f"/archive/{SLUG}")):
            page.goto(served + path, wait_until="load")
            shot = artifacts_dir / f"archive-{name}-{width}px.png"
            page.screenshot(path=str(shot), full_page=True)
            fit = page.evaluate(WIDEST_OVERFLOW)
            assert fit["scrollWidth"] <= width, (path, fit)
            assert fit["worst"]["overflow"] <= 1, (path, fit)
            assert shot.stat().st_size > 10_000
            assert page.evaluate("getComputedStyle(document.body).margin") == "0px"
        chart = page.locator(".content img[src*='img1.']")
        assert chart.evaluate("img => img.naturalWidth") > 0
        page.goto(served + "/archive/2026-11-27-long", wait_until="load")
        page.screenshot(path=str(artifacts_dir / f"archive-long-{width}px.png"), full_page=True)
        fit = page.evaluate(WIDEST_OVERFLOW)
        assert fit["scrollWidth"] <= width, fit
        assert errors == []
    finally:
        context.close()


def test_links_between_served_pages_work(browser, served: str) -> None:
    """From the list to an issue, back to the list, and on to the signup form."""
    context, page, errors = _page(browser, 1280)
    try:
        page.goto(served + "/archive", wait_until="load")
        page.click(f"text={LONG_TITLE}")
        page.wait_for_url(served + "/archive/2026-11-27-long")
        page.click("header.site >> text=All issues")
        page.wait_for_url(served + "/archive")
        page.click("header.site >> text=Subscribe")
        page.wait_for_url(served + "/")
        assert page.locator("input[name=email]").count() == 1
        assert errors == []
    finally:
        context.close()


def test_the_static_export_works_from_disk(browser, site, tmp_path: Path, artifacts_dir: Path):
    """`archive build` output opened with file://: styled, images shown, links followed
    from the index to an issue and back."""
    settings, store = site
    out = tmp_path / "export"
    Archive(store, settings).build(out)
    context, page, errors = _page(browser, 375)
    try:
        page.goto((out / "index.html").as_uri(), wait_until="load")
        assert page.evaluate("getComputedStyle(document.body).margin") == "0px"
        page.screenshot(path=str(artifacts_dir / "archive-static-index-375px.png"), full_page=True)
        page.click("text=📬 Email that renders")
        page.wait_for_url((out / SLUG / "index.html").as_uri())
        assert page.locator("h1").inner_text().startswith("📬 Email that renders")
        chart = page.locator(".content img[src*='img1.']")
        assert chart.evaluate("img => img.naturalWidth") > 0
        fit = page.evaluate(WIDEST_OVERFLOW)
        assert fit["scrollWidth"] <= 375, fit
        page.screenshot(path=str(artifacts_dir / "archive-static-issue-375px.png"), full_page=True)
        page.click("header.site >> text=All issues")
        page.wait_for_url((out / "index.html").as_uri())
        feed = page.locator("link[rel=alternate]").get_attribute("href")
        assert (out / feed).is_file()
        assert errors == []
    finally:
        context.close()
