"""Subscriber lists in and out: CSV import, CSV and JSON export.

Import streams the file: each row is validated on its own and written in batches of
bulk inserts and updates, so a list of 100,000 takes seconds and little memory. It
runs in the caller's transaction and follows the rules of :mod:`newsletter.subscribers`:
a file refused as a whole (no ``email`` column, not UTF-8) leaves the database as it
was; a refused row is reported with its line number while the valid rows are kept;
importing the same file twice changes nothing the second time; and nobody who
unsubscribed, bounced or complained is subscribed again without ``resubscribe``.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from newsletter.errors import InputError
from newsletter.store import SOURCES, Subscriber, utcnow
from newsletter.subscribers import (
    FIELDS,
    iter_records,
    next_status,
    normalise_email,
    status_changes,
    validate_name,
    validate_status,
)

BATCH_SIZE = 500
HEADER_ALIASES = {"e-mail": "email", "email address": "email", "email_address": "email"}
TIME_FIELDS = ("created_at", "confirmed_at", "unsubscribed_at")
# What makes a spreadsheet read a cell as a formula (OWASP, CSV injection); names are typed
# into a public form, so "=HYPERLINK(...)" is one signup away.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


@dataclass(frozen=True)
class RowError:
    """A refused row: its line in the file (the header is line 1) and why."""

    line: int
    message: str


@dataclass
class ImportReport:
    """What an import did; ``to_confirm`` lists the addresses that became pending."""

    added: int = 0
    updated: int = 0
    unchanged: int = 0
    kept_stopped: int = 0
    refused: list[RowError] = field(default_factory=list)
    to_confirm: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{self.added} added", f"{self.updated} updated", f"{self.unchanged} unchanged"]
        if self.kept_stopped:
            parts.append(f"{self.kept_stopped} left unsubscribed, bounced or complained")
        if self.refused:
            parts.append(f"{len(self.refused)} refused")
        return ", ".join(parts)


@dataclass(slots=True)
class _Row:
    line: int
    email: str
    name: str | None
    status: str | None
    source: str
    times: dict[str, datetime]


def import_csv(
    session: Session,
    path: str | Path,
    *,
    default_status: str = "active",
    resubscribe: bool = False,
) -> ImportReport:
    """Import a CSV with a header row: ``email`` required; ``name``, ``status`` and the other
    exported fields optional. Rows without a status get ``default_status`` (active or pending).
    """
    if default_status not in ("active", "pending"):
        raise ValueError(f"default_status must be active or pending, not {default_status!r}")
    path = Path(path)
    report = ImportReport()
    now = utcnow()
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise InputError(f"{path}: {exc.strerror}") from None
    with handle:
        rows = _valid_rows(_records(handle, path), path, report)
        while batch := list(islice(rows, BATCH_SIZE)):
            _apply(session, batch, report, now, default_status, resubscribe)
    return report


def _lines(handle: BinaryIO, path: Path) -> Iterator[str]:
    """Decode line by line, so that bytes that are not UTF-8 are reported with their line."""
    for number, raw in enumerate(handle, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(
                f"{path}:{number}: not UTF-8 (byte 0x{raw[exc.start]:02X} at position "
                f"{exc.start + 1}); save the file as UTF-8"
            ) from None
        yield line.removeprefix("\ufeff") if number == 1 else line


def _records(handle: BinaryIO, path: Path) -> Iterator[tuple[int, list[str]]]:
    """Each non-blank record with the line it starts on (a quoted field may span lines).

    Strict, because a quote left open would otherwise swallow the rest of the file into one name.
    """
    reader = csv.reader(_lines(handle, path), strict=True)
    start = 1
    try:
        for cells in reader:
            if any(cell.strip() for cell in cells):
                yield start, cells
            start = reader.line_num + 1
    except csv.Error as exc:
        raise InputError(f"{path}:{reader.line_num}: {exc}") from None


def _columns(cells: list[str], line: int, path: Path) -> list[str]:
    columns = [HEADER_ALIASES.get(c.strip().lower(), c.strip().lower()) for c in cells]
    if "email" not in columns:
        found = ", ".join(repr(c) for c in columns if c) or "no names"
        raise InputError(f"{path}:{line}: no 'email' column (the header has {found})")
    for column in columns:
        if column and columns.count(column) > 1:
            raise InputError(f"{path}:{line}: column {column!r} appears twice")
    return columns


def _valid_rows(
    records: Iterator[tuple[int, list[str]]], path: Path, report: ImportReport
) -> Iterator[_Row]:
    first = next(records, None)
    if first is None:
        raise InputError(f"{path}: empty; expected a header row with an 'email' column")
    columns = _columns(first[1], first[0], path)
    seen: dict[str, int] = {}
    for line, cells in records:
        try:
            row = _parse(line, cells, columns)
            if row.email in seen:
                raise InputError(f"email: {row.email} is a duplicate of line {seen[row.email]}")
        except InputError as exc:
            report.refused.append(RowError(line, str(exc)))
            continue
        seen[row.email] = line
        yield row


def _parse(line: int, cells: list[str], columns: list[str]) -> _Row:
    if len(cells) > len(columns):
        raise InputError(
            f"{len(cells)} fields but the header has {len(columns)} "
            "(quote values that contain commas)"
        )
    values = dict(zip(columns, (from_csv_cell(cell) for cell in cells), strict=False))
    status = values.get("status", "").strip()
    source = values.get("source", "").strip().lower() or "import"
    if source not in SOURCES:
        raise InputError(f"source: {source!r} is not one of {', '.join(SOURCES)}")
    times = {}
    for name in TIME_FIELDS:
        if when := _time(values.get(name, ""), name):
            times[name] = when
    return _Row(
        line=line,
        email=normalise_email(values.get("email", "")),
        name=validate_name(values.get("name")),
        status=validate_status(status) if status else None,
        source=source,
        times=times,
    )


def _time(raw: str, field: str) -> datetime | None:
    value = raw.strip()
    if not value:
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise InputError(f"{field}: {value!r} is not an ISO 8601 time") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _apply(
    session: Session,
    rows: list[_Row],
    report: ImportReport,
    now: datetime,
    default_status: str,
    resubscribe: bool,
) -> None:
    """Write one batch: one query for the addresses already known, bulk inserts and updates."""
    known = session.execute(
        select(Subscriber.id, Subscriber.email, Subscriber.name, Subscriber.status).where(
            Subscriber.email.in_([row.email for row in rows])
        )
    )
    existing = {subscriber.email: subscriber for subscriber in known}
    inserts: list[dict[str, Any]] = []
    updates: list[dict[str, Any]] = []
    for row in rows:
        wanted = row.status or default_status
        current = existing.get(row.email)
        if current is None:
            values = {"email": row.email, "name": row.name, "source": row.source}
            values |= {"created_at": now, "confirmed_at": None, "unsubscribed_at": None}
            inserts.append(values | status_changes(None, wanted, now) | row.times)
            report.added += 1
            if wanted == "pending":
                report.to_confirm.append(row.email)
            continue
        new = next_status(current.status, wanted, resubscribe)
        if new is None:
            report.kept_stopped += 1
            continue
        changes = status_changes(current.status, new, now)
        if row.name and row.name != current.name:
            changes["name"] = row.name
        if not changes:
            report.unchanged += 1
            continue
        updates.append({"id": current.id, **changes})
        report.updated += 1
        if changes.get("status") == "pending":
            report.to_confirm.append(row.email)
    if inserts:
        # Core, not ORM: the ORM splits a batch wherever a row has a NULL the previous had not.
        session.execute(insert(Subscriber.__table__), inserts)
    if updates:
        session.execute(update(Subscriber), updates)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return value.isoformat() if isinstance(value, datetime) else str(value)


def _needs_quote(text: str) -> bool:
    """Whether a spreadsheet would take ``text`` for a formula, once any leading quotes it
    already has are gone (so that a value that starts with ``'=`` round-trips too)."""
    return text.lstrip("'").startswith(FORMULA_STARTS)


def csv_cell(text: str) -> str:
    """``text`` as a CSV cell no spreadsheet runs: a leading ``'`` before what would start a
    formula (Excel, LibreOffice and Google Sheets show the text and hide the quote)."""
    return "'" + text if _needs_quote(text) else text


def from_csv_cell(text: str) -> str:
    """What :func:`csv_cell` was given: the one quote it added comes off, nothing else."""
    return text[1:] if text.startswith("'") and _needs_quote(text[1:]) else text


def export_csv(session: Session, target: TextIO | str | Path, status: str | None = None) -> int:
    """Write subscribers as CSV with every field; :func:`import_csv` reads it back unchanged.

    A value that a spreadsheet would run as a formula gets a leading ``'``
    (:func:`csv_cell`), which :func:`import_csv` takes off again.

    A path is written whole or not at all (a temporary file renamed into place).
    Returns the number of subscribers written.
    """
    if isinstance(target, str | Path):
        with _replace_when_done(Path(target)) as out:
            return export_csv(session, out, status)
    writer = csv.writer(target)
    writer.writerow(FIELDS)
    written = 0
    for record in iter_records(session, status):
        writer.writerow([csv_cell(_cell(record[name])) for name in FIELDS])
        written += 1
    return written


def export_json(session: Session, out: TextIO, status: str | None = None) -> int:
    """Write subscribers as one JSON list of objects, streamed; returns how many."""
    written = 0
    for record in iter_records(session, status):
        out.write("[\n" if written == 0 else ",\n")
        out.write(
            json.dumps(
                {k: None if v is None else _cell(v) for k, v in record.items()}, ensure_ascii=False
            )
        )
        written += 1
    out.write("\n]\n" if written else "[]\n")
    return written


@contextmanager
def _replace_when_done(path: Path) -> Iterator[TextIO]:
    """A file that appears at ``path`` only once complete; mode 0600, as it is personal data."""
    try:
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise InputError(f"{path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as out:
            yield out
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
