"""Where finished messages go: an SMTP server over one reused connection, or an outbox folder.

A transport sends bytes to one address and says what the server answered; it knows
nothing of subscribers or issues. The sender opens one transport per worker thread,
so ``NEWSLETTER_SMTP_CONNECTIONS`` transports are the connection pool. A run of messages
goes through :meth:`Transport.send_all`, which over SMTP puts each message's envelope on
the wire right behind the previous message's body: one round trip per message.

Messages arrive in SMTP wire format (CRLF line ends, already dot-stuffed, without the
final ``.``): the message builder stuffs the template once per issue, so no transport
runs a per-message regex over 30 KB of HTML.
"""

from __future__ import annotations

import contextlib
import re
import smtplib
import ssl
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from newsletter.errors import DeliveryError
from newsletter.files import atomic_write

if TYPE_CHECKING:
    from newsletter.config import Settings

ABANDONED_SECONDS = 60  # an outbox file still being written after this long was left by a kill
_LINE_END = re.compile(rb"\r\n|\r|\n")
_ENHANCED_USER_UNKNOWN = re.compile(r"^5\.1\.\d{1,3}\b")
_USER_UNKNOWN_TEXT = re.compile(
    r"user unknown|unknown user|no such user|recipient unknown|unknown recipient", re.I
)
_UNSAFE_ADDRESS = re.compile(r"[\r\n<>\s]")  # would let an address inject SMTP commands
_DROPPED = (smtplib.SMTPException, OSError)


@dataclass(frozen=True)
class Outcome:
    """What became of one message: the sender decides on retries, bounces and backoff."""

    status: str  # "sent" | "retry" | "failed" | "bounced"
    code: int | None  # the SMTP reply code; None when the connection dropped or timed out
    answer: str  # one line, e.g. "250 2.0.0 Ok: queued as X" or "connection dropped: ..."
    throttle: bool = False  # the server asked the whole send to slow down (see slows_down)
    # A 5xx to MAIL FROM: the server refuses us (quota, sender address), not this recipient.
    sender_refused: bool = False


@dataclass(frozen=True)
class Message:
    """One message for one recipient: ``data`` in wire format (CRLF, dot-stuffed)."""

    envelope_from: str
    recipient: str
    data: bytes


Key = TypeVar("Key")


class Transport(Protocol):
    """What the sender needs from a way of delivering mail."""

    def check(self) -> None:
        """Connect (TLS, login) now, so a bad setup fails before the first message."""

    def send(self, envelope_from: str, recipient: str, data: bytes) -> Outcome:
        """Deliver ``data`` (wire format) to one recipient; network trouble is an Outcome."""

    def send_all(self, messages: Iterable[tuple[Key, Message]]) -> Iterator[tuple[Key, Outcome]]:
        """Deliver messages as they are drawn, each outcome with its key, in order; the next
        message may be drawn before the previous one's outcome is given."""

    def close(self) -> None:
        """Let go of connections; the transport may be used again afterwards."""


def one_at_a_time(
    transport: Transport, messages: Iterable[tuple[Key, Message]]
) -> Iterator[tuple[Key, Outcome]]:
    """``send_all`` for a transport with nothing to gain from looking ahead."""
    for key, message in messages:
        yield key, transport.send(message.envelope_from, message.recipient, message.data)


def to_wire(message_bytes: bytes) -> bytes:
    """CRLF line ends and dot-stuffing (RFC 5321 4.5.2), done once per template, not per send."""
    wire = _LINE_END.sub(b"\r\n", message_bytes)
    if wire.startswith(b"."):
        wire = b"." + wire
    return wire.replace(b"\r\n.", b"\r\n..")


def from_wire(data: bytes) -> bytes:
    """Undo dot-stuffing: the message bytes a server stores for ``data``."""
    if data.startswith(b"."):
        data = data[1:]
    return data.replace(b"\r\n.", b"\r\n")


def _one_line(code: int, message: bytes | str) -> str:
    """A multi-line server reply as one log-friendly line."""
    text = message.decode("utf-8", "replace") if isinstance(message, bytes) else message
    return " ".join(f"{code} {text}".split())


def slows_down(stage: str, code: int) -> bool:
    """Whether a temporary answer is about our pace, so the whole send slows down: 421
    (closing the connection), 454, or a 4xx when we connect or at MAIL FROM. A 4xx for one
    recipient (greylisting, a full mailbox) only makes that message wait."""
    return code in (421, 454) or stage in ("connect", "mail")


def classify(stage: str, code: int, message: bytes | str) -> Outcome:
    """Map a reply at ``stage`` ("mail", "rcpt", "data" or "final") to an Outcome."""
    answer = _one_line(code, message)
    if 200 <= code < 300 and stage == "final":
        return Outcome("sent", code, answer)
    if 400 <= code < 500:
        return Outcome("retry", code, answer, throttle=slows_down(stage, code))
    if 500 <= code < 600:
        text = answer[4:]
        unknown = _ENHANCED_USER_UNKNOWN.match(text) or (
            code == 550 and _USER_UNKNOWN_TEXT.search(text)
        )
        if stage in ("rcpt", "final") and unknown:
            return Outcome("bounced", code, answer)
        return Outcome("failed", code, answer, sender_refused=stage == "mail")
    return Outcome("retry", code if code > 0 else None, f"unexpected reply: {answer}")


class _BusyServer(DeliveryError):
    """A 4xx at greeting, STARTTLS or login: the server is busy, not misconfigured."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class SmtpTransport:
    """One SMTP connection, opened on first use and reused for every message.

    Each message is MAIL/RCPT/DATA driven by hand, pipelined when the server offers
    PIPELINING (RFC 2920): one write and one round trip for the envelope, one for the
    body. Not thread-safe: give each worker thread its own transport.
    """

    def __init__(
        self,
        host: str,
        port: int,
        security: str = "starttls",
        username: str | None = None,
        password: str | None = None,
        timeout: float = 30.0,
        local_hostname: str | None = None,
    ) -> None:
        if security not in ("starttls", "ssl", "none"):
            raise ValueError(f"unknown SMTP security mode {security!r}")
        self.host, self.port, self.security = host, port, security
        self.username, self._password = username, password
        self.timeout, self.local_hostname = timeout, local_hostname
        self._conn: smtplib.SMTP | None = None
        self._dirty = False  # an envelope was refused: RSET before the next one

    @property
    def where(self) -> str:
        """host:port, for messages that must never carry credentials."""
        return f"{self.host}:{self.port}"

    def __enter__(self) -> SmtpTransport:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def check(self) -> None:
        """Connect, secure and log in now; DeliveryError (one line) if any step fails."""
        if self._conn is None:
            self._conn = self._open()

    def close(self) -> None:
        """Say QUIT if the server is still listening, then drop the socket."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(*_DROPPED):
                conn.quit()
            conn.close()

    def _discard(self) -> None:
        """Drop a connection that can no longer be trusted, without a goodbye."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _open(self) -> smtplib.SMTP:
        """Connect, EHLO, STARTTLS and login; raise DeliveryError naming host:port."""
        try:
            if self.security == "ssl":
                context = ssl.create_default_context()
                conn: smtplib.SMTP = smtplib.SMTP_SSL(
                    self.host, self.port, self.local_hostname, timeout=self.timeout, context=context
                )
            else:
                conn = smtplib.SMTP(self.host, self.port, self.local_hostname, timeout=self.timeout)
        except Exception as exc:
            raise self._connect_error(exc) from None
        try:
            self._secure_and_login(conn)
        except BaseException as exc:
            conn.close()
            if isinstance(exc, Exception):
                raise self._connect_error(exc) from None
            raise
        self._dirty = False
        return conn

    def _connect_error(self, exc: Exception) -> DeliveryError:
        """One line naming host:port (never the password) for ``exc``."""
        if isinstance(exc, DeliveryError):
            return exc
        if isinstance(exc, ssl.SSLCertVerificationError):
            return DeliveryError(f"TLS with SMTP server {self.where} failed: {exc.verify_message}")
        if isinstance(exc, ssl.SSLError):
            reason = exc.reason or exc.strerror or type(exc).__name__
            return DeliveryError(f"TLS with SMTP server {self.where} failed: {reason}")
        if isinstance(exc, smtplib.SMTPResponseException):
            answer = _one_line(exc.smtp_code, exc.smtp_error)
            message = f"SMTP server {self.where} refused us: {answer}"
            if isinstance(exc, smtplib.SMTPAuthenticationError):
                message = f"SMTP login refused by {self.where}: {answer}"
            if 400 <= exc.smtp_code < 500:
                return _BusyServer(message, exc.smtp_code)
            return DeliveryError(message)
        if isinstance(exc, smtplib.SMTPNotSupportedError):
            return DeliveryError(f"SMTP server {self.where} offers no login method we support")
        reason = " ".join(str(exc).split()) or type(exc).__name__
        return DeliveryError(f"cannot reach SMTP server {self.where}: {reason}")

    def _secure_and_login(self, conn: smtplib.SMTP) -> None:
        conn.ehlo_or_helo_if_needed()
        if self.security == "starttls":
            if not conn.has_extn("starttls"):
                raise DeliveryError(
                    f"SMTP server {self.where} does not offer STARTTLS; refusing to send in "
                    "clear text (set NEWSLETTER_SMTP_SECURITY to ssl or none)"
                )
            conn.starttls(context=ssl.create_default_context())
            conn.ehlo()
        if not self.username:
            return
        if not conn.has_extn("auth"):
            raise DeliveryError(
                f"SMTP server {self.where} does not offer AUTH; cannot log in as configured"
            )
        conn.login(self.username, self._password or "")

    def send(self, envelope_from: str, recipient: str, data: bytes) -> Outcome:
        """Deliver one message (see :meth:`send_all`)."""
        [(_, outcome)] = self.send_all([(None, Message(envelope_from, recipient, data))])
        return outcome

    def send_all(self, messages: Iterable[tuple[Key, Message]]) -> Iterator[tuple[Key, Outcome]]:
        """Deliver each message over the reused connection, reconnecting as needed.

        Never raises for SMTP trouble: a failed (re)connect is a retry with code None (the
        DeliveryError text as answer), which the sender counts as an unreachable server;
        only a 4xx at greeting or login keeps its code. When the server offers PIPELINING,
        the next message is drawn before this one's body is sent, and its envelope goes out
        behind the body; if the connection breaks or closes before that envelope is
        answered, it is sent again on a new connection (its body never left, so it cannot
        have been delivered).
        """
        queue = iter(messages)
        item = next(queue, None)
        announced = False  # the item's envelope is on the wire already, behind the last body
        try:
            while item is not None:
                key, message = item
                following = None
                refused = None if announced else self._unsendable(message)
                if refused is None:
                    try:
                        refused = self._envelope(message, announced)
                        if refused is None:
                            following = self._draw(queue)
                            ahead = self._ahead(following)
                            tail = b".\r\n" if message.data.endswith(b"\r\n") else b"\r\n.\r\n"
                            self._conn.sock.sendall(message.data + tail + ahead)  # type: ignore[union-attr]
                            announced = bool(ahead)
                            refused = self._final(classify("final", *self._conn.getreply()))  # type: ignore[union-attr]
                    except _DROPPED as exc:
                        self._discard()
                        reason = " ".join(str(exc).split()) or type(exc).__name__
                        refused = Outcome("retry", None, f"connection dropped: {reason}")
                if self._conn is None:
                    announced = False
                yield key, refused
                item = following if following is not None else next(queue, None)
                if following is None:
                    announced = False
        finally:
            if announced:  # an envelope is waiting for its body, which will not come
                self._discard()

    def _draw(self, queue: Iterator[tuple[Key, Message]]) -> tuple[Key, Message] | None:
        """The next message, drawn while the server waits for this one's body: if drawing
        it fails, the connection is dropped, so no half-sent message is ever completed."""
        try:
            return next(queue, None)
        except BaseException:
            self._discard()
            raise

    def _unsendable(self, message: Message) -> Outcome | None:
        """Why this message cannot go on this connection, without a command; None if it can
        (a connection is opened here when there is none)."""
        for address in (message.envelope_from, message.recipient):
            if _UNSAFE_ADDRESS.search(address):
                return Outcome("failed", None, f"invalid address {address!r}")
        if self._conn is None:
            try:
                self._conn = self._open()
            except DeliveryError as exc:
                code = exc.code if isinstance(exc, _BusyServer) else None
                throttle = code is not None and slows_down("connect", code)
                return Outcome("retry", code, str(exc), throttle=throttle)
        needs_utf8 = not (message.envelope_from + message.recipient).isascii()
        if needs_utf8 and not self._conn.has_extn("smtputf8"):
            return Outcome(
                "failed",
                None,
                f"{message.recipient}: {self.where} does not offer SMTPUTF8, which an address "
                "with non-ASCII characters needs",
            )
        return None

    def _commands(self, message: Message) -> list[bytes]:
        """RSET when the last envelope was refused, then MAIL FROM, RCPT TO and DATA."""
        conn = self._conn
        assert conn is not None
        params = " BODY=8BITMIME" if conn.has_extn("8bitmime") else ""
        if conn.has_extn("size"):
            params += f" SIZE={len(message.data)}"
        if not (message.envelope_from + message.recipient).isascii():
            params += " SMTPUTF8"
        commands = [b"RSET\r\n"] if self._dirty else []
        return [
            *commands,
            f"MAIL FROM:<{message.envelope_from}>{params}\r\n".encode(),
            f"RCPT TO:<{message.recipient}>\r\n".encode(),
            b"DATA\r\n",
        ]

    def _ahead(self, following: tuple[object, Message] | None) -> bytes:
        """The next message's envelope, to go out behind this body (pipelining only)."""
        conn = self._conn
        if following is None or conn is None or not conn.has_extn("pipelining"):
            return b""
        if self._unsendable(following[1]) is not None:
            return b""  # it is refused without a command when its turn comes
        return b"".join(self._commands(following[1]))

    def _envelope(self, message: Message, announced: bool) -> Outcome | None:
        """Send the envelope (unless ``announced``) and read its answers: None once the
        server waits for the body (354), else why the message is refused."""
        conn = self._conn
        assert conn is not None
        commands = self._commands(message)
        stages = [*(["reset"] if self._dirty else []), "mail", "rcpt", "data"]
        pipelined = conn.has_extn("pipelining")
        if pipelined and not announced:
            conn.sock.sendall(b"".join(commands))
        for stage, command in zip(stages, commands, strict=True):
            if not pipelined:
                conn.sock.sendall(command)
            code, text = conn.getreply()
            if stage == "reset":
                self._dirty = code != 250
                if self._dirty:
                    raise smtplib.SMTPResponseException(code, text)  # a new connection
                continue
            if (stage, code) in (("mail", 250), ("rcpt", 250), ("rcpt", 251)):
                continue
            if (stage, code) == ("data", 354):
                return None
            return self._refused(stage, code, text, pipelined, stages.index(stage), len(stages))
        raise AssertionError("unreachable")

    def _refused(self, stage: str, code: int, text: bytes, pipelined: bool, at: int, of: int):
        """An envelope refused at ``stage``: read what the pipelined rest answered (and end
        a DATA that was accepted anyway), then RSET before the next message."""
        conn = self._conn
        assert conn is not None
        outcome = classify(stage, code, text)
        last = code
        if pipelined and code != 421:
            for _ in range(of - at - 1):
                last = conn.getreply()[0]
                if last == 421:
                    break
        if last == 354:
            conn.sock.sendall(b".\r\n")
            conn.getreply()
        self._dirty = True
        if 421 in (code, last):
            self._discard()
        return outcome

    def _final(self, outcome: Outcome) -> Outcome:
        """After the body's answer: a 421 or an odd answer ends the connection."""
        if outcome.code == 421 or (
            outcome.status == "retry" and not 400 <= (outcome.code or 0) < 500
        ):
            self._discard()
        return outcome


class OutboxTransport:
    """Writes each message to ``directory`` as its own ``.eml`` file, for setups without SMTP.

    Names are ``<UTC time>-<random>.eml``: they sort by time and never collide, even
    with several senders writing at once; each file appears whole or not at all.
    """

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)

    def check(self) -> None:
        """Create the folder and prove we can write there before sending starts; clear away
        half-written files a killed send left behind."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.directory):
                pass
            abandoned = time.time() - ABANDONED_SECONDS
            for path in self.directory.glob(".*.eml.*.tmp"):
                with contextlib.suppress(OSError):  # another sender's, just renamed
                    if path.stat().st_mtime < abandoned:
                        path.unlink()
        except OSError as exc:
            raise DeliveryError(
                f"outbox folder {self.directory} is not writable: {exc.strerror or exc}"
            ) from None

    def send(self, envelope_from: str, recipient: str, data: bytes) -> Outcome:
        """Write one message; a full disk is a retry, like a busy server."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        path = self.directory / f"{stamp}-{uuid.uuid4().hex[:12]}.eml"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            atomic_write(path, from_wire(data))
        except OSError as exc:
            return Outcome("retry", None, f"cannot write {path}: {exc.strerror or exc}")
        return Outcome("sent", 250, f"written to {path}")

    def send_all(self, messages: Iterable[tuple[Key, Message]]) -> Iterator[tuple[Key, Outcome]]:
        """One file after another."""
        return one_at_a_time(self, messages)

    def close(self) -> None:
        """Nothing to release."""


@dataclass(frozen=True)
class Attempt:
    """One call to :meth:`MemoryTransport.send`, as the sender made it."""

    envelope_from: str
    recipient: str
    data: bytes
    outcome: Outcome


class MemoryTransport:
    """Records messages instead of sending them, for fast tests of the sender.

    ``script(recipient)`` may return an Outcome to play a server's answer (None means
    sent). ``check_error`` makes :meth:`check` fail as an unreachable server would.
    """

    def __init__(
        self,
        script: Callable[[str], Outcome | None] | None = None,
        check_error: str | None = None,
    ) -> None:
        self.script = script
        self.check_error = check_error
        self.attempts: list[Attempt] = []
        self.checks = 0
        self.closes = 0
        self._lock = threading.Lock()

    def check(self) -> None:
        """Count the call; fail when told to."""
        with self._lock:
            self.checks += 1
        if self.check_error:
            raise DeliveryError(self.check_error)

    def send(self, envelope_from: str, recipient: str, data: bytes) -> Outcome:
        """Record the attempt and answer as scripted."""
        scripted = self.script(recipient) if self.script else None
        outcome = scripted or Outcome("sent", 250, "250 2.0.0 Ok: kept in memory")
        with self._lock:
            self.attempts.append(Attempt(envelope_from, recipient, data, outcome))
        return outcome

    def send_all(self, messages: Iterable[tuple[Key, Message]]) -> Iterator[tuple[Key, Outcome]]:
        """One after another, as scripted."""
        return one_at_a_time(self, messages)

    def close(self) -> None:
        """Count the call."""
        with self._lock:
            self.closes += 1

    @property
    def sent(self) -> list[Attempt]:
        """The attempts that ended as sent, in order."""
        with self._lock:
            return [a for a in self.attempts if a.outcome.status == "sent"]

    def recipients(self) -> list[str]:
        """Every address that was sent a message, once per copy."""
        return [a.recipient for a in self.sent]


def make_transport(settings: Settings) -> Transport:
    """The transport the settings ask for; call it once per worker thread."""
    if settings.smtp_host is None:
        return OutboxTransport(settings.outbox_dir)
    return SmtpTransport(
        settings.smtp_host,
        settings.smtp_port,
        settings.smtp_security,
        settings.smtp_username,
        settings.smtp_password,
        settings.smtp_timeout,
    )
