"""Provider webhooks: who sent the request, checked, and what it reports, as events.

    Amazon SES via SNS   the SNS message's signature, checked against the signing
                         certificate, fetched only from an SNS host of AWS over https;
                         only the topics in NEWSLETTER_WEBHOOK_SNS_TOPIC_ARN
    Postmark             HTTP basic auth with NEWSLETTER_WEBHOOK_SECRET_POSTMARK
    Mailgun              HMAC-SHA256 of timestamp and token with the signing key, and a
                         timestamp no more than FRESH_SECONDS away from now

A request that fails the check is refused (:class:`Refused`, 401 or 403) before its
payload is read. A provider that proved who it is may name a subscriber by address
alone; the same event delivered twice has the same identity and counts once.
No Flask here: :mod:`newsletter.web_hooks` is the thin web side.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit

from newsletter.bounce_reports import COMPLAINT, DELIVERED, HARD, SOFT, one_line
from newsletter.bounces import Event
from newsletter.verp import DELIVERY_HEADER, tokens_in

log = logging.getLogger("newsletter.bounces")

FRESH_SECONDS = 15 * 60  # Mailgun: a signed request older (or newer) than this is refused
CERT_MAX_BYTES = 64 * 1024
_SNS_HOST = re.compile(r"sns\.[a-z0-9-]+\.amazonaws\.com(\.cn)?")
_ENHANCED = re.compile(r"(?<![\w.])([245])\.\d{1,3}\.\d{1,3}(?!\d|\.\d)")
_HEADER_TOKEN = re.compile(rf"^{DELIVERY_HEADER}:[ \t]*([0-9A-Za-z-]+)", re.I | re.MULTILINE)
_MESSAGE_ID = re.compile(r"^Message-ID:[ \t]*<([^<>\s]+)>", re.I | re.MULTILINE)
_SNS_FIELDS = {
    "Notification": ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"),
    "SubscriptionConfirmation": (
        "Message",
        "MessageId",
        "SubscribeURL",
        "Timestamp",
        "Token",
        "TopicArn",
        "Type",
    ),
}
_SNS_FIELDS["UnsubscribeConfirmation"] = _SNS_FIELDS["SubscriptionConfirmation"]

POSTMARK_TYPES = {
    HARD: {"HardBounce", "BadEmailAddress", "ManuallyDeactivated"},
    SOFT: {"SoftBounce", "Transient", "DnsError", "Blocked", "DMARCPolicy", "SMTPApiError"},
    COMPLAINT: {"SpamComplaint"},
}

Fetch = Callable[[str], bytes]


class Refused(Exception):
    """The request failed the provider's authentication or signature check."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class BadPayload(Exception):
    """An authenticated request whose body is not what the provider sends."""


def http_get(url: str) -> bytes:
    """GET over https with a timeout and a size limit (a certificate, a confirmation)."""
    import httpx

    with httpx.stream("GET", url, timeout=10.0, follow_redirects=False) as response:
        response.raise_for_status()
        body = b""
        for chunk in response.iter_bytes():
            body += chunk
            if len(body) > CERT_MAX_BYTES:
                raise BadPayload(f"{url}: answer larger than {CERT_MAX_BYTES} bytes")
        return body


def sns_host(url: str) -> bool:
    """Whether ``url`` is https on an SNS host of AWS (nothing else is ever fetched)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return False
    return (
        parts.scheme == "https"
        and not parts.username
        and port in (None, 443)
        and bool(_SNS_HOST.fullmatch(parts.hostname or ""))
    )


# Amazon SES through SNS -----------------------------------------------------------------


@dataclass(frozen=True)
class SnsMessage:
    """A verified SNS message: what kind, and its fields."""

    type: str
    fields: dict


class SnsVerifier:
    """Checks SNS signatures; signing certificates are fetched once each (``fetch``)."""

    def __init__(self, topics: tuple[str, ...], fetch: Fetch = http_get) -> None:
        self.topics = topics
        self.fetch = fetch
        self._keys: dict[str, object] = {}
        self._lock = threading.Lock()

    def verify(self, body: bytes) -> SnsMessage:
        try:
            fields = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise Refused(403, "not an SNS message (not JSON)") from None
        if not isinstance(fields, dict) or fields.get("Type") not in _SNS_FIELDS:
            raise Refused(403, "not an SNS message")
        if fields.get("TopicArn") not in self.topics:
            raise Refused(403, f"topic {str(fields.get('TopicArn'))[:200]!r} is not accepted")
        url = str(fields.get("SigningCertURL") or fields.get("SigningCertUrl") or "")
        if not sns_host(url) or not urlsplit(url).path.endswith(".pem"):
            raise Refused(403, f"signing certificate URL {url[:200]!r} is not on an SNS host")
        version = str(fields.get("SignatureVersion"))
        if version not in ("1", "2"):
            raise Refused(403, f"unknown SNS signature version {version[:10]!r}")
        try:
            signature = base64.b64decode(str(fields.get("Signature", "")), validate=True)
        except (binascii.Error, ValueError):
            raise Refused(403, "the signature is not base64") from None
        signed = "".join(
            f"{name}\n{fields[name]}\n"
            for name in _SNS_FIELDS[fields["Type"]]
            if fields.get(name) is not None
        ).encode("utf-8")
        self._check(url, signature, signed, version)
        return SnsMessage(fields["Type"], fields)

    def _check(self, url: str, signature: bytes, signed: bytes, version: str) -> None:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        key = self._key(url)
        digest = hashes.SHA256() if version == "2" else hashes.SHA1()  # SNS signature version 1
        try:
            key.verify(signature, signed, padding.PKCS1v15(), digest)  # type: ignore[attr-defined]
        except (InvalidSignature, ValueError, TypeError):
            raise Refused(403, "the SNS signature does not match") from None

    def _key(self, url: str):
        from cryptography import x509
        from cryptography.hazmat.primitives.asymmetric import rsa

        with self._lock:
            key = self._keys.get(url)
        if key is not None:
            return key
        try:
            certificate = x509.load_pem_x509_certificate(self.fetch(url))
        except Exception as exc:
            raise Refused(403, f"signing certificate {url}: {type(exc).__name__}") from None
        now = datetime.now(UTC)
        if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
            raise Refused(403, f"signing certificate {url} is not valid now")
        key = certificate.public_key()
        if not isinstance(key, rsa.RSAPublicKey):
            raise Refused(403, f"signing certificate {url} has no RSA key")
        with self._lock:
            if len(self._keys) > 20:
                self._keys.clear()
            self._keys[url] = key
        return key


def confirm_subscription(message: SnsMessage, fetch: Fetch) -> None:
    """Visit the SubscribeURL of a verified SubscriptionConfirmation (SNS hosts only)."""
    url = str(message.fields.get("SubscribeURL") or "")
    if not sns_host(url):
        raise Refused(403, f"SubscribeURL {url[:200]!r} is not on an SNS host")
    fetch(url)
    log.info("SNS subscription to %s confirmed", message.fields.get("TopicArn"))


def ses_events(message: SnsMessage) -> list[Event]:
    """The bounce, complaint or delivery events of an SES notification."""
    try:
        payload = json.loads(message.fields.get("Message") or "")
    except ValueError:
        return []  # SNS's own text notices
    if not isinstance(payload, dict):
        return []
    kind = payload.get("notificationType") or payload.get("eventType")
    mail = _dict(payload.get("mail"))
    headers = [h for h in mail.get("headers") or [] if isinstance(h, dict)]
    tokens = [
        *tokens_in(str(mail.get("source") or "")),
        *(str(h.get("value", "")).strip() for h in headers if _named(h, DELIVERY_HEADER)),
        *tokens_in(" ".join(str(h.get("value", "")) for h in headers if _named(h, "Return-Path"))),
    ]
    message_ids = [
        str(h.get("value", "")).strip().strip("<>") for h in headers if _named(h, "Message-ID")
    ]
    common_id = _dict(mail.get("commonHeaders")).get("messageId")
    if common_id:
        message_ids.append(str(common_id).strip().strip("<>"))
    clues = {"tokens": _unique(tokens), "message_ids": _unique(message_ids), "by_address": True}
    sns_id = str(message.fields.get("MessageId") or "")
    events = []
    if kind == "Bounce":
        bounce = _dict(payload.get("bounce"))
        identity = f"ses:{bounce.get('feedbackId') or sns_id}"
        permanent = bounce.get("bounceType") == "Permanent"
        for recipient in _dicts(bounce.get("bouncedRecipients")):
            words = str(recipient.get("diagnosticCode") or "")
            status = _enhanced(recipient.get("status")) or _enhanced(words)
            found = _by_status(status) or (HARD if permanent else SOFT)
            detail = words or f"{bounce.get('bounceType')}/{bounce.get('bounceSubType')}"
            events.append(
                Event(
                    found,
                    "ses",
                    identity,
                    _address(recipient.get("emailAddress")),
                    status,
                    one_line(detail),
                    _when(bounce.get("timestamp")),
                    **clues,
                )
            )
    elif kind == "Complaint":
        complaint = _dict(payload.get("complaint"))
        feedback_type = str(complaint.get("complaintFeedbackType") or "abuse")
        if feedback_type == "not-spam":
            return []
        agent = complaint.get("userAgent") or "the mailbox provider"
        for recipient in _dicts(complaint.get("complainedRecipients")):
            events.append(
                Event(
                    COMPLAINT,
                    "ses",
                    f"ses:{complaint.get('feedbackId') or sns_id}",
                    _address(recipient.get("emailAddress")),
                    feedback_type,
                    one_line(f"{feedback_type} complaint from {agent}"),
                    _when(complaint.get("timestamp")),
                    **clues,
                )
            )
    elif kind == "Delivery":
        delivery = _dict(payload.get("delivery"))
        for address in delivery.get("recipients") or []:
            events.append(
                Event(
                    DELIVERED,
                    "ses",
                    f"ses:{sns_id}",
                    _address(address),
                    None,
                    one_line(str(delivery.get("smtpResponse") or "delivered")),
                    _when(delivery.get("timestamp")),
                    **clues,
                )
            )
    return events


# Postmark -------------------------------------------------------------------------------


def check_basic_auth(header: str | None, secret: str) -> None:
    """Postmark's basic auth, compared in constant time (Refused 401)."""
    scheme, _, encoded = (header or "").partition(" ")
    if scheme.lower() != "basic" or not encoded:
        raise Refused(401, "no basic auth")
    try:
        given = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise Refused(401, "basic auth that is not base64") from None
    if not hmac.compare_digest(given, secret.encode("utf-8")):
        raise Refused(401, "wrong user or password")


def postmark_events(body: bytes) -> list[Event]:
    """The event of a Postmark webhook (bounce, spam complaint or delivery)."""
    payload = _json(body)
    record = payload.get("RecordType")
    address = _address(payload.get("Email") or payload.get("Recipient"))
    metadata = _dict(payload.get("Metadata"))
    content = str(payload.get("Content") or "")[:262144]
    clues = {
        "tokens": _unique(
            [
                *(str(v) for v in metadata.values()),
                *tokens_in(content),
                *(m.group(1) for m in _HEADER_TOKEN.finditer(content)),
            ]
        ),
        "message_ids": _unique(m.group(1) for m in _MESSAGE_ID.finditer(content)),
        "by_address": True,
    }
    if record == "Delivery":
        identity = f"postmark:delivery:{payload.get('MessageID')}:{address}"
        detail = one_line(str(payload.get("Details") or "delivered"))
        when = _when(payload.get("DeliveredAt"))
        return [Event(DELIVERED, "postmark", identity, address, None, detail, when, **clues)]
    if record not in ("Bounce", "SpamComplaint"):
        return []
    postmark_type = str(payload.get("Type") or ("SpamComplaint" if record != "Bounce" else ""))
    found = next((k for k, types in POSTMARK_TYPES.items() if postmark_type in types), None)
    if found is None:
        return []  # auto-responders, subscribe requests, challenge verifications
    words = " ".join(str(payload.get(k) or "") for k in ("Details", "Description"))
    status = _enhanced(words)
    if found != COMPLAINT:
        found = _by_status(status) or found
    detail = one_line(f"{postmark_type}: {payload.get('Details') or payload.get('Description')}")
    identity = f"postmark:{payload.get('ID')}"
    return [
        Event(
            found,
            "postmark",
            identity,
            address,
            status or postmark_type,
            detail,
            _when(payload.get("BouncedAt")),
            **clues,
        )
    ]


# Mailgun --------------------------------------------------------------------------------


def check_mailgun(payload: dict, key: str, now: float | None = None) -> None:
    """Mailgun's signature: HMAC-SHA256 of timestamp and token, and a fresh timestamp."""
    signature = _dict(payload.get("signature"))
    timestamp, token = str(signature.get("timestamp", "")), str(signature.get("token", ""))
    given = str(signature.get("signature", ""))
    if not (timestamp and token and given):
        raise Refused(403, "the request is not signed")
    expected = hmac.new(key.encode(), (timestamp + token).encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, given.lower()):
        raise Refused(403, "the signature does not match")
    try:
        age = (time.time() if now is None else now) - float(timestamp)
    except ValueError:
        raise Refused(403, "the timestamp is not a number") from None
    if abs(age) > FRESH_SECONDS:
        raise Refused(403, f"the timestamp is {abs(age):.0f} s away from now (stale or replayed)")


def mailgun_payload(body: bytes) -> dict:
    return _json(body)


def mailgun_events(payload: dict) -> list[Event]:
    """The event of a Mailgun webhook (failed, complained or delivered)."""
    data = _dict(payload.get("event-data"))
    event = data.get("event")
    address = _address(data.get("recipient"))
    headers = _dict(_dict(data.get("message")).get("headers"))
    variables = _dict(data.get("user-variables"))
    clues = {
        "tokens": _unique(str(v) for v in variables.values()),
        "message_ids": _unique([str(headers.get("message-id") or "").strip().strip("<>")]),
        "by_address": True,
    }
    identity = f"mailgun:{data.get('id') or payload.get('signature', {}).get('token')}"
    when = _when(data.get("timestamp"))
    if event == "failed":
        status_block = _dict(data.get("delivery-status"))
        words = " ".join(
            str(status_block.get(k) or "")
            for k in ("code", "enhanced-code", "message", "description")
        )
        status = _enhanced(str(status_block.get("enhanced-code") or "")) or _enhanced(words)
        permanent = data.get("severity") == "permanent"
        found = _by_status(status) or (HARD if permanent else SOFT)
        detail = one_line(words) or str(data.get("reason") or "failed")
        return [Event(found, "mailgun", identity, address, status, detail, when, **clues)]
    if event == "complained":
        return [Event(COMPLAINT, "mailgun", identity, address, "abuse", "complaint", when, **clues)]
    if event == "delivered":
        status_block = _dict(data.get("delivery-status"))
        detail = one_line(f"{status_block.get('code', '')} {status_block.get('message', '')}")
        return [
            Event(
                DELIVERED, "mailgun", identity, address, None, detail or "delivered", when, **clues
            )
        ]
    return []


# Helpers --------------------------------------------------------------------------------


def _json(body: bytes) -> dict:
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadPayload("the body is not JSON") from None
    if not isinstance(payload, dict):
        raise BadPayload("the body is not a JSON object")
    return payload


def _dict(value: object) -> dict:
    return value if isinstance(value, dict) else {}


def _dicts(value: object) -> list[dict]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _named(header: dict, name: str) -> bool:
    return str(header.get("name", "")).lower() == name.lower()


def _address(value: object) -> str | None:
    text = str(value or "").strip().strip("<>").lower()
    return text if "@" in text and len(text) <= 320 else None


def _enhanced(value: object) -> str | None:
    match = _ENHANCED.search(str(value or ""))
    return match.group(0) if match else None


def _by_status(status: str | None) -> str | None:
    return {"5": HARD, "4": SOFT}.get(status[0]) if status else None


def _when(value: object) -> datetime | None:
    """A provider's time: ISO 8601 (SES, Postmark) or epoch seconds (Mailgun)."""
    if isinstance(value, int | float):
        try:
            return datetime.fromtimestamp(float(value), UTC)
        except (OverflowError, OSError, ValueError):
            return None
    if not isinstance(value, str) or not value:
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).astimezone(UTC)


def _unique(values) -> tuple[str, ...]:
    return tuple(dict.fromkeys(v for v in values if v))
