"""A DNS server for tests: dnslib on 127.0.0.1, over UDP and TCP, answering TXT records
from a dict, in threads of this process. Never the real network.

    with DnsZone({"example.com": ["v=spf1 -all"]}) as dns:
        dns.records["_dmarc.example.com"] = ["v=DMARC1; p=reject"]   # changeable while it runs
        env = {"NEWSLETTER_DNS_SERVER": dns.address}

A TXT value longer than 255 bytes (a 2048-bit DKIM key) is served as one record of several
strings, as real zones publish it. Names not in the dict get NXDOMAIN; names in it get
their TXT records, and an empty answer for other types. ``SilentDns`` is a server that
never answers, for timeouts.
"""

from __future__ import annotations

import socket
import socketserver
import threading

from dnslib import QTYPE, RCODE, RR, TXT
from dnslib.server import BaseResolver, DNSServer


class _ZoneResolver(BaseResolver):
    def __init__(self, zone: DnsZone) -> None:
        self.zone = zone

    def resolve(self, request, handler):
        reply = request.reply()
        name = str(request.q.qname).rstrip(".").lower()
        with self.zone.lock:
            self.zone.queries.append((name, QTYPE[request.q.qtype]))
            values = self.zone.records.get(name)
        if values is None:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        if request.q.qtype in (QTYPE.TXT, QTYPE.ANY):
            for value in values:
                data = value.encode("utf-8")
                chunks = [data[at : at + 255] for at in range(0, len(data), 255)] or [b""]
                reply.add_answer(RR(request.q.qname, QTYPE.TXT, rdata=TXT(chunks), ttl=60))
        return reply


class _UdpServer(socketserver.ThreadingMixIn, socketserver.UDPServer):
    """dnslib's UDP server without SO_REUSEADDR, with which Linux may give a port that
    another such socket holds to a bind on port 0: two tests' servers would share it."""

    daemon_threads = True
    allow_reuse_address = False


class DnsZone:
    """TXT records by lower-case name without the final dot, served on a free port."""

    def __init__(self, records: dict[str, list[str]] | None = None) -> None:
        self.records: dict[str, list[str]] = {
            name.lower(): list(values) for name, values in (records or {}).items()
        }
        self.queries: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        resolver = _ZoneResolver(self)
        for attempt in range(5):  # the TCP port of the UDP port's number may be taken
            self._udp = DNSServer(
                resolver, port=0, address="127.0.0.1", logger=_Quiet(), server=_UdpServer
            )
            self.port: int = self._udp.server.server_address[1]
            try:
                self._tcp = DNSServer(
                    resolver, port=self.port, address="127.0.0.1", tcp=True, logger=_Quiet()
                )
                break
            except OSError:
                self._udp.server.server_close()
                if attempt == 4:
                    raise

    @property
    def address(self) -> str:
        """HOST:PORT, as NEWSLETTER_DNS_SERVER takes it."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> DnsZone:
        self._threads = [
            threading.Thread(
                target=server.server.serve_forever,
                kwargs={"poll_interval": 0.05},  # stops at once, not after dnslib's 0.5 s
                daemon=True,
            )
            for server in (self._udp, self._tcp)
        ]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        for server in (self._udp, self._tcp):
            server.server.shutdown()
            server.server.server_close()
        for thread in self._threads:
            thread.join(timeout=10)

    def __enter__(self) -> DnsZone:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class SilentDns:
    """A UDP socket on 127.0.0.1 that takes queries and never answers (nor refuses)."""

    def __init__(self) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind(("127.0.0.1", 0))
        self.port: int = self._socket.getsockname()[1]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def received(self) -> int:
        """How many queries arrived (and were dropped) so far."""
        self._socket.setblocking(False)
        count = 0
        while True:
            try:
                self._socket.recv(4096)
            except BlockingIOError:
                return count
            count += 1

    def __enter__(self) -> SilentDns:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._socket.close()


class _Quiet:
    """dnslib's logger interface, saying nothing (pytest turns stray output into noise)."""

    def log_recv(self, handler, data) -> None: ...
    def log_send(self, handler, data) -> None: ...
    def log_request(self, handler, request) -> None: ...
    def log_reply(self, handler, reply) -> None: ...
    def log_truncated(self, handler, reply) -> None: ...
    def log_error(self, handler, e) -> None: ...
    def log_data(self, dnsobj) -> None: ...
