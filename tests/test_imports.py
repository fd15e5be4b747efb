"""How the package is put together: a CLI that starts at once, imports that point one way,
and interpreter-wide settings left to the entry points."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "newsletter"
HEAVY = (
    *("flask", "gunicorn", "apscheduler", "alembic", "sqlalchemy", "premailer", "lxml"),
    "feedgen",
)
# Each heavy library may be imported at module level by the one module that uses it.
OWNERS = {
    "flask": {"newsletter.web", "newsletter.server"},
    "gunicorn": {"newsletter.server"},
    "apscheduler": {"newsletter.schedules"},
    "alembic": {"newsletter.migrations"},  # its env.py and the migration scripts
    "feedgen": {"newsletter.archive"},  # the reading side only: a send never loads it
}


def _loaded_after(*args: str, cwd: Path | None = None) -> list[str]:
    """The heavy libraries in sys.modules after `newsletter ARGS` ran in a fresh interpreter."""
    code = (
        "import sys, json\n"
        "from newsletter.cli import main\n"
        f"try: main({list(args)!r})\n"
        "except SystemExit: pass\n"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r})))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        cwd=cwd,
        env=env,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["render", "--help"],
        ["send", "--help"],
        ["serve", "--help"],
        ["worker", "--help"],
        ["schedule", "add", "--help"],
        ["subscribers", "list", "--help"],
    ],
)
def test_help_imports_no_heavy_library(args: list[str]) -> None:
    """`newsletter --help` and each command's --help load none of the big libraries."""
    assert _loaded_after(*args) == []


@pytest.mark.parametrize(
    "args", [["schedule", "list"], ["schedule", "cancel", "1"], ["subscribers", "list"]]
)
def test_table_commands_never_load_the_sending_machinery(args: list[str], tmp_path: Path) -> None:
    """Commands that only read or write a table of an existing database load the database
    layer, not the renderer, the web app, the archive or the migrations."""
    _loaded_after("subscribers", "list", cwd=tmp_path)  # makes the database
    assert set(_loaded_after(*args, cwd=tmp_path)) <= {"sqlalchemy", "apscheduler"}


def _modules() -> dict[str, ast.Module]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = ast.parse(path.read_text("utf-8"))
    return found


def _top_level_imports(tree: ast.Module) -> set[str]:
    """Modules imported when the module itself is (not inside functions or TYPE_CHECKING)."""
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_no_import_cycles() -> None:
    """Module-level imports of the package form no cycle, the cli package's included."""
    modules = _modules()
    graph = {
        name: {other for other in _top_level_imports(tree) if other in modules and other != name}
        for name, tree in modules.items()
    }
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for other in graph[name]:
            if state.get(other) == 1:
                raise AssertionError(f"import cycle: {' -> '.join([*path, name, other])}")
            if other not in state:
                visit(other, [*path, name])
        state[name] = 2

    for name in graph:
        if name not in state:
            visit(name, [])


def test_heavy_libraries_are_imported_only_where_used() -> None:
    """Flask, gunicorn, APScheduler and Alembic are imported at module level only by the
    module that uses them."""
    for name, tree in _modules().items():
        for imported in _top_level_imports(tree):
            library = imported.split(".")[0]
            if library in OWNERS:
                allowed = any(name.startswith(owner) for owner in OWNERS[library])
                assert allowed, f"{name} imports {library} at module level"


def test_only_entry_points_touch_interpreter_settings() -> None:
    """Signal handlers, GIL switching and the garbage collector are the CLI's business."""
    calls = ("signal.signal", "setswitchinterval", "gc.freeze", "gc.disable")
    for path in PACKAGE.rglob("*.py"):
        if "cli" in path.relative_to(PACKAGE).parts:
            continue
        text = path.read_text("utf-8")
        assert not [call for call in calls if call in text], path
