"""`newsletter subscribers …` and `newsletter db upgrade` as a user runs them, on both databases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from newsletter.cli import main
from newsletter.migrate import head_revision

SAMPLE = Path(__file__).resolve().parents[1] / "subscribers" / "sample.csv"


def _run(runner: CliRunner, *args: str) -> Result:
    return runner.invoke(main, list(args), catch_exceptions=False)


def _listed(runner: CliRunner, *args: str) -> dict[str, dict]:
    result = _run(runner, "subscribers", "list", "--format", "json", *args)
    assert result.exit_code == 0, result.output
    return {record["email"]: record for record in json.loads(result.stdout)}


def test_add_then_list(db_runner: CliRunner) -> None:
    """add prints the normalised address and status; list --format json shows the subscriber."""
    result = _run(db_runner, "subscribers", "add", "Ada@Example.com", "--name", "Ada Lovelace")
    assert (result.exit_code, result.stdout) == (0, "ada@example.com: active\n")
    _run(db_runner, "subscribers", "add", "bob@example.com", "--pending")
    listed = _listed(db_runner)
    assert listed["ada@example.com"]["name"] == "Ada Lovelace"
    assert listed["bob@example.com"]["status"] == "pending"
    assert list(_listed(db_runner, "--status", "pending")) == ["bob@example.com"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["not-an-address"], "error: email: 'not-an-address' is not a valid address"),
        (["a@example.com", "--name", "A\r\nBcc: x@example.net"], "error: name: contains a line"),
    ],
)
def test_add_refuses_bad_input_in_one_line(
    db_runner: CliRunner, args: list[str], message: str
) -> None:
    """A bad address or a name with CR/LF exits 2 with one `error:` line, adding nobody."""
    result = _run(db_runner, "subscribers", "add", *args)
    assert result.exit_code == 2
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1
    assert _listed(db_runner) == {}


def test_add_of_a_known_address_in_other_capitals_is_refused(db_runner: CliRunner) -> None:
    """The same address in other capitals is refused with exit 2."""
    _run(db_runner, "subscribers", "add", "ada@example.com")
    result = _run(db_runner, "subscribers", "add", "ADA@example.COM")
    assert result.exit_code == 2
    assert "ada@example.com is already a subscriber (active)" in result.stderr


def test_remove_keeps_the_row_and_purge_erases_it(db_runner: CliRunner) -> None:
    """remove leaves the subscriber unsubscribed; --purge deletes them."""
    _run(db_runner, "subscribers", "add", "ada@example.com")
    result = _run(db_runner, "subscribers", "remove", "ada@example.com")
    assert result.stdout == "ada@example.com: unsubscribed\n"
    assert _listed(db_runner)["ada@example.com"]["status"] == "unsubscribed"
    result = _run(db_runner, "subscribers", "remove", "ada@example.com", "--purge")
    assert result.stdout == "ada@example.com: purged (subscribers: 1)\n"
    assert _listed(db_runner) == {}
    assert _run(db_runner, "subscribers", "remove", "ada@example.com").exit_code == 2


def test_list_formats(db_runner: CliRunner) -> None:
    """The table shows one row per subscriber, CSV has the export's header, and a bad
    --status or --format is a usage error."""
    _run(db_runner, "subscribers", "import", str(SAMPLE))
    table = _run(db_runner, "subscribers", "list").stdout.splitlines()
    assert table[0].split() == ["EMAIL", "STATUS", "SINCE", "NAME"]
    assert table[4].split()[0] == "zoe@example.org" and table[4].endswith("Zoë Łukasiewicz-Müller")
    assert len(table) == 6
    listed_csv = _run(db_runner, "subscribers", "list", "--format", "csv").stdout
    assert listed_csv.startswith("email,name,status,source,created_at,confirmed_at,unsubscribed_at")
    assert _run(db_runner, "subscribers", "list", "--status", "vip").exit_code == 2
    assert _run(db_runner, "subscribers", "list", "--format", "xml").exit_code == 2


def test_import_exit_codes(db_runner: CliRunner, fixtures_dir: Path) -> None:
    """Import exits 0 when every row is taken, 1 listing refused rows as FILE:LINE: reason,
    and 2 when the whole file is refused, leaving the list as it was."""
    result = _run(db_runner, "subscribers", "import", str(SAMPLE))
    assert result.exit_code == 0
    assert result.stdout == f"{SAMPLE}: 5 added, 0 updated, 0 unchanged\n"
    again = _run(db_runner, "subscribers", "import", str(SAMPLE))
    assert again.stdout == f"{SAMPLE}: 0 added, 0 updated, 5 unchanged\n"

    mixed = fixtures_dir / "subscribers-mixed.csv"
    result = _run(db_runner, "subscribers", "import", str(mixed))
    assert result.exit_code == 1
    assert [line.split(": ")[0] for line in result.stderr.splitlines()] == [
        f"{mixed}:{n}" for n in (3, 4, 6, 7)
    ]
    assert result.stdout == f"{mixed}: 2 added, 0 updated, 0 unchanged, 4 refused\n"

    before = _listed(db_runner)
    for name in ("subscribers-no-email.csv", "subscribers-latin1.csv"):
        result = _run(db_runner, "subscribers", "import", str(fixtures_dir / name))
        assert result.exit_code == 2
        assert result.stderr.startswith(f"error: {fixtures_dir / name}:")
        assert result.stderr.count("\n") == 1
    assert _listed(db_runner) == before


def test_import_pending_and_resubscribe(db_runner: CliRunner, tmp_path: Path) -> None:
    """--pending makes new rows pending; a re-import leaves the unsubscribed alone unless
    --resubscribe is given."""
    _run(db_runner, "subscribers", "import", str(SAMPLE), "--pending")
    assert {r["status"] for r in _listed(db_runner).values()} == {"pending"}
    _run(db_runner, "subscribers", "remove", "ada@example.com")
    result = _run(db_runner, "subscribers", "import", str(SAMPLE))
    assert "1 left unsubscribed, bounced or complained" in result.stdout
    assert _listed(db_runner)["ada@example.com"]["status"] == "unsubscribed"
    _run(db_runner, "subscribers", "import", str(SAMPLE), "--resubscribe")
    assert _listed(db_runner)["ada@example.com"]["status"] == "active"


def test_export_round_trips_through_import(db_runner: CliRunner, tmp_path: Path) -> None:
    """export FILE writes what list --format csv shows; purging everyone and importing the
    file brings every field back."""
    _run(db_runner, "subscribers", "import", str(SAMPLE))
    _run(db_runner, "subscribers", "remove", "grace@example.org")
    before = _run(db_runner, "subscribers", "list", "--format", "csv").stdout
    assert _run(db_runner, "subscribers", "export").stdout == before
    backup = tmp_path / "backup.csv"
    result = _run(db_runner, "subscribers", "export", str(backup))
    assert result.stdout == f"{backup}: 5 subscribers\n"
    for address in _listed(db_runner):
        _run(db_runner, "subscribers", "remove", address, "--purge")
    assert _run(db_runner, "subscribers", "import", str(backup)).exit_code == 0
    assert _run(db_runner, "subscribers", "list", "--format", "csv").stdout == before


def test_db_upgrade_reports_the_revision(db_runner: CliRunner) -> None:
    """db upgrade creates the schema and says which revision it is at."""
    result = _run(db_runner, "db", "upgrade")
    assert result.exit_code == 0
    assert result.stdout.endswith(
        f"schema at revision {head_revision()} (newest: {head_revision()})\n"
    )


def test_the_default_database_is_created_in_the_working_directory(runner: CliRunner) -> None:
    """With no configuration, the SQLite file appears at subscribers/newsletter.db."""
    assert _run(runner, "subscribers", "add", "ada@example.com").exit_code == 0
    assert Path("subscribers/newsletter.db").is_file()


@pytest.mark.parametrize(
    "command",
    ["add", "remove", "list", "import", "export"],
)
def test_every_subscribers_command_has_an_example(runner: CliRunner, command: str) -> None:
    """Each command's --help ends with an Example: line that runs that command."""
    result = _run(runner, "subscribers", command, "--help")
    assert f"Example: newsletter subscribers {command}" in result.stdout
