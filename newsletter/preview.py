"""`newsletter preview`: a local page that shows a digest as its readers will get it.

One page, four views side by side: the email at 600 px, at 375 px, at 375 px with its
dark-mode rules applied, and the plain-text part; above them the subject, the preheader,
the size against Gmail's clipping and what `check` finds. A watcher thread renders again
when the digest, an image beside it or a template changes, and tells open pages over
server-sent events. A digest that cannot be rendered shows its one-line error, over the
last good render, until it can. The server listens on 127.0.0.1 only and answers only
requests addressed to it by that name, so no other site can read the digest through it.
"""

from __future__ import annotations

import errno
import json
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from lxml import html as lxml_html

from newsletter.config import Settings
from newsletter.digest import MUST_FIX, Digest, Finding, load_digest
from newsletter.errors import DigestError, InputError
from newsletter.render import (
    GMAIL_CLIP_BYTES,
    SAMPLE_RECIPIENT,
    RenderedIssue,
    default_templates_dir,
    markdown_to_html,
    render_issue,
)

HOST = "127.0.0.1"
DEFAULT_PORT = 8001
POLL_SECONDS = 0.25
KEEPALIVE_SECONDS = 15.0
WATCHED_ENTRIES_LIMIT = 1000
PAGE = default_templates_dir() / "preview" / "page.html"

ExtraFindings = Callable[[Digest, RenderedIssue], list[Finding]]

_HEAD = re.compile(r"<head\b[^>]*>", re.IGNORECASE)
_STYLE = re.compile(r"(<style\b[^>]*>)(.*?)(</style>)", re.IGNORECASE | re.DOTALL)
_DARK = re.compile(r"\(\s*prefers-color-scheme\s*:\s*dark\s*\)", re.IGNORECASE)
_LIGHT = re.compile(r"\(\s*prefers-color-scheme\s*:\s*light\s*\)", re.IGNORECASE)
_CID = re.compile(r"""(\bsrc\s*=\s*["'])cid:([^"']+)""", re.IGNORECASE)
_FRAME_POLICY = "script-src 'none'; object-src 'none'; base-uri 'self'"


@dataclass(frozen=True)
class Snapshot:
    """What the page shows at one moment: the last good render and the current error."""

    version: int
    issue: RenderedIssue | None
    findings: tuple[Finding, ...]
    error: str | None


class Preview:
    """A digest's latest render, made again when a watched file changes."""

    def __init__(
        self,
        path: Path,
        settings: Settings,
        extra_findings: ExtraFindings | None = None,
    ) -> None:
        if path.is_dir():
            raise DigestError(f"{path}: is a directory, not a digest file")
        if not path.is_file():
            raise DigestError(f"{path}: no such file")
        self.path = path
        self.settings = settings
        self._extra = extra_findings
        self._changed = threading.Condition()
        self._snapshot = Snapshot(0, None, (), None)
        self._fingerprint: tuple = ()
        self._images: tuple[Path, ...] = ()
        self.closed = False
        self.refresh()

    def snapshot(self) -> Snapshot:
        with self._changed:
            return self._snapshot

    def wait_for_change(self, seen: int, timeout: float) -> Snapshot:
        """The snapshot once its version differs from ``seen``, or after ``timeout``."""
        with self._changed:
            self._changed.wait_for(
                lambda: self.closed or self._snapshot.version != seen, timeout=timeout
            )
            return self._snapshot

    def refresh(self) -> bool:
        """Render again if a watched file changed since the last render; True if it did."""
        fingerprint = self._watched_state()
        if fingerprint == self._fingerprint:
            return False
        self._fingerprint = fingerprint
        previous = self.snapshot()
        issue, findings, error = previous.issue, previous.findings, None
        try:
            digest = load_digest(self.path)
            self._images = local_images(digest)
            issue = render_issue(digest, self.settings)
            findings = tuple(issue.findings if self._extra is None else self._extra(digest, issue))
        except DigestError as exc:
            error = str(exc)
        except Exception as exc:  # a template or library error must not stop the watcher
            error = f"{self.path}: cannot render: {type(exc).__name__}: {_one_line(exc)}"
        with self._changed:
            self._snapshot = Snapshot(previous.version + 1, issue, findings, error)
            self._changed.notify_all()
        return True

    def watch(self, stop: threading.Event, interval: float = POLL_SECONDS) -> None:
        """Poll the watched files until ``stop`` is set."""
        while not stop.wait(interval):
            self.refresh()

    def close(self) -> None:
        with self._changed:
            self.closed = True
            self._changed.notify_all()

    def _watched_state(self) -> tuple:
        state = []
        for path in self._watched_files():
            try:
                stat = path.stat()
            except OSError:
                state.append((str(path), None))
                continue
            state.append((str(path), stat.st_mtime_ns, stat.st_size, stat.st_ino))
        return tuple(state)

    def _watched_files(self) -> Iterator[Path]:
        """The digest, the local images it shows (there or not yet) and the template files."""
        yield self.path
        yield from self._images
        template_dirs = [self.settings.templates_dir, default_templates_dir()]
        for directory in dict.fromkeys(d for d in template_dirs if d is not None):
            yield from _files(directory, depth=4)


def local_images(digest: Digest) -> tuple[Path, ...]:
    """The files beside the digest that its images point at, whether they exist yet or not."""
    root = lxml_html.fragment_fromstring(markdown_to_html(digest.body), create_parent="div")
    found = []
    for img in root.iter("img"):
        src = unquote((img.get("src") or "").strip()).split("?", 1)[0].split("#", 1)[0]
        try:
            remote = bool(urlsplit(src).scheme) or src.startswith("//")
        except ValueError:
            continue
        if src and not remote:
            found.append(digest.path.parent / src)
    return tuple(dict.fromkeys(found))


def _files(directory: Path, depth: int) -> Iterator[Path]:
    """Files under ``directory`` and ``depth`` folders down, in a stable order, hidden names
    skipped; only the first entries are looked at, so a digest kept in a large folder stays
    cheap to poll."""
    pending = [(directory, depth)]
    looked_at = 0
    while pending:
        folder, left = pending.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError:
            continue
        below = []
        for entry in entries:
            looked_at += 1
            if looked_at > WATCHED_ENTRIES_LIMIT:
                return
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    if left > 0:
                        below.append((Path(entry.path), left - 1))
                elif entry.is_file():
                    yield Path(entry.path)
            except OSError:
                continue
        pending.extend(reversed(below))


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def email_html(issue: RenderedIssue, dark: bool = False) -> str:
    """The sample reader's email as a frame shows it: inline images served by the preview,
    links opening a new tab, and with ``dark`` the dark-mode rules in force."""
    html, _ = issue.personalize(SAMPLE_RECIPIENT)
    html = _CID.sub(lambda m: f"{m.group(1)}/image/{quote(m.group(2), safe='')}", html)
    head = '<base target="_blank">'
    if dark:
        html = _STYLE.sub(
            lambda m: (
                m.group(1)
                + _LIGHT.sub("(max-width: 0px)", _DARK.sub("(min-width: 0px)", m.group(2)))
                + m.group(3)
            ),
            html,
        )
        head += "<style>:root { color-scheme: dark; }</style>"
    match = _HEAD.search(html)
    if match is None:
        return head + html
    return html[: match.end()] + head + html[match.end() :]


def state(preview: Preview, snapshot: Snapshot) -> dict:
    """What the page needs to draw everything but the frames, as JSON-ready data."""
    issue = snapshot.issue
    data: dict = {
        "version": snapshot.version,
        "path": str(preview.path),
        "error": snapshot.error,
        "stale": snapshot.error is not None and issue is not None,
        "clip_bytes": GMAIL_CLIP_BYTES,
        "findings": [
            {
                "line": finding.line,
                "level": "error" if finding.severity == MUST_FIX else "warning",
                "message": finding.message,
            }
            for finding in snapshot.findings
        ],
    }
    if issue is not None:
        _, text = issue.personalize(SAMPLE_RECIPIENT)
        data |= {
            "subject": issue.subject,
            "preheader": issue.preheader,
            "html_bytes": len(issue.html.encode("utf-8")),
            "text_bytes": len(text.encode("utf-8")),
            "images": len(issue.images),
            "image_bytes": sum(len(image.data) for image in issue.images),
            "text": text,
        }
    return data


class PreviewServer(ThreadingHTTPServer):
    """The preview's HTTP server on 127.0.0.1, with the watcher thread it runs beside."""

    daemon_threads = True

    def __init__(self, preview: Preview, port: int, poll: float = POLL_SECONDS) -> None:
        self.preview = preview
        try:
            super().__init__((HOST, port), _Handler)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise InputError(
                    f"--port {port}: {HOST}:{port} is in use; choose another port"
                ) from None
            raise InputError(
                f"--port {port}: cannot listen on {HOST}:{port}: {exc.strerror}"
            ) from None
        self.port = self.server_address[1]
        self._stop = threading.Event()
        self._watcher = threading.Thread(
            target=preview.watch, args=(self._stop, poll), name="preview-watcher", daemon=True
        )
        self._watcher.start()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/"

    def allowed_hosts(self) -> frozenset[str]:
        return frozenset({f"{HOST}:{self.port}", f"localhost:{self.port}"})

    def close(self) -> None:
        """Stop the watcher, release waiting event streams and the socket."""
        self._stop.set()
        self.preview.close()
        self.server_close()
        self._watcher.join(timeout=5)


def open_preview(
    path: Path,
    settings: Settings,
    *,
    port: int | None = None,
    extra_findings: ExtraFindings | None = None,
    poll: float = POLL_SECONDS,
) -> PreviewServer:
    """Render the digest and listen; ``port`` None means the usual port, or any free one."""
    preview = Preview(path, settings, extra_findings)
    if port is not None:
        return PreviewServer(preview, port, poll)
    try:
        return PreviewServer(preview, DEFAULT_PORT, poll)
    except InputError:
        return PreviewServer(preview, 0, poll)


class _Handler(BaseHTTPRequestHandler):
    server: PreviewServer
    server_version = "newsletter-preview"

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the terminal shows the URL, not every request."""

    def do_GET(self) -> None:
        if self.headers.get("Host", "") not in self.server.allowed_hosts():
            self._send(HTTPStatus.MISDIRECTED_REQUEST, "text/plain", b"wrong host\n")
            return
        preview = self.server.preview
        route = urlsplit(self.path).path
        if route == "/":
            self._send(HTTPStatus.OK, "text/html; charset=utf-8", PAGE.read_bytes())
        elif route == "/state":
            body = json.dumps(state(preview, preview.snapshot())).encode("utf-8")
            self._send(HTTPStatus.OK, "application/json", body)
        elif route in ("/email/light", "/email/dark"):
            issue = preview.snapshot().issue
            html = email_html(issue, dark=route.endswith("dark")) if issue else ""
            self._send(HTTPStatus.OK, "text/html; charset=utf-8", html.encode("utf-8"))
        elif route.startswith("/image/"):
            self._image(unquote(route.removeprefix("/image/")))
        elif route == "/events":
            self._events()
        else:
            self._send(HTTPStatus.NOT_FOUND, "text/plain", b"not found\n")

    def _image(self, cid: str) -> None:
        issue = self.server.preview.snapshot().issue
        for image in issue.images if issue else ():
            if image.cid == cid:
                self._send(HTTPStatus.OK, image.content_type, image.data)
                return
        self._send(HTTPStatus.NOT_FOUND, "text/plain", b"no such image\n")

    def _send(self, status: HTTPStatus, kind: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        if self.path.startswith("/email/"):
            self.send_header("Content-Security-Policy", _FRAME_POLICY)
        self.end_headers()
        self.wfile.write(body)

    def _events(self) -> None:
        """Server-sent events: the version now, then each new one, and a comment to keep
        proxies and browsers from closing an idle stream."""
        preview = self.server.preview
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        seen = -1
        try:
            while not preview.closed:
                snapshot = preview.wait_for_change(seen, KEEPALIVE_SECONDS)
                if snapshot.version != seen:
                    seen = snapshot.version
                    self.wfile.write(f"data: {seen}\n\n".encode())
                else:
                    self.wfile.write(b": still here\n\n")
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            return
