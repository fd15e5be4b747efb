"""Settings from ``NEWSLETTER_*`` environment variables and ``.env``, validated once.

Every bad value is a ``ConfigError`` whose one-line message names the variable,
so a typo in ``.env`` never surfaces later as a stack trace mid-send.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from dotenv import dotenv_values

from newsletter.errors import ConfigError

DEFAULT_DATABASE_URL = "sqlite:///subscribers/newsletter.db"
SMTP_SECURITY_MODES = ("starttls", "ssl", "none")
MAILBOX_SCHEMES = {"imaps": 993, "imap": 143, "pop3s": 995}
_SNS_TOPIC_ARN = re.compile(r"arn:aws[a-z-]*:sns:[a-z0-9-]+:\d{12}:[A-Za-z0-9_.-]{1,256}")


@dataclass(frozen=True)
class BounceMailbox:
    """Where bounces arrive (``NEWSLETTER_BOUNCE_MAILBOX``): IMAP over TLS (``imaps``), IMAP
    with STARTTLS (``imap``) or POP3 over TLS (``pop3s``). What was read is moved to
    ``move_to`` (IMAP) or deleted (``delete``; POP3 always deletes)."""

    scheme: str
    host: str
    port: int
    username: str
    password: str = field(repr=False)
    folder: str = "INBOX"
    move_to: str | None = "Processed"

    @property
    def delete(self) -> bool:
        return self.move_to is None

    def __str__(self) -> str:
        """The mailbox for messages and logs, without its password."""
        where = "" if self.scheme == "pop3s" else f"/{self.folder}"
        return f"{self.scheme}://{self.username}@{self.host}:{self.port}{where}"


_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_SELECTOR = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_DOMAIN = re.compile(rf"(?:{_LABEL}\.)+{_LABEL}\.?")


@dataclass(frozen=True)
class Settings:
    """Validated configuration; build it with :func:`load_settings`."""

    database_url: str = DEFAULT_DATABASE_URL
    from_address: str = "Newsletter <newsletter@localhost>"
    reply_to: str | None = None
    list_name: str = "Newsletter"
    site_url: str = "http://localhost:8000"
    asset_base_url: str | None = None
    secret_key: str | None = field(default=None, repr=False)
    smtp_host: str | None = None
    smtp_port: int = 587
    smtp_username: str | None = field(default=None, repr=False)
    smtp_password: str | None = field(default=None, repr=False)
    smtp_security: str = "starttls"
    smtp_connections: int = 4
    smtp_timeout: float = 30.0
    send_rate: float | None = None
    outbox_dir: Path = Path("outbox")
    timezone: str | None = None
    templates_dir: Path | None = None
    misfire_grace: int = 3600
    claim_timeout: int = 600
    worker_poll: float = 0.5
    trusted_proxies: int = 0
    allowed_redirects: tuple[str, ...] = ()
    frame_ancestors: tuple[str, ...] = ()
    archive: bool = True
    bounce_address: str | None = None
    bounce_mailbox: BounceMailbox | None = None
    bounce_interval: int = 300
    soft_bounce_limit: int = 3
    webhook_secret_postmark: str | None = field(default=None, repr=False)
    webhook_secret_mailgun: str | None = field(default=None, repr=False)
    sns_topic_arns: tuple[str, ...] = ()
    dkim_private_key: Path | None = None
    dkim_selector: str | None = None
    dkim_domain: str | None = None
    dns_server: tuple[str, int] | None = None

    @property
    def tz(self) -> ZoneInfo | None:
        """The configured zone, or None for the machine's local zone."""
        return ZoneInfo(self.timezone) if self.timezone else None


def _read_environment(environ: Mapping[str, str] | None, dotenv_path: Path | None) -> dict:
    """Merge ``.env`` under the real environment: the real environment wins."""
    merged: dict[str, str] = {}
    path = dotenv_path if dotenv_path is not None else Path.cwd() / ".env"
    if path.is_file():
        merged.update({k: v for k, v in dotenv_values(path).items() if v is not None})
    merged.update(os.environ if environ is None else environ)
    return {k: v for k, v in merged.items() if k.startswith("NEWSLETTER_")}


def _text(env: dict, name: str) -> str | None:
    value = env.get(name, "").strip()
    return value or None


def _int(env: dict, name: str, default: int, minimum: int = 0) -> int:
    raw = _text(env, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}: {raw!r} is not a whole number") from None
    if value < minimum:
        raise ConfigError(f"{name}: {value} is below the minimum of {minimum}")
    return value


def _float(env: dict, name: str) -> float | None:
    raw = _text(env, name)
    if raw is None or raw.lower() in {"unlimited", "0"}:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}: {raw!r} is not a number") from None
    if value <= 0:
        raise ConfigError(f"{name}: must be positive, got {raw}")
    return value


def _url(env: dict, name: str, default: str | None) -> str | None:
    raw = _text(env, name) or default
    if raw is None:
        return None
    parts = urlsplit(raw)
    if parts.scheme not in {"http", "https"} or not parts.netloc:
        raise ConfigError(f"{name}: {raw!r} is not an http(s) URL")
    return raw.rstrip("/")


def _origins(env: dict, name: str) -> tuple[str, ...]:
    """Comma- or space-separated origins (``https://blog.example.com``), normalised."""
    origins = []
    for raw in (_text(env, name) or "").replace(",", " ").split():
        parts = urlsplit(raw)
        try:
            parts.port  # noqa: B018 -- raises ValueError for a port that is not a number
        except ValueError:
            parts = urlsplit("")
        if (
            parts.scheme not in {"http", "https"}
            or not parts.hostname
            or parts.path not in {"", "/"}
            or parts.query
            or parts.fragment
            or parts.username
        ):
            raise ConfigError(f"{name}: {raw!r} is not an origin like https://blog.example.com")
        origins.append(f"{parts.scheme}://{parts.netloc.lower()}")
    return tuple(origins)


def _switch(env: dict, name: str, default: bool) -> bool:
    raw = (_text(env, name) or "").lower()
    if not raw:
        return default
    if raw in {"on", "true", "yes", "1"}:
        return True
    if raw in {"off", "false", "no", "0"}:
        return False
    raise ConfigError(f"{name}: {raw!r} is not on or off")


def _database_url(env: dict) -> str:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    raw = _text(env, "NEWSLETTER_DATABASE_URL") or DEFAULT_DATABASE_URL
    try:
        make_url(raw)
    except ArgumentError:
        raise ConfigError(f"NEWSLETTER_DATABASE_URL: {raw!r} is not a database URL") from None
    return raw


def _address(env: dict, name: str, default: str | None) -> str | None:
    raw = _text(env, name) or default
    if raw is not None and ("\r" in raw or "\n" in raw or "@" not in raw):
        raise ConfigError(f"{name}: {raw!r} is not an email address")
    return raw


def _bounce_address(env: dict) -> str | None:
    """A bare address (no display name): VERP puts ``+TOKEN`` before its ``@``."""
    name = "NEWSLETTER_BOUNCE_ADDRESS"
    raw = _text(env, name)
    if raw is None:
        return None
    local, at, domain = raw.rpartition("@")
    if (
        not at
        or not local
        or "." not in domain
        or re.search(r"[\s<>(),;:\\\"\[\]@]", local + domain)
    ):
        raise ConfigError(f"{name}: {raw!r} is not a bare address like bounces@example.com")
    if not raw.isascii():
        raise ConfigError(f"{name}: {raw!r} must be ASCII (servers rewrite the envelope otherwise)")
    return raw


def _bounce_mailbox(env: dict) -> BounceMailbox | None:
    """``imaps://user:password@host[:port]/FOLDER[?move_to=FOLDER|?delete=yes]``, checked
    without ever echoing the password."""
    name = "NEWSLETTER_BOUNCE_MAILBOX"
    raw = _text(env, name)
    if raw is None:
        return None
    parts = urlsplit(raw)
    shown = f"{parts.scheme}://{parts.hostname or ''}{parts.path}"
    if parts.scheme not in MAILBOX_SCHEMES:
        raise ConfigError(
            f"{name}: {parts.scheme or raw!r} is not one of {', '.join(MAILBOX_SCHEMES)}"
            " (e.g. imaps://user:password@mail.example.com/INBOX)"
        )
    try:
        port = parts.port or MAILBOX_SCHEMES[parts.scheme]
    except ValueError:
        raise ConfigError(f"{name}: the port of {shown} is not a number") from None
    if not parts.hostname:
        raise ConfigError(f"{name}: {shown} has no host")
    if not parts.username or parts.password is None:
        raise ConfigError(f"{name}: {shown} needs a user and a password (user:password@host)")
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - {"move_to", "delete"})
    if unknown:
        raise ConfigError(f"{name}: unknown option {unknown[0]!r} (move_to=FOLDER or delete=yes)")
    folder = unquote(parts.path.strip("/")) or "INBOX"
    move_to: str | None = query.get("move_to", ["Processed"])[-1].strip() or "Processed"
    if query.get("delete", ["no"])[-1].lower() in {"yes", "true", "1"} or parts.scheme == "pop3s":
        move_to = None
    for label, value in (("folder", folder), ("move_to", move_to or "")):
        if not value.isascii() or any(ord(c) < 32 for c in value):
            raise ConfigError(f"{name}: the {label} {value!r} must be printable ASCII")
    if move_to is not None and move_to == folder:
        raise ConfigError(f"{name}: move_to must name another folder than {folder!r}")
    return BounceMailbox(
        parts.scheme,
        parts.hostname,
        port,
        unquote(parts.username),
        unquote(parts.password),
        folder,
        move_to,
    )


def _postmark_secret(env: dict) -> str | None:
    name = "NEWSLETTER_WEBHOOK_SECRET_POSTMARK"
    raw = _text(env, name)
    if raw is not None and (":" not in raw or raw.startswith(":") or raw.endswith(":")):
        raise ConfigError(f"{name}: must be user:password (the webhook's basic auth)")
    return raw


def _topic_arns(env: dict) -> tuple[str, ...]:
    name = "NEWSLETTER_WEBHOOK_SNS_TOPIC_ARN"
    arns = tuple((_text(env, name) or "").replace(",", " ").split())
    for arn in arns:
        if not _SNS_TOPIC_ARN.fullmatch(arn):
            raise ConfigError(
                f"{name}: {arn!r} is not an SNS topic ARN like "
                "arn:aws:sns:us-east-1:123456789012:bounces"
            )
    return arns


def _dkim(env: dict) -> tuple[Path | None, str | None, str | None]:
    """The DKIM key's path (a readable file), selector and domain, each checked for syntax;
    the key itself is parsed by ``newsletter.signing``, before the first message."""
    raw_key = _text(env, "NEWSLETTER_DKIM_PRIVATE_KEY")
    selector = _text(env, "NEWSLETTER_DKIM_SELECTOR")
    domain = _text(env, "NEWSLETTER_DKIM_DOMAIN")
    if selector is not None and not _SELECTOR.fullmatch(selector):
        raise ConfigError(
            f"NEWSLETTER_DKIM_SELECTOR: {selector!r} is not a selector "
            "(letters, digits and hyphens, dots between parts, e.g. news2026)"
        )
    if domain is not None:
        try:
            domain = domain.encode("idna").decode("ascii").lower().rstrip(".")
        except UnicodeError:
            domain = None
        if domain is None or not _DOMAIN.fullmatch(domain):
            raise ConfigError(
                f"NEWSLETTER_DKIM_DOMAIN: {_text(env, 'NEWSLETTER_DKIM_DOMAIN')!r} "
                "is not a domain name"
            )
    if raw_key is None:
        return None, selector, domain
    key = Path(raw_key).expanduser()
    try:
        with key.open("rb") as readable:
            readable.read(1)
    except OSError as exc:
        raise ConfigError(
            f"NEWSLETTER_DKIM_PRIVATE_KEY: cannot read {raw_key}: {exc.strerror or exc}"
        ) from None
    if selector is None:
        raise ConfigError(
            "NEWSLETTER_DKIM_SELECTOR: required with NEWSLETTER_DKIM_PRIVATE_KEY "
            "(the key is published at SELECTOR._domainkey.DOMAIN)"
        )
    return key, selector, domain


def _host_port(env: dict, name: str, default_port: int) -> tuple[str, int] | None:
    """``HOST``, ``HOST:PORT``, ``[IPV6]:PORT`` or a bare IPv6 address."""
    raw = _text(env, name)
    if raw is None:
        return None
    host, port = raw, str(default_port)
    if raw.startswith("["):
        host, closed, rest = raw[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")):
            host = ""
        elif rest:
            port = rest[1:]
    elif raw.count(":") == 1:
        host, port = raw.split(":")
    if not host or any(ch.isspace() or ch in "[]/" for ch in host) or not port.isdigit():
        raise ConfigError(f"{name}: {raw!r} is not HOST or HOST:PORT")
    if not 0 < int(port) < 65536:
        raise ConfigError(f"{name}: port {port} is not between 1 and 65535")
    return host, int(port)


def load_settings(
    environ: Mapping[str, str] | None = None, dotenv_path: Path | None = None
) -> Settings:
    """Read and validate every ``NEWSLETTER_*`` variable (environment first, then ``.env``)."""
    env = _read_environment(environ, dotenv_path)
    security = (_text(env, "NEWSLETTER_SMTP_SECURITY") or "starttls").lower()
    if security not in SMTP_SECURITY_MODES:
        raise ConfigError(
            f"NEWSLETTER_SMTP_SECURITY: {security!r} is not one of {', '.join(SMTP_SECURITY_MODES)}"
        )
    timezone = _text(env, "NEWSLETTER_TIMEZONE")
    if timezone:
        try:
            ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigError(f"NEWSLETTER_TIMEZONE: {timezone!r} is not a time zone") from None
    templates = _text(env, "NEWSLETTER_TEMPLATES_DIR")
    if templates and not Path(templates).is_dir():
        raise ConfigError(f"NEWSLETTER_TEMPLATES_DIR: {templates!r} is not a directory")
    name = _text(env, "NEWSLETTER_NAME") or "Newsletter"
    if any(ord(ch) < 32 for ch in name):
        raise ConfigError("NEWSLETTER_NAME: control characters are not allowed")
    dkim_key, dkim_selector, dkim_domain = _dkim(env)
    return Settings(
        database_url=_database_url(env),
        from_address=_address(env, "NEWSLETTER_FROM", "Newsletter <newsletter@localhost>"),
        reply_to=_address(env, "NEWSLETTER_REPLY_TO", None),
        list_name=name,
        site_url=_url(env, "NEWSLETTER_SITE_URL", "http://localhost:8000"),
        asset_base_url=_url(env, "NEWSLETTER_ASSET_BASE_URL", None),
        secret_key=_text(env, "NEWSLETTER_SECRET_KEY"),
        smtp_host=_text(env, "NEWSLETTER_SMTP_HOST"),
        smtp_port=_int(env, "NEWSLETTER_SMTP_PORT", 587, minimum=1),
        smtp_username=_text(env, "NEWSLETTER_SMTP_USERNAME"),
        smtp_password=_text(env, "NEWSLETTER_SMTP_PASSWORD"),
        smtp_security=security,
        smtp_connections=_int(env, "NEWSLETTER_SMTP_CONNECTIONS", 4, minimum=1),
        smtp_timeout=float(_int(env, "NEWSLETTER_SMTP_TIMEOUT", 30, minimum=1)),
        send_rate=_float(env, "NEWSLETTER_SEND_RATE"),
        outbox_dir=Path(_text(env, "NEWSLETTER_OUTBOX_DIR") or "outbox"),
        timezone=timezone,
        templates_dir=Path(templates) if templates else None,
        misfire_grace=_int(env, "NEWSLETTER_MISFIRE_GRACE", 3600, minimum=1),
        claim_timeout=_int(env, "NEWSLETTER_CLAIM_TIMEOUT", 600, minimum=1),
        worker_poll=_float(env, "NEWSLETTER_WORKER_POLL") or 0.5,
        trusted_proxies=_int(env, "NEWSLETTER_TRUSTED_PROXIES", 0),
        allowed_redirects=_origins(env, "NEWSLETTER_ALLOWED_REDIRECTS"),
        frame_ancestors=_origins(env, "NEWSLETTER_FRAME_ANCESTORS"),
        archive=_switch(env, "NEWSLETTER_ARCHIVE", True),
        bounce_address=_bounce_address(env),
        bounce_mailbox=_bounce_mailbox(env),
        bounce_interval=_int(env, "NEWSLETTER_BOUNCE_INTERVAL", 300, minimum=1),
        soft_bounce_limit=_int(env, "NEWSLETTER_SOFT_BOUNCE_LIMIT", 3, minimum=1),
        webhook_secret_postmark=_postmark_secret(env),
        webhook_secret_mailgun=_text(env, "NEWSLETTER_WEBHOOK_SECRET_MAILGUN"),
        sns_topic_arns=_topic_arns(env),
        dkim_private_key=dkim_key,
        dkim_selector=dkim_selector,
        dkim_domain=dkim_domain,
        dns_server=_host_port(env, "NEWSLETTER_DNS_SERVER", 53),
    )
