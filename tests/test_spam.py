"""The sample email as sent scores well below SpamAssassin's thresholds."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from newsletter.cli import main

SAMPLE = Path(__file__).resolve().parents[1] / "digests"


@pytest.mark.slow
def test_sample_email_scores_below_two(
    runner: CliRunner, clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SpamAssassin (local tests) gives the sent sample less than 2.0 points."""
    if shutil.which("spamassassin") is None:
        if os.environ.get("CI"):
            pytest.fail("CI needs spamassassin (apt-get install spamassassin)")
        pytest.skip("spamassassin is not installed")
    monkeypatch.setenv("NEWSLETTER_FROM", "Weekly Links <links@example.com>")
    monkeypatch.setenv("NEWSLETTER_NAME", "Weekly Links")
    monkeypatch.setenv("NEWSLETTER_SITE_URL", "https://news.example.com")
    monkeypatch.setenv("HOME", str(clean_env))  # spamassassin writes its user prefs there
    for name in ("2026-11-20-weekly-links.md", "2026-11-20-open-rates.png"):
        shutil.copy(SAMPLE / name, clean_env / name)
    assert (
        runner.invoke(main, ["subscribers", "add", "ada@example.org", "--name", "Ada"]).exit_code
        == 0
    )
    sent = runner.invoke(main, ["send", "2026-11-20-weekly-links.md", "--yes"])
    assert sent.exit_code == 0, sent.output
    [message] = (clean_env / "outbox").glob("*.eml")
    report = subprocess.run(
        ["spamassassin", "-L", "-t"],
        input=message.read_bytes(),
        capture_output=True,
        timeout=120,
        check=True,
    ).stdout.decode("utf-8", "replace")
    status = re.search(
        r"X-Spam-Status: \w+, score=(-?[\d.]+).*?tests=(.*?) autolearn", report, re.S
    )
    assert status, report[:2000]
    score, rules = float(status.group(1)), " ".join(status.group(2).split())
    print(f"SpamAssassin score {score} with rules: {rules}")
    assert score < 2.0, f"score {score}: {rules}"
    assert "MPART_ALT_DIFF" not in rules
