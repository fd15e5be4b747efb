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
class _Served:
    """What the routes need, kept on the app (``app.extensions["newsletter_archive"]``)."""

    site: archive.Site
    css: bytes
    headers: tuple[tuple[str, str], ...]
    enabled: bool


@bp.record_once
def _setup(state: BlueprintSetupState) -> None:
    context = state.app.extensions["newsletter"]
    pages = archive.Archive(context.store, context.settings)
    state.app.extensions["newsletter_archive"] = _Served(
        archive.Site(pages),
        pages.stylesheet(),
        # The signup pages' headers, but an issue shows the same pictures as its email
        # (video thumbnails, the blog's images), from any https site.
        security_headers(context.settings, False, images="'self' data: https:"),
        context.settings.archive,
    )


def _site() -> archive.Site:
    served: _Served = current_app.extensions["newsletter_archive"]
    g.security_headers = served.headers
    if not served.enabled:
        abort(404)
    return served.site


def _conditional(
    data: bytes, mimetype: str, modified: datetime | None, tag: str | None = None
) -> Response:
    response = Response(data, mimetype=mimetype)
    response.set_etag(tag or archive.etag(data))
    if modified is not None:
        response.last_modified = modified
    response.headers["Cache-Control"] = "public, no-cache"
    return response.make_conditional(flask_request)


def _answer(body: archive.Body | None, mimetype: str = "text/html") -> Response:
    if body is None:
        abort(404)
    return _conditional(body.data, mimetype, body.modified, body.etag)


@bp.get("/archive", strict_slashes=False)
def index() -> Response:
    site = _site()
    raw = flask_request.args.get("page", "1")
    if not raw.isdigit() or len(raw) > 6:
        abort(404)
    return _answer(site.index(int(raw)))


@bp.get("/archive/style.css")
def style() -> Response:
    _site()
    response = Response(current_app.extensions["newsletter_archive"].css, mimetype="text/css")
    response.headers["Cache-Control"] = "public, max-age=3600"
    return response


@bp.get("/archive/<slug>")
def issue(slug: str) -> Response:
    return _answer(_site().issue(slug))


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
    found = site.image(slug, name) if archive.IMAGE_NAME.fullmatch(name) else None
    if found is None:
        abort(404)
    picture, modified = found
    return _conditional(picture.data, picture.content_type, modified)


@bp.get("/feed.xml")
def feed() -> Response:
    return _answer(_site().feed(), "application/atom+xml")


@bp.get("/latest")
def latest() -> Response:
    address = _site().newest()
    if address is None:
        abort(404)
    response = redirect(address, 302)
    response.headers["Cache-Control"] = "no-cache"
    return response  # type: ignore[return-value]
