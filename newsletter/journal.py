"""A sender's journal: the file whose lock says it is alive, and whose lines say which
messages the server accepted that the ledger may not have recorded yet.

Recording each accepted message in the database before sending the next one costs a
commit per message, several times a line appended here. So senders record "sent" rows
in small batches, and first append one line per accepted message to their journal: a
plain ``write()``, which survives the process being killed (the kernel keeps it).

The sender holds an exclusive ``flock`` on its journal as long as it runs, and the
kernel drops that lock the moment the process dies, however it dies. So "is that sender
dead?" is answered by trying to take its lock: whoever gets it replays the journal into
the ledger before requeueing the dead sender's rows, and only the messages truly in
flight at the kill (sent, the server's answer not yet read) can go twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy.engine import make_url


def journal_dir(database_url: str) -> Path:
    """Where the journals of one database's senders live: beside a SQLite database file (so
    every user and service of it finds them), else in ``$XDG_STATE_HOME/newsletter/journal``
    on this host, in a folder of that database's own. Senders of other databases never see
    them, so none can take them for leftovers of its own."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        database = Path(url.database).resolve()
        return database.parent / "journal" / database.name
    where = f"{url.get_backend_name()}://{url.host or ''}:{url.port or ''}/{url.database or ''}"
    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state) / "newsletter" / "journal" / hashlib.sha256(where.encode()).hexdigest()[:16]


def _path(directory: Path, owner: str) -> Path:
    return directory / (re.sub(r"[^A-Za-z0-9_.-]", "_", owner) + ".journal")


class Journal:
    """Append-only lines ``delivery_id TAB unix_time`` of one running sender, locked while
    it runs (a delivery's Message-ID follows from its id and its sender)."""

    def __init__(self, owner: str, directory: Path) -> None:
        self.path = _path(directory, owner)
        self.keep = False  # set when the ledger may lack what it holds: kept for a replay
        self._fd: int | None = None
        self._lock = threading.Lock()

    def open(self) -> None:
        """Create and lock the file before any message goes out (OSError if it cannot be).

        It is locked under a temporary name and then renamed into place, so nobody can
        find it unlocked and take its owner for dead.
        """
        with self._lock:
            if self._fd is not None:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_suffix(".opening")
            fd = os.open(temporary, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.rename(temporary, self.path)
            except BaseException:
                os.close(fd)
                temporary.unlink(missing_ok=True)
                raise
            self._fd = fd

    def accepted(self, delivery_id: int, when: float) -> None:
        """Note that the server accepted this delivery's message."""
        line = f"{delivery_id}\t{when:.6f}\n".encode()
        with self._lock:
            if self._fd is None:
                raise RuntimeError("the journal was not opened")
            os.write(self._fd, line)

    def close(self, keep: bool = False) -> None:
        """Delete the file (unless ``keep``: the ledger may lack what it holds, and the next
        sender replays it), then let go of the lock."""
        with self._lock:
            if self._fd is None:
                return
            if not keep:
                self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None


class Found:
    """Another sender's journal as :func:`examine` finds it."""

    def __init__(self, path: Path, alive: bool) -> None:
        self.path, self.alive = path, alive

    def discard(self) -> None:
        """Delete a dead sender's journal once what it held is in the ledger."""
        if not self.alive:
            self.path.unlink(missing_ok=True)

    def entries(self) -> list[tuple[int, datetime]]:
        """The accepted messages it holds: (delivery id, when); a torn last line is ignored."""
        try:
            text = self.path.read_text("utf-8", "replace")
        except OSError:
            return []
        entries = []
        for line in text.splitlines():
            parts = line.split("\t")
            if len(parts) in (2, 3) and parts[0].isdigit():  # 3: an older version's line
                try:
                    when = datetime.fromtimestamp(float(parts[-1]), UTC)
                except ValueError:
                    continue
                entries.append((int(parts[0]), when))
        return entries


@contextlib.contextmanager
def examine(owner: str, directory: Path) -> Iterator[Found]:
    """``owner``'s journal on this host: ``alive`` while its sender holds the lock; a dead
    sender's lock is held here for the block, so nobody else replays it meanwhile."""
    path = _path(directory, owner)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        yield Found(path, alive=False)
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield Found(path, alive=True)
            return
        yield Found(path, alive=False)
    finally:
        os.close(fd)


def owners(directory: Path) -> list[str]:
    """The senders with a journal in ``directory``, living or dead."""
    return [path.stem for path in directory.glob("*.journal")]
