"""`newsletter preview`: the page, its live reload, a browser looking at it, and bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner

from newsletter.cli import main
from newsletter.config import load_settings
from newsletter.preview import DEFAULT_PORT, PreviewServer, open_preview

DIGEST = """---
title: "Weekly links: number one"
description: A preheader readers see in their inbox list.
---
Hello {{ name }}, the first paragraph of the digest.

* [A link](https://example.com/one)

![A chart](chart.png)
"""
WAIT = 20.0  # generous: the suite may share two cores with another copy of itself
EXIT_WAIT = 60.0  # a whole interpreter winding down on a machine that busy


def _get(url: str, host: str | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def _state(server: PreviewServer) -> dict:
    return json.loads(_get(server.url + "state")[2])


def _write(path: Path, text: str) -> None:
    """Write as an editor that saves by renaming does (a new inode each time)."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, "utf-8")
    os.replace(temporary, path)


@pytest.fixture
def digest_dir(clean_env: Path, fixtures_dir: Path) -> Path:
    """A digest with an image beside it."""
    (clean_env / "digest.md").write_text(DIGEST, "utf-8")
    shutil.copy(fixtures_dir / "chart.png", clean_env / "chart.png")
    return clean_env


@pytest.fixture
def preview_server(digest_dir: Path) -> Iterator[PreviewServer]:
    """The preview of digest.md served in a thread on a free port, as the CLI runs it."""
    settings = load_settings({}, dotenv_path=digest_dir / ".env")
    server = open_preview(digest_dir / "digest.md", settings, port=0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.close()
        thread.join(timeout=10)


def _wait_for_version(server: PreviewServer, after: int) -> dict:
    server.preview.wait_for_change(after, WAIT)
    return _state(server)


def test_page_and_parts_are_served(preview_server: PreviewServer) -> None:
    """The page has the three frames and the text view; the state names subject, preheader
    and size; the frames get the sample reader's email with its image served locally."""
    status, _, page = _get(preview_server.url)
    assert status == 200
    for frame in (b'id="frame-600"', b'id="frame-375"', b'id="frame-dark"', b'id="text"'):
        assert frame in page
    state = _state(preview_server)
    assert state["subject"] == "Weekly links: number one"
    assert state["preheader"] == "A preheader readers see in their inbox list."
    assert 0 < state["html_bytes"] < state["clip_bytes"] == 102 * 1024
    assert "Hello Sample Reader, the first paragraph" in state["text"]
    assert state["error"] is None and state["findings"] == []
    status, headers, light = _get(preview_server.url + "email/light")
    assert status == 200 and "script-src 'none'" in headers["Content-Security-Policy"]
    assert b"Hello Sample Reader" in light and b"cid:" not in light
    image = light.split(b'src="/image/', 1)[1].split(b'"', 1)[0].decode()
    status, headers, data = _get(preview_server.url + "image/" + image)
    assert status == 200 and headers["Content-Type"] == "image/png"
    assert data.startswith(b"\x89PNG")


def test_dark_frame_applies_the_dark_rules(preview_server: PreviewServer) -> None:
    """The dark frame's stylesheet has the prefers-color-scheme: dark rules always on."""
    light = _get(preview_server.url + "email/light")[2].decode()
    dark = _get(preview_server.url + "email/dark")[2].decode()
    assert "(prefers-color-scheme: dark)" in light
    assert "(prefers-color-scheme: dark)" not in dark
    assert "@media (min-width: 0px)" in dark and "color-scheme: dark" in dark


def test_other_host_names_are_refused(preview_server: PreviewServer) -> None:
    """A request addressed to another name (DNS rebinding) gets nothing of the digest."""
    status, _, body = _get(preview_server.url + "state", host="attacker.example")
    assert status == 421 and b"Weekly" not in body


def test_broken_digest_shows_its_error_and_keeps_watching(
    preview_server: PreviewServer, digest_dir: Path
) -> None:
    """Broken front matter shows the one-line error over the last good render; fixing the
    file brings the new render back, without restarting anything."""
    before = _state(preview_server)["version"]
    _write(digest_dir / "digest.md", "---\ntitle: [unclosed\n---\nbody\n")
    state = _wait_for_version(preview_server, before)
    assert re.search(r"digest\.md:\d+: front matter \(YAML\): ", state["error"])
    assert "\n" not in state["error"]
    assert state["stale"] and state["subject"] == "Weekly links: number one"
    _write(digest_dir / "digest.md", DIGEST.replace("number one", "number two"))
    state = _wait_for_version(preview_server, state["version"])
    assert state["error"] is None and state["subject"] == "Weekly links: number two"


def test_image_and_template_changes_render_again(digest_dir: Path, fixtures_dir: Path) -> None:
    """Replacing the image beside the digest, or editing a template, renders again."""
    templates = digest_dir / "templates"
    shutil.copytree(Path(__file__).resolve().parents[1] / "templates", templates)
    settings = load_settings(
        {"NEWSLETTER_TEMPLATES_DIR": str(templates)}, dotenv_path=digest_dir / ".env"
    )
    server = open_preview(digest_dir / "digest.md", settings, port=0, poll=0.05)
    try:
        first = server.preview.snapshot()
        (digest_dir / "chart.png").write_bytes(
            (fixtures_dir / "chart.png").read_bytes() + b"\0" * 16
        )
        second = server.preview.wait_for_change(first.version, WAIT)
        assert second.version > first.version
        assert second.issue.images[0].data.endswith(b"\0" * 16)
        email = templates / "email.html"
        email.write_text(email.read_text("utf-8").replace("<body", "<!-- edited -->\n<body"))
        third = server.preview.wait_for_change(second.version, WAIT)
        assert "<!-- edited -->" in third.issue.html
    finally:
        server.close()


def test_image_added_later_is_picked_up(digest_dir: Path, fixtures_dir: Path) -> None:
    """An image the digest shows but that is not there yet: once it is saved beside the
    digest, the render takes it and the 'cannot be resolved' error goes away."""
    _write(digest_dir / "digest.md", DIGEST.replace("chart.png", "images/later.png"))
    settings = load_settings({}, dotenv_path=digest_dir / ".env")
    server = open_preview(digest_dir / "digest.md", settings, port=0, poll=0.05)
    try:
        first = server.preview.snapshot()
        assert any("images/later.png" in finding.message for finding in first.findings)
        (digest_dir / "images").mkdir()
        shutil.copy(fixtures_dir / "chart.png", digest_dir / "images" / "later.png")
        second = server.preview.wait_for_change(first.version, WAIT)
        assert [image.filename for image in second.issue.images] == ["later.png"]
        assert not any("later.png" in finding.message for finding in second.findings)
    finally:
        server.close()


def test_default_port_taken_falls_back_to_a_free_one(digest_dir: Path) -> None:
    """Without --port, a taken default port means another free port, not an error."""
    settings = load_settings({}, dotenv_path=digest_dir / ".env")
    with socket.socket() as holder:
        try:
            holder.bind(("127.0.0.1", DEFAULT_PORT))
            holder.listen()
        except OSError:
            pass  # someone else holds it: the same situation
        server = open_preview(digest_dir / "digest.md", settings)
        try:
            assert server.port != DEFAULT_PORT
            assert server.url == f"http://127.0.0.1:{server.port}/"
        finally:
            server.close()


def test_unrenderable_at_start_still_serves(digest_dir: Path) -> None:
    """A digest broken from the start: the server runs and the page shows why."""
    _write(digest_dir / "digest.md", "no title here\n")
    settings = load_settings({}, dotenv_path=digest_dir / ".env")
    server = open_preview(digest_dir / "digest.md", settings, port=0)
    try:
        snapshot = server.preview.snapshot()
        assert snapshot.issue is None
        assert snapshot.error.endswith(
            "digest.md:1: no title: add 'title:' to the front matter or a '# heading' to the text"
        )
    finally:
        server.close()


@pytest.mark.browser
def test_browser_sees_frames_text_and_live_edit(
    browser, preview_server: PreviewServer, digest_dir: Path, artifacts_dir: Path
) -> None:
    """Chromium shows the email in three frames and the text part; an edit of the digest
    appears in every view within 3 s with no reload of the page."""
    page = browser.new_page(viewport={"width": 2100, "height": 1000})
    try:
        page.goto(preview_server.url)
        from playwright.sync_api import expect

        expect(page.locator("#subject")).to_have_text("Weekly links: number one")
        for frame_id in ("frame-600", "frame-375", "frame-dark"):
            body = page.frame_locator(f"#{frame_id}").locator("body")
            expect(body).to_contain_text("Hello Sample Reader, the first paragraph")
        expect(page.locator("#text")).to_contain_text("Hello Sample Reader, the first paragraph")
        for frame_id, width in (("frame-600", 600), ("frame-375", 375), ("frame-dark", 375)):
            inner = page.frame_locator(f"#{frame_id}").locator("html")
            assert inner.evaluate("() => window.innerWidth") == width
        dark_background = page.frame_locator("#frame-dark").locator(".nl-container").first
        expect(dark_background).to_have_css("background-color", "rgb(22, 27, 34)")
        light_background = page.frame_locator("#frame-600").locator(".nl-container").first
        expect(light_background).to_have_css("background-color", "rgb(255, 255, 255)")
        page.screenshot(path=str(artifacts_dir / "preview.png"))

        page.evaluate("window.notReloaded = true")
        edited = DIGEST.replace("the first paragraph", "an edited paragraph")
        _write(digest_dir / "digest.md", edited.replace("![A chart]", "![]"))
        for frame_id in ("frame-600", "frame-375", "frame-dark"):
            body = page.frame_locator(f"#{frame_id}").locator("body")
            expect(body).to_contain_text("an edited paragraph", timeout=3000)
        expect(page.locator("#text")).to_contain_text("an edited paragraph", timeout=3000)
        expect(page.locator("#findings")).to_contain_text("digest.md:9: warning: image")
        assert page.evaluate("window.notReloaded") is True
        page.screenshot(path=str(artifacts_dir / "preview-edited.png"))

        _write(digest_dir / "digest.md", "---\ntitle: [unclosed\n---\n")
        expect(page.locator("#error")).to_contain_text("front matter (YAML)", timeout=3000)
        page.screenshot(path=str(artifacts_dir / "preview-error.png"))
    finally:
        page.close()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def _cli(cwd: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """`newsletter preview ARGS` as a process, killed afterwards if a test left it running."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    with subprocess.Popen(
        [sys.executable, "-m", "newsletter", "preview", *args],
        cwd=cwd,
        env=environment | (env or {}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            yield process
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def test_cli_prints_url_serves_and_stops_on_ctrl_c(digest_dir: Path) -> None:
    """`preview --no-open` prints its URL, serves there, and Ctrl-C ends it with exit 0."""
    port = _free_port()
    with _cli(digest_dir, "digest.md", "--no-open", "--port", str(port)) as process:
        line = process.stdout.readline()
        assert line == f"previewing digest.md at http://127.0.0.1:{port}/ (Ctrl-C to stop)\n"
        state = json.loads(_get(f"http://127.0.0.1:{port}/state")[2])
        assert state["subject"] == "Weekly links: number one"
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=EXIT_WAIT) == 0


def test_cli_stops_on_sigterm_as_a_supervisor_sends_it(digest_dir: Path) -> None:
    """SIGTERM ends the preview as cleanly as Ctrl-C: exit 0, the port free again."""
    port = _free_port()
    with _cli(digest_dir, "digest.md", "--no-open", "--port", str(port)) as process:
        assert process.stdout.readline().startswith("previewing")
        assert _get(f"http://127.0.0.1:{port}/state")[0] == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=EXIT_WAIT) == 0
        assert process.stderr.read().splitlines()[-1] == "preview stopped"
        with socket.socket() as again:  # no listener left (only connections in TIME_WAIT)
            again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            again.bind(("127.0.0.1", port))


def test_cli_opens_the_browser(digest_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Without --no-open the page is opened in the user's browser ($BROWSER here)."""
    bin_dir = tmp_path_factory.mktemp("bin")
    opened = bin_dir / "opened.txt"
    script = bin_dir / "browser"
    script.write_text(f'#!/bin/sh\necho "$1" > {opened}.tmp && mv {opened}.tmp {opened}\n')
    script.chmod(0o755)
    port = _free_port()
    browser = {"BROWSER": str(script)}
    with _cli(digest_dir, "digest.md", "--port", str(port), env=browser) as process:
        assert process.stdout.readline().startswith("previewing")
        deadline = time.monotonic() + WAIT
        while not opened.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert opened.read_text().strip() == f"http://127.0.0.1:{port}/"
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=EXIT_WAIT) == 0


def test_missing_digest_is_one_line_exit_2(runner: CliRunner, clean_env: Path) -> None:
    """A digest that does not exist: one line naming it, exit 2, nothing served."""
    result = runner.invoke(main, ["preview", "nowhere.md", "--no-open", "--port", "0"])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == ["error: nowhere.md: no such file"]
    assert result.stdout == ""


def test_directory_is_not_a_digest(runner: CliRunner, clean_env: Path) -> None:
    """A directory given as the digest is bad usage: exit 2."""
    (clean_env / "posts").mkdir()
    result = runner.invoke(main, ["preview", "posts", "--no-open"])
    assert result.exit_code == 2
    assert "posts" in result.stderr


def test_port_in_use_is_one_line_exit_2(runner: CliRunner, digest_dir: Path) -> None:
    """An explicit --port that another program holds: one line naming it, exit 2."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runner.invoke(main, ["preview", "digest.md", "--no-open", "--port", str(port)])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"error: --port {port}: 127.0.0.1:{port} is in use; choose another port"
    ]
    assert result.stdout == ""
