"""Where an issue lives on the web, read from its digest alone (no database).

The archive page's name (slug) comes from the front matter's ``slug``, else the file
name (``2026-11-20-weekly-links.md``), else the title when the file name says nothing
(``index.md`` of a page bundle). ``canonical_url`` names the blog post the "View in
browser" link should open instead, and ``archive: false`` keeps the issue out of the
archive. A slug is made unique when the issue is created (:mod:`newsletter.archive`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from slugify import slugify

from newsletter.config import Settings
from newsletter.digest import Digest
from newsletter.errors import DigestError

SLUG_MAX = 80
SLUG = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
# File names that name a post's folder or a draft, not the post: the title says more.
GENERIC_NAMES = frozenset(
    {"index", "_index", "readme", "post", "digest", "newsletter", "issue", "draft", "untitled"}
)
FALLBACK_SLUG = "issue"
_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})


@dataclass(frozen=True)
class Permalink:
    """An issue's place on the web: its archive slug, whether it is archived, and the
    link its email offers as "View in browser" (None: no link)."""

    slug: str
    listed: bool
    canonical_url: str | None
    view_url: str | None


def slug_of(text: str) -> str:
    """``text`` as a slug: lower-case ASCII words joined by hyphens (transliterated)."""
    return slugify(text, max_length=SLUG_MAX, word_boundary=True)


def archive_url(site_url: str, slug: str) -> str:
    """The archive page of ``slug`` on the site ``newsletter serve`` answers at."""
    return f"{site_url.rstrip('/')}/archive/{slug}"


def issue_slug(digest: Digest) -> str:
    """The slug the digest asks for: front matter ``slug``, file name, title, in that order."""
    explicit = digest.meta.get("slug")
    if explicit not in (None, ""):
        slug = slug_of(str(explicit)) if isinstance(explicit, str | int) else ""
        if not slug:
            raise DigestError(
                f"{digest.path}:{digest.field_line('slug')}: front matter field 'slug': "
                f"{explicit!r} has no letters or digits to make a web address of"
            )
        return slug
    stem = digest.path.stem
    if stem.lower() not in GENERIC_NAMES and (slug := slug_of(stem)):
        return slug
    return slug_of(digest.title) or FALLBACK_SLUG


def canonical_url(digest: Digest) -> str | None:
    """The post's own URL from front matter ``canonical_url``, checked to be http(s)."""
    raw = digest.meta.get("canonical_url")
    if raw in (None, ""):
        return None
    url = raw.strip() if isinstance(raw, str) else ""
    parts = urlsplit(url) if url and url.isascii() and not re.search(r"\s", url) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise DigestError(
            f"{digest.path}:{digest.field_line('canonical_url')}: front matter field "
            f"'canonical_url': {raw!r} is not an http(s) URL"
        )
    return url


def listed(digest: Digest) -> bool:
    """Front matter ``archive`` (true unless it says false, no or off)."""
    raw = digest.meta.get("archive")
    if raw is None or raw == "" or raw is True:
        return True
    if raw is False:
        return False
    word = str(raw).strip().lower()
    if word in _TRUE | _FALSE and not isinstance(raw, list | dict):
        return word in _TRUE
    raise DigestError(
        f"{digest.path}:{digest.field_line('archive')}: front matter field 'archive': "
        f"{raw!r} is not true or false"
    )


def permalink(digest: Digest, settings: Settings) -> Permalink:
    """Where the digest's issue will live, as far as the digest and settings can tell."""
    slug, is_listed, canonical = issue_slug(digest), listed(digest), canonical_url(digest)
    if canonical:
        view = canonical
    elif settings.archive and is_listed:
        view = archive_url(settings.site_url, slug)
    else:
        view = None
    return Permalink(slug, is_listed, canonical, view)
