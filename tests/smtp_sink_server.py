"""aiosmtpd glue for tests/smtp_sink.py: the protocol, hooks and controller behind SmtpSink.

Everything here runs on the sink's event-loop thread and keeps no state of its own:
it asks the sink which fault applies and hands it what was received.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

if TYPE_CHECKING:
    from smtp_sink import SmtpSink


async def hang_up(server: SMTP, reply: str | None = None) -> None:
    """Optionally answer, then close the connection and never return (the task is cancelled)."""
    if reply:
        await server.push(reply)
    if server.transport is not None:
        server.transport.close()
    await asyncio.get_running_loop().create_future()


class SinkSMTP(SMTP):
    """aiosmtpd's server with a connection number and a log of every command."""

    def __init__(self, sink: SmtpSink, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sink = sink
        self.connection_id = 0
        self.accepted = 0
        self._smtp_methods = {
            verb: self._logged(verb, method) for verb, method in self._smtp_methods.items()
        }

    def _logged(self, verb: str, method: Callable[[Any], Any]) -> Callable[[Any], Any]:
        async def run(arg: Any) -> None:
            waiting = bool(self._reader._buffer)  # type: ignore[attr-defined]
            self.sink.record_command(self.connection_id, verb, waiting)
            await method(arg)

        return run

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None:  # not the second call that follows STARTTLS
            self.connection_id = self.sink.connection_opened(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self.sink.connection_closed(self)
        super().connection_lost(error)

    async def smtp_DATA(self, arg: str) -> None:
        rule = self.sink.match_rule("data", self.envelope.rcpt_tos, partial=True)
        if rule is None or not self.envelope.rcpt_tos:
            return await super().smtp_DATA(arg)
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        await self._reader.read(1024)
        await hang_up(self)


class SinkHandler:
    """aiosmtpd hooks: advertise what the sink offers and apply its faults."""

    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        *head, last = responses
        if not self.sink.credentials:
            head = [line for line in head if not line.startswith("250-AUTH")]
        if self.sink.pipelining:
            head.append("250-PIPELINING")
        return [*head, last]

    async def _fault(self, server: SinkSMTP, stage: str, addresses: list[str]) -> str | None:
        limit = self.sink.per_connection_limit
        if stage == "mail" and limit and server.accepted >= limit[0]:
            await hang_up(server, limit[1])
        rule = self.sink.match_rule(stage, addresses)
        if rule is None:
            return None
        if rule.action == "stall":
            await asyncio.sleep(rule.seconds)
            return None
        if rule.action == "drop":
            await hang_up(server)
        return rule.reply

    async def handle_MAIL(self, server, session: Session, envelope: Envelope, address, options):
        if self.sink.credentials and not session.authenticated:
            return "530 5.7.0 Authentication required"
        reply = await self._fault(server, "mail", [address])
        if reply:
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server, session: Session, envelope: Envelope, address, options):
        reply = await self._fault(server, "rcpt", [address])
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server, session: Session, envelope: Envelope) -> str:
        reply = await self._fault(server, "data", envelope.rcpt_tos)
        if reply:
            return reply
        server.accepted += 1
        followed = bool(server._reader._buffer)  # type: ignore[attr-defined]
        self.sink.record_message(server.connection_id, envelope, followed)
        return f"250 2.0.0 Ok: queued as {server.connection_id}.{server.accepted}"


def authenticate(server, session, envelope, mechanism, auth_data) -> AuthResult:
    """aiosmtpd authenticator: LOGIN and PLAIN against the sink's current credentials."""
    given = None
    if isinstance(auth_data, LoginPassword):
        given = (auth_data.login.decode(), auth_data.password.decode())
    ok = server.sink.credentials is not None and given == server.sink.credentials
    return AuthResult(success=ok, handled=False, auth_data=auth_data)


def listening_socket(host: str, port: int) -> socket.socket:
    """A bound socket made with IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that
    say so, and without it every pipelined reply waits 40 ms for a delayed ACK."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


class SinkController(Controller):
    """Serves on a socket bound beforehand, so the port is known and never raced for.

    ``factory`` runs per connection, so TLS, AUTH and PIPELINING follow the sink's
    settings at the moment a client connects.
    """

    def __init__(self, sink: SmtpSink, sock: socket.socket, **kwargs: Any) -> None:
        host, port = sock.getsockname()
        super().__init__(SinkHandler(sink), hostname=host, port=port, **kwargs)
        self.sink, self.sock = sink, sock
        self.SMTP_kwargs["enable_SMTPUTF8"] = sink.smtputf8

    def factory(self) -> SMTP:
        starttls = self.sink.tls == "starttls" and self.sink.cert is not None
        return SinkSMTP(
            self.sink,
            self.handler,
            **self.SMTP_kwargs,
            tls_context=self.sink.cert.server_context() if starttls else None,
            authenticator=authenticate,
            auth_require_tls=starttls,
        )

    def _create_server(self):
        return self.loop.create_server(self._factory_invoker, sock=self.sock, ssl=self.ssl_context)
