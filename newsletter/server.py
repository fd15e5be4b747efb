"""``newsletter serve``: the web app on gunicorn, and the confirmation mail sender beside it.

Two processes, started and watched by this one:

- **web**: gunicorn, a production WSGI server (the Flask development server never runs
  here): its master keeps ``workers`` processes running, each answering with ``threads``
  threads (the ``gthread`` worker, keep-alive included). Each worker opens its own store.
- **outbound**: the :class:`~newsletter.outbound.OutboundWorker` thread, which sends the
  confirmations that signups queue in the database. A signup wakes it by writing a byte
  to a pipe; it also polls, for retries and mail queued by other processes.

Why two: sending mail is socket waits and MIME bytes, answering signups is Python; in one
process they share one GIL, and at fifty busy clients the sender's hand-overs cost the
request threads a quarter of their throughput (660 against 830 signups/s). Why gunicorn
and not waitress: waitress reads every request on one event-loop thread that competes
for that GIL too (about 450 signups/s against 780).

If the outbound process dies it is started again (after 1 s, doubling up to a minute);
if the web server stops, everything stops. The listening socket is opened here first,
so a port in use is a one-line error (exit 2) rather than gunicorn's retries, and
``--port 0`` works. SIGTERM stops gracefully (requests in progress finish, up to 5 s;
the outbound worker finishes the message in hand), SIGINT at once; both exit 0. The
scheduler is not part of this; it runs as ``newsletter scheduler``.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess

from flask import Flask
from gunicorn.app.base import BaseApplication

from newsletter import signup
from newsletter.config import Settings
from newsletter.errors import InputError, ServiceError
from newsletter.outbound import OutboundWorker
from newsletter.store import Store, open_store
from newsletter.web import create_app

logger = logging.getLogger(__name__)

DEFAULT_WORKERS = 1
DEFAULT_THREADS = 8
BACKLOG = 1024
GRACEFUL_SECONDS = 5
GIL_SWITCH_SECONDS = 0.001
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
RESTART_DELAYS = (1.0, 60.0)  # first delay, longest delay
OUTBOUND_STOP_SECONDS = 35.0  # its worker's own stop waits up to 30 s for the message in hand
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (IPv6 when the host has a colon); InputError
    naming the address when it cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=BACKLOG)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise InputError(f"cannot listen on {host}:{port}: {reason}") from None


def url_of(listening: socket.socket) -> str:
    host, port = listening.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def _waker(fd: int) -> Callable[[], None]:
    """``notify`` for the app: one byte down the pipe wakes the outbound process."""

    def wake() -> None:
        with contextlib.suppress(OSError):  # full: a wake-up is waiting; gone: it polls
            os.write(fd, b"\0")

    return wake


def _settle(app: Flask) -> None:
    """Load what the first requests would, freeze the heap, and tune thread switching.

    Everything start-up made lives as long as the process; frozen, the garbage collector
    stops walking those ~100,000 objects in each full collection, which otherwise pauses
    every request thread for tens of milliseconds now and then under load.
    """
    app.test_client().get("/")
    gc.collect()
    gc.freeze()
    # Hand the GIL over every 1 ms instead of 5: whoever holds the database write lock or
    # waits on a socket gets it back sooner.
    sys.setswitchinterval(GIL_SWITCH_SECONDS)


# The web process -----------------------------------------------------------------------


class _Gunicorn(BaseApplication):
    """Gunicorn configured in code: no config file, no command line of its own."""

    def __init__(
        self, settings: Settings, listening_fd: int, workers: int, threads: int, wake_fd: int
    ) -> None:
        self._settings, self._fd, self._wake_fd = settings, listening_fd, wake_fd
        self._workers, self._threads = workers, threads
        self._store: Store | None = None
        self._app: Flask | None = None
        super().__init__()

    def load_config(self) -> None:
        options = {
            "bind": [f"fd://{self._fd}"],  # gunicorn adopts the socket and closes this fd
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
            "post_worker_init": lambda worker: _settle(self._app),
            "worker_exit": lambda arbiter, worker: self._store and self._store.close(),
        }
        for name, value in options.items():
            self.cfg.set(name, value)

    def load(self) -> Flask:
        """Called in each worker process after the fork: nothing open crosses it."""
        self._store = open_store(self._settings)
        self._app = create_app(self._settings, self._store, notify=_waker(self._wake_fd))
        return self._app


def _serve_web(
    settings: Settings, listening_fd: int, workers: int, threads: int, wake_fd: int
) -> None:
    _Gunicorn(settings, listening_fd, workers, threads, wake_fd).run()


# The outbound process ------------------------------------------------------------------


def _send_outbound(settings: Settings, wake_fd: int) -> None:
    """Run the outbound worker until SIGINT or SIGTERM, woken by bytes on ``wake_fd``."""
    stopping = threading.Event()
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, frame: stopping.set())
    store = open_store(settings)
    worker = OutboundWorker(store, settings, housekeeping=[signup.prune_attempts])

    def relay() -> None:
        while os.read(wake_fd, 4096):
            worker.wake()

    worker.start()
    threading.Thread(target=relay, name="newsletter-wake", daemon=True).start()
    parent = os.getppid()
    try:
        while not stopping.wait(1.0) and worker.is_alive() and os.getppid() == parent:
            pass
    finally:
        worker.stop()
        store.close()


# The process that starts and watches both ----------------------------------------------


def _die_with(parent: int) -> None:
    """Have Linux send SIGTERM to this process when ``parent`` dies: a ``kill -9`` of
    ``newsletter serve`` must not leave a web server or a mail sender running alone."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: _send_outbound checks
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _child(parent: int, target: Callable[..., None], *args: object) -> None:
    """Run ``target`` in a forked child with the default signal handling back."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # held back by _Supervisor._start
    _die_with(parent)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    target(*args)


class _Supervisor:
    """Starts the web and outbound processes, starts the outbound one again if it dies, and
    passes a stop signal on to both."""

    def __init__(self, settings: Settings, workers: int, threads: int) -> None:
        self._settings, self._workers, self._threads = settings, workers, threads
        self._context = multiprocessing.get_context("fork")  # forked before any thread starts
        self._stop_signal: int | None = None
        self._children: list[BaseProcess] = []

    def _on_signal(self, signum: int, frame: object) -> None:
        self._stop_signal = signum
        for child in self._children:
            if child.pid is not None and child.exitcode is None:
                os.kill(child.pid, signum)

    def _start(self, name: str, target: Callable[..., None], *args: object) -> BaseProcess:
        """Fork a child with the stop signals held back until it is on the list they are
        passed on to (and, in the child, until its own handling is in place)."""
        process = self._context.Process(target=_child, args=(os.getpid(), target, *args), name=name)
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            process.start()
            self._children = [c for c in self._children if c.exitcode is None] + [process]
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        return process

    @contextlib.contextmanager
    def handling_signals(self) -> Iterator[None]:
        """SIGINT and SIGTERM noted (and passed on to the children) instead of ending this
        process, from before start-up until the children are gone."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def run(self, listening: socket.socket) -> None:
        """Run both processes until a stop signal or the web server's end."""
        if self._stop_signal is not None:  # asked to stop while starting up
            listening.close()
            return
        wake_read, wake_write = os.pipe()
        os.set_blocking(wake_write, False)
        try:
            web = self._start(
                "newsletter-web",
                _serve_web,
                self._settings,
                listening.fileno(),
                self._workers,
                self._threads,
                wake_write,
            )
            listening.close()  # the web process has it
            os.close(wake_write)  # kept for restarts: the read end only
            self._watch(web, wake_read)
        finally:
            os.close(wake_read)

    def _running(self, web: BaseProcess) -> bool:
        return self._stop_signal is None and web.exitcode is None

    def _watch(self, web: BaseProcess, wake_read: int) -> None:
        delay = RESTART_DELAYS[0]
        while self._running(web):
            started = time.monotonic()
            outbound = self._start("newsletter-outbound", _send_outbound, self._settings, wake_read)
            while self._running(web) and outbound.exitcode is None:
                wait([web.sentinel, outbound.sentinel], timeout=1.0)
            if not self._running(web):
                break
            if time.monotonic() - started > RESTART_DELAYS[1]:
                delay = RESTART_DELAYS[0]  # it ran well for a while: this is a new failure
            logger.warning(
                "the outbound mail process stopped (exit %s); starting it again in %.0f s",
                outbound.exitcode,
                delay,
            )
            deadline = time.monotonic() + delay
            while self._running(web) and time.monotonic() < deadline:
                wait([web.sentinel], timeout=min(1.0, deadline - time.monotonic()))
            delay = min(delay * 2, RESTART_DELAYS[1])
        web_stopped_alone = self._stop_signal is None
        if web_stopped_alone:
            self._on_signal(signal.SIGTERM, None)
        for child in self._children:
            child.join(OUTBOUND_STOP_SECONDS)
            if child.exitcode is None:
                child.kill()
                child.join()
        if web_stopped_alone:
            raise ServiceError(f"the web server stopped (exit {web.exitcode}); see its log above")


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

    The store is opened (and migrated) and the app built once here, before any process
    starts, so a bad setting or template is a one-line error rather than workers that
    fail to boot one after the other.
    """
    supervisor = _Supervisor(settings, workers, threads)
    with supervisor.handling_signals():
        with open_store(settings) as store:
            create_app(settings, store)
        listening = listen(host, port)
        announce(url_of(listening))
        supervisor.run(listening)
