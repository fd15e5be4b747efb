"""The archive: every issue that went to subscribers, as web pages, an Atom feed and a
static export.

An issue gets its page when it is created (:mod:`newsletter.archive_pages`). What the web
app serves and what ``newsletter archive build`` writes are the same pages, rendered
by :class:`Archive` with links either to the served routes or relative between files.

A page shows the newest send of its slug; that send's ``archived`` flag decides
whether it is shown at all (``archive: false`` in the front matter, or
``newsletter issues archive ID --off``).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path

from feedgen.feed import FeedGenerator
from markupsafe import Markup
from sqlalchemy import and_, exists, func, select, true, update
from sqlalchemy.orm import Session, aliased

from newsletter.archive_pages import ASSETS
from newsletter.config import Settings
from newsletter.errors import ConfigError, InputError
from newsletter.permalink import SLUG, archive_url
from newsletter.render import template_environment
from newsletter.store import ArchivePage, Issue, Store, utcnow

PAGE_SIZE = 20  # issues per page of /archive
FEED_ENTRIES = 20  # newest issues in the feed
IMAGE_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,99}")
MANIFEST = ".newsletter-archive.json"  # what `archive build` wrote, so it may replace it


# Reading the archive ---------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """An issue as the archive lists it."""

    id: int
    slug: str
    subject: str
    preheader: str | None
    sent_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class Listing:
    """One page of the archive's list, newest first."""

    entries: list[Entry]
    page: int
    pages: int
    updated_at: datetime | None


@dataclass(frozen=True)
class Image:
    """An inline image of an issue, served beside its page."""

    name: str
    content_type: str
    data: bytes


@dataclass(frozen=True)
class Content:
    """What an issue's page shows (stored with the issue by :func:`place`)."""

    title: str
    byline: str | None
    lang: str
    canonical_url: str | None
    description: str
    image: str | None
    body: str
    images: dict[str, Image]

    @classmethod
    def load(cls, blob: bytes) -> Content:
        data = json.loads(blob)
        images = {
            i["name"]: Image(i["name"], i["content_type"], base64.b64decode(i["data"]))
            for i in data["images"]
        }
        return cls(
            data["title"],
            data["byline"],
            data["lang"],
            data["canonical_url"],
            data["description"],
            data["image"],
            data["body"],
            images,
        )

    def html(self, assets: str) -> Markup:
        """The content with its images at ``assets`` (a URL prefix ending in '/')."""
        return Markup(self.body.replace(ASSETS, assets))


# A page is made with its issue, whose send starts then: every issue with a page went to
# subscribers. Shown is the newest page of each slug, if it is archived; the list and the
# feed read this table alone (and its index), not the large rows of ``issues``.
_Newer = aliased(ArchivePage)
_SUPERSEDED = exists().where(
    _Newer.slug == ArchivePage.slug, _Newer.issue_id > ArchivePage.issue_id
)
_VISIBLE = and_(ArchivePage.archived == true(), ~_SUPERSEDED)
_ENTRY = (
    select(
        ArchivePage.issue_id,
        ArchivePage.slug,
        Issue.subject,
        ArchivePage.preheader,
        func.coalesce(Issue.started_at, Issue.created_at),
        ArchivePage.updated_at,
    )
    .join(Issue, Issue.id == ArchivePage.issue_id)
    .where(_VISIBLE)
)


def _entry(row) -> Entry:
    return Entry(*row)


def listing(session: Session, page: int | None = 1) -> Listing | None:
    """Page ``page`` of the archive (None: every issue on one page); None when there is
    no such page."""
    total = session.scalar(select(func.count()).select_from(ArchivePage).where(_VISIBLE)) or 0
    pages = max(1, math.ceil(total / PAGE_SIZE)) if page is not None else 1
    if page is not None and not 1 <= page <= pages:
        return None
    query = _ENTRY.order_by(ArchivePage.issue_id.desc())
    if page is not None:
        query = query.offset((page - 1) * PAGE_SIZE).limit(PAGE_SIZE)
    entries = [_entry(row) for row in session.execute(query)]
    return Listing(entries, page or 1, pages, last_change(session))


def last_change(session: Session) -> datetime | None:
    """When the archive last changed: an issue added, or one taken out or put back."""
    return session.scalar(select(func.max(ArchivePage.updated_at)))


def find(session: Session, slug: str) -> Entry | None:
    """The issue shown at ``slug``; None for a name that is not a slug or not shown."""
    if not SLUG.fullmatch(slug):
        return None
    row = session.execute(_ENTRY.where(ArchivePage.slug == slug)).first()
    return _entry(row) if row else None


def newest(session: Session) -> Entry | None:
    """The issue sent last that the archive shows."""
    row = session.execute(_ENTRY.order_by(ArchivePage.issue_id.desc()).limit(1)).first()
    return _entry(row) if row else None


def load_content(session: Session, issue_id: int) -> Content:
    """What the page of issue ``issue_id`` shows."""
    blob = session.scalar(select(ArchivePage.content).where(ArchivePage.issue_id == issue_id))
    if blob is None:
        raise InputError(f"issue {issue_id}: has no archive page")
    return Content.load(blob)


@dataclass(frozen=True)
class Placement:
    """An issue's archive page and whether the archive shows it."""

    issue_id: int
    slug: str
    archived: bool
    shown_by: int | None  # the issue the page shows (a later send of the digest), if any


def set_archived(store: Store, issue_id: int, archived: bool | None) -> Placement:
    """Put the page of issue ``issue_id`` in the archive or take it out (None: only look).
    Every send of the digest shares the page, so the flag is set on all of them."""
    with store.write() as session:
        page = session.get(ArchivePage, issue_id)
        if page is None:
            if session.get(Issue, issue_id) is None:
                raise InputError(f"issue {issue_id}: no such issue")
            raise InputError(f"issue {issue_id}: has no archive page")
        if archived is not None:
            session.execute(
                update(ArchivePage)
                .where(ArchivePage.slug == page.slug)
                .values(archived=archived, updated_at=utcnow())
            )
            session.flush()
            session.refresh(page)
        shown = find(session, page.slug)
        return Placement(issue_id, page.slug, page.archived, shown.id if shown else None)


# Pages ---------------------------------------------------------------------------------


class Links:
    """Where the pages of the served archive are (absolute paths on the site)."""

    def __init__(self, site_url: str) -> None:
        self.site_url = site_url.rstrip("/")

    def index(self, page: int = 1) -> str:
        return "/archive" if page == 1 else f"/archive?page={page}"

    def issue(self, slug: str) -> str:
        return f"/archive/{slug}"

    def assets(self, slug: str) -> str:
        return f"/archive/{slug}/"

    def feed(self) -> str:
        return "/feed.xml"

    def css(self) -> str:
        return "/archive/style.css"

    def signup(self) -> str:
        return "/"

    def absolute(self, link: str) -> str | None:
        """``link`` (one of the above) as a full URL; None when it cannot be known."""
        return self.site_url + link


class StaticLinks(Links):
    """Relative links between the files of ``archive build``: the index at the top, one
    folder per issue (its page is ``SLUG/index.html``); they work from ``file://`` too.
    The signup form stays on the served site."""

    def __init__(self, site_url: str, base_url: str | None, depth: int) -> None:
        super().__init__(site_url)
        self.base_url = base_url.rstrip("/") + "/" if base_url else None
        self.up = "../" * depth

    def index(self, page: int = 1) -> str:
        return f"{self.up}index.html"

    def issue(self, slug: str) -> str:
        return f"{self.up}{slug}/index.html"

    def assets(self, slug: str) -> str:
        return f"{self.up}{slug}/"

    def feed(self) -> str:
        return f"{self.up}feed.xml"

    def css(self) -> str:
        return f"{self.up}style.css"

    def signup(self) -> str:
        return f"{self.site_url}/"

    def absolute(self, link: str) -> str | None:
        if link.startswith(("http://", "https://")):
            return link
        if self.base_url is None:
            return None
        path = link.removeprefix(self.up)
        return self.base_url + path.removesuffix("index.html")


@dataclass
class Archive:
    """The archive's pages and feed for one site (its settings and database)."""

    store: Store
    settings: Settings
    _contents: dict[int, Content] = field(default_factory=dict, repr=False)

    @cached_property
    def _env(self):
        return template_environment(self.settings.templates_dir)

    def stylesheet(self) -> bytes:
        return self._env.get_template("archive/style.css").render().encode("utf-8")

    def content(self, session: Session, entry: Entry) -> Content:
        """An issue's content, read once per process: it never changes after the send."""
        found = self._contents.get(entry.id)
        if found is None:
            if len(self._contents) >= 256:
                self._contents.clear()
            found = self._contents[entry.id] = load_content(session, entry.id)
        return found

    def _date(self, when: datetime) -> str:
        local = when.astimezone(self.settings.tz)
        return f"{local.day} {local:%B %Y}"

    def index_page(self, listing: Listing, links: Links) -> str:
        """The list of issues, newest first, with links to the other pages."""
        return self._env.get_template("archive/index.html").render(
            list_name=self.settings.list_name,
            listing=listing,
            links=links,
            date=self._date,
            og_url=links.absolute(links.index(listing.page)),
        )

    def issue_page(self, entry: Entry, content: Content, links: Links) -> str:
        """An issue as a web page."""
        own = links.issue(entry.slug)
        return self._env.get_template("archive/issue.html").render(
            list_name=self.settings.list_name,
            entry=entry,
            page=content,
            body=content.html(links.assets(entry.slug)),
            links=links,
            date=self._date,
            og_url=links.absolute(own),
            canonical=content.canonical_url or links.absolute(own),
        )

    def feed(self, session: Session, links: Links) -> bytes:
        """The Atom feed of the newest issues, each with its full content."""
        site = self.settings.site_url
        generator = FeedGenerator()
        generator.id(archive_url(site, "").rstrip("/"))
        generator.title(self.settings.list_name)
        generator.author({"name": self.settings.list_name})
        index = links.absolute(links.index()) or links.index()
        generator.link(href=index, rel="alternate", type="text/html")
        feed = links.absolute(links.feed())
        if feed:
            generator.link(href=feed, rel="self", type="application/atom+xml")
        generator.updated(last_change(session) or datetime(1970, 1, 1, tzinfo=UTC))
        newest = _ENTRY.order_by(ArchivePage.issue_id.desc()).limit(FEED_ENTRIES)
        rows = session.execute(newest).all()
        for entry in map(_entry, rows):
            page = self.content(session, entry)
            item = generator.add_entry(order="append")
            item.id(archive_url(site, entry.slug))
            item.title(entry.subject)
            own = links.issue(entry.slug)
            item.link(href=links.absolute(own) or own, rel="alternate", type="text/html")
            item.published(entry.sent_at)
            item.updated(entry.updated_at)
            if page.description:
                item.summary(page.description)
            assets = links.assets(entry.slug)
            item.content(page.html(links.absolute(assets) or assets), type="html")
        return generator.atom_str(pretty=True)

    # The static export ----------------------------------------------------------------

    def build(self, directory: Path, base_url: str | None = None) -> BuildReport:
        """Write the archive into ``directory``: ``index.html``, ``feed.xml``,
        ``style.css`` and a folder per issue. A file is written (atomically) only when its
        bytes change, and files an earlier build wrote that are no longer part of the
        archive are removed; anything else in the folder is left alone, and a file in the
        way that an earlier build did not write stops the build before it writes."""
        if not self.settings.archive:
            raise ConfigError("NEWSLETTER_ARCHIVE is off: there is no archive to build")
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise InputError(f"{directory}: is not a folder")
        previous = _read_manifest(directory)
        report = BuildReport(directory)
        wanted: list[str] = []
        with self.store.session() as session:
            listing_ = listing(session, None)
            assert listing_ is not None
            _refuse_foreign(
                directory,
                previous,
                ["index.html", "feed.xml", "style.css"] + [e.slug for e in listing_.entries],
            )
            top = StaticLinks(self.settings.site_url, base_url, 0)
            inner = StaticLinks(self.settings.site_url, base_url, 1)
            files = [
                ("index.html", self.index_page(listing_, top).encode("utf-8")),
                ("feed.xml", self.feed(session, top)),
                ("style.css", self.stylesheet()),
            ]
            for name, data in files:
                report.count(_write_if_changed(directory / name, data), name)
                wanted.append(name)
            for entry in listing_.entries:
                page = self.content(session, entry)
                name = f"{entry.slug}/index.html"
                html_ = self.issue_page(entry, page, inner).encode("utf-8")
                report.count(_write_if_changed(directory / name, html_), name)
                wanted.append(name)
                for image in page.images.values():
                    name = f"{entry.slug}/{image.name}"
                    report.count(_write_if_changed(directory / name, image.data), name)
                    wanted.append(name)
        report.issues = len(listing_.entries)
        for name in sorted(set(previous) - set(wanted)):
            path = directory / name
            if path.is_file():
                path.unlink()
                report.removed.append(name)
            if path.parent != directory:
                with contextlib.suppress(OSError):  # not empty: something of the user's
                    path.parent.rmdir()
        manifest = json.dumps(sorted(wanted), indent=0).encode("utf-8") + b"\n"
        _write_if_changed(directory / MANIFEST, manifest)
        return report


@dataclass
class BuildReport:
    """What ``archive build`` did."""

    directory: Path
    issues: int = 0
    written: list[str] = field(default_factory=list)
    unchanged: int = 0
    removed: list[str] = field(default_factory=list)

    def count(self, written: bool, name: str) -> None:
        if written:
            self.written.append(name)
        else:
            self.unchanged += 1


def _read_manifest(directory: Path) -> list[str]:
    try:
        names = json.loads((directory / MANIFEST).read_bytes())
    except FileNotFoundError:
        return []
    except (OSError, ValueError):
        raise InputError(f"{directory / MANIFEST}: cannot be read; remove it") from None
    safe = re.compile(r"(?:[a-z0-9-]+/)?[a-z0-9][a-z0-9._-]*")
    return [n for n in names if isinstance(n, str) and safe.fullmatch(n) and ".." not in n]


def _refuse_foreign(directory: Path, previous: list[str], names: list[str]) -> None:
    """Stop before overwriting what an earlier build did not write (a blog's own index)."""
    ours = set(previous) | {n.split("/", 1)[0] for n in previous}
    for name in names:
        if name not in ours and (directory / name).exists():
            raise InputError(
                f"{directory / name}: is in the way and was not written by `archive build`; "
                "build into an empty folder or move it"
            )


def _write_if_changed(path: Path, data: bytes) -> bool:
    """Write ``data`` to ``path`` unless it already holds exactly that; atomically (a
    temporary file renamed over it), so a reader never sees half a page."""
    try:
        if path.stat().st_size == len(data) and path.read_bytes() == data:
            return False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return True


def etag(data: bytes) -> str:
    """A strong validator of a response body."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


# The served archive ---------------------------------------------------------------------


def state(session: Session) -> tuple:
    """What the archive's lists depend on, read from an index: how many pages there are,
    how many are archived, and when one last changed. Any change of what is shown
    changes it."""
    return tuple(
        session.execute(
            select(
                func.count(),
                func.count().filter(ArchivePage.archived == true()),
                func.max(ArchivePage.updated_at),
            ).select_from(ArchivePage)
        ).one()
    )


@dataclass(frozen=True)
class Body:
    """A finished answer: its bytes, their validator, and when what they show changed."""

    data: bytes
    modified: datetime | None
    etag: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "etag", etag(self.data))


class Site:
    """The archive as ``newsletter serve`` answers it. Each page is rendered once for a
    state of the archive (an issue's page: once for its issue) and kept, so an answer
    costs the query that finds the key."""

    CACHED = 512

    def __init__(self, archive: Archive) -> None:
        self.archive = archive
        self.links = Links(archive.settings.site_url)
        self._bodies: dict[tuple, Body] = {}

    def _kept(self, key: tuple, make: Callable[[], Body | None]) -> Body | None:
        body = self._bodies.get(key)
        if body is None:
            body = make()
            if body is not None:
                if len(self._bodies) >= self.CACHED:
                    self._bodies.clear()
                self._bodies[key] = body
        return body

    def index(self, page: int) -> Body | None:
        """Page ``page`` of the list; None when there is no such page."""

        with self.archive.store.session() as session:

            def make() -> Body | None:
                found = listing(session, page)
                if found is None:
                    return None
                html = self.archive.index_page(found, self.links)
                return Body(html.encode("utf-8"), found.updated_at)

            return self._kept(("index", page, state(session)), make)

    def issue(self, slug: str) -> Body | None:
        """The page of the issue shown at ``slug``; None when none is."""
        with self.archive.store.session() as session:
            entry = find(session, slug)
            if entry is None:
                return None

            def make() -> Body:
                content = self.archive.content(session, entry)
                html = self.archive.issue_page(entry, content, self.links)
                return Body(html.encode("utf-8"), entry.updated_at)

            return self._kept(("issue", entry.id, entry.updated_at), make)

    def image(self, slug: str, name: str) -> tuple[Image, datetime] | None:
        """An image of the issue shown at ``slug``, and when that page appeared."""
        with self.archive.store.session() as session:
            entry = find(session, slug)
            if entry is None:
                return None
            image = self.archive.content(session, entry).images.get(name)
        return (image, entry.updated_at) if image is not None else None

    def feed(self) -> Body:
        """The Atom feed."""
        with self.archive.store.session() as session:

            def make() -> Body:
                return Body(self.archive.feed(session, self.links), last_change(session))

            body = self._kept(("feed", state(session)), make)
        assert body is not None
        return body

    def newest(self) -> str | None:
        """The address of the newest shown issue's page."""
        with self.archive.store.session() as session:
            entry = newest(session)
        return self.links.issue(entry.slug) if entry is not None else None
