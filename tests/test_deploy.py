"""The files in deploy/: systemd units that systemd itself accepts, and a compose file that
runs the same two commands against PostgreSQL."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from newsletter.cli import main

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
UNITS = sorted(DEPLOY.glob("*.service"))
INSTALLED = "/opt/newsletter/venv/bin/newsletter"


def _exec_start(unit: Path) -> list[str]:
    [line] = [line for line in unit.read_text().splitlines() if line.startswith("ExecStart=")]
    return shlex.split(line.removeprefix("ExecStart="))


def test_there_is_a_unit_for_serve_and_one_for_worker() -> None:
    """One unit per long-running process, each running its command."""
    commands = {unit.name: _exec_start(unit)[1] for unit in UNITS}
    assert commands == {"newsletter-serve.service": "serve", "newsletter-worker.service": "worker"}


@pytest.mark.parametrize("unit", UNITS, ids=lambda unit: unit.name)
def test_systemd_accepts_the_unit(unit: Path, tmp_path: Path) -> None:
    """`systemd-analyze verify` finds nothing to complain about (with the command pointed at
    this installation instead of /opt/newsletter)."""
    if shutil.which("systemd-analyze") is None:
        if os.environ.get("CI"):
            pytest.fail("CI needs systemd-analyze (apt-get install systemd)")
        pytest.skip("systemd-analyze is not installed")
    here = Path(sys.executable).with_name("newsletter")
    assert here.exists(), "the newsletter script of this environment"
    copy = tmp_path / unit.name
    copy.write_text(unit.read_text().replace(INSTALLED, str(here)))
    done = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert INSTALLED in unit.read_text()


@pytest.mark.parametrize("unit", UNITS, ids=lambda unit: unit.name)
def test_the_units_command_line_is_one_the_cli_takes(unit: Path) -> None:
    """The arguments in ExecStart are ones `newsletter` accepts."""
    args = _exec_start(unit)[1:]
    result = CliRunner().invoke(main, [*args, "--help"])
    assert result.exit_code == 0, result.output


def test_compose_runs_web_and_worker_on_postgresql() -> None:
    """The compose file's web and worker run `serve` and `worker` on the same PostgreSQL
    database, the one its db service holds, and the image's entry point is `newsletter`."""
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert services["web"]["command"][0] == "serve"
    assert services["worker"]["command"] == ["worker"]
    urls = {services[name]["environment"]["NEWSLETTER_DATABASE_URL"] for name in ("web", "worker")}
    [url] = urls
    assert url.startswith("postgresql+psycopg://") and "@db/" in url
    assert services["db"]["image"].startswith("postgres:")
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["newsletter"]' in dockerfile
    for name in ("web", "worker"):
        result = CliRunner().invoke(main, [*services[name]["command"], "--help"])
        assert result.exit_code == 0, result.output
