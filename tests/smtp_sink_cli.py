"""The test SMTP sink as its own process, for tests that kill the sender mid-send.

    python tests/smtp_sink.py --port 0 --jsonl deliveries.jsonl --fail-fraction 0.1

prints ``listening on 127.0.0.1:PORT`` once it accepts connections, appends one JSON
line per accepted message (and flushes it before answering 250), and exits 0 on
SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from collections.abc import Callable
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import IO

from smtp_sink import Received, SmtpSink, make_self_signed_cert


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    parser.add_argument("--jsonl", type=Path, help="append one JSON line per accepted message")
    parser.add_argument("--no-pipelining", action="store_true")
    parser.add_argument("--auth", metavar="USER:PASSWORD", help="require AUTH LOGIN/PLAIN")
    parser.add_argument("--tls", choices=["starttls", "ssl"], help="with a fresh self-signed cert")
    parser.add_argument("--cert-dir", type=Path, default=Path("."), help="gets sink-cert.pem")
    parser.add_argument("--fail-fraction", type=float, help="fraction of addresses that fail")
    parser.add_argument("--fail-reply", default="451 4.7.1 try later")
    parser.add_argument("--fail-stage", choices=["mail", "rcpt", "data"], default="rcpt")
    parser.add_argument("--fail-times", type=int, default=1, help="attempts per address; 0: all")
    parser.add_argument("--unknown", action="append", default=[], metavar="ADDR")
    parser.add_argument("--drop", action="append", default=[], metavar="ADDR")
    parser.add_argument("--stall", type=float, help="seconds to wait before answering DATA")
    parser.add_argument("--limit-per-connection", type=int, metavar="N")
    return parser


def _journal(handle: IO[str]) -> Callable[[Received], None]:
    def write(message: Received) -> None:
        headers = BytesHeaderParser().parsebytes(message.data)
        line = {
            "time": time.time(),
            "connection": message.connection,
            "mail_from": message.mail_from,
            "recipients": list(message.recipients),
            "message_id": headers.get("Message-ID"),
            "size": len(message.data),
        }
        handle.write(json.dumps(line) + "\n")
        handle.flush()

    return write


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    journal = args.jsonl.open("a", encoding="utf-8") if args.jsonl else None
    cert = make_self_signed_cert(args.cert_dir) if args.tls else None
    credentials = tuple(args.auth.split(":", 1)) if args.auth else None
    sink = SmtpSink(
        port=args.port,
        tls=args.tls,
        cert=cert,
        credentials=credentials,
        pipelining=not args.no_pipelining,
        on_message=_journal(journal) if journal else None,
    )
    if args.fail_fraction:
        times = args.fail_times or None
        sink.fail(args.fail_stage, args.fail_reply, fraction=args.fail_fraction, times=times)
    if args.unknown:
        sink.fail("rcpt", "550 5.1.1 user unknown", recipients=args.unknown)
    if args.drop:
        sink.drop(recipients=args.drop)
    if args.stall:
        sink.stall(args.stall)
    if args.limit_per_connection:
        sink.limit_per_connection(args.limit_per_connection)

    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    with sink:
        print(f"listening on {sink.host}:{sink.port}", flush=True)
        while not stopping.wait(0.2):
            pass
    if journal:
        journal.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
