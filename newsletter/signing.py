"""DKIM signatures (RFC 6376) for the wire bytes of every message a delivery sends.

With ``NEWSLETTER_DKIM_PRIVATE_KEY`` and ``NEWSLETTER_DKIM_SELECTOR`` set, each message gets
a ``DKIM-Signature`` header (relaxed/relaxed) prepended to its wire bytes, so the wire
stays correct (CRLF, dot-stuffed) and nothing else of the message changes.

A send of one issue signs thousands of messages that differ only in a few personal
fields (the unsubscribe link among them, so no two bodies are alike), so the key is parsed
once per process and key file, the header fields all copies share are canonicalised once,
and each message costs only what differs per message: its body hash and the signature.
The DKIM procedure (header parsing, selection and canonicalisation, the signature
header's hash) is dkimpy's. The body canonicalisation gives dkimpy's result with a
literal-prefix regex instead of one that stops at every space of the HTML part, and the
private-key operation is OpenSSL's through ``cryptography``: dkimpy's RSA is pure-Python
big-int arithmetic, far slower per signature. dkimpy and cryptography are imported only
once a key is configured, so an unsigned send never loads them.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import parseaddr
from pathlib import Path
from typing import Any

from newsletter.config import Settings
from newsletter.errors import ConfigError

KEY_VARIABLE = "NEWSLETTER_DKIM_PRIVATE_KEY"
MIN_RSA_BITS = 2048
# Signed when present, in this order; a header present twice is signed twice.
SIGNED = (
    b"from",
    b"sender",
    b"reply-to",
    b"to",
    b"cc",
    b"subject",
    b"date",
    b"message-id",
    b"in-reply-to",
    b"references",
    b"list-id",
    b"list-unsubscribe",
    b"list-unsubscribe-post",
    b"auto-submitted",
    b"mime-version",
    b"content-type",
    b"content-transfer-encoding",
)
# Signed once more than present, so no second copy can be added without breaking the
# signature (a second From, or a List-Unsubscribe pointing elsewhere).
OVERSIGNED = (b"from", b"to", b"subject", b"date", b"message-id")
OVERSIGNED_LIST = (b"list-unsubscribe", b"list-unsubscribe-post")
_LINE = 72  # folded header lines stay under this many characters
_SPACES = re.compile(rb"  +")  # a literal prefix: the regex engine skips ahead to each run

Signer = Callable[[bytes], bytes]


@dataclass(frozen=True)
class DkimKey:
    """A private key DKIM can sign with, and what DNS must publish for it."""

    private: Any  # cryptography's RSAPrivateKey or Ed25519PrivateKey
    kind: str  # "rsa" or "ed25519": the k= tag
    bits: int
    sign_digest: Callable[[bytes], bytes] = field(repr=False, compare=False)

    @property
    def algorithm(self) -> bytes:
        """The a= tag of signatures made with this key."""
        return b"rsa-sha256" if self.kind == "rsa" else b"ed25519-sha256"

    @property
    def public_key(self) -> str:
        """The p= value: base64 of the public key (SubjectPublicKeyInfo for RSA, the raw
        32 bytes for Ed25519, RFC 8463)."""
        from cryptography.hazmat.primitives import serialization

        public = self.private.public_key()
        if self.kind == "rsa":
            data = public.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        else:
            data = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return base64.b64encode(data).decode("ascii")

    def dns_record(self) -> str:
        """The TXT record to publish at ``SELECTOR._domainkey.DOMAIN``."""
        return f"v=DKIM1; k={self.kind}; p={self.public_key}"


def parse_key(data: bytes, where: str) -> DkimKey:
    """A PEM private key (PKCS#1 or PKCS#8) as a DkimKey; ConfigError naming the variable
    for anything else: not PEM, encrypted, a public key, another algorithm, RSA too short."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, padding, rsa, utils

    prefix = f"{KEY_VARIABLE}: {where}"
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError(
            f"{prefix} is encrypted with a passphrase; DKIM needs it unencrypted"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(
            f"{prefix} is not a PEM private key (-----BEGIN PRIVATE KEY-----); make one with "
            "`openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out dkim.pem`"
        ) from None
    if isinstance(private, ed25519.Ed25519PrivateKey):
        # RFC 8463: PureEdDSA over the SHA-256 digest of the signed headers.
        return DkimKey(private, "ed25519", 256, private.sign)
    if isinstance(private, rsa.RSAPrivateKey):
        if private.key_size < MIN_RSA_BITS:
            raise ConfigError(
                f"{prefix} is a {private.key_size}-bit RSA key; DKIM keys need at least "
                f"{MIN_RSA_BITS} bits (receivers ignore shorter ones)"
            )
        scheme, prehashed = padding.PKCS1v15(), utils.Prehashed(hashes.SHA256())
        return DkimKey(
            private,
            "rsa",
            private.key_size,
            lambda digest: private.sign(digest, scheme, prehashed),
        )
    kind = "a DSA" if isinstance(private, dsa.DSAPrivateKey) else "an unsupported"
    if isinstance(private, ec.EllipticCurvePrivateKey):
        kind = f"an elliptic-curve ({private.curve.name})"
    raise ConfigError(f"{prefix} is {kind} key; DKIM signs with RSA (2048 bits or more) or Ed25519")


@functools.lru_cache(maxsize=4)
def _cached_key(path: str, mtime_ns: int, size: int) -> DkimKey:
    """The key file parsed once per process and version of the file (a replaced key is
    read again): the worker makes a sender for each round of confirmations."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{KEY_VARIABLE}: cannot read {path}: {exc.strerror or exc}") from None
    return parse_key(data, path)


def load_key(path: Path) -> DkimKey:
    """The private key in ``path``; ConfigError naming the variable if it cannot sign."""
    try:
        stat = path.stat()
    except OSError as exc:
        raise ConfigError(f"{KEY_VARIABLE}: cannot read {path}: {exc.strerror or exc}") from None
    return _cached_key(str(path), stat.st_mtime_ns, stat.st_size)


def signing_domain(settings: Settings) -> str:
    """The d= domain: NEWSLETTER_DKIM_DOMAIN, else the From address's domain (ASCII)."""
    if settings.dkim_domain:
        return settings.dkim_domain
    domain = parseaddr(settings.from_address)[1].rpartition("@")[2].lower().rstrip(".")
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain


def _unchanged(wire: bytes) -> bytes:
    return wire


def message_signer(settings: Settings) -> Signer:
    """What turns a message's wire bytes into the bytes to send: a DkimSigner when a key
    is configured (ConfigError now if it cannot sign), else the bytes as they are."""
    if settings.dkim_private_key is None:
        return _unchanged
    if not settings.dkim_selector:
        raise ConfigError(f"NEWSLETTER_DKIM_SELECTOR: required with {KEY_VARIABLE}")
    domain = signing_domain(settings)
    if not re.fullmatch(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*", domain):
        raise ConfigError(
            f"NEWSLETTER_DKIM_DOMAIN: the From address's domain {domain!r} cannot be a DKIM "
            "domain; set NEWSLETTER_DKIM_DOMAIN"
        )
    return DkimSigner(load_key(settings.dkim_private_key), settings.dkim_selector, domain)


def relaxed_body(body: bytes) -> bytes:
    """The relaxed canonical form of a body (RFC 6376 3.4.4), equal to dkimpy's: every run
    of spaces and tabs one space, none at a line's end, no empty lines at the end."""
    if b"\t" in body:
        body = body.replace(b"\t", b" ")
    body = _SPACES.sub(b" ", body).replace(b" \r\n", b"\r\n")
    end = len(body)
    while body.endswith(b"\r\n", 0, end):
        end -= 2
    return body[:end] + b"\r\n" if end else b""


@functools.lru_cache(maxsize=256)
def _canonical_header(name: bytes, value: bytes) -> tuple[bytes, bytes]:
    """One header field in relaxed form (dkimpy's); the fields every copy of an issue
    shares (From, Subject, Content-Type, ...) are canonicalised once."""
    from dkim.canonicalization import Relaxed

    [(canonical_name, canonical_value)] = Relaxed.canonicalize_headers([(name, value)])
    return canonical_name, canonical_value


def _unstuff(wire: bytes) -> bytes:
    """The message bytes of SMTP wire bytes (dot-stuffing undone): what the receiver
    verifies."""
    if wire.startswith(b"."):
        wire = wire[1:]
    return wire.replace(b"\r\n.", b"\r\n")


def _fold(items: list[bytes], separator: bytes, first: int) -> bytes:
    """``items`` joined by ``separator``, broken into header lines of at most _LINE
    characters (continuation lines start with a space); ``first`` is what the first line
    already holds."""
    lines: list[bytes] = []
    line, width = b"", first
    for index, item in enumerate(items):
        piece = item + (separator if index < len(items) - 1 else b"")
        if line and width + len(line) + len(piece) > _LINE:
            lines.append(line)
            line, width = b"", 1
        line += piece
    lines.append(line)
    return b"\r\n ".join(lines)


class DkimSigner:
    """Signs messages with one key, selector and domain; thread-safe (one per send)."""

    def __init__(
        self,
        key: DkimKey,
        selector: str,
        domain: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        import dkim

        self.key, self.selector, self.domain = key, selector, domain
        self.clock = clock
        self._policy = dkim.CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
        self._head = (
            b" v=1; a=" + key.algorithm + b"; c=relaxed/relaxed;\r\n d=" + domain.encode("ascii")
            + b"; s=" + selector.encode("ascii") + b";"
        )  # fmt: skip
        self._h_column = len(self._head) - self._head.rfind(b"\n") + len(b" t=0000000000; h=")

    def __call__(self, wire: bytes) -> bytes:
        """``wire`` (CRLF, dot-stuffed, no final dot) with its DKIM-Signature in front."""
        return self.signature(_unstuff(wire)) + wire

    def signature(self, message: bytes) -> bytes:
        """The ``DKIM-Signature`` header line (CRLF-terminated) for a message's bytes."""
        import dkim

        end = message.find(b"\r\n\r\n")
        head, body = (message, b"") if end < 0 else (message[: end + 2], message[end + 4 :])
        headers, _ = dkim.rfc822_parse(head)
        signed = self._signed_names(headers)
        wanted = set(signed)
        canonical = [
            _canonical_header(name, value) for name, value in headers if name.lower() in wanted
        ]
        body_hash = base64.b64encode(hashlib.sha256(relaxed_body(body)).digest())
        value = (
            self._head
            + b" t=" + str(int(self.clock())).encode("ascii")
            + b"; h=" + _fold(signed, b":", self._h_column)
            + b";\r\n bh=" + body_hash + b";\r\n b="
        )  # fmt: skip
        hasher = hashlib.sha256()
        dkim.hash_headers(hasher, self._policy, canonical, signed, (b"DKIM-Signature", value), {})
        signature = base64.b64encode(self.key.sign_digest(hasher.digest()))
        chunks = [signature[at : at + _LINE - 4] for at in range(0, len(signature), _LINE - 4)]
        return b"DKIM-Signature:" + value + b"\r\n  ".join(chunks) + b"\r\n"

    @staticmethod
    def _signed_names(headers: list[list[bytes]]) -> list[bytes]:
        """The h= list: each wanted header as often as it is present, then the singletons
        once more (the List-Unsubscribe pair only where the message has it)."""
        present: dict[bytes, int] = {}
        for name, _ in headers:
            lowered = name.lower()
            present[lowered] = present.get(lowered, 0) + 1
        names = [name for name in SIGNED for _ in range(present.get(name, 0))]
        extra = OVERSIGNED + (OVERSIGNED_LIST if b"list-unsubscribe" in present else ())
        return names + list(extra)
