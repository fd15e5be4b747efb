"""One recipient's MIME message, built once per issue and filled in per recipient.

Building an ``EmailMessage`` per recipient costs ~5 ms, more than SMTP itself. So the
whole message — headers, multipart structure, quoted-printable bodies — is encoded
once as SMTP wire bytes (CRLF, dot-stuffed) with placeholders left in place, and each
recipient's copy is a join of pre-encoded pieces and a few encoded values.

Placeholders in the bodies sit alone between quoted-printable soft line breaks, so no
soft break can split one and any value of any length can be wrapped in its place.
"""

from __future__ import annotations

import email.quoprimime
import re
import secrets
import time
import uuid
from base64 import b64encode, encodebytes
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.header import Header
from email.utils import format_datetime, parseaddr
from html import escape
from urllib.parse import urlsplit

import idna

from newsletter.render import InlineImage, RenderedIssue, keep_sections, placeholder

_PLACEHOLDER = re.compile(rb"@@NL_([A-Z_]+)@@")
_QP_SAFE = re.compile(r"[!-<>-~]*")  # printable ASCII except '=' and space
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SPECIALS = re.compile(r'[][\\()<>@,:;".]')  # a display name with one of these is quoted
_TEXT_FIELDS = re.compile(r"@@NL_(NAME|EMAIL|UNSUBSCRIBE_URL)@@")
_PLACEHOLDER_TEXT = re.compile(r"@@NL_[A-Z_]+@@")  # in a one-off's finished text: not ours
_SET_FIELDS = frozenset({"email", "unsubscribe_url"})  # every recipient has these
CRLF = "\r\n"
DELIVERY_HEADER = "X-Newsletter-Delivery"  # the bounce parser looks for it (newsletter.verp)


def clean_header_value(value: str) -> str:
    """A value safe in a header: CR, LF and other control characters become spaces."""
    return _CONTROL.sub(" ", value).strip()


def wire_address(address: str) -> str:
    """The address as it goes on the wire: an internationalised domain in its ASCII
    (punycode) form. A non-ASCII local part stays as it is: only SMTPUTF8 carries it."""
    if address.isascii():
        return address
    local, at, domain = address.rpartition("@")
    try:
        return f"{local}{at}{idna.encode(domain, uts46=True).decode('ascii')}"
    except idna.IDNAError:
        return address


def address_header(name: str | None, address: str) -> str:
    """``Name <addr>`` for a header: the name quoted or RFC 2047-encoded as it needs, the
    address in its wire form (no CR/LF possible)."""
    name = clean_header_value(name or "")
    address = wire_address(clean_header_value(address))
    if not name:
        return address
    if not name.isascii():
        name = encoded_words(name)
    elif _SPECIALS.search(name):
        name = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{name} <{address}>"


def encode_header(name: str, value: str) -> str:
    """A header value folded, and RFC 2047-encoded only when it is not ASCII."""
    value = clean_header_value(value)
    if value.isascii() and len(name) + len(value) < 76:
        return value  # nothing to fold or encode: skip the email package's work
    charset = "us-ascii" if value.isascii() else "utf-8"
    return Header(value, charset, header_name=name).encode(linesep=CRLF)


def encoded_words(value: str) -> str:
    """``value`` as RFC 2047 "B" encoded words of at most 75 characters, folded: what
    :func:`encode_header` gives for a display name, at a tenth of the cost (it runs for
    every recipient with a non-ASCII name)."""
    words, chunk = [], b""
    for char in value:
        data = char.encode("utf-8")
        if len(chunk) + len(data) > 45:  # 45 bytes are 60 in base64: a word of 72
            words.append(chunk)
            chunk = b""
        chunk += data
    words.append(chunk)
    return f"{CRLF} ".join(f"=?utf-8?b?{b64encode(word).decode('ascii')}?=" for word in words)


def _ascii_filename(name: str) -> str:
    """A file name safe in a header without encoding (the image is shown inline anyway)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "image"


def envelope_address(header: str) -> str:
    """The bare address of a header value like ``Name <addr>`` (for MAIL FROM)."""
    return parseaddr(header)[1]


def new_message_id(domain: str) -> str:
    """A globally unique Message-ID value, without the angle brackets."""
    return f"{uuid.uuid4().hex}@{domain}"


def message_domain(from_address: str) -> str:
    """The domain of the From address: the right-hand side of every Message-ID we make."""
    return envelope_address(from_address).rpartition("@")[2] or "localhost"


def _qp(text: str) -> str:
    """Quoted-printable body encoding of UTF-8 text with CRLF line ends, lines of at most
    75 characters: a placeholder's soft line break may follow the last one."""
    raw = text.replace("\r\n", "\n").encode("utf-8").decode("latin-1")
    return email.quoprimime.body_encode(raw, maxlinelen=75, eol=CRLF)


def qp_value(value: str) -> str:
    """A value for a placeholder's own line: QP-encoded, soft-wrapped, never a leading '.'."""
    if _QP_SAFE.fullmatch(value):  # a link, an address: nothing to encode, only to wrap
        lines = [value[start : start + 72] for start in range(0, len(value), 72)]
        return f"={CRLF}".join("=2E" + line[1:] if line[:1] == "." else line for line in lines)
    encoded = _qp(value.replace("\r", " ").replace("\n", " "))
    return re.sub(r"(^|\r\n)\.", r"\1=2E", encoded)


def _dot_stuff(wire: str) -> str:
    stuffed = wire.replace("\r\n.", "\r\n..")
    return "." + stuffed if stuffed.startswith(".") else stuffed


def _qp_template(text: str) -> str:
    """QP-encode ``text`` keeping each placeholder intact, alone between soft breaks."""
    pieces = re.split(r"(@@NL_[A-Z_]+@@)", text)
    out: list[str] = []
    for index, piece in enumerate(pieces):
        if index % 2:
            out.append(f"={CRLF}{piece}={CRLF}")
        elif piece:
            out.append(_qp(piece))
    return "".join(out)


@dataclass(frozen=True)
class Recipient:
    """What a message needs to know about its one recipient."""

    email: str
    name: str | None
    unsubscribe_url: str
    message_id: str
    delivery_token: str = ""  # names the delivery in returned bounces (DELIVERY_HEADER)


class WireTemplate:
    """A text+HTML message (HTML with its inline images) encoded once as SMTP wire bytes,
    placeholders left in place; :meth:`fill` makes one copy. ``headers`` are finished
    header lines (ASCII, RFC 2047 where needed), placeholders allowed."""

    def __init__(
        self, headers: list[str], text: str, html: str, images: Sequence[InlineImage] = ()
    ) -> None:
        boundary = f"=_nl_{secrets.token_hex(12)}"
        html_part = self._part("text/html", html)
        if images:
            html_part = self._related(html_part, images, f"{boundary}_r")
        body = self._multipart("alternative", boundary, [self._part("text/plain", text), html_part])
        wire = _dot_stuff(CRLF.join(headers) + CRLF + body)
        self._pieces = _PLACEHOLDER.split(wire.encode("ascii"))
        self._fields = [piece.decode().lower() for piece in self._pieces[1::2]]

    @staticmethod
    def _part(content_type: str, text: str) -> str:
        return (
            f'Content-Type: {content_type}; charset="utf-8"{CRLF}'
            f"Content-Transfer-Encoding: quoted-printable{CRLF}{CRLF}{_qp_template(text)}"
        )

    @staticmethod
    def _multipart(kind: str, boundary: str, parts: list[str]) -> str:
        head = f'Content-Type: multipart/{kind}; boundary="{boundary}"{CRLF}{CRLF}'
        inner = "".join(f"--{boundary}{CRLF}{part}{CRLF}" for part in parts)
        return f"{head}{inner}--{boundary}--{CRLF}"

    def _related(self, html_part: str, images: Sequence[InlineImage], boundary: str) -> str:
        parts = [html_part]
        for image in images:
            data = encodebytes(image.data).decode("ascii").replace("\n", CRLF)
            parts.append(
                f"Content-Type: {image.content_type}{CRLF}"
                f"Content-ID: <{image.cid}>{CRLF}"
                f'Content-Disposition: inline; filename="{_ascii_filename(image.filename)}"{CRLF}'
                f"Content-Transfer-Encoding: base64{CRLF}{CRLF}{data}"
            )
        return self._multipart("related", boundary, parts)

    def fill(self, values: Mapping[str, str]) -> bytes:
        """One copy as SMTP wire bytes (CRLF, dot-stuffed, no final '.'). Header values go
        in as given (clean them first); body values through :func:`qp_value`."""
        pieces = self._pieces.copy()
        for index, field in enumerate(self._fields):
            pieces[2 * index + 1] = values.get(field, "").encode("utf-8")
        return b"".join(pieces)


class HeaderClock:
    """The Date header value (RFC 5322, ``+0000``), formatted at most once per second."""

    def __init__(self) -> None:
        self._date = (0, "")

    def now(self) -> str:
        second = int(time.time())
        if self._date[0] != second:
            self._date = (second, format_datetime(datetime.fromtimestamp(second, UTC)))
        return self._date[1]


def headers(
    *, from_address: str, subject: str, reply_to: str | None = None, extra: Sequence[str] = ()
) -> list[str]:
    """The header lines every message carries, in order, with placeholders for what differs
    per copy (``to_header``, ``date``, ``message_id``); ``extra`` lines go before MIME-Version."""
    lines = [
        f"From: {address_header(*parseaddr(from_address))}",
        f"To: {placeholder('to_header')}",
        f"Subject: {encode_header('Subject', subject)}",
        f"Date: {placeholder('date')}",
        f"Message-ID: <{placeholder('message_id')}>",
    ]
    if reply_to:
        lines.append(f"Reply-To: {address_header(*parseaddr(reply_to))}")
    return [*lines, *extra, "MIME-Version: 1.0"]


class MessageTemplate:
    """An issue's message encoded once; :meth:`build` makes one recipient's wire bytes."""

    def __init__(
        self,
        issue: RenderedIssue,
        *,
        from_address: str,
        list_name: str,
        site_url: str,
        reply_to: str | None = None,
    ) -> None:
        self.envelope_from = envelope_address(from_address)
        self.domain = message_domain(from_address)
        list_host = urlsplit(site_url).hostname or self.domain
        slug = re.sub(r"[^a-z0-9]+", "-", list_name.lower()).strip("-") or "newsletter"
        lines = headers(
            from_address=from_address,
            subject=issue.subject,
            reply_to=reply_to,
            extra=(
                f"List-Id: {address_header(list_name, f'{slug}.{list_host}')}",
                f"List-Unsubscribe: <{placeholder('header_unsubscribe_url')}>",
                "List-Unsubscribe-Post: List-Unsubscribe=One-Click",
                f"{DELIVERY_HEADER}: {placeholder('delivery_token')}",
            ),
        )
        text = _TEXT_FIELDS.sub(r"@@NL_TEXT_\1@@", issue.text)
        # if_set("name") sections (the greeting): one encoding with them, one without.
        self._wires = {
            named: WireTemplate(
                lines,
                keep_sections(text, _SET_FIELDS | ({"name"} if named else set())),
                keep_sections(issue.html, _SET_FIELDS | ({"name"} if named else set())),
                issue.images,
            )
            for named in (True, False)
        }
        self._clock = HeaderClock()

    def build(self, recipient: Recipient) -> bytes:
        """One recipient's message as SMTP wire bytes (CRLF, dot-stuffed, no final '.')."""
        name = clean_header_value(recipient.name or "")
        url = clean_header_value(recipient.unsubscribe_url)
        values = {
            "to_header": address_header(name, recipient.email),
            "date": self._clock.now(),
            "message_id": clean_header_value(recipient.message_id),
            "header_unsubscribe_url": url,
            "delivery_token": clean_header_value(recipient.delivery_token),
            "unsubscribe_url": qp_value(escape(url)),
            "name": qp_value(escape(name)),
            "email": qp_value(escape(recipient.email)),
            "text_unsubscribe_url": qp_value(url),
            "text_name": qp_value(name),
            "text_email": qp_value(recipient.email),
        }
        return self._wires[bool(name)].fill(values)


def one_off(
    *,
    from_address: str,
    to: str,
    subject: str,
    text: str,
    html: str,
    message_id: str,
    reply_to: str | None = None,
    extra: Sequence[str] = (),
    delivery_token: str = "",
) -> bytes:
    """A single message (a confirmation, a welcome) as SMTP wire bytes.

    ``To`` is the bare address: whatever else a visitor typed never heads mail to a stranger.
    """
    if delivery_token:
        extra = (*extra, f"{DELIVERY_HEADER}: {clean_header_value(delivery_token)}")
    lines = headers(from_address=from_address, subject=subject, reply_to=reply_to, extra=extra)
    wire = WireTemplate(lines, _PLACEHOLDER_TEXT.sub("", text), _PLACEHOLDER_TEXT.sub("", html))
    values = {
        "to_header": address_header(None, to),
        "date": HeaderClock().now(),
        "message_id": message_id,
    }
    return wire.fill(values)
