"""A real SMTP server for tests: aiosmtpd in a thread that records mail and misbehaves on cue.

    with SmtpSink() as sink:                       # plain, PIPELINING offered
        sink.fail("rcpt", "550 5.1.1 user unknown", recipients=["gone@example.com"])
        sink.fail("rcpt", "451 4.7.1 try later", fraction=0.1, times=1)
        ...send...
        sink.wait_for(200)
        assert sink.connections_opened <= 4

Faults can be switched while the server runs: each is a rule matched per stage ("mail",
"rcpt", "data" = the end of DATA) and per recipient, for every attempt or only the first
``times`` attempts of each address, so a retried message eventually goes through.
The aiosmtpd glue lives in smtp_sink_server.py; run this file as a script
(``python tests/smtp_sink.py --help``, see smtp_sink_cli.py) for crash tests.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from aiosmtpd.smtp import Envelope
from smtp_sink_server import SinkController, SinkSMTP, listening_socket

STAGES = ("mail", "rcpt", "data")


@dataclass(frozen=True)
class CertPair:
    """A self-signed certificate (valid for localhost and 127.0.0.1) and its key."""

    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        return context


def make_self_signed_cert(directory: Path) -> CertPair:
    """Generate a certificate with the openssl CLI; clients trust it through SSL_CERT_FILE."""
    pair = CertPair(directory / "sink-cert.pem", directory / "sink-key.pem")
    command = "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2"
    command += " -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1"
    keys = ["-keyout", str(pair.key), "-out", str(pair.cert)]
    subprocess.run([*command.split(), *keys], check=True, capture_output=True)
    return pair


def in_fraction(address: str, fraction: float) -> bool:
    """Whether ``address`` falls in the deterministic ``fraction`` picked by hash."""
    digest = hashlib.sha256(address.lower().encode()).digest()
    return int.from_bytes(digest[:4], "big") < fraction * 2**32


@dataclass(frozen=True)
class Received:
    """One accepted message, as the server stored it (dot-stuffing undone)."""

    mail_from: str
    recipients: tuple[str, ...]
    data: bytes
    connection: int
    mail_options: tuple[str, ...] = ()
    followed: bool = False  # the next commands had arrived before this message was answered


@dataclass(frozen=True)
class Command:
    """One SMTP command; ``pipelined`` is True when more input was already waiting behind it."""

    connection: int
    verb: str
    pipelined: bool


@dataclass
class Rule:
    """A fault: at ``stage``, for matching addresses, reply, drop or stall."""

    stage: str
    action: str  # "reply", "drop" or "stall"
    reply: str = ""
    seconds: float = 0.0
    recipients: frozenset[str] | None = None
    fraction: float | None = None
    times: int | None = None
    partial: bool = False
    hits: Counter[str] = field(default_factory=Counter)

    def take(self, addresses: Iterable[str]) -> bool:
        """Whether this rule fires for this attempt; counts the attempt if so."""
        for address in addresses:
            key = address.lower()
            if self.recipients is not None and key not in self.recipients:
                continue
            if self.fraction is not None and not in_fraction(key, self.fraction):
                continue
            if self.times is not None and self.hits[key] >= self.times:
                continue
            self.hits[key] += 1
            return True
        return False


class SmtpSink:
    """Records what a real SMTP client sends; thread-safe; faults switchable at runtime.

    ``tls``: None (plain), "starttls" (offered, not required) or "ssl" (implicit TLS);
    both need ``cert``. ``credentials=(user, password)`` requires AUTH LOGIN/PLAIN
    before MAIL. ``pipelining=False`` stops advertising PIPELINING; ``smtputf8=False``
    stops offering SMTPUTF8 (RFC 6531: non-ASCII addresses).
    """

    def __init__(
        self,
        *,
        port: int = 0,
        tls: str | None = None,
        cert: CertPair | None = None,
        credentials: tuple[str, str] | None = None,
        pipelining: bool = True,
        smtputf8: bool = True,
        on_message: Callable[[Received], None] | None = None,
    ) -> None:
        if tls not in (None, "starttls", "ssl") or (tls and cert is None):
            raise ValueError("tls must be None, 'starttls' or 'ssl', and TLS needs a cert")
        self.host = "127.0.0.1"
        self.tls, self.cert, self.credentials = tls, cert, credentials
        self.pipelining, self.smtputf8 = pipelining, smtputf8
        self.per_connection_limit: tuple[int, str] | None = None
        self.on_message = on_message
        self._lock = threading.Condition()
        self._rules: list[Rule] = []
        self._messages: list[Received] = []
        self._commands: list[Command] = []
        self._live: set[SinkSMTP] = set()
        self.connections_opened = 0
        self._running = False
        self._sock = listening_socket(self.host, port)
        self.port: int = self._sock.getsockname()[1]
        ssl_context = cert.server_context() if tls == "ssl" and cert else None
        self._controller = SinkController(
            self, self._sock, ssl_context=ssl_context, server_hostname="sink.test"
        )

    def start(self) -> SmtpSink:
        self._controller.start()
        self._running = True
        with self._lock:
            self.connections_opened = 0
        return self

    def stop(self) -> None:
        """Close every client connection, then the server, so no socket outlives the test."""
        if not self._running:
            self._sock.close()
            return
        self._running = False
        loop = self._controller.loop

        async def close_all() -> None:
            with self._lock:
                live = list(self._live)
            for server in live:
                if server.transport is not None:
                    server.transport.close()
            for _ in range(3):
                await asyncio.sleep(0)

        if loop.is_running():
            asyncio.run_coroutine_threadsafe(close_all(), loop).result(timeout=5)
        self._controller.stop()

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def env(self) -> dict[str, str]:
        """NEWSLETTER_SMTP_* settings that point the app at this sink."""
        env = {
            "NEWSLETTER_SMTP_HOST": self.host,
            "NEWSLETTER_SMTP_PORT": str(self.port),
            "NEWSLETTER_SMTP_SECURITY": self.tls or "none",
            "NEWSLETTER_SMTP_TIMEOUT": "5",
        }
        if self.credentials:
            env["NEWSLETTER_SMTP_USERNAME"], env["NEWSLETTER_SMTP_PASSWORD"] = self.credentials
        return env

    # Faults -------------------------------------------------------------------------

    def fail(
        self,
        stage: str,
        reply: str,
        *,
        recipients: Iterable[str] | None = None,
        fraction: float | None = None,
        times: int | None = None,
    ) -> None:
        """Answer ``reply`` at ``stage`` for the chosen recipients (all by default)."""
        self._add(Rule(stage, "reply", reply=reply, times=times, fraction=fraction), recipients)

    def drop(
        self,
        *,
        partial: bool = False,
        recipients: Iterable[str] | None = None,
        times: int | None = 1,
    ) -> None:
        """Close the connection without a reply once DATA is in, or after ~1 KB of it."""
        self._add(Rule("data", "drop", times=times, partial=partial), recipients)

    def stall(
        self,
        seconds: float,
        stage: str = "data",
        *,
        recipients: Iterable[str] | None = None,
        times: int | None = None,
    ) -> None:
        """Wait ``seconds`` before answering at ``stage``, as an overloaded server does."""
        self._add(Rule(stage, "stall", seconds=seconds, times=times), recipients)

    def limit_per_connection(
        self, count: int, reply: str = "421 4.7.0 too many messages, slow down"
    ) -> None:
        """After ``count`` messages on a connection, answer MAIL with ``reply`` and hang up."""
        self.per_connection_limit = (count, reply)

    def clear_faults(self) -> None:
        """Back to a well-behaved server."""
        with self._lock:
            self._rules.clear()
            self.per_connection_limit = None

    def _add(self, rule: Rule, recipients: Iterable[str] | None) -> None:
        if rule.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}")
        if recipients is not None:
            rule.recipients = frozenset(a.lower() for a in recipients)
        with self._lock:
            self._rules.append(rule)

    # Called from the server thread ----------------------------------------------------

    def match_rule(
        self, stage: str, addresses: Iterable[str], partial: bool = False
    ) -> Rule | None:
        """The first fault rule that fires for this attempt, counting it."""
        addresses = list(addresses)
        with self._lock:
            for rule in self._rules:
                if rule.stage == stage and rule.partial == partial and rule.take(addresses):
                    return rule
        return None

    def connection_opened(self, server: SinkSMTP) -> int:
        with self._lock:
            self.connections_opened += 1
            self._live.add(server)
            return self.connections_opened

    def connection_closed(self, server: SinkSMTP) -> None:
        with self._lock:
            self._live.discard(server)

    def record_command(self, connection: int, verb: str, pipelined: bool) -> None:
        with self._lock:
            self._commands.append(Command(connection, verb, pipelined))

    def record_message(self, connection: int, envelope: Envelope, followed: bool = False) -> None:
        message = Received(
            envelope.mail_from,
            tuple(envelope.rcpt_tos),
            envelope.original_content,
            connection,
            tuple(envelope.mail_options),
            followed,
        )
        with self._lock:
            self._messages.append(message)
            if self.on_message is not None:
                self.on_message(message)
            self._lock.notify_all()

    @property
    def messages(self) -> list[Received]:
        """Every accepted message so far, in arrival order."""
        with self._lock:
            return list(self._messages)

    @property
    def commands(self) -> list[Command]:
        """Every command so far (verbs only: AUTH arguments are never kept)."""
        with self._lock:
            return list(self._commands)

    def command_counts(self) -> Counter[str]:
        """How often each verb was seen, e.g. ``counts["RSET"]``."""
        return Counter(c.verb for c in self.commands)

    def received_by(self, address: str) -> list[Received]:
        """The accepted messages addressed to ``address`` (a second copy shows as two)."""
        key = address.lower()
        return [m for m in self.messages if key in (r.lower() for r in m.recipients)]

    def wait_for(self, count: int, timeout: float = 5.0) -> list[Received]:
        """Block until ``count`` messages arrived; AssertionError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self._messages) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"sink got {len(self._messages)} of {count} messages")
                self._lock.wait(left)
            return list(self._messages)


if __name__ == "__main__":
    from smtp_sink_cli import main

    raise SystemExit(main())
