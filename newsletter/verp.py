"""VERP: an envelope sender per delivery, so a bounce names the very message it is about.

With ``NEWSLETTER_BOUNCE_ADDRESS=bounces@example.com`` each message goes out with MAIL FROM
``bounces+TOKEN@example.com`` (which becomes its Return-Path, where bounces are sent).
TOKEN is the delivery's id in base 36 and a MAC of it made with the secret key, in
lower-case letters and digits only: relays that lower-case addresses keep it readable,
and nobody can make up a token that names someone else's delivery. Nothing is stored:
the token is checked by making it again. The same token goes in our own header
(``X-Newsletter-Delivery``), for relays that rewrite the envelope.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from base64 import b32encode
from email.utils import parseaddr

from newsletter.config import Settings

DELIVERY_HEADER = "X-Newsletter-Delivery"
MAC_BYTES = 8  # 13 base-32 characters: guessing one is hopeless, and addresses stay short
_TOKEN = re.compile(r"([0-9a-z]{1,13})-([a-z2-7]{13})", re.IGNORECASE)
_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


def _base36(number: int) -> str:
    digits = ""
    while True:
        number, rest = divmod(number, 36)
        digits = _DIGITS[rest] + digits
        if number == 0:
            return digits


class Verp:
    """Makes and checks delivery tokens with one secret key; the envelope sender of each
    delivery as configured."""

    def __init__(self, secret_key: str, bounce_address: str | None, from_address: str) -> None:
        self._key = hashlib.sha256(b"newsletter.verp:" + secret_key.encode("utf-8")).digest()
        self.bounce_address = bounce_address
        self._plain = parseaddr(from_address)[1]
        local, _, domain = (bounce_address or "").rpartition("@")
        self._local, self._domain = local, domain

    @classmethod
    def of(cls, settings: Settings, secret_key: str) -> Verp:
        return cls(secret_key, settings.bounce_address, settings.from_address)

    def token(self, delivery_id: int) -> str:
        """The token that names ``delivery_id``: short, lower-case, unguessable."""
        mac = hmac.digest(self._key, str(delivery_id).encode("ascii"), "sha256")[:MAC_BYTES]
        return f"{_base36(delivery_id)}-{b32encode(mac).decode('ascii').rstrip('=').lower()}"

    def envelope_from(self, delivery_id: int) -> str:
        """MAIL FROM for a delivery: the VERP address, or the From address without VERP."""
        if self.bounce_address is None:
            return self._plain
        return f"{self._local}+{self.token(delivery_id)}@{self._domain}"

    def delivery_of(self, token: str) -> int | None:
        """The delivery a token names; None when it is malformed or forged."""
        match = _TOKEN.fullmatch(token.strip())
        if match is None:
            return None
        delivery_id = int(match.group(1), 36)
        if hmac.compare_digest(self.token(delivery_id), token.strip().lower()):
            return delivery_id
        return None


def tokens_in(text: str) -> list[str]:
    """Every string in ``text`` shaped like a token after a ``+`` (a VERP address), in
    order: candidates for :meth:`Verp.delivery_of`, which tells the real ones."""
    return [m.group(0) for m in re.finditer(rf"(?<=\+){_TOKEN.pattern}(?=@)", text, re.I)]
