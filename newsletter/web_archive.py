"""The archive's routes in ``newsletter serve``; the pages come from :mod:`newsletter.archive`.

    GET /archive                  sent issues, newest first (``?page=N``)
    GET /archive/SLUG             one issue as a web page
    GET /archive/SLUG/IMAGE       an image that went inside the email
    GET /archive/style.css        the pages' stylesheet
    GET /feed.xml                 Atom feed of the newest issues, full content
    GET /latest                   302 to the newest issue's page

Every answer carries ``ETag`` and ``Last-Modified`` and answers a matching conditional
request with ``304``. Anything that is not a shown issue's slug is the site's 404 page,
and so is every route while ``NEWSLETTER_ARCHIVE`` is off.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from flask import Blueprint, Response, abort, current_app, g, redirect
from flask import request as flask_request
from flask.sansio.blueprints import BlueprintSetupState

from newsletter import archive
from newsletter.permalink import SLUG
from newsletter.web import security_headers

bp = Blueprint("archive", __name__)


@dataclass(frozen=True)
class _Site:
    """What the routes need, kept on the app (``app.extensions["newsletter_archive"]``)."""

    archive: archive.Archive
    links: archive.Links
    css: bytes
    headers: tuple[tuple[str, str], ...]


@bp.record_once
def _setup(state: BlueprintSetupState) -> None:
    context = state.app.extensions["newsletter"]
    pages = archive.Archive(context.store, context.settings)
    state.app.extensions["newsletter_archive"] = _Site(
        pages,
        archive.Links(context.settings.site_url),
        pages.stylesheet(),
        # The signup pages' headers, but an issue shows the same pictures as its email
        # (video thumbnails, the blog's images), from any https site.
        security_headers(context.settings, False, images="'self' data: https:"),
    )


def _site() -> _Site:
    site: _Site = current_app.extensions["newsletter_archive"]
    g.security_headers = site.headers
    if not site.archive.settings.archive:
        abort(404)
    return site


def _conditional(body: bytes, mimetype: str, modified: datetime | None) -> Response:
    response = Response(body, mimetype=mimetype)
    response.set_etag(archive.etag(body))
    if modified is not None:
        response.last_modified = modified
    response.headers["Cache-Control"] = "public, no-cache"
    return response.make_conditional(flask_request)


@bp.get("/archive", strict_slashes=False)
def index() -> Response:
    site = _site()
    raw = flask_request.args.get("page", "1")
    if not raw.isdigit() or len(raw) > 6:
        abort(404)
    with site.archive.store.session() as session:
        listing = archive.listing(session, int(raw))
    if listing is None:
        abort(404)
    html = site.archive.index_page(listing, site.links).encode("utf-8")
    return _conditional(html, "text/html", listing.updated_at)


@bp.get("/archive/style.css")
def style() -> Response:
    response = Response(_site().css, mimetype="text/css")
    response.headers["Cache-Control"] = "public, max-age=3600"
    return response


@bp.get("/archive/<slug>")
def issue(slug: str) -> Response:
    site = _site()
    with site.archive.store.session() as session:
        entry = archive.find(session, slug)
        if entry is None:
            abort(404)
        content = site.archive.content(session, entry)
    html = site.archive.issue_page(entry, content, site.links).encode("utf-8")
    return _conditional(html, "text/html", entry.updated_at)


@bp.get("/archive/<slug>/")
def issue_folder(slug: str) -> Response:
    """The static export's folder form of a page's address leads to the page."""
    _site()
    if not SLUG.fullmatch(slug):
        abort(404)
    return redirect(f"/archive/{slug}", 301)  # type: ignore[return-value]


@bp.get("/archive/<slug>/<name>")
def image(slug: str, name: str) -> Response:
    site = _site()
    if not archive.IMAGE_NAME.fullmatch(name):
        abort(404)
    with site.archive.store.session() as session:
        entry = archive.find(session, slug)
        if entry is None:
            abort(404)
        content = site.archive.content(session, entry)
    picture = content.images.get(name)
    if picture is None:
        abort(404)
    return _conditional(picture.data, picture.content_type, entry.updated_at)


@bp.get("/feed.xml")
def feed() -> Response:
    site = _site()
    with site.archive.store.session() as session:
        body = site.archive.feed(session, site.links)
        modified = archive.last_change(session)
    return _conditional(body, "application/atom+xml", modified)


@bp.get("/latest")
def latest() -> Response:
    site = _site()
    with site.archive.store.session() as session:
        entry = archive.newest(session)
    if entry is None:
        abort(404)
    response = redirect(site.links.issue(entry.slug), 302)
    response.headers["Cache-Control"] = "no-cache"
    return response  # type: ignore[return-value]
