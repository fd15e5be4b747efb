"""``newsletter serve``: the web app on waitress, with the outbound mail worker beside it.

Waitress is a production WSGI server (the Flask development server never runs here):
one process, ``threads`` worker threads, and an event loop that buffers each request
before a thread sees it, so a slow client never holds a thread. The scheduler is not
part of this process; it runs as ``newsletter scheduler``.

SIGINT and SIGTERM stop it cleanly: no new connections, requests in progress finish
(up to 5 s), the outbound worker finishes the message in hand, and the exit code is 0.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable

from flask import Flask
from waitress.server import create_server

from newsletter import signup
from newsletter.config import Settings
from newsletter.errors import InputError
from newsletter.outbound import OutboundWorker
from newsletter.store import open_store
from newsletter.web import create_app

DEFAULT_THREADS = 8
CONNECTION_LIMIT = 250
GIL_SWITCH_SECONDS = 0.001
# Waitress buffers a body before the app sees it, so it refuses the absurd ones itself; up
# to this size the app answers its own 413 page (the app's limit is MAX_BODY_BYTES).
REQUEST_BODY_LIMIT = 1024 * 1024


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # waitress's loop ends on it and shuts its threads down


def _settle(app: Flask) -> None:
    """Load what the first requests would, freeze the heap, and tune thread switching.

    Everything start-up made lives as long as the process; frozen, the garbage collector
    stops walking those ~100,000 objects in each full collection, which otherwise pauses
    every request thread for tens of milliseconds now and then under load.
    """
    app.test_client().get("/")
    gc.collect()
    gc.freeze()
    # Hand the GIL over every 1 ms instead of 5: the event loop thread and whoever holds the
    # database write lock get it back sooner, which halves the p99 at fifty busy clients.
    sys.setswitchinterval(GIL_SWITCH_SECONDS)


def run(
    settings: Settings,
    host: str,
    port: int,
    *,
    threads: int = DEFAULT_THREADS,
    announce: Callable[[str], None] = print,
) -> None:
    """Serve until SIGINT or SIGTERM; ``announce`` gets the URL once connections are taken."""
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # Waitress warns once per request while requests wait for a thread: at a busy moment
    # that is thousands of lines a second, and the queue is what the threads are for.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    store = open_store(settings)
    worker = OutboundWorker(store, settings, housekeeping=[signup.prune_attempts])
    app = create_app(settings, store, notify=worker.wake)
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listening = socket.create_server((host, port), family=family, backlog=1024)
    except OSError as exc:
        store.close()
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise InputError(f"cannot listen on {host}:{port}: {reason}") from None
    server = create_server(
        app,
        sockets=[listening],
        threads=threads,
        connection_limit=CONNECTION_LIMIT,
        max_request_body_size=REQUEST_BODY_LIMIT,
        channel_timeout=60,
        ident="newsletter",
        clear_untrusted_proxy_headers=False,
    )
    _settle(app)
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        worker.start()
        bound_host, bound_port = listening.getsockname()[:2]
        announce(f"http://{f'[{bound_host}]' if ':' in bound_host else bound_host}:{bound_port}")
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for channel in list(server._map.values()):  # type: ignore[union-attr]
            channel.close()
        worker.stop()
        store.close()
