"""Provider webhooks on the web app: the thin side of :mod:`newsletter.bounce_webhooks`.

    POST /webhooks/ses        Amazon SES notifications through SNS (signed messages)
    POST /webhooks/postmark   Postmark (HTTP basic auth)
    POST /webhooks/mailgun    Mailgun (signed with the webhook signing key)

A route whose secret is not set answers 404, as if it did not exist. A request that
fails its check gets 401 or 403 and changes nothing; one that passes answers 200 with
what it recorded (a provider retries anything else). HTTP requests the routes make
themselves (SNS certificates, the subscription confirmation) go through the ``fetch``
of :class:`Hooks`, which tests point at a local server.
"""

from __future__ import annotations

import logging

from flask import Blueprint, Response, abort, current_app
from flask import request as flask_request

from newsletter.bounce_webhooks import (
    BadPayload,
    Fetch,
    Refused,
    SnsVerifier,
    check_basic_auth,
    check_mailgun,
    confirm_subscription,
    http_get,
    mailgun_events,
    mailgun_payload,
    postmark_events,
    ses_events,
)
from newsletter.bounces import Event, record_events

log = logging.getLogger("newsletter.bounces")

bp = Blueprint("webhooks", __name__, url_prefix="/webhooks")


class Hooks:
    """What the webhook routes keep between requests: the SNS certificates fetched."""

    def __init__(self, fetch: Fetch = http_get) -> None:
        self.fetch = fetch
        self._sns: SnsVerifier | None = None

    def sns(self, topics: tuple[str, ...]) -> SnsVerifier:
        if self._sns is None or self._sns.topics != topics or self._sns.fetch is not self.fetch:
            self._sns = SnsVerifier(topics, self.fetch)
        return self._sns


@bp.record_once
def _set_up(state) -> None:
    state.app.extensions.setdefault("newsletter.webhooks", Hooks())


def _context():
    web = current_app.extensions["newsletter"]
    return web.settings, web.store, current_app.extensions["newsletter.webhooks"]


def _answer(status: int, text: str, **headers: str) -> Response:
    return Response(text + "\n", status, mimetype="text/plain", headers=headers)


def _refused(provider: str, exc: Refused) -> Response:
    log.warning("webhook %s refused (%d): %s", provider, exc.status, exc)
    headers = {"WWW-Authenticate": 'Basic realm="newsletter webhooks"'} if exc.status == 401 else {}
    return _answer(exc.status, "refused", **headers)


def _recorded(events: list[Event]) -> Response:
    settings, store, _ = _context()
    tally = record_events(store, settings, events)
    return _answer(200, tally.summary())


@bp.post("/ses")
def ses() -> Response:
    settings, _, hooks = _context()
    if not settings.sns_topic_arns:
        abort(404)
    verifier = hooks.sns(settings.sns_topic_arns)
    try:
        message = verifier.verify(flask_request.get_data())
        if message.type == "SubscriptionConfirmation":
            confirm_subscription(message, hooks.fetch)
            return _answer(200, "subscribed")
    except Refused as exc:
        return _refused("ses", exc)
    except Exception as exc:  # the confirmation URL did not answer: SNS sends it again
        log.warning("webhook ses: confirming the subscription failed: %s", exc)
        return _answer(502, "the subscription could not be confirmed")
    if message.type != "Notification":
        return _answer(200, "ignored")
    return _recorded(ses_events(message))


@bp.post("/postmark")
def postmark() -> Response:
    settings, _, _ = _context()
    if not settings.webhook_secret_postmark:
        abort(404)
    try:
        check_basic_auth(
            flask_request.headers.get("Authorization"), settings.webhook_secret_postmark
        )
        events = postmark_events(flask_request.get_data())
    except Refused as exc:
        return _refused("postmark", exc)
    except BadPayload as exc:
        return _answer(400, str(exc))
    return _recorded(events)


@bp.post("/mailgun")
def mailgun() -> Response:
    settings, _, _ = _context()
    if not settings.webhook_secret_mailgun:
        abort(404)
    try:
        payload = mailgun_payload(flask_request.get_data())
        check_mailgun(payload, settings.webhook_secret_mailgun)
    except BadPayload:
        return _refused("mailgun", Refused(403, "the request is not signed JSON"))
    except Refused as exc:
        return _refused("mailgun", exc)
    return _recorded(mailgun_events(payload))
