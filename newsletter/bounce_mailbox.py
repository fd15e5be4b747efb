"""Where returned messages come from: files (one message each, or an mbox), standard input,
and the bounce mailbox (IMAP over TLS or STARTTLS, POP3 over TLS).

Each message is read and recorded (:class:`newsletter.bounces.Recorder`) before the
next is fetched, so memory holds one message at a time however large the mbox or the
mailbox. A mailbox message is moved away (or deleted) only after what it said is
committed; a round cut short by a dropped connection or a database error leaves the
rest where it was, and reading it again next round counts nothing twice.
"""

from __future__ import annotations

import contextlib
import imaplib
import logging
import mailbox
import poplib
import re
import shutil
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from newsletter.bounces import MAX_MESSAGE_BYTES, Recorder, Tally
from newsletter.config import BounceMailbox, Settings
from newsletter.errors import InputError, MailboxError
from newsletter.store import Store

log = logging.getLogger("newsletter.bounces")

TIMEOUT = 30.0  # seconds for any one answer of the mail server
ROUND_LIMIT = 500  # messages per round: the worker has other work; the rest comes next round
MOVE_EVERY = 100  # messages moved (or deleted) per command
_FETCH_ITEM = re.compile(rb"UID (\d+)")
_SIZE_ITEM = re.compile(rb"UID (\d+).*?RFC822\.SIZE (\d+)|RFC822\.SIZE (\d+).*?UID (\d+)")


# Files and standard input ---------------------------------------------------------------


def process_files(store: Store, settings: Settings, paths: list[str], stdin: BinaryIO) -> Tally:
    """``newsletter bounces process``: each path is one message or an mbox; ``-`` (or no
    path) is standard input. Every file is opened before any is read (InputError)."""
    for path in paths:
        if path != "-":
            _check_readable(Path(path))
    recorder = Recorder(store, settings)
    for path in paths or ["-"]:
        if path == "-":
            with _spooled(stdin) as spooled:
                _process_file(recorder, spooled, "<stdin>")
        else:
            _process_file(recorder, Path(path), path)
    return recorder.flush()


def _check_readable(path: Path) -> None:
    try:
        with path.open("rb") as handle:
            handle.read(1)
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, not a message or an mbox") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror or exc})") from None


@contextlib.contextmanager
def _spooled(stream: BinaryIO) -> Iterator[Path]:
    """Standard input in a temporary file, so an mbox piped in streams like one on disk."""
    with tempfile.TemporaryDirectory(prefix="newsletter-bounces-") as folder:
        path = Path(folder) / "stdin"
        with path.open("wb") as spool:
            shutil.copyfileobj(stream, spool, 1024 * 1024)
        yield path


def _process_file(recorder: Recorder, path: Path, label: str) -> None:
    with path.open("rb") as handle:
        head = handle.read(5)
    if head == b"From ":
        for number, data in enumerate(iter_mbox(path), start=1):
            recorder.message(f"{label} message {number}", data, "process")
        return
    size = path.stat().st_size
    if size > MAX_MESSAGE_BYTES:
        recorder.too_big(label, size)
        return
    recorder.message(label, path.read_bytes(), "process")


def iter_mbox(path: Path) -> Iterator[bytes]:
    """The messages of an mbox one at a time (Python's mailbox reads each by its offset)."""
    box = mailbox.mbox(path, create=False)
    try:
        for key in box.iterkeys():
            yield box.get_bytes(key)
    finally:
        box.close()


# The bounce mailbox --------------------------------------------------------------------


def fetch(
    store: Store,
    settings: Settings,
    limit: int | None = None,
    stop: threading.Event | None = None,
) -> tuple[Tally, bool]:
    """Read the bounce mailbox once: (what it did, whether messages are left for another
    round). MailboxError when the server cannot be reached or refuses the login."""
    where = settings.bounce_mailbox
    if where is None:
        raise InputError("NEWSLETTER_BOUNCE_MAILBOX is not set: there is no bounce mailbox")
    recorder = Recorder(store, settings)
    stop = stop or threading.Event()
    reader = _Pop3 if where.scheme == "pop3s" else _Imap
    more = reader(where).read(recorder, limit or 10**9, stop)
    return recorder.flush(), more


class _Imap:
    def __init__(self, where: BounceMailbox) -> None:
        self.where = where

    def read(self, recorder: Recorder, limit: int, stop: threading.Event) -> bool:
        connection = self._connect()
        try:
            uids = self._search(connection)
            chosen, more = uids[:limit], len(uids) > limit
            sizes = self._sizes(connection, chosen)
            done: list[bytes] = []
            if chosen and self.where.move_to is not None:
                _quietly(connection.create, _quote(self.where.move_to))
            for uid in chosen:
                if stop.is_set():
                    more = True
                    break
                label = f"{self.where} UID {uid.decode()}"
                size = sizes.get(uid, 0)
                if size > MAX_MESSAGE_BYTES:
                    recorder.too_big(label, size)
                else:
                    recorder.message(label, self._body(connection, uid), "mailbox")
                done.append(uid)
                if len(done) >= MOVE_EVERY:
                    recorder.flush()  # committed first, then moved away
                    self._put_away(connection, done)
                    done = []
            recorder.flush()
            self._put_away(connection, done)
            return more
        except _FAILURES as exc:
            raise MailboxError(f"{self.where}: {_reason(exc)}") from None
        finally:
            with contextlib.suppress(*_FAILURES):
                connection.logout()

    def _connect(self) -> imaplib.IMAP4:
        where = self.where
        context = ssl.create_default_context()
        try:
            if where.scheme == "imaps":
                connection = imaplib.IMAP4_SSL(
                    where.host, where.port, ssl_context=context, timeout=TIMEOUT
                )
            else:
                connection = imaplib.IMAP4(where.host, where.port, timeout=TIMEOUT)
                connection.starttls(context)
        except _FAILURES as exc:
            raise MailboxError(f"{where}: cannot connect: {_reason(exc)}") from None
        try:
            connection.login(where.username, where.password)
        except _FAILURES as exc:
            with contextlib.suppress(*_FAILURES):
                connection.shutdown()
            raise MailboxError(f"{where}: login refused: {_reason(exc)}") from None
        status, answer = connection.capability()  # what the server offers once logged in
        if status == "OK" and answer and isinstance(answer[-1], bytes):
            connection.capabilities = tuple(answer[-1].decode("ascii", "replace").upper().split())
        status, answer = connection.select(_quote(where.folder))
        if status != "OK":
            raise MailboxError(f"{where}: cannot open the folder: {_reason(answer)}")
        return connection

    @staticmethod
    def _search(connection: imaplib.IMAP4) -> list[bytes]:
        status, answer = connection.uid("SEARCH", None, "ALL")
        _ok(status, answer)
        return [uid for line in answer if line for uid in line.split()]

    @staticmethod
    def _sizes(connection: imaplib.IMAP4, uids: list[bytes]) -> dict[bytes, int]:
        sizes: dict[bytes, int] = {}
        for start in range(0, len(uids), 500):
            status, answer = connection.uid(
                "FETCH", b",".join(uids[start : start + 500]).decode(), "(RFC822.SIZE)"
            )
            _ok(status, answer)
            for item in answer:
                line = item[0] if isinstance(item, tuple) else item
                match = _SIZE_ITEM.search(line or b"")
                if match:
                    uid = match.group(1) or match.group(4)
                    sizes[uid] = int(match.group(2) or match.group(3))
        return sizes

    @staticmethod
    def _body(connection: imaplib.IMAP4, uid: bytes) -> bytes:
        status, answer = connection.uid("FETCH", uid.decode(), "(BODY.PEEK[])")
        _ok(status, answer)
        for item in answer:
            if isinstance(item, tuple) and _FETCH_ITEM.search(item[0]):
                return item[1]
        return b""  # expunged meanwhile: an empty message is counted as unrecognised

    def _put_away(self, connection: imaplib.IMAP4, uids: list[bytes]) -> None:
        """Move read messages to ``move_to`` (MOVE, or COPY and delete), or delete them."""
        if not uids:
            return
        uid_set = b",".join(uids).decode()
        target = self.where.move_to
        if target is not None and "MOVE" in connection.capabilities:
            _ok(*connection.uid("MOVE", uid_set, _quote(target)))
            return
        if target is not None:
            _ok(*connection.uid("COPY", uid_set, _quote(target)))
        _ok(*connection.uid("STORE", uid_set, "+FLAGS.SILENT", r"(\Deleted)"))
        if "UIDPLUS" in connection.capabilities:
            _ok(*connection.uid("EXPUNGE", uid_set))
        else:
            _ok(*connection.expunge())


class _Pop3:
    def __init__(self, where: BounceMailbox) -> None:
        self.where = where

    def read(self, recorder: Recorder, limit: int, stop: threading.Event) -> bool:
        where = self.where
        try:
            connection = poplib.POP3_SSL(
                where.host, where.port, context=ssl.create_default_context(), timeout=TIMEOUT
            )
        except _FAILURES as exc:
            raise MailboxError(f"{where}: cannot connect: {_reason(exc)}") from None
        try:
            try:
                connection.user(where.username)
                connection.pass_(where.password)
            except _FAILURES as exc:
                raise MailboxError(f"{where}: login refused: {_reason(exc)}") from None
            try:
                count = connection.stat()[0]
                more = count > limit
                for number in range(1, min(count, limit) + 1):
                    if stop.is_set():
                        more = True
                        break
                    size = int(connection.list(number).split()[2])
                    label = f"{where} message {number}"
                    if size > MAX_MESSAGE_BYTES:
                        recorder.too_big(label, size)
                    else:
                        lines = connection.retr(number)[1]
                        recorder.message(label, b"\r\n".join(lines) + b"\r\n", "mailbox")
                    connection.dele(number)
                recorder.flush()  # committed first: the deletions take effect only at QUIT
                connection.quit()
                return more
            except _FAILURES as exc:
                raise MailboxError(f"{where}: {_reason(exc)}") from None
        finally:
            with contextlib.suppress(*_FAILURES):
                connection.close()


_FAILURES = (imaplib.IMAP4.error, poplib.error_proto, OSError, EOFError, ValueError, IndexError)


def _ok(status: str, answer: list) -> None:
    if status != "OK":
        raise imaplib.IMAP4.error(_reason(answer))


def _quietly(command, *args) -> None:
    with contextlib.suppress(imaplib.IMAP4.error):
        command(*args)


def _quote(folder: str) -> str:
    """A folder name as an IMAP string (imaplib sends arguments as they are)."""
    return '"' + folder.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _reason(problem: object) -> str:
    """One line from an exception or a server's answer."""
    if isinstance(problem, list):
        problem = b" ".join(p for p in problem if isinstance(p, bytes))
    if isinstance(problem, bytes):
        problem = problem.decode("utf-8", "replace")
    if isinstance(problem, BaseException):
        text = str(problem) or type(problem).__name__
        if isinstance(problem, socket.timeout | TimeoutError):
            text = "no answer (timed out)"
        elif isinstance(problem, ssl.SSLError | ssl.CertificateError):
            text = f"TLS failed: {problem}"
        problem = text
    text = str(problem).strip().strip("b'\"")
    return " ".join(text.split())[:300] or "no answer"


# The worker's duty ------------------------------------------------------------------------


class Poller:
    """Reads the bounce mailbox every ``NEWSLETTER_BOUNCE_INTERVAL`` seconds from
    :meth:`tick` (the worker calls it every second); a failure is one line in the log and
    the mailbox is tried again next round. It never raises."""

    def __init__(self, store: Store, settings: Settings, stop: threading.Event) -> None:
        self.store, self.settings, self.stop = store, settings, stop
        self.next_round = 0.0

    def tick(self) -> Tally | None:
        """Read the mailbox if it is time; what the round did, or None."""
        where = self.settings.bounce_mailbox
        if where is None or time.monotonic() < self.next_round:
            return None
        interval = self.settings.bounce_interval
        try:
            tally, more = fetch(self.store, self.settings, ROUND_LIMIT, self.stop)
        except MailboxError as exc:
            log.warning("bounce mailbox: %s; trying again in %d s", exc, interval)
            tally, more = None, False
        except Exception as exc:  # a database error: the messages stay for next round
            reason = (str(exc).strip().splitlines() or [""])[0][:300]
            log.warning(
                "bounce mailbox %s: %s: %s; trying again in %d s",
                where,
                type(exc).__name__,
                reason,
                interval,
            )
            tally, more = None, False
        self.next_round = time.monotonic() + (1.0 if more else interval)
        if tally is not None and tally.messages:
            log.info("bounce mailbox %s: %s", where, tally.summary())
        return tally
