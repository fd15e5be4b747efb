"""``newsletter serve``: the web app on gunicorn, a production WSGI server, and nothing else.

Gunicorn's master keeps ``workers`` processes running, each answering with ``threads``
threads (the ``gthread`` worker, keep-alive included); it stops gracefully on SIGTERM and
SIGINT, and its workers leave when it dies. The web process never sends mail: a signup
queues its confirmation and the worker (``newsletter worker``) sends it. Supervision
(restarts, logs) is the job of whatever runs it: systemd or compose (see ``deploy/``).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

from flask import Flask
from gunicorn.app.base import BaseApplication

from newsletter.config import Settings
from newsletter.errors import InputError
from newsletter.store import Store, open_store
from newsletter.web import create_app

DEFAULT_WORKERS = 1
DEFAULT_THREADS = 8
BACKLOG = 1024
GRACEFUL_SECONDS = 5


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (IPv6 when the host has a colon); InputError
    naming the address when it cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise InputError(f"--host: cannot listen on {host}: {exc.strerror}") from None
    try:
        return socket.create_server((host, port), family=family, backlog=BACKLOG)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise InputError(f"cannot listen on {host}:{port}: {reason}") from None


def url_of(listening: socket.socket) -> str:
    host, port = listening.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


class _Gunicorn(BaseApplication):
    """Gunicorn configured in code: no config file, no command line of its own."""

    def __init__(self, settings: Settings, listening: socket.socket, workers: int, threads: int):
        self._settings, self._listening = settings, listening
        self._workers, self._threads = workers, threads
        self._store: Store | None = None
        super().__init__()

    def load_config(self) -> None:
        options = {
            "bind": [f"fd://{self._listening.fileno()}"],  # gunicorn adopts the socket
            "worker_class": "gthread",
            "workers": self._workers,
            "threads": self._threads,
            "graceful_timeout": GRACEFUL_SECONDS,
            "keepalive": 5,
            "loglevel": "warning",
            "errorlog": "-",
            "accesslog": None,
            "proc_name": "newsletter-serve",
            "control_socket_disable": True,  # one per user by default: two servers would clash
            "worker_exit": lambda arbiter, worker: self._store and self._store.close(),
        }
        for name, value in options.items():
            self.cfg.set(name, value)

    def load(self) -> Flask:
        """Called in each worker process after the fork: nothing open crosses it."""
        self._store = open_store(self._settings)
        return create_app(self._settings, self._store)


def run(
    settings: Settings,
    host: str,
    port: int,
    *,
    workers: int = DEFAULT_WORKERS,
    threads: int = DEFAULT_THREADS,
    announce: Callable[[str], None] = print,
) -> None:
    """Serve until SIGINT or SIGTERM; ``announce`` gets the URL once connections are taken.

    The store is opened (and migrated) and the app built once first, so a bad setting or
    template is a one-line error rather than workers that fail to boot one after another;
    the socket is opened here too, so a port in use is one line as well.
    """
    with open_store(settings) as store:
        create_app(settings, store)
    listening = listen(host, port)
    announce(url_of(listening))
    _Gunicorn(settings, listening, workers, threads).run()
