"""Shared fixtures: real files, real databases, real servers; never mocks."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

FIXTURES = Path(__file__).parent / "fixtures"
SHARED_FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
ARTIFACTS = Path(__file__).parent / "artifacts"


@pytest.fixture
def fixtures_dir() -> Path:
    """The project's own digests, CSVs and images."""
    return FIXTURES


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A working directory with no NEWSLETTER_* variables and no .env, as on a new machine."""
    import os

    for name in list(os.environ):
        if name.startswith("NEWSLETTER_") and name != "NEWSLETTER_TEST_POSTGRES_URL":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def runner(clean_env: Path) -> CliRunner:
    """A click runner in a clean working directory."""
    return CliRunner()
