"""Reading one returned message: a DSN, a feedback report, a server's own bounce format,
an auto-reply, or none of these. Pure: bytes in, a :class:`Report` out.

    multipart/report; report-type=delivery-status   RFC 3464, read here with the email
                                                    package: each recipient block's Status
                                                    decides (5.x.x hard, 4.x.x soft,
                                                    2.x.x delivered), whatever Action says
    multipart/report; report-type=feedback-report   RFC 5965 (ARF): Feedback-Type abuse or
                                                    fraud is a complaint
    anything else                                   flufl.bounce's detectors (Exim, qmail,
                                                    old Exchange, ...), then auto-reply marks

What names the delivery is gathered as it is read: tokens after a ``+`` in the addresses
the report was sent to (VERP) or in the returned message's Return-Path, our header, and
the Message-IDs of the returned message. Which of them are genuine is for the caller.
"""

from __future__ import annotations

import base64
import binascii
import email
import hashlib
import quopri
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import Message
from email.parser import HeaderParser
from email.utils import parsedate_to_datetime

from newsletter.verp import DELIVERY_HEADER, tokens_in

HARD, SOFT, COMPLAINT, DELIVERED = "hard", "soft", "complaint", "delivered"
COMPLAINT_TYPES = ("abuse", "fraud")  # others (auth-failure, not-spam, virus) are no complaint
DETAIL_MAX = 1000
SCAN_MAX = 256 * 1024  # characters of a non-standard bounce's text searched for clues

_ENHANCED = re.compile(r"(?<![\w.])([245])\.(\d{1,3})\.(\d{1,3})(?!\d|\.\d)")
_SMTP_REPLY = re.compile(r"(?<![\d.])([245])\d\d(?:[ -]|$)")
_REPLY_LINE = re.compile(r"^.*(?<![\d.])[45]\d\d[ -].*$", re.MULTILINE)
_HEADER_TOKEN = re.compile(rf"^{DELIVERY_HEADER}:[ \t]*([0-9A-Za-z-]+)", re.I | re.MULTILINE)
_HEADER_MESSAGE_ID = re.compile(r"^Message-ID:[ \t]*<([^<>\s]+)>", re.I | re.MULTILINE)
_ENVELOPE_HEADERS = (
    "To",
    "Cc",
    "Delivered-To",
    "X-Original-To",
    "Envelope-To",
    "X-Envelope-To",
    "X-Original-Rcpt-To",
)
_AUTO_SUBJECT = re.compile(
    r"^\s*(out of (the )?office|automatic reply|auto[- ]?reply|autoreply|auto:|"
    r"abwesenheitsnotiz|réponse automatique|respuesta automática|on vacation|vacation)",
    re.I,
)
_DAEMON = re.compile(r"mailer-daemon|postmaster|mail delivery", re.I)


@dataclass(frozen=True)
class Finding:
    """What a report says about one recipient."""

    kind: str  # hard, soft, complaint or delivered
    address: str | None  # as the report names it (redacted in some complaints)
    status: str | None  # the enhanced status code (5.1.1), or a complaint's feedback type
    detail: str  # the server's words, on one line


@dataclass(frozen=True)
class Report:
    """One returned message, read. ``verdict``: ``report`` (findings below), ``auto-reply``
    or ``unrecognised`` (``reason`` says why)."""

    verdict: str
    identity: str  # names the message itself: its Message-ID, or a hash of its content
    findings: tuple[Finding, ...] = ()
    tokens: tuple[str, ...] = ()  # candidates for a delivery token, in order of trust
    message_ids: tuple[str, ...] = ()  # Message-IDs of the returned message
    occurred_at: datetime | None = None
    reason: str = ""
    kind_name: str = field(default="", compare=False)  # "DSN", "feedback report", ...


def one_line(text: str | None, limit: int = DETAIL_MAX) -> str:
    """``text`` with its whitespace collapsed, cut to ``limit`` characters."""
    line = " ".join((text or "").split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def read_report(data: bytes) -> Report:
    """Read one message (RFC 5322 bytes, any line ends)."""
    message = email.message_from_bytes(data)
    identity = _identity(message, data)
    tokens = _unique(tokens_in(" ".join(_values(message, _ENVELOPE_HEADERS))))
    when = _date(message.get("Date"))
    report_type = (message.get_param("report-type") or "").lower()
    delivery_status = _part(message, "message/delivery-status")
    feedback = _part(message, "message/feedback-report")
    returned = _returned_headers(message)
    tokens += _unique(t for headers in returned for t in _tokens_of_headers(headers))
    message_ids = _unique(
        _message_id(value) for headers in returned for value in [headers.get("Message-ID")] if value
    )
    tokens = _unique(tokens)
    if feedback is not None or report_type == "feedback-report":
        return _feedback(feedback, identity, tokens, message_ids, when)
    if delivery_status is not None:
        return _dsn(delivery_status, identity, tokens, message_ids, when)
    text = _text(message)
    tokens += _unique([*tokens_in(text), *(m.group(1) for m in _HEADER_TOKEN.finditer(text))])
    message_ids += _unique(m.group(1) for m in _HEADER_MESSAGE_ID.finditer(text))
    message_ids += _unique(
        _message_id(v) for v in _values(message, ("In-Reply-To", "References")) if v
    )
    clues = {"tokens": _unique(tokens), "message_ids": _unique(message_ids)}
    if _auto_reply(message):
        return Report("auto-reply", identity, occurred_at=when, **clues)
    findings = _non_standard(message, text)
    if isinstance(findings, str):
        return Report("unrecognised", identity, occurred_at=when, reason=findings, **clues)
    return Report("report", identity, findings, occurred_at=when, kind_name="bounce", **clues)


def _dsn(
    part: Message, identity: str, tokens: tuple[str, ...], ids: tuple[str, ...], when
) -> Report:
    blocks = _blocks(part)
    per_message = blocks[0] if blocks else None
    if per_message is not None:
        when = _date(per_message.get("Arrival-Date")) or when
        original = per_message.get("X-Original-Message-ID")  # Gmail names it here too
        if original:
            ids = _unique([*ids, _message_id(str(original))])
    findings = []
    for block in blocks:
        if not any(block.get(f) for f in ("Action", "Status", "Final-Recipient")):
            continue
        finding = _recipient_finding(block)
        if finding is not None:
            findings.append(finding)
    if not findings:
        reason = "a delivery status report without a recipient it can be about"
        return Report("unrecognised", identity, (), tokens, ids, when, reason=reason)
    return Report("report", identity, tuple(findings), tokens, ids, when, kind_name="DSN")


def _recipient_finding(block: Message) -> Finding | None:
    address = _address_field(block.get("Final-Recipient") or block.get("Original-Recipient"))
    diagnostic = _after_type(block.get("Diagnostic-Code"))
    action = (block.get("Action") or "").strip().lower()
    status = _enhanced(block.get("Status")) or _enhanced(diagnostic)
    if status is not None:
        kind = {"5": HARD, "4": SOFT, "2": DELIVERED}[status[0]]
    elif reply := _SMTP_REPLY.search(diagnostic):
        kind = {"5": HARD, "4": SOFT, "2": DELIVERED}[reply.group(1)]
    elif action == "failed":
        kind = HARD
    elif action == "delayed":
        kind = SOFT
    elif action in ("delivered", "relayed", "expanded"):
        kind = DELIVERED
    else:
        return None
    words = diagnostic or " ".join(p for p in (action, block.get("Status")) if p)
    return Finding(kind, address, status, one_line(words))


def _feedback(
    part: Message | None, identity: str, tokens: tuple[str, ...], ids: tuple[str, ...], when
) -> Report:
    fields = _blocks(part)[0] if part is not None and _blocks(part) else None
    if fields is None:
        reason = "a feedback report without its machine-readable part"
        return Report("unrecognised", identity, (), tokens, ids, when, reason=reason)
    feedback_type = (fields.get("Feedback-Type") or "").strip().lower()
    when = _date(fields.get("Arrival-Date") or fields.get("Received-Date")) or when
    mail_from = " ".join(_values(fields, ("Original-Mail-From",)))
    tokens = _unique([*tokens_in(mail_from), *tokens])
    if feedback_type not in COMPLAINT_TYPES:
        reason = f"a feedback report of type {feedback_type or 'none'!r}, not a complaint"
        return Report("unrecognised", identity, (), tokens, ids, when, reason=reason)
    address = _address_field(fields.get("Original-Rcpt-To"))
    agent = fields.get("User-Agent") or fields.get("Reported-Domain") or "a mailbox provider"
    detail = one_line(f"{feedback_type} report from {agent}")
    finding = Finding(COMPLAINT, address, feedback_type, detail)
    return Report("report", identity, (finding,), tokens, ids, when, kind_name="feedback report")


def _non_standard(message: Message, text: str) -> tuple[Finding, ...] | str:
    """flufl.bounce's reading of a bounce in a server's own format; a reason when it finds
    no failed address (or its detectors fail on a malformed message)."""
    from flufl.bounce import all_failures

    try:
        temporary, permanent = all_failures(message)
    except Exception as exc:  # its detectors raise on some malformed messages
        return f"unreadable ({type(exc).__name__} in flufl.bounce)"
    if not temporary and not permanent:
        return "not a bounce, a feedback report or an auto-reply"
    status = _enhanced(text)
    line = _REPLY_LINE.search(text)
    detail = one_line(line.group(0) if line else "no details in the bounce")
    findings = []
    for address, default in [*((a, HARD) for a in permanent), *((a, SOFT) for a in temporary)]:
        kind = {"5": HARD, "4": SOFT}.get(status[0], default) if status else default
        decoded = address.decode("utf-8", "replace") if isinstance(address, bytes) else address
        findings.append(Finding(kind, decoded.strip().lower(), status, detail))
    return tuple(sorted(findings, key=lambda f: (f.address or "", f.kind)))


def _auto_reply(message: Message) -> bool:
    """An out-of-office or other automatic answer (RFC 3834 and the usual marks), from
    someone other than a mail server."""
    if _DAEMON.search(message.get("From") or "") or message.get("X-Failed-Recipients"):
        return False
    auto = (message.get("Auto-Submitted") or "no").strip().lower()
    precedence = (message.get("Precedence") or "").strip().lower()
    return (
        auto.startswith("auto-replied")
        or any(message.get(h) for h in ("X-Autoreply", "X-Autorespond", "X-Auto-Response-Suppress"))
        or precedence in ("auto_reply", "bulk", "junk")
        or bool(_AUTO_SUBJECT.match(str(message.get("Subject") or "")))
    )


# Reading the parts ----------------------------------------------------------------------


def _part(message: Message, content_type: str) -> Message | None:
    for part in message.walk():
        if part.get_content_type() == content_type:
            return part
    return None


def _blocks(part: Message) -> list[Message]:
    """The field blocks of a delivery-status or feedback-report part: the email package
    parses them as sub-messages, unless the part came base64- or QP-encoded."""
    payload = part.get_payload()
    encoding = str(part.get("Content-Transfer-Encoding", "7bit")).strip().lower()
    parsed = isinstance(payload, list) and all(isinstance(p, Message) for p in payload)
    if parsed and encoding in ("7bit", "8bit", "binary"):
        return payload
    raw = part.get_payload(decode=True)
    if not isinstance(raw, bytes):  # parsed into blocks before it was decoded: undo, decode
        body = part.as_string().replace("\r\n", "\n").partition("\n\n")[2]
        if encoding == "base64":
            try:
                raw = base64.b64decode("".join(body.split()) + "==", validate=False)
            except (binascii.Error, ValueError):
                raw = b""
        elif encoding == "quoted-printable":
            raw = quopri.decodestring(body.encode("ascii", "replace"))
        else:
            raw = body.encode("utf-8", "replace")
    text = raw.decode("utf-8", "replace").replace("\r\n", "\n")
    parser = HeaderParser()
    return [parser.parsestr(block.strip() + "\n") for block in text.split("\n\n") if block.strip()]


def _returned_headers(message: Message) -> list[Message]:
    """The headers of the original message a report returns (in full or headers only)."""
    found = []
    for part in message.walk():
        content_type = part.get_content_type()
        if content_type == "message/rfc822":
            payload = part.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                found.append(payload[0])
        elif content_type in ("text/rfc822-headers", "message/rfc822-headers"):
            raw = part.get_payload(decode=True) or b""
            if isinstance(raw, bytes):
                found.append(HeaderParser().parsestr(raw.decode("utf-8", "replace")))
    return found


def _tokens_of_headers(headers: Message) -> list[str]:
    own = [v.strip() for v in _values(headers, (DELIVERY_HEADER,)) if v.strip()]
    return [*own, *tokens_in(" ".join(_values(headers, ("Return-Path", "Sender"))))]


def _text(message: Message) -> str:
    """The text of every text part (and of a non-multipart message), up to SCAN_MAX."""
    pieces, size = [], 0
    for part in message.walk():
        if part.is_multipart() or part.get_content_maintype() not in ("text", "message"):
            continue
        raw = part.get_payload(decode=True)
        if not isinstance(raw, bytes):
            continue
        charset = part.get_content_charset() or "utf-8"
        try:
            text = raw.decode(charset, "replace")
        except LookupError:
            text = raw.decode("utf-8", "replace")
        pieces.append(text[: SCAN_MAX - size])
        size += len(pieces[-1])
        if size >= SCAN_MAX:
            break
    return "\n".join(pieces).replace("\r\n", "\n")


def _values(message: Message, names: Iterable[str]) -> list[str]:
    values = []
    for name in names:
        for value in message.get_all(name) or ():
            values.append(str(value))
    return values


def _after_type(value: str | None) -> str:
    """``smtp; 550 5.1.1 ...`` without its type, on one line."""
    text = one_line(str(value or ""))
    kind, semicolon, rest = text.partition(";")
    return rest.strip() if semicolon and " " not in kind.strip() else text


def _address_field(value: str | None) -> str | None:
    address = _after_type(value).strip("<> ").lower()
    return address if "@" in address else None


def _enhanced(value: str | None) -> str | None:
    match = _ENHANCED.search(str(value or ""))
    return match.group(0) if match else None


def _message_id(value: str) -> str:
    return str(value).strip().strip("<>").strip()


def _date(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        when = parsedate_to_datetime(str(value).split(";")[-1].strip())
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC)


def _identity(message: Message, data: bytes) -> str:
    own = _message_id(str(message.get("Message-ID") or ""))
    if own:
        return f"mid:{own}"
    body = data.replace(b"\r\n", b"\n")
    return "sha256:" + hashlib.sha256(body.partition(b"\n\n")[2] or body).hexdigest()


def _unique(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(v for v in values if v))
