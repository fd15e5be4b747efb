"""The signup web app's routes through Flask's test client, on SQLite and PostgreSQL."""

from __future__ import annotations

import email
import email.policy
import http.client
import io
import re
import socket
import time
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner
from flask import Flask
from flask.testing import FlaskClient
from itsdangerous import TimestampSigner, URLSafeTimedSerializer
from sqlalchemy import select, text
from werkzeug.test import EnvironBuilder

from newsletter import signup, subscribers
from newsletter.cli import main
from newsletter.config import Settings, load_settings
from newsletter.errors import ConfigError
from newsletter.store import Delivery, SignupAttempt, Store, Subscriber, make_engine
from newsletter.tokens import Tokens
from newsletter.transports import from_wire
from newsletter.web import create_app, embed_form

SECRET = "test-secret-key-that-signs-links-0123456789"
TOKENS = Tokens(SECRET)
# Where the database cannot make a difference, one backend is enough.
sqlite_only = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
MARKUP_NAME = '<script>alert("x")</script><b>Ada & "Co"</b>'


def _post(client: FlaskClient, ip: str = "192.0.2.1", **fields: str):
    """Submit the signup form as a browser at ``ip`` would."""
    return client.post("/subscribe", data=fields, environ_base={"REMOTE_ADDR": ip})


def _status(store: Store, address: str) -> str | None:
    with store.session() as session:
        found = subscribers.get(session, address)
        return found.status if found else None


def _mails(store: Store, address: str | None = None) -> list[Delivery]:
    """The one-off mail queued, oldest first."""
    with store.session() as session:
        query = select(Delivery).where(Delivery.issue_id.is_(None)).order_by(Delivery.id)
        if address:
            query = query.where(Delivery.email == address)
        return list(session.scalars(query))


def _add(store: Store, address: str, status: str = "active", name: str | None = None) -> None:
    with store.begin() as session:
        subscribers.add(session, address, name, status="active" if status != "pending" else status)
        if status in ("unsubscribed", "bounced", "complained"):
            subscribers.unsubscribe(session, subscribers.get(session, address).id, status)


def _body(mail: Delivery) -> bytes:
    """The message the worker builds for a queued confirmation (with the app's settings)."""
    from newsletter.outbound import confirmation

    settings = Settings(
        site_url="https://news.example.com",
        list_name="Weekly Links",
        from_address="Weekly Links <links@example.com>",
    )
    assert mail.kind == "confirm" and mail.issue_id is None
    return confirmation(settings, TOKENS, mail.email, "queued.1@example.com")


def _link(mail: Delivery, kind: str = "confirm") -> str:
    message = email.message_from_bytes(from_wire(_body(mail)), policy=email.policy.default)
    text_part = message.get_body(("plain",)).get_content()
    return re.search(rf"https://news\.example\.com(/{kind}/\S+)", text_part)[1]


def _page_text(response) -> str:
    return response.get_data(as_text=True)


# The form ------------------------------------------------------------------------------


@sqlite_only
def test_form_is_plain_accessible_html(client: FlaskClient) -> None:
    """GET / is a form with labelled email and name fields, a hidden honeypot, no script."""
    response = client.get("/")
    page = _page_text(response)
    assert response.status_code == 200
    assert '<form method="post" action="/subscribe"' in page
    assert '<label for="email">' in page and 'type="email"' in page and "required" in page
    assert '<label for="name">' in page and 'autocomplete="name"' in page
    assert re.search(r'<div class="trap" aria-hidden="true">.*name="website"', page, re.S)
    assert 'tabindex="-1"' in page
    assert "<script" not in page
    assert 'name="viewport"' in page
    assert "Subscribe to Weekly Links" in page


@sqlite_only
def test_every_page_sends_security_headers_and_no_cookie(client: FlaskClient) -> None:
    """CSP without inline code, nosniff, no referrer, no framing by default, never a cookie."""
    for response in (client.get("/"), _post(client, email="ada@example.com"), client.get("/x")):
        headers = response.headers
        csp = headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "style-src 'self'" in csp
        assert "frame-ancestors 'none'" in csp and headers["X-Frame-Options"] == "DENY"
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Referrer-Policy"] == "no-referrer"
        assert "Set-Cookie" not in headers


@sqlite_only
def test_stylesheet_is_served(client: FlaskClient) -> None:
    """The only stylesheet comes from /style.css, cacheable, with dark-mode and phone rules."""
    response = client.get("/style.css")
    assert response.status_code == 200 and response.mimetype == "text/css"
    assert "prefers-color-scheme: dark" in _page_text(response)
    assert "max-age" in response.headers["Cache-Control"]


# Signup --------------------------------------------------------------------------------


def test_signup_makes_a_pending_subscriber_and_queues_one_confirmation(
    client: FlaskClient, store: Store
) -> None:
    """A valid signup answers 303 to /thanks, stores a pending subscriber from the form and
    queues one confirmation whose subject is the list's, not the visitor's, words."""
    response = _post(client, email=" Ada@Example.COM ", name="Ada Lovelace")
    assert response.status_code == 303
    assert response.headers["Location"] == "/thanks"
    with store.session() as session:
        ada = subscribers.get(session, "ada@example.com")
        assert (ada.status, ada.source, ada.name) == ("pending", "form", "Ada Lovelace")
    [mail] = _mails(store)
    assert (mail.email, mail.status) == ("ada@example.com", "queued")
    assert b"Subject: Confirm your subscription to Weekly Links\r\n" in _body(mail)
    thanks = client.get("/thanks")
    assert thanks.status_code == 200 and "Check your inbox" in _page_text(thanks)


@pytest.mark.parametrize(
    ("state", "mails", "after"),
    [
        (None, 1, "pending"),
        ("pending", 1, "pending"),
        ("active", 0, "active"),
        ("unsubscribed", 1, "pending"),
        ("bounced", 0, "bounced"),
        ("complained", 0, "complained"),
    ],
)
def test_same_answer_whatever_the_address_was(
    client: FlaskClient, store: Store, state: str | None, mails: int, after: str
) -> None:
    """New, pending, active or stopped: the same 303 and body; only new, pending and
    unsubscribed (fresh consent) get a confirmation, and nobody active is renamed."""
    reference = _post(client, ip="198.51.100.7", email="someone-else@example.org")
    if state:
        _add(store, "ada@example.com", state, name="Ada")
    response = _post(client, email="ada@example.com", name="Mallory")
    assert (response.status_code, response.headers["Location"]) == (303, "/thanks")
    assert response.get_data() == reference.get_data()
    assert len(_mails(store, "ada@example.com")) == mails
    assert _status(store, "ada@example.com") == after
    if state == "active":
        with store.session() as session:
            assert subscribers.get(session, "ada@example.com").name == "Ada"


@sqlite_only
@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("", "Please enter your email address."),
        ("not-an-address", "An email address must have an @-sign"),
        ("ada@example", "This is not a valid email address"),
        ("ada@@example.com", "This is not a valid email address"),
        ("ada@exa mple.com", "This is not a valid email address"),
        ("a" * 300 + "@example.com", "This is not a valid email address"),
    ],
)
def test_invalid_address_shows_the_form_again(
    client: FlaskClient, store: Store, address: str, message: str
) -> None:
    """An invalid address is a 400 form page naming the problem at the field; nothing stored."""
    response = _post(client, email=address, name="Ada")
    page = _page_text(response)
    assert response.status_code == 400
    assert message in page
    assert 'aria-invalid="true" aria-describedby="email-error"' in page
    assert 'value="Ada"' in page  # what they typed is kept
    assert _mails(store) == []
    with store.session() as session:
        assert session.scalars(select(Subscriber)).all() == []


@sqlite_only
def test_name_with_a_line_break_is_refused(client: FlaskClient, store: Store) -> None:
    """A name that would break a header is a 400 at the name field."""
    response = _post(client, email="ada@example.com", name="Ada\r\nBcc: victim@example.net")
    assert response.status_code == 400
    assert "The name has a line break" in _page_text(response)
    assert _status(store, "ada@example.com") is None


def test_honeypot_gets_the_normal_answer_and_creates_nothing(
    client: FlaskClient, store: Store
) -> None:
    """A filled `website` field: the usual 303 to /thanks, and no row of any kind."""
    response = _post(client, email="victim@example.com", website="http://spam.example")
    assert (response.status_code, response.headers["Location"]) == (303, "/thanks")
    with store.session() as session:
        assert session.scalars(select(Subscriber)).all() == []
        assert session.scalars(select(SignupAttempt)).all() == []
    assert _mails(store) == []


def test_per_ip_rate_limit_is_a_friendly_429(client: FlaskClient, store: Store) -> None:
    """The 21st signup in an hour from one IP is a 429 page with Retry-After and creates
    nothing; another IP is unaffected; an IPv6 /64 counts as one client."""
    for n in range(signup.PER_IP_LIMIT):
        assert _post(client, email=f"reader{n}@example.com").status_code == 303
    refused = _post(client, email="one-too-many@example.com")
    assert refused.status_code == 429
    assert "Too many signups" in _page_text(refused)
    assert 0 < int(refused.headers["Retry-After"]) <= 3600
    assert _status(store, "one-too-many@example.com") is None
    assert _post(client, ip="192.0.2.2", email="other@example.com").status_code == 303

    for n in range(signup.PER_IP_LIMIT):
        _post(client, ip=f"2001:db8:1:2::{n + 1:x}", email=f"six{n}@example.com")
    assert _post(client, ip="2001:db8:1:2:ffff::1", email="six@example.com").status_code == 429
    assert _post(client, ip="2001:db8:1:3::1", email="six@example.com").status_code == 303


def test_per_address_limit_keeps_the_answer_and_stops_the_mail(
    client: FlaskClient, store: Store
) -> None:
    """Signups of one address from many IPs all get the same 303, but only the first
    PER_ADDRESS_LIMIT in a day queue a confirmation (a victim is not mail-bombed)."""
    for n in range(signup.PER_ADDRESS_LIMIT + 3):
        response = _post(client, ip=f"203.0.113.{n + 1}", email="victim@example.com")
        assert (response.status_code, response.headers["Location"]) == (303, "/thanks")
    assert len(_mails(store, "victim@example.com")) == signup.PER_ADDRESS_LIMIT


@sqlite_only
def test_forwarded_for_counts_only_behind_a_trusted_proxy(
    web_settings: Settings, store: Store
) -> None:
    """X-Forwarded-For is ignored by default (a client could forge it) and used when
    NEWSLETTER_TRUSTED_PROXIES says a proxy sets it."""
    direct = create_app(web_settings, store).test_client()
    for n in range(signup.PER_IP_LIMIT):
        _post(direct, email=f"a{n}@example.com", ip="10.0.0.1")
    forged = direct.post(
        "/subscribe",
        data={"email": "b@example.com"},
        headers={"X-Forwarded-For": "192.0.2.99"},
        environ_base={"REMOTE_ADDR": "10.0.0.1"},
    )
    assert forged.status_code == 429
    proxied = create_app(replace(web_settings, trusted_proxies=1), store).test_client()
    behind = proxied.post(
        "/subscribe",
        data={"email": "b@example.com"},
        headers={"X-Forwarded-For": "192.0.2.99"},
        environ_base={"REMOTE_ADDR": "10.0.0.1"},
    )
    assert behind.status_code == 303


@sqlite_only
def test_oversized_body_is_a_friendly_413(client: FlaskClient, store: Store) -> None:
    """A body over 16 KB is refused with a 413 page before anything is stored."""
    response = _post(client, email="ada@example.com", name="x" * 20_000)
    assert response.status_code == 413
    assert "too much" in _page_text(response)
    assert _status(store, "ada@example.com") is None
    token = TOKENS.unsubscribe_token("ada@example.com")
    big = client.post(f"/unsubscribe/{token}", data={"List-Unsubscribe": "One-Click" * 3000})
    assert big.status_code == 413


@sqlite_only
def test_get_subscribe_goes_to_the_form(client: FlaskClient) -> None:
    """Someone typing /subscribe into the address bar lands on the form."""
    response = client.get("/subscribe")
    assert (response.status_code, response.headers["Location"]) == (302, "/")


# Redirects and framing -----------------------------------------------------------------


@sqlite_only
@pytest.mark.parametrize(
    ("next_url", "location"),
    [
        ("https://blog.example.com/thanks/", "https://blog.example.com/thanks/"),
        ("https://news.example.com/thanks", "https://news.example.com/thanks"),
        ("https://evil.example.net/", "/thanks"),
        ("https://blog.example.com.evil.example.net/", "/thanks"),
        ("//evil.example.net/", "/thanks"),
        ("javascript:alert(1)", "/thanks"),
        ("https://blog.example.com\\@evil.example.net/", "/thanks"),
        ("https://user@blog.example.com/", "/thanks"),
        ("http://blog.example.com/", "/thanks"),
    ],
)
def test_next_only_leads_to_allowed_origins(
    web_settings: Settings, store: Store, next_url: str, location: str
) -> None:
    """A `next` URL is followed only to our site or an origin in NEWSLETTER_ALLOWED_REDIRECTS;
    anything else lands on /thanks (no open redirect)."""
    settings = replace(web_settings, allowed_redirects=("https://blog.example.com",))
    client = create_app(settings, store).test_client()
    response = _post(client, email="ada@example.com", next=next_url)
    assert (response.status_code, response.headers["Location"]) == (303, location)


@sqlite_only
def test_allowed_redirect_origins_may_receive_the_form_post(
    web_settings: Settings, store: Store
) -> None:
    """The form page carries an allowed `next` and its CSP lets the form land there."""
    settings = replace(web_settings, allowed_redirects=("https://blog.example.com",))
    client = create_app(settings, store).test_client()
    response = client.get("/?next=https://blog.example.com/thanks/")
    assert 'name="next" value="https://blog.example.com/thanks/"' in _page_text(response)
    assert (
        "form-action 'self' https://blog.example.com" in response.headers["Content-Security-Policy"]
    )
    assert 'name="next"' not in _page_text(client.get("/?next=https://evil.example.net/"))


@sqlite_only
def test_framing_only_where_configured(web_settings: Settings, store: Store) -> None:
    """NEWSLETTER_FRAME_ANCESTORS lets those sites frame the form and thank-you page, never
    the unsubscribe page."""
    settings = replace(web_settings, frame_ancestors=("https://blog.example.com",))
    client = create_app(settings, store).test_client()
    for path in ("/", "/thanks"):
        response = client.get(path)
        assert (
            "frame-ancestors https://blog.example.com;"
            in response.headers["Content-Security-Policy"]
        )
        assert "X-Frame-Options" not in response.headers
    token = TOKENS.unsubscribe_token("ada@example.com")
    page = client.get(f"/unsubscribe/{token}")
    assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]


def test_origin_settings_are_validated(clean_env) -> None:
    """A redirect or frame origin that is not scheme://host is a one-line ConfigError."""
    for name in ("NEWSLETTER_ALLOWED_REDIRECTS", "NEWSLETTER_FRAME_ANCESTORS"):
        with pytest.raises(ConfigError, match=name):
            load_settings({name: "https://blog.example.com/path"}, clean_env / ".env")
    settings = load_settings(
        {"NEWSLETTER_ALLOWED_REDIRECTS": "https://Blog.example.com/, http://localhost:4000"},
        clean_env / ".env",
    )
    assert settings.allowed_redirects == ("https://blog.example.com", "http://localhost:4000")


# Confirm -------------------------------------------------------------------------------


def test_confirmation_link_activates(client: FlaskClient, store: Store) -> None:
    """The link in the queued confirmation shows a page whose one button POSTs back to
    it; that POST activates the subscriber and shows the welcome page."""
    _post(client, email="ada@example.com", name="Ada")
    [mail] = _mails(store)
    page = client.get(_link(mail))
    assert page.status_code == 200
    assert '<form method="post">' in _page_text(page) and _page_text(page).count("<button") == 1
    assert "ada@example.com" in _page_text(page)
    assert _status(store, "ada@example.com") == "pending"
    response = client.post(_link(mail))
    assert response.status_code == 200 and "Location" not in response.headers
    assert "You’re subscribed, Ada!" in _page_text(response)
    assert _status(store, "ada@example.com") == "active"
    assert client.post(_link(mail)).status_code == 200  # a second press is harmless
    again = client.get(_link(mail))  # and the link now says so, still changing nothing
    assert "You’re subscribed, Ada!" in _page_text(again) and "<form" not in _page_text(again)
    assert _status(store, "ada@example.com") == "active"


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_get_or_head_on_a_confirmation_link_changes_nothing(
    client: FlaskClient, store: Store, method: str
) -> None:
    """Mail scanners fetch every link (GET) and link checkers probe (HEAD): however often,
    the subscriber stays pending."""
    _post(client, email="ada@example.com")
    link = _link(_mails(store)[0])
    for _ in range(3):
        assert client.open(link, method=method).status_code == 200
    assert _status(store, "ada@example.com") == "pending"


def test_old_confirmation_link_never_resubscribes(client: FlaskClient, store: Store) -> None:
    """After unsubscribing, an older confirmation link leaves the address unsubscribed."""
    _post(client, email="ada@example.com")
    link = _link(_mails(store)[0])
    _add(store, "ada@example.com", "active")
    with store.begin() as session:
        subscribers.remove(session, "ada@example.com")
    for response in (client.get(link), client.post(link)):
        assert response.status_code == 200 and "not subscribed" in _page_text(response)
    assert _status(store, "ada@example.com") == "unsubscribed"


def _expired_confirm_token(address: str) -> str:
    class EightDaysAgo(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(time.time()) - 8 * 86400

    return URLSafeTimedSerializer(SECRET, salt="newsletter.confirm", signer=EightDaysAgo).dumps(
        address
    )


BAD_TOKENS = {
    "forged": Tokens("some-other-secret-key-entirely-000000").confirm_token("ada@example.com"),
    "malformed": "not-a-token",
    "truncated": TOKENS.confirm_token("ada@example.com")[:-5],
    "wrong kind": TOKENS.unsubscribe_token("ada@example.com"),
    "long": "A" * 1500,
}


@sqlite_only
@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize("kind", [*BAD_TOKENS, "expired"])
def test_bad_confirm_token_is_a_friendly_400(
    client: FlaskClient, store: Store, kind: str, method: str
) -> None:
    """A forged, expired, malformed or unsubscribe token on /confirm, shown or pressed,
    is a 400 page and confirms nobody."""
    _add(store, "ada@example.com", "pending")
    token = _expired_confirm_token("ada@example.com") if kind == "expired" else BAD_TOKENS[kind]
    response = client.open(f"/confirm/{token}", method=method)
    page = _page_text(response)
    assert response.status_code == 400 and response.mimetype == "text/html"
    assert "Traceback" not in page and "<h1>" in page
    assert ("has expired" in page) == (kind == "expired")
    assert _status(store, "ada@example.com") == "pending"


@sqlite_only
@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize(
    "token",
    [
        Tokens("some-other-secret-key-entirely-000000").unsubscribe_token("ada@example.com"),
        "not-a-token",
        TOKENS.confirm_token("ada@example.com"),
    ],
    ids=["other-key", "not-a-token", "a-confirm-token"],  # the same in every test process
)
def test_bad_unsubscribe_token_is_a_friendly_400(
    client: FlaskClient, store: Store, method: str, token: str
) -> None:
    """A bad unsubscribe token, by GET or POST, is a 400 page and unsubscribes nobody."""
    _add(store, "ada@example.com")
    response = client.open(f"/unsubscribe/{token}", method=method)
    assert response.status_code == 400
    assert "This link does not work" in _page_text(response)
    assert _status(store, "ada@example.com") == "active"


ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
FORGED = Tokens("some-other-secret-key-entirely-000000")
BAD_TOKEN_PATHS = {
    "confirm forged": f"/confirm/{FORGED.confirm_token('ada@example.com')}",
    "confirm malformed": "/confirm/not-a-token",
    "confirm unsubscribe token": f"/confirm/{TOKENS.unsubscribe_token('ada@example.com')}",
    "confirm forged, slash": f"/confirm/{FORGED.confirm_token('ada@example.com')}/",
    "confirm with a slash inside": f"/confirm/{TOKENS.confirm_token('ada@example.com')}/x",
    "confirm without token": "/confirm",
    "confirm empty token": "/confirm/",
    "unsubscribe forged": f"/unsubscribe/{FORGED.unsubscribe_token('ada@example.com')}",
    "unsubscribe malformed": "/unsubscribe/not-a-token",
    "unsubscribe confirm token": f"/unsubscribe/{TOKENS.confirm_token('ada@example.com')}",
    "unsubscribe forged, slash": f"/unsubscribe/{FORGED.unsubscribe_token('ada@example.com')}/",
    "unsubscribe non-ASCII": "/unsubscribe/%C3%A9t%C3%A9",
    "unsubscribe without token": "/unsubscribe",
    "unsubscribe empty token": "/unsubscribe/",
}


@sqlite_only
@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("path", BAD_TOKEN_PATHS.values(), ids=BAD_TOKEN_PATHS.keys())
def test_bad_token_is_a_friendly_400_whatever_the_method(
    client: FlaskClient, store: Store, method: str, path: str
) -> None:
    """Any method, trailing slash or none, no token at all: a bad token is the 400 page,
    never a 404, 405 or stack trace, and it changes nobody."""
    _add(store, "ada@example.com", "pending")
    _add(store, "bob@example.com")
    response = client.open(path, method=method, data={"List-Unsubscribe": "One-Click"})
    assert response.status_code == 400 and response.mimetype == "text/html"
    if method != "HEAD":
        page = _page_text(response)
        assert "This link does not work" in page and "Traceback" not in page
    assert "Allow" not in response.headers
    assert (_status(store, "ada@example.com"), _status(store, "bob@example.com")) == (
        "pending",
        "active",
    )


def test_trailing_slash_on_good_links_works(client: FlaskClient, store: Store) -> None:
    """A mail client or a person adding a slash to a good link changes nothing: the
    confirm page shows its button and its POST activates, the unsubscribe page shows its
    button and its POST unsubscribes."""
    _add(store, "ada@example.com", "pending")
    confirm_url = f"/confirm/{TOKENS.confirm_token('ada@example.com')}/"
    assert client.head(confirm_url).status_code == 200
    assert '<form method="post">' in _page_text(client.get(confirm_url))
    assert _status(store, "ada@example.com") == "pending"
    confirmed = client.post(confirm_url)
    assert confirmed.status_code == 200 and "subscribed" in _page_text(confirmed)
    assert _status(store, "ada@example.com") == "active"
    url = f"/unsubscribe/{TOKENS.unsubscribe_token('ada@example.com')}/"
    page = client.get(url)
    assert page.status_code == 200 and page.headers.get("Location") is None
    assert '<form method="post">' in _page_text(page)
    assert _status(store, "ada@example.com") == "active"
    response = client.post(url, data={"List-Unsubscribe": "One-Click"})
    assert response.status_code == 200 and "You are unsubscribed" in _page_text(response)
    assert _status(store, "ada@example.com") == "unsubscribed"


@sqlite_only
@pytest.mark.parametrize(
    ("route", "method", "allow"),
    [
        ("confirm", "PUT", "GET, HEAD, POST, OPTIONS"),
        ("confirm", "PATCH", "GET, HEAD, POST, OPTIONS"),
        ("confirm", "DELETE", "GET, HEAD, POST, OPTIONS"),
        ("unsubscribe", "PUT", "GET, HEAD, POST, OPTIONS"),
        ("unsubscribe", "PATCH", "GET, HEAD, POST, OPTIONS"),
        ("unsubscribe", "DELETE", "GET, HEAD, POST, OPTIONS"),
    ],
)
def test_good_token_with_an_unused_method_is_a_friendly_405(
    client: FlaskClient, store: Store, route: str, method: str, allow: str
) -> None:
    """A genuine link with a method its page has no use for is our 405 page naming the
    allowed methods, and it confirms or unsubscribes nobody."""
    _add(store, "ada@example.com", "pending")
    _add(store, "bob@example.com")
    token = (
        TOKENS.confirm_token("ada@example.com")
        if route == "confirm"
        else TOKENS.unsubscribe_token("bob@example.com")
    )
    response = client.open(f"/{route}/{token}", method=method)
    assert response.status_code == 405 and response.headers["Allow"] == allow
    assert "<h1>" in _page_text(response) and "Traceback" not in _page_text(response)
    assert _status(store, "ada@example.com") == "pending"
    assert _status(store, "bob@example.com") == "active"


@sqlite_only
def test_options_on_a_good_link_names_the_methods(client: FlaskClient, store: Store) -> None:
    """OPTIONS on a genuine link answers 204 with Allow and changes nothing."""
    _add(store, "ada@example.com", "pending")
    confirm = client.options(f"/confirm/{TOKENS.confirm_token('ada@example.com')}")
    assert (confirm.status_code, confirm.headers["Allow"]) == (204, "GET, HEAD, POST, OPTIONS")
    unsubscribe = client.options(f"/unsubscribe/{TOKENS.unsubscribe_token('ada@example.com')}")
    assert unsubscribe.status_code == 204
    assert unsubscribe.headers["Allow"] == "GET, HEAD, POST, OPTIONS"
    assert _status(store, "ada@example.com") == "pending"


@sqlite_only
def test_confirm_link_of_a_purged_address_is_a_400(client: FlaskClient, store: Store) -> None:
    """A genuine link whose address was erased meanwhile is a friendly 400, not a crash."""
    for method in ("GET", "POST"):
        response = client.open(
            f"/confirm/{TOKENS.confirm_token('gone@example.com')}", method=method
        )
        assert response.status_code == 400 and "no longer on the list" in _page_text(response)


# Markup in names -----------------------------------------------------------------------


def test_name_with_markup_is_escaped_everywhere(client: FlaskClient, store: Store) -> None:
    """A name with HTML is escaped on the form and the confirm page and never reaches the
    confirmation email at all (neither subject, nor To, nor body)."""
    again = _post(client, email="not-an-address", name=MARKUP_NAME)
    assert "<script>" not in _page_text(again)
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in _page_text(again)

    _post(client, email="ada@example.com", name=MARKUP_NAME)
    [mail] = _mails(store)
    message = email.message_from_bytes(from_wire(_body(mail)), policy=email.policy.default)
    assert message["To"] == "ada@example.com"
    everything = from_wire(_body(mail)).decode() + "".join(
        part.get_content() for part in message.walk() if part.get_content_maintype() == "text"
    )
    for piece in ("<script", "alert(", "&lt;script", "Ada &", "Ada &amp;", '"Co"'):
        assert piece not in everything
    confirmed = _page_text(client.post(_link(mail)))
    assert "<script>" not in confirmed and "<b>" not in confirmed
    assert "&lt;b&gt;Ada &amp; &#34;Co&#34;&lt;/b&gt;" in confirmed


# Unsubscribe ---------------------------------------------------------------------------


def test_get_on_an_unsubscribe_link_changes_nothing(client: FlaskClient, store: Store) -> None:
    """A GET (or HEAD) shows the address and one button that POSTs; the subscriber stays."""
    _add(store, "ada@example.com")
    url = f"/unsubscribe/{TOKENS.unsubscribe_token('ada@example.com')}"
    for response in (client.get(url), client.head(url), client.get(url)):
        assert response.status_code == 200
    page = _page_text(client.get(url))
    assert "ada@example.com" in page
    assert '<form method="post">' in page and page.count("<button") == 1
    assert _status(store, "ada@example.com") == "active"


@pytest.mark.parametrize(
    "body",
    [
        {"data": {"List-Unsubscribe": "One-Click"}},
        {"data": {"List-Unsubscribe": "One-Click"}, "content_type": "multipart/form-data"},
        {},
    ],
    ids=["form-encoded", "multipart", "empty"],
)
def test_one_click_post_unsubscribes_at_once(client: FlaskClient, store: Store, body) -> None:
    """RFC 8058: a POST with no cookie and no CSRF token unsubscribes and answers 200 with
    no redirect; a second POST is fine too."""
    _add(store, "ada@example.com")
    url = f"/unsubscribe/{TOKENS.unsubscribe_token('ada@example.com')}"
    for _ in range(2):
        response = client.post(url, **body)
        assert response.status_code == 200
        assert "Location" not in response.headers and "Set-Cookie" not in response.headers
        assert "You are unsubscribed" in _page_text(response)
        assert _status(store, "ada@example.com") == "unsubscribed"
    assert "You are unsubscribed" in _page_text(client.get(url))


@sqlite_only
def test_unsubscribing_an_erased_address_is_fine(client: FlaskClient) -> None:
    """A genuine link for an address no longer on the list still answers 200."""
    response = client.post(f"/unsubscribe/{TOKENS.unsubscribe_token('gone@example.com')}")
    assert response.status_code == 200


def test_unsubscribe_keeps_a_bounce(client: FlaskClient, store: Store) -> None:
    """Unsubscribing a bounced address keeps the first reason."""
    _add(store, "ada@example.com", "bounced")
    client.post(f"/unsubscribe/{TOKENS.unsubscribe_token('ada@example.com')}")
    assert _status(store, "ada@example.com") == "bounced"


# Health and errors ---------------------------------------------------------------------


def test_healthz_wants_the_newest_schema(web_settings: Settings, database_url: str) -> None:
    """A database that answers but has no tables (a new PostgreSQL database) is a 503, as is
    one at a revision this version does not know; migrated to the newest, a 200."""
    from newsletter.migrate import upgrade

    bare = Store(make_engine(database_url))
    try:
        health = create_app(web_settings, bare).test_client()
        with bare.engine.connect() as connection:
            assert connection.execute(text("SELECT 1")).scalar() == 1  # it does answer
        assert health.get("/healthz").status_code == 503
        upgrade(bare.engine)
        assert health.get("/healthz").status_code == 200
        with bare.engine.begin() as connection:
            connection.execute(text("UPDATE alembic_version SET version_num = 'fffffffffff'"))
        assert health.get("/healthz").status_code == 503
    finally:
        bare.close()


@sqlite_only
def test_healthz(client: FlaskClient, web_settings: Settings) -> None:
    """200 while the database answers, 503 when it does not."""
    assert client.get("/healthz").status_code == 200
    down = Store(make_engine("postgresql+psycopg://nobody@127.0.0.1:9/none?connect_timeout=2"))
    try:
        app = create_app(web_settings, down)
        assert app.test_client().get("/healthz").status_code == 503
    finally:
        down.close()


@sqlite_only
def test_not_found_and_wrong_method_are_friendly(client: FlaskClient) -> None:
    """404 and 405 are pages of our own; 405 names the allowed methods."""
    missing = client.get("/wp-login.php")
    assert missing.status_code == 404 and "Page not found" in _page_text(missing)
    wrong = client.delete("/subscribe")
    assert wrong.status_code == 405 and "POST" in wrong.headers["Allow"]
    assert "<h1>" in _page_text(wrong)


def test_a_crash_is_a_friendly_500(app: Flask, store: Store) -> None:
    """A broken database gives a 500 page, never a stack trace."""
    with store.begin() as session:
        session.execute(text("DROP TABLE signup_attempts"))
    response = _post(app.test_client(), email="ada@example.com")
    page = _page_text(response)
    assert response.status_code == 500
    assert "Something went wrong" in page and "Traceback" not in page


# The command ---------------------------------------------------------------------------


def test_print_form_is_a_snippet_posting_here(runner: CliRunner, monkeypatch) -> None:
    """`serve --print-form` prints a form posting to SITE_URL/subscribe with the same fields
    and the honeypot."""
    monkeypatch.setenv("NEWSLETTER_SITE_URL", "https://news.example.com")
    result = runner.invoke(main, ["serve", "--print-form"])
    assert result.exit_code == 0
    snippet = result.stdout
    assert 'action="https://news.example.com/subscribe" method="post"' in snippet
    for field in ('name="email"', 'name="name"', 'name="website"'):
        assert field in snippet
    assert "<script" not in snippet


def test_readme_shows_the_printed_form(clean_env) -> None:
    """The snippet in the README is exactly what `serve --print-form` prints."""
    settings = load_settings(
        {"NEWSLETTER_SITE_URL": "https://news.example.com", "NEWSLETTER_NAME": "Weekly Links"},
        clean_env / ".env",
    )
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text("utf-8")
    assert f"```html\n{embed_form(settings)}```" in readme


def test_serve_on_a_busy_port_is_a_one_line_error(runner: CliRunner) -> None:
    """`serve` on a port another program holds exits 2 with one line naming the address."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runner.invoke(main, ["serve", "--port", str(port)])
    assert result.exit_code == 2
    assert result.stderr == f"error: cannot listen on 127.0.0.1:{port}: Address already in use\n"


# Request bodies --------------------------------------------------------------------------

FORM = "application/x-www-form-urlencoded"


def _raw_post(
    app: Flask, body: bytes, content_type: str = FORM, chunked: bool = False
) -> tuple[int, str]:
    """POST ``body`` to /subscribe straight through WSGI (the test client would rebuild
    the environ); ``chunked``: without Content-Length, as gunicorn hands on a chunked
    request (``wsgi.input_terminated``). Returns the status code and the page."""
    environ = EnvironBuilder(path="/subscribe", method="POST").get_environ()
    environ.update(
        {"wsgi.input": io.BytesIO(body), "CONTENT_TYPE": content_type, "REMOTE_ADDR": "192.0.2.7"}
    )
    if chunked:
        environ |= {"wsgi.input_terminated": True, "HTTP_TRANSFER_ENCODING": "chunked"}
        environ.pop("CONTENT_LENGTH", None)
    else:
        environ["CONTENT_LENGTH"] = str(len(body))
    status: list[str] = []
    page = b"".join(app.wsgi_app(environ, lambda line, headers: status.append(line)))
    return int(status[0].split()[0]), page.decode("utf-8")


@sqlite_only
def test_a_chunked_body_is_held_to_the_same_limit(app: Flask, store: Store) -> None:
    """A body without Content-Length is read up to the 16 KB limit: past it a 413 page and
    nobody stored; within it the form is read whole."""
    big = b"email=bob%40example.com&name=" + b"x" * 20_000
    status, page = _raw_post(app, big, chunked=True)
    assert status == 413 and "That was too much" in page
    assert _status(store, "bob@example.com") is None
    status, _ = _raw_post(app, b"email=ada%40example.com&name=Ada", chunked=True)
    assert status == 303 and _status(store, "ada@example.com") == "pending"


@sqlite_only
@pytest.mark.parametrize(
    ("body", "content_type", "says"),
    [
        (b"email=zoe%40example.com&name=Zo%EB", f"{FORM}; charset=iso-8859-1", "ISO-8859-1"),
        (b"email=zoe%40example.com&name=Zo%EB", FORM, "not sent as UTF-8"),
        (b"email=zoe%40example.com&name=Zo\xeb", FORM, "not sent as UTF-8"),
        ("email=zoe%40example.com".encode("utf-16"), f"{FORM}; charset=utf-16", "UTF-16"),
        (
            b'--B\r\nContent-Disposition: form-data; name="email"\r\n\r\nzoe@example.com\r\n'
            b'--B\r\nContent-Disposition: form-data; name="name"\r\n\r\nZo\xeb\r\n--B--\r\n',
            "multipart/form-data; boundary=B",
            "not sent as UTF-8",
        ),
    ],
    ids=["declared-latin-1", "percent-latin-1", "raw-latin-1", "utf-16", "multipart-latin-1"],
)
def test_a_form_not_in_utf8_is_a_clear_400(
    app: Flask, store: Store, body: bytes, content_type: str, says: str
) -> None:
    """A form in another charset, or with bytes that are not UTF-8, is a 400 page saying
    so (Werkzeug would have replaced the name's letters or dropped the field), and nobody
    is stored; a UTF-8 name goes through, chunked or not."""
    for chunked in (False, True):
        status, page = _raw_post(app, body, content_type, chunked)
        assert status == 400 and "That form could not be read" in page
        assert says in page and "Traceback" not in page
    assert _status(store, "zoe@example.com") is None
    fine = b"email=zoe%40example.com&name=Zo%C3%AB"
    assert _raw_post(app, fine, f"{FORM}; charset=UTF-8", chunked=True)[0] == 303
    with store.session() as session:
        assert subscribers.get(session, "zoe@example.com").name == "Zoë"


def test_chunked_bodies_through_the_real_server(server) -> None:
    """Through gunicorn: a chunked signup is read whole, a chunked 100 KB body is a 413."""
    from urllib.parse import urlsplit

    parts = urlsplit(server.url)

    def chunked(chunks: list[bytes]) -> int:
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        try:
            connection.request(
                "POST",
                "/subscribe",
                body=iter(chunks),
                headers={"Content-Type": FORM},
                encode_chunked=True,
            )
            return connection.getresponse().status
        finally:
            connection.close()

    assert chunked([b"email=ada%40example", b".com&name=Ada"]) == 303
    assert server.status("ada@example.com") == "pending"
    assert chunked([b"email=bob%40example.com&name="] + [b"x" * 1000] * 100) == 413
    assert server.status("bob@example.com") is None
