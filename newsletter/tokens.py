"""Signed confirm and unsubscribe tokens.

Both carry the subscriber's address, signed with the configured or generated secret
key. Confirm tokens expire (a stale signup link must not activate anyone); unsubscribe
tokens never do, because people click them in mail that is years old and the
RFC 8058 one-click POST carries nothing but the URL.
"""

from __future__ import annotations

from base64 import urlsafe_b64decode, urlsafe_b64encode

from itsdangerous import BadSignature, SignatureExpired, Signer, URLSafeTimedSerializer

CONFIRM_MAX_AGE = 7 * 24 * 3600


class InvalidToken(Exception):
    """A token that is forged, malformed or expired (``expired``); the web app answers 400."""

    def __init__(self, reason: str, *, expired: bool = False) -> None:
        super().__init__(reason)
        self.expired = expired


class Tokens:
    """Makes and checks the two kinds of token with one secret key."""

    def __init__(self, secret_key: str, confirm_max_age: int = CONFIRM_MAX_AGE) -> None:
        self._unsubscribe = Signer(secret_key, salt="newsletter.unsubscribe")
        self._confirm = URLSafeTimedSerializer(secret_key, salt="newsletter.confirm")
        self.confirm_max_age = confirm_max_age

    def unsubscribe_token(self, email: str) -> str:
        """A token that unsubscribes ``email``, valid forever.

        A signed base64 address rather than a serialized payload: one is made per
        message of every send, and this costs a third of the serializer's time.
        """
        value = urlsafe_b64encode(email.lower().encode("utf-8")).rstrip(b"=")
        return self._unsubscribe.sign(value).decode("ascii")

    def confirm_token(self, email: str) -> str:
        """A token that confirms ``email``'s signup, valid for ``confirm_max_age`` seconds."""
        return self._confirm.dumps(email.lower())

    def read_unsubscribe(self, token: str) -> str:
        """The address an unsubscribe token was made for; ``InvalidToken`` if it is not genuine."""
        return self._load(self._unsigned_address, token)

    def read_confirm(self, token: str) -> str:
        """The address a confirm token was made for; ``InvalidToken`` if forged or expired."""
        return self._load(lambda t: self._confirm.loads(t, max_age=self.confirm_max_age), token)

    def _unsigned_address(self, token: str) -> str:
        value = self._unsubscribe.unsign(token.encode("ascii"))
        return urlsafe_b64decode(value + b"=" * (-len(value) % 4)).decode("utf-8")

    @staticmethod
    def _load(loader, token: str) -> str:
        try:
            value = loader(token)
        except SignatureExpired:
            raise InvalidToken("this link has expired", expired=True) from None
        except (BadSignature, UnicodeError, ValueError, TypeError):
            raise InvalidToken("this link is not valid") from None
        if not isinstance(value, str) or "@" not in value:
            raise InvalidToken("this link is not valid")
        return value


def unsubscribe_url(site_url: str, token: str) -> str:
    """The public URL of the unsubscribe page for ``token``."""
    return f"{site_url.rstrip('/')}/unsubscribe/{token}"


def confirm_url(site_url: str, token: str) -> str:
    """The public URL that confirms a signup."""
    return f"{site_url.rstrip('/')}/confirm/{token}"
