"""The signup web app: a Flask factory whose routes call :mod:`newsletter.signup`.

    GET  /                   the form (plain HTML, works without JavaScript)
    POST /subscribe          double opt-in; the same 303 answer for every address
    GET  /thanks             "check your inbox"
    GET  /confirm/TOKEN      a page with one "Confirm" button; a GET never changes anything
    POST /confirm/TOKEN      activates the pending subscriber and shows the welcome page
    GET  /unsubscribe/TOKEN  a page with one button; a GET never changes anything
    POST /unsubscribe/TOKEN  unsubscribes at once and answers 200 (RFC 8058 one-click)
    GET  /healthz            200 when the database answers with the newest schema, else 503
    GET  /style.css          the pages' only stylesheet (the CSP allows nothing inline)

No cookies, sessions or CSRF tokens, by design. Signup is meant to be posted from
another site (a static blog), and what stops abuse is double opt-in, the honeypot and
the rate limits, not the origin of the post. Unsubscribe must take the RFC 8058
one-click POST that a mail provider sends with nothing but the URL; the signed token
in the URL is the authority, and only the subscriber's own mail carries it.

The token routes take every method and an optional trailing slash, and read the token
before anything else: a bad or forged token is the same friendly 400 page however it
arrives; only a good token with a method its page has no use for gets a 405.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from flask import Blueprint, Flask, Response, abort, current_app, g, redirect, render_template
from flask import request as flask_request
from werkzeug.exceptions import HTTPException, MethodNotAllowed
from werkzeug.middleware.proxy_fix import ProxyFix

from newsletter import signup, web_hooks
from newsletter.config import Settings, load_settings
from newsletter.migrate import schema_is_current
from newsletter.render import template_environment
from newsletter.store import Store, open_store
from newsletter.tokens import CONFIRM_MAX_AGE, InvalidToken, Tokens

MAX_BODY_BYTES = 16 * 1024  # a signup is well under 1 KB; anything bigger is not a person
WEBHOOK_BODY_BYTES = 1024 * 1024  # a provider's event may carry the bounced message's text
TOKEN_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
UTF8_NAMES = ("utf-8", "utf8", "us-ascii", "ascii")

ERRORS = {
    400: ("This link does not work", "The request could not be understood."),
    404: ("Page not found", "There is nothing at this address."),
    405: ("Not here", "This page cannot be used that way."),
    413: (
        "That was too much",
        f"The form sent more than {MAX_BODY_BYTES // 1024} KB, more than a signup ever needs.",
    ),
    429: ("Too many signups", "Too many signups came from your network. Please try again later."),
    500: ("Something went wrong on our side", "Please try again in a moment."),
}

bp = Blueprint("web", __name__)


@dataclass(frozen=True)
class WebContext:
    """What the routes need, kept on the app (``app.extensions["newsletter"]``)."""

    settings: Settings
    store: Store
    tokens: Tokens
    css: bytes
    headers: dict[bool, tuple[tuple[str, str], ...]]  # security headers by embeddable or not


def _ctx() -> WebContext:
    return current_app.extensions["newsletter"]


def create_app(settings: Settings | None = None, store: Store | None = None) -> Flask:
    """The WSGI app; without a store one is opened from the settings. It never sends
    mail: confirmations wait in the database for ``newsletter worker``."""
    settings = settings or load_settings()
    store = store or open_store(settings)
    app = Flask(__name__, static_folder=None)
    app.jinja_loader = template_environment(settings.templates_dir).loader  # type: ignore[assignment]
    app.config.update(MAX_CONTENT_LENGTH=MAX_BODY_BYTES, MAX_FORM_PARTS=20)
    css = app.jinja_env.get_template("web/style.css").render().encode("utf-8")
    app.extensions["newsletter"] = WebContext(
        settings,
        store,
        signup.make_tokens(settings, store),
        css,
        {embeddable: security_headers(settings, embeddable) for embeddable in (False, True)},
    )
    app.register_blueprint(bp)
    app.register_blueprint(web_hooks.bp)
    from newsletter.web_archive import bp as archive_bp  # it builds on this module

    app.register_blueprint(archive_bp)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(InvalidToken, _bad_token)
    app.before_request(_check_body)
    app.after_request(_security_headers)
    app.context_processor(lambda: {"list_name": _ctx().settings.list_name})
    if settings.trusted_proxies:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.trusted_proxies)  # type: ignore[method-assign]
    return app


def embed_form(settings: Settings) -> str:
    """An HTML form to paste into a static blog: it posts to this app, which answers with
    its ``/thanks`` page (or a ``next`` URL on an origin in ``NEWSLETTER_ALLOWED_REDIRECTS``)."""
    template = template_environment(settings.templates_dir).get_template("web/embed_form.html")
    return template.render(site_url=settings.site_url, list_name=settings.list_name)


# Routes --------------------------------------------------------------------------------


def _page(template: str, status: int = 200, **context) -> Response:
    return Response(render_template(template, **context), status, mimetype="text/html")


def _safe_next(raw: str | None) -> str | None:
    """``raw`` if it is an http(s) URL on our site or an allowed origin; else None."""
    if not raw or len(raw) > 2000 or any(c in raw for c in "\\\r\n\t ") or not raw.isascii():
        return None
    try:
        parts = urlsplit(raw)
        origin = f"{parts.scheme}://{(parts.netloc or '').lower()}"
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number
    except ValueError:
        return None
    settings = _ctx().settings
    site = urlsplit(settings.site_url)
    allowed = {f"{site.scheme}://{site.netloc.lower()}", *settings.allowed_redirects}
    if parts.scheme not in ("http", "https") or parts.username or origin not in allowed:
        return None
    return raw


@bp.get("/")
def form() -> Response:
    g.embeddable = True
    return _page(
        "web/signup.html",
        email="",
        name="",
        errors={},
        next_url=_safe_next(flask_request.args.get("next")),
    )


@bp.get("/subscribe")
def subscribe_page() -> Response:
    return redirect("/", 302)  # type: ignore[return-value]


@bp.post("/subscribe")
def subscribe() -> Response:
    g.embeddable = True
    fields = flask_request.form
    next_url = _safe_next(fields.get("next"))
    ctx = _ctx()
    try:
        signup.signup(
            ctx.store,
            ctx.settings,
            ctx.tokens,
            email=fields.get("email", ""),
            name=fields.get("name"),
            ip=flask_request.remote_addr,
            website=fields.get("website"),
        )
    except signup.InvalidSignup as exc:
        return _page(
            "web/signup.html",
            400,
            email=fields.get("email", ""),
            name=fields.get("name", ""),
            errors={exc.field: exc.reason},
            next_url=next_url,
        )
    except signup.TooManySignups as exc:
        minutes = max(1, round(exc.retry_after / 60))
        response = _error_page(
            429, message=f"Too many signups came from your network. Try again in {minutes} min."
        )
        response.headers["Retry-After"] = str(exc.retry_after)
        return response
    return Response(status=303, headers={"Location": next_url or "/thanks"})


@bp.get("/thanks")
def thanks() -> Response:
    g.embeddable = True
    return _page("web/thanks.html", days=CONFIRM_MAX_AGE // 86400)


def _token_route(prefix: str) -> Callable[[Callable[[str], Response]], Callable[[str], Response]]:
    """Route ``prefix`` and ``prefix/TOKEN`` for every method, slash or not, so that no way
    of arriving with a bad token (none, a truncated one, a trailing slash, a PUT) misses
    the view and its friendly 400 for a 404 or 405."""

    def register(view: Callable[[str], Response]) -> Callable[[str], Response]:
        options = {"view_func": view, "methods": TOKEN_METHODS, "strict_slashes": False}
        bp.add_url_rule(prefix, defaults={"token": ""}, **options)
        bp.add_url_rule(f"{prefix}/<path:token>", **options)
        return view

    return register


def _method_answer(*methods: str) -> Response | None:
    """Once the token is known good: 204 with ``Allow`` for OPTIONS, a friendly 405 for a
    method the page has no use for, None to go on."""
    allowed = (*methods, "OPTIONS")
    if flask_request.method == "OPTIONS":
        return Response(status=204, headers={"Allow": ", ".join(allowed)})
    if flask_request.method not in methods:
        raise MethodNotAllowed(valid_methods=allowed)
    return None


@_token_route("/confirm")
def confirm(token: str) -> Response:
    address = _ctx().tokens.read_confirm(token.rstrip("/"))  # a bad token is a 400 first
    if (answer := _method_answer("GET", "HEAD", "POST")) is not None:
        return answer
    if flask_request.method == "POST":  # the page's button
        subscriber = signup.confirm(_ctx().store, address)
    else:  # mail scanners and link checkers fetch every link: a GET only shows the button
        subscriber = signup.lookup(_ctx().store, address)
    if subscriber is None:
        raise InvalidToken("this address is no longer on the list")
    if subscriber.status == "pending":
        return _page("web/confirm.html", subscriber=subscriber)
    return _page("web/confirmed.html", subscriber=subscriber)


@_token_route("/unsubscribe")
def unsubscribe(token: str) -> Response:
    address = _ctx().tokens.read_unsubscribe(token.rstrip("/"))  # a bad token is a 400 first
    if (answer := _method_answer("GET", "HEAD", "POST")) is not None:
        return answer
    if flask_request.method == "POST":  # RFC 8058 one-click, or the page's button
        signup.unsubscribe(_ctx().store, address)
        return _page("web/unsubscribed.html", email=address)
    # A GET only shows the button: mail scanners fetch every link they see.
    subscriber = signup.lookup(_ctx().store, address)
    stopped = subscriber is None or subscriber.status in ("unsubscribed", "bounced", "complained")
    return _page("web/unsubscribe.html", email=address, stopped=stopped)


@bp.get("/healthz")
def healthz() -> Response:
    """200 only when the database answers and is migrated: a load balancer must not send
    signups to an app whose tables are missing (a new PostgreSQL database, a failed
    upgrade)."""
    if schema_is_current(_ctx().store.engine):
        return Response("ok\n", 200, mimetype="text/plain")
    return Response("database unavailable or not migrated\n", 503, mimetype="text/plain")


@bp.get("/style.css")
def style() -> Response:
    response = Response(_ctx().css, mimetype="text/css")
    response.headers["Cache-Control"] = "public, max-age=3600"
    return response


# Errors and headers --------------------------------------------------------------------


def _error_page(code: int, title: str | None = None, message: str | None = None) -> Response:
    default_title, default_message = ERRORS.get(code, ERRORS[500])
    return _page(
        "web/error.html",
        code,
        code=code,
        title=title or default_title,
        message=message or default_message,
    )


def _http_error(exc: HTTPException) -> Response:
    code = exc.code or 500
    response = _error_page(code if code in ERRORS else (400 if code < 500 else 500))
    response.status_code = code
    if code == 405 and exc.valid_methods:  # type: ignore[attr-defined]
        response.headers["Allow"] = ", ".join(exc.valid_methods)  # type: ignore[attr-defined]
    return response


def _bad_token(exc: InvalidToken) -> Response:
    reason = str(exc)
    message = f"Sorry, {reason}."
    if exc.expired:
        message += " Sign up again to get a fresh confirmation link."
    return _error_page(400, message=message)


def _body_limit() -> int:
    """How big a request body may be: a form's size, or a provider's webhook event's."""
    webhook = flask_request.path.startswith("/webhooks/")
    return WEBHOOK_BODY_BYTES if webhook else MAX_BODY_BYTES


def _check_body() -> Response | None:
    """Refuse a body over its limit, and a form that is not UTF-8, before a route reads
    it: Werkzeug decodes every form as UTF-8, replacing what is not, and ignores a
    declared charset, so such a form would lose its name or address without a word."""
    environ = flask_request.environ
    limit = flask_request.max_content_length = _body_limit()
    if not environ.get("CONTENT_LENGTH") and environ.get("wsgi.input_terminated"):
        _take_chunked_body(environ, limit)  # no Content-Length: Werkzeug reads it unbounded
    if (flask_request.content_length or 0) > limit:
        abort(413)
    if flask_request.mimetype not in FORM_TYPES:
        return None
    charset = flask_request.mimetype_params.get("charset", "utf-8").strip().lower()
    problem = None
    if charset not in UTF8_NAMES:
        problem = f"The form was sent as {charset.upper()}; this site reads UTF-8 only."
    else:
        body = flask_request.get_data(cache=True)  # within the limit by now
        try:
            text = body.decode("utf-8")
            if flask_request.mimetype == "application/x-www-form-urlencoded":
                parse_qsl(text, keep_blank_values=True, encoding="utf-8", errors="strict")
        except UnicodeDecodeError:
            problem = "The form was not sent as UTF-8, so what you typed cannot be read."
    if problem is None:
        return None
    return _error_page(
        400,
        title="That form could not be read",
        message=f"{problem} Please go back and send it again from the form on this site.",
    )


def _take_chunked_body(environ: dict, limit: int) -> None:
    """Read a body sent without Content-Length (chunked) up to one byte over the limit:
    413 past it, else hand it on as an ordinary body of known length (before anything
    reads ``request.content_length``, which Werkzeug keeps once read)."""
    stream, data = environ["wsgi.input"], b""
    while len(data) <= limit and (chunk := stream.read(limit + 1 - len(data))):
        data += chunk
    if len(data) > limit:
        abort(413)
    environ["wsgi.input"] = io.BytesIO(data)
    environ["CONTENT_LENGTH"] = str(len(data))
    environ.pop("wsgi.input_terminated", None)
    environ.pop("HTTP_TRANSFER_ENCODING", None)  # else Werkzeug ignores the length


def security_headers(
    settings: Settings, embeddable: bool, images: str = "'self' data:"
) -> tuple[tuple[str, str], ...]:
    """The headers every answer carries; ``embeddable`` pages (the form, its thank-you
    page) may be framed by the sites in ``NEWSLETTER_FRAME_ANCESTORS``, if any; ``images``
    is where pictures may come from (the archive's pages show the email's)."""
    embeddable = embeddable and bool(settings.frame_ancestors)
    ancestors = " ".join(settings.frame_ancestors) if embeddable else "'none'"
    form_action = " ".join(("'self'", *settings.allowed_redirects))
    csp = (
        f"default-src 'none'; style-src 'self'; img-src {images}; "
        f"form-action {form_action}; frame-ancestors {ancestors}; base-uri 'none'"
    )
    headers = [("Content-Security-Policy", csp)]
    if not embeddable:
        headers.append(("X-Frame-Options", "DENY"))
    return (
        *headers,
        ("X-Content-Type-Options", "nosniff"),
        ("Referrer-Policy", "no-referrer"),  # tokens in our URLs stay ours
        ("Cross-Origin-Opener-Policy", "same-origin"),
    )


def _security_headers(response: Response) -> Response:
    for name, value in g.get("security_headers") or _ctx().headers[g.get("embeddable", False)]:
        response.headers[name] = value
    response.headers.setdefault("Cache-Control", "no-store")
    return response
