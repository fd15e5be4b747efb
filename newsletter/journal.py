"""A per-process journal of messages the server accepted but the ledger has not recorded yet.

Recording each accepted message in the database before sending the next one costs a
commit per message, slower than SMTP itself. So workers record "sent" rows in small
batches, and first append one line per accepted message to this file: a plain
``write()``, which survives the process being killed (the kernel keeps it) without an
fsync. When a sender dies, the next sender on the same host replays the dead one's
journal into the ledger before requeueing its rows, so only messages truly in flight
at the kill (sent, but the server's answer not yet read) can go twice.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from datetime import UTC, datetime
from pathlib import Path


def journal_dir(database_url: str | None = None) -> Path:
    """Where journals live: beside a SQLite database file (so every user and service of it
    finds them), else ``$XDG_STATE_HOME/newsletter/journal`` on this host."""
    if database_url and database_url.startswith("sqlite:///") and ":memory:" not in database_url:
        return Path(database_url.removeprefix("sqlite:///")).resolve().parent / "journal"
    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state) / "newsletter" / "journal"


def _path(directory: Path, owner: str) -> Path:
    return directory / (re.sub(r"[^A-Za-z0-9_.-]", "_", owner) + ".journal")


class Journal:
    """Append-only lines ``delivery_id TAB message_id TAB unix_time`` for one sending process."""

    def __init__(self, owner: str, directory: Path | None = None) -> None:
        self.path = _path(directory or journal_dir(), owner)
        self._fd: int | None = None
        self._lock = threading.Lock()

    def open(self) -> None:
        """Create the file now, before any message goes out (OSError if it cannot be)."""
        with self._lock:
            if self._fd is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def accepted(self, delivery_id: int, message_id: str, when: float) -> None:
        """Note that the server accepted this delivery's message."""
        line = f"{delivery_id}\t{message_id}\t{when:.6f}\n".encode()
        with self._lock:
            if self._fd is None:
                raise RuntimeError("the journal was not opened")
            os.write(self._fd, line)

    def close(self, keep: bool = False) -> None:
        """Close it; delete it unless ``keep`` (the ledger may lack what it holds: the next
        sender replays it)."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            if not keep:
                self.path.unlink(missing_ok=True)


def recover(owner: str, directory: Path | None = None) -> list[tuple[int, str, datetime]]:
    """The accepted messages a dead sender journaled (a torn last line is ignored)."""
    path = _path(directory or journal_dir(), owner)
    try:
        text = path.read_text("utf-8", "replace")
    except OSError:
        return []
    entries = []
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and parts[0].isdigit():
            try:
                when = datetime.fromtimestamp(float(parts[2]), UTC)
            except ValueError:
                continue
            entries.append((int(parts[0]), parts[1], when))
    return entries


def discard(owner: str, directory: Path | None = None) -> None:
    """Delete a dead sender's journal once it has been replayed."""
    with contextlib.suppress(OSError):  # nothing to delete where nothing could be written
        _path(directory or journal_dir(), owner).unlink(missing_ok=True)
