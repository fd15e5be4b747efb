"""Provider webhooks: signed requests change statuses; unsigned, forged, stale and replayed
ones change nothing. SNS certificates are made here and served by a local server."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import httpx
import pytest
from bounce_helpers import SECRET, send_issue, status_of
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from newsletter.config import load_settings
from newsletter.verp import Verp
from newsletter.web import create_app

TOPIC = "arn:aws:sns:us-east-1:123456789012:newsletter-bounces"
CERT_URL = "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-test.pem"
MAILGUN_KEY = "key-mailgun-signing-0123456789"
VERP = Verp(SECRET, "bounces@example.com", "links@example.com")


def _certificate(key: rsa.RSAPrivateKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.amazonaws.com")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


class _Server:
    """A local HTTP server standing in for AWS: it serves the signing certificate and
    records every GET (certificate and subscription confirmation alike)."""

    def __init__(self, pem: bytes) -> None:
        seen = self.seen = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                seen.append(self.path)
                body = pem if self.path.endswith(".pem") else b"<ConfirmSubscriptionResponse/>"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def fetch(self, url: str) -> bytes:
        """What the app's fetch does, pointed here: the path and query of an AWS URL."""
        parts = urlsplit(url)
        local = f"http://127.0.0.1:{self.httpd.server_port}{parts.path}"
        return httpx.get(local + (f"?{parts.query}" if parts.query else ""), timeout=5).content

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def signing_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def aws(signing_key):
    server = _Server(_certificate(signing_key))
    yield server
    server.close()


@pytest.fixture
def hooks(clean_env, database_url, store, aws):
    """The web app with every webhook secret set; its HTTP fetches go to the local server."""
    settings = load_settings(
        {
            "NEWSLETTER_DATABASE_URL": database_url,
            "NEWSLETTER_SECRET_KEY": SECRET,
            "NEWSLETTER_FROM": "Weekly Links <links@example.com>",
            "NEWSLETTER_BOUNCE_ADDRESS": "bounces@example.com",
            "NEWSLETTER_WEBHOOK_SNS_TOPIC_ARN": TOPIC,
            "NEWSLETTER_WEBHOOK_SECRET_POSTMARK": "postmark:hook-password",
            "NEWSLETTER_WEBHOOK_SECRET_MAILGUN": MAILGUN_KEY,
        },
        dotenv_path=clean_env / ".env",
    )
    app = create_app(settings, store)
    app.extensions["newsletter.webhooks"].fetch = aws.fetch
    return app.test_client()


def _sns(key, kind: str, fields: dict, version: str = "2", cert_url: str = CERT_URL) -> bytes:
    message = {
        "Type": kind,
        "MessageId": fields.pop("MessageId", "b1b2c3d4-0000-4000-8000-000000000001"),
        "TopicArn": TOPIC,
        "Timestamp": "2026-12-01T10:00:00.000Z",
        "SignatureVersion": version,
        "SigningCertURL": cert_url,
        **fields,
    }
    order = (
        ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type")
        if kind == "Notification"
        else ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type")
    )
    signed = "".join(f"{k}\n{message[k]}\n" for k in order if k in message).encode()
    digest = hashes.SHA256() if version == "2" else hashes.SHA1()
    message["Signature"] = base64.b64encode(key.sign(signed, padding.PKCS1v15(), digest)).decode()
    return json.dumps(message).encode()


def _ses_bounce(sent, status: str = "5.1.1", feedback: str = "fb-1") -> str:
    return json.dumps(
        {
            "notificationType": "Bounce",
            "bounce": {
                "feedbackId": feedback,
                "bounceType": "Permanent" if status.startswith("5") else "Transient",
                "bounceSubType": "General",
                "bouncedRecipients": [
                    {
                        "emailAddress": sent.email,
                        "action": "failed",
                        "status": status,
                        "diagnosticCode": f"smtp; 550 {status} user unknown",
                    }
                ],
                "timestamp": "2026-12-01T09:59:59.000Z",
            },
            "mail": {
                "source": f"bounces+{VERP.token(sent.delivery_id)}@example.com",
                "messageId": "0100018c-ses-own-id",
                "headers": [{"name": "X-Newsletter-Delivery", "value": "not-a-token"}],
                "commonHeaders": {"messageId": "<0100018c@email.amazonses.com>"},
            },
        }
    )


def test_ses_bounce_signed_by_sns_suppresses(hooks, store, signing_key, aws) -> None:
    """A signed SES bounce (signature version 1 and 2) suppresses the address it names."""
    first, second = send_issue(store, "gone@example.org", "also@example.org")
    for version, sent in (("2", first), ("1", second)):
        body = _sns(
            signing_key, "Notification", {"Message": _ses_bounce(sent, feedback=version)}, version
        )
        answer = hooks.post("/webhooks/ses", data=body, content_type="text/plain")
        assert answer.status_code == 200, answer.data
    assert status_of(store, "gone@example.org") == "bounced"
    assert status_of(store, "also@example.org") == "bounced"
    assert aws.seen == ["/SimpleNotificationService-test.pem"]  # fetched once, then kept


def test_ses_complaint_and_replay_count_once(hooks, store, signing_key) -> None:
    """A complaint suppresses; the same notification again is answered and counted once."""
    [sent] = send_issue(store, "angry@example.org")
    complaint = json.dumps(
        {
            "notificationType": "Complaint",
            "complaint": {
                "feedbackId": "c-1",
                "complaintFeedbackType": "abuse",
                "complainedRecipients": [{"emailAddress": "angry@example.org"}],
            },
            "mail": {"source": "links@example.com", "headers": []},
        }
    )
    body = _sns(signing_key, "Notification", {"Message": complaint})
    first = hooks.post("/webhooks/ses", data=body)
    again = hooks.post("/webhooks/ses", data=body)
    assert first.status_code == again.status_code == 200
    assert b"1 complaints" in first.data and b"1 already recorded" in again.data
    assert status_of(store, sent.email) == "complained"


@pytest.mark.parametrize("tamper", ["message", "signature", "topic", "unsigned"])
def test_ses_forged_requests_are_refused(hooks, store, signing_key, tamper: str) -> None:
    """A changed message, a bad signature, another topic or no signature: 403, no change."""
    [sent] = send_issue(store, "victim@example.org")
    body = json.loads(_sns(signing_key, "Notification", {"Message": _ses_bounce(sent)}))
    if tamper == "message":
        body["Message"] = body["Message"].replace("Permanent", "Transient")
    elif tamper == "signature":
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        body = json.loads(_sns(other, "Notification", {"Message": _ses_bounce(sent)}))
    elif tamper == "topic":
        body["TopicArn"] = "arn:aws:sns:us-east-1:999999999999:someone-else"
    else:
        del body["Signature"]
    answer = hooks.post("/webhooks/ses", data=json.dumps(body))
    assert answer.status_code == 403
    assert status_of(store, "victim@example.org") == "active"


@pytest.mark.parametrize(
    "cert_url",
    [
        "https://evil.example.com/SimpleNotificationService-test.pem",
        "https://sns.us-east-1.amazonaws.com.evil.example.com/cert.pem",
        "http://sns.us-east-1.amazonaws.com/SimpleNotificationService-test.pem",
    ],
)
def test_a_certificate_url_off_the_sns_hosts_is_refused(
    hooks, store, signing_key, aws, cert_url: str
) -> None:
    """A signing certificate on another host (or over http) is never fetched: 403."""
    [sent] = send_issue(store, "victim@example.org")
    body = _sns(signing_key, "Notification", {"Message": _ses_bounce(sent)}, cert_url=cert_url)
    assert hooks.post("/webhooks/ses", data=body).status_code == 403
    assert aws.seen == []
    assert status_of(store, "victim@example.org") == "active"


def test_sns_subscription_is_confirmed(hooks, signing_key, aws) -> None:
    """A signed SubscriptionConfirmation is confirmed by visiting its SubscribeURL."""
    url = "https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription&Token=tok123"
    body = _sns(
        signing_key,
        "SubscriptionConfirmation",
        {"Message": "You have chosen to subscribe", "SubscribeURL": url, "Token": "tok123"},
    )
    answer = hooks.post("/webhooks/ses", data=body)
    assert answer.status_code == 200
    assert "/?Action=ConfirmSubscription&Token=tok123" in aws.seen


def _postmark(sent, kind: str = "HardBounce", record: str = "Bounce", ident: int = 42) -> dict:
    return {
        "RecordType": record,
        "ID": ident,
        "Type": kind,
        "TypeCode": 1,
        "Email": sent.email,
        "BouncedAt": "2026-12-01T10:00:00Z",
        "Details": "smtp;550 5.1.1 The email account that you tried to reach does not exist",
        "Description": "The server was unable to deliver your message",
        "MessageID": "883953f4-6105-42a2-a16a-77a8eac79483",
    }


def _basic(user: str, password: str) -> dict:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def test_postmark_with_basic_auth(hooks, store) -> None:
    """Postmark's bounce with the right basic auth suppresses; replays count once."""
    [gone, spam] = send_issue(store, "gone@example.org", "spam@example.org")
    auth = _basic("postmark", "hook-password")
    answer = hooks.post("/webhooks/postmark", json=_postmark(gone), headers=auth)
    replay = hooks.post("/webhooks/postmark", json=_postmark(gone), headers=auth)
    assert answer.status_code == replay.status_code == 200
    assert b"1 already recorded" in replay.data
    complaint = _postmark(spam, "SpamComplaint", "SpamComplaint", 43)
    assert hooks.post("/webhooks/postmark", json=complaint, headers=auth).status_code == 200
    assert status_of(store, "gone@example.org") == "bounced"
    assert status_of(store, "spam@example.org") == "complained"


def test_a_webhook_event_carrying_the_bounced_message_is_taken(hooks, store) -> None:
    """Postmark with "include bounce content" sends the returned message along: a body far
    over the signup form's 16 KB is taken on a webhook route; one over 1 MB is refused."""
    [gone] = send_issue(store, "gone@example.org")
    auth = _basic("postmark", "hook-password")
    event = _postmark(gone) | {"Content": "Received: from mx\r\n" + "x" * 200_000}
    assert hooks.post("/webhooks/postmark", json=event, headers=auth).status_code == 200
    assert status_of(store, "gone@example.org") == "bounced"
    huge = _postmark(gone) | {"Content": "x" * 1_100_000}
    assert hooks.post("/webhooks/postmark", json=huge, headers=auth).status_code == 413


@pytest.mark.parametrize("auth", [{}, _basic("postmark", "wrong"), {"Authorization": "Bearer x"}])
def test_postmark_without_the_password_is_refused(hooks, store, auth: dict) -> None:
    """No or wrong basic auth: 401 with a challenge, and nothing changes."""
    [sent] = send_issue(store, "victim@example.org")
    answer = hooks.post("/webhooks/postmark", json=_postmark(sent), headers=auth)
    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"].startswith("Basic")
    assert status_of(store, "victim@example.org") == "active"


def _mailgun(
    sent,
    event: str = "failed",
    *,
    at: float | None = None,
    key: str = MAILGUN_KEY,
    event_id: str = "mg-event-1",
) -> dict:
    timestamp = str(int(at if at is not None else time.time()))
    token = hashlib.sha256(f"{event_id}{timestamp}".encode()).hexdigest()[:50]
    signature = hmac.new(key.encode(), (timestamp + token).encode(), hashlib.sha256).hexdigest()
    return {
        "signature": {"timestamp": timestamp, "token": token, "signature": signature},
        "event-data": {
            "event": event,
            "id": event_id,
            "severity": "permanent",
            "recipient": sent.email,
            "timestamp": float(timestamp),
            "delivery-status": {"code": 550, "message": "5.1.1 mailbox does not exist"},
            "message": {"headers": {"message-id": sent.message_id}},
        },
    }


def test_mailgun_signed_event_suppresses_and_counts_once(hooks, store) -> None:
    """A signed, fresh Mailgun failure suppresses; the same event again counts once."""
    [sent, angry] = send_issue(store, "gone@example.org", "angry@example.org")
    payload = _mailgun(sent)
    assert hooks.post("/webhooks/mailgun", json=payload).status_code == 200
    again = hooks.post("/webhooks/mailgun", json=payload)
    assert again.status_code == 200 and b"1 already recorded" in again.data
    complained = _mailgun(angry, "complained", event_id="mg-event-2")
    assert hooks.post("/webhooks/mailgun", json=complained).status_code == 200
    assert status_of(store, "gone@example.org") == "bounced"
    assert status_of(store, "angry@example.org") == "complained"


@pytest.mark.parametrize("problem", ["unsigned", "wrong key", "stale", "from the future"])
def test_mailgun_bad_signatures_are_refused(hooks, store, problem: str) -> None:
    """Unsigned, wrongly signed, stale or far-future requests: 403, nothing changes."""
    [sent] = send_issue(store, "victim@example.org")
    if problem == "unsigned":
        payload = _mailgun(sent)
        del payload["signature"]
    elif problem == "wrong key":
        payload = _mailgun(sent, key="not-the-key")
    elif problem == "stale":
        payload = _mailgun(sent, at=time.time() - 3600)
    else:
        payload = _mailgun(sent, at=time.time() + 3600)
    assert hooks.post("/webhooks/mailgun", json=payload).status_code == 403
    assert status_of(store, "victim@example.org") == "active"


def test_routes_without_a_secret_answer_404(clean_env, database_url, store) -> None:
    """With no webhook secret set, every webhook route is a 404."""
    settings = load_settings(
        {"NEWSLETTER_DATABASE_URL": database_url}, dotenv_path=clean_env / ".env"
    )
    client = create_app(settings, store).test_client()
    for route in ("ses", "postmark", "mailgun"):
        assert client.post(f"/webhooks/{route}", data=b"{}").status_code == 404
