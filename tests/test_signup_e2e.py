"""The whole signup life in a real browser against `newsletter serve` as a real process:
form, confirmation email over SMTP, confirm link, a digest sent by `newsletter send`,
RFC 8058 one-click unsubscribe, and the next send leaving the reader out."""

from __future__ import annotations

import email
import email.policy
import re
import shutil
import signal
from pathlib import Path

import pytest
from serving import Server, post

from newsletter import subscribers
from newsletter.store import open_store

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
DIGEST = ROOT / "digests" / "2026-11-20-weekly-links.md"


def _parse(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)


def test_signup_confirm_send_and_one_click_unsubscribe(
    server: Server, smtp_sink, browser, artifacts_dir: Path
) -> None:
    """A reader signs up in the browser, opens the email's link (which changes nothing) and
    presses its Confirm button with JavaScript off, gets the digest, leaves with the
    one-click POST of its List-Unsubscribe header and is left out of the next send."""
    with open_store(server.env["NEWSLETTER_DATABASE_URL"]) as store, store.begin() as session:
        subscribers.add(session, "bob@example.com", "Bob")
    page = browser.new_page(viewport={"width": 900, "height": 860})
    try:
        page.goto(f"{server.url}/")
        assert page.get_by_label("Email address").is_visible()
        trap = page.locator("#website").bounding_box()
        assert trap is not None and trap["x"] + trap["width"] <= 0  # off-screen: bots fill it
        page.screenshot(path=artifacts_dir / "signup-1-form.png", full_page=True)
        page.set_viewport_size({"width": 375, "height": 740})
        page.screenshot(path=artifacts_dir / "signup-1-form-phone.png", full_page=True)
        page.set_viewport_size({"width": 900, "height": 860})

        page.get_by_label("Email address").fill("ada@localhost")
        page.get_by_role("button", name="Subscribe").click()
        page.wait_for_load_state()
        assert page.locator("#email-error").is_visible()
        page.screenshot(path=artifacts_dir / "signup-2-form-error.png", full_page=True)

        page.get_by_label("Email address").fill("Ada@Example.com")
        page.get_by_label("Name").fill("Ada <b>Lovelace</b>")
        page.get_by_role("button", name="Subscribe").click()
        page.wait_for_url(f"{server.url}/thanks")
        assert page.get_by_role("heading", name="Check your inbox").is_visible()
        page.screenshot(path=artifacts_dir / "signup-3-thanks.png", full_page=True)

        [confirmation] = smtp_sink.wait_for(1, timeout=10)
        message = _parse(confirmation.data)
        assert confirmation.recipients == ("ada@example.com",)
        assert message["Subject"] == "Confirm your subscription to Weekly Links"
        assert "Lovelace" not in confirmation.data.decode()
        link = re.search(r"http://\S+/confirm/\S+", message.get_body(("plain",)).get_content())[0]
        assert server.status("ada@example.com") == "pending"
        inbox = browser.new_page(viewport={"width": 700, "height": 600})  # no CSP of ours
        inbox.set_content(message.get_body(("html",)).get_content())
        inbox.screenshot(path=artifacts_dir / "signup-3-confirmation-email.png", full_page=True)
        inbox.close()

        no_script = browser.new_context(
            java_script_enabled=False, viewport={"width": 900, "height": 860}
        )
        try:
            reader = no_script.new_page()
            reader.goto(link)  # what a mail scanner does too: it must not confirm
            assert reader.get_by_role("heading", name="Confirm your subscription").is_visible()
            reader.screenshot(path=artifacts_dir / "signup-4-confirm-button.png", full_page=True)
            assert server.status("ada@example.com") == "pending"
            reader.get_by_role("button", name="Confirm").click()  # a form POST, under our CSP
            reader.wait_for_load_state()
            welcome = reader.get_by_role("heading", name="You’re subscribed, Ada <b>Lovelace</b>!")
            assert welcome.count() and reader.url == link  # answered in place, no redirect
            reader.screenshot(path=artifacts_dir / "signup-4-confirmed.png", full_page=True)
        finally:
            no_script.close()
        assert server.status("ada@example.com") == "active"

        shutil.copy(DIGEST, server.cwd / "first.md")
        sent = server.newsletter("send", "first.md", "--yes")
        assert sent.returncode == 0, sent.stderr
        [issue] = smtp_sink.received_by("ada@example.com")[-1:]
        digest = _parse(issue.data)
        assert digest["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        unsubscribe_url = digest["List-Unsubscribe"].strip("<>")
        assert unsubscribe_url.startswith(f"{server.url}/unsubscribe/")
        assert len(smtp_sink.received_by("bob@example.com")) == 1

        page.goto(unsubscribe_url)  # what a mail scanner or a curious reader does: no change
        page.screenshot(path=artifacts_dir / "signup-5-unsubscribe.png", full_page=True)
        assert server.status("ada@example.com") == "active"

        response = post(unsubscribe_url, "List-Unsubscribe=One-Click")  # as Gmail does
        assert response.status == 200
        assert "Location" not in response.headers and "Set-Cookie" not in response.headers
        assert server.status("ada@example.com") == "unsubscribed"

        page.get_by_role("button", name="Unsubscribe").click()  # a second time is fine
        page.wait_for_load_state()
        assert page.get_by_role("heading", name="You are unsubscribed").is_visible()
        page.screenshot(path=artifacts_dir / "signup-6-unsubscribed.png", full_page=True)

        second = DIGEST.read_text("utf-8").replace("📬 Email that renders", "📬 A second issue")
        (server.cwd / "second.md").write_text(second, "utf-8")
        before = len(smtp_sink.messages)
        sent = server.newsletter("send", "second.md", "--yes")
        assert sent.returncode == 0, sent.stderr
        assert [r for m in smtp_sink.messages[before:] for r in m.recipients] == ["bob@example.com"]

        page.goto(f"{server.url}/confirm/forged.token")
        assert page.get_by_role("heading", name="This link does not work").is_visible()
        page.screenshot(path=artifacts_dir / "signup-7-bad-link.png", full_page=True)
    finally:
        page.close()
    assert server.stop(signal.SIGTERM) == 0
    assert "Traceback" not in (server.cwd / "serve.log").read_text()


def test_form_pasted_into_a_blog_posts_across_sites(
    server: Server, smtp_sink, browser, artifacts_dir: Path
) -> None:
    """The snippet from `serve --print-form`, on another origin, signs up and lands the
    reader on the thank-you page; SIGINT then stops the server with exit 0."""
    snippet = server.newsletter("serve", "--print-form")
    assert snippet.returncode == 0
    blog = (server.cwd / "blog").resolve()
    blog.mkdir()
    (blog / "post.html").write_text(
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>A blog post</title></head>"
        f"<body><h1>My blog</h1><p>Like this post? Subscribe:</p>{snippet.stdout}</body></html>",
        "utf-8",
    )
    page = browser.new_page(viewport={"width": 800, "height": 600})
    try:
        page.goto(blog.joinpath("post.html").as_uri())
        page.get_by_label("Email address").fill("reader@example.org")
        page.get_by_role("button", name="Subscribe to Weekly Links").click()
        page.wait_for_url(f"{server.url}/thanks")
        page.screenshot(path=artifacts_dir / "signup-8-from-blog-thanks.png", full_page=True)
    finally:
        page.close()
    assert smtp_sink.wait_for(1, timeout=10)[0].recipients == ("reader@example.org",)
    assert server.status("reader@example.org") == "pending"
    too_big = post(f"{server.url}/subscribe", "email=a%40example.com&name=" + "x" * 100_000)
    assert too_big.status == 413 and b"<h1>That was too much</h1>" in too_big.body
    assert server.stop(signal.SIGINT) == 0
