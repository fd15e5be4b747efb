"""The README is the user's manual: its commands must be the ones that exist and run."""

from __future__ import annotations

import re
from pathlib import Path

import click

from newsletter.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text("utf-8")


CTX = click.Context(main)


def _commands(group: click.Group, prefix: str = "newsletter") -> list[str]:
    names = []
    for name in group.list_commands(CTX):
        command = group.get_command(CTX, name)
        names.append(f"{prefix} {name}")
        if isinstance(command, click.Group):
            names += _commands(command, f"{prefix} {name}")
    return names


def test_ci_runs_the_readme_test_command() -> None:
    """`.ci/run` runs the README's test command exactly as the README writes it."""
    ci = (ROOT / ".ci" / "run").read_text("utf-8").strip().splitlines()
    assert ci[-1] in README
    assert "pytest" in ci[-1]


def test_quick_start_has_two_commands() -> None:
    """The quick start is exactly two shell blocks: run the main job, run the tests."""
    quick = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert len(re.findall(r"```sh\n", quick)) == 2


def test_every_command_is_documented() -> None:
    """Every command and subcommand appears in the README's tour."""
    missing = [name for name in _commands(main) if f"`{name}" not in README]
    assert not missing


def test_every_command_has_an_example_in_its_help() -> None:
    """Each command's --help shows an Example: line."""
    for name in _commands(main):
        command: click.Command = main
        for part in name.split()[1:]:
            command = command.get_command(CTX, part)  # type: ignore[attr-defined]
        if isinstance(command, click.Group):
            continue
        assert "Example:" in command.get_help(CTX), name


def test_no_merge_conflict_is_left_in_the_sources() -> None:
    """No file of the project carries a merge conflict's markers."""
    markers = ("<" * 7 + " ", ">" * 7 + " ")
    suffixes = {".py", ".md", ".html", ".txt", ".toml", ".yaml", ".service"}
    for path in ROOT.rglob("*"):
        skipped = {".git", ".venv", "artifacts"} & set(path.parts)
        if path.is_file() and not skipped and path.suffix in suffixes:
            lines = path.read_text("utf-8", "replace").splitlines()
            assert not [line for line in lines if line.startswith(markers)], path
