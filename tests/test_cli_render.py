"""`newsletter render` and `newsletter check` as a user runs them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from newsletter.cli import main


def _copy(fixtures_dir: Path, dest: Path, *names: str) -> Path:
    for name in names:
        shutil.copy(fixtures_dir / name, dest / name)
    return dest / names[0]


def test_render_writes_html_file(runner: CliRunner, fixtures_dir: Path, clean_env: Path) -> None:
    """`render -o FILE` writes the finished HTML with the sample recipient filled in."""
    digest = _copy(fixtures_dir, clean_env, "mojibake-digest.md", "chart.png")
    result = runner.invoke(main, ["render", str(digest), "-o", "out.html"])
    assert result.exit_code == 0, result.output
    html = (clean_env / "out.html").read_text("utf-8")
    assert html.startswith("<!DOCTYPE html>") and "@@NL_" not in html
    assert "Sample Reader will find here" in html


def test_render_text_to_stdout(runner: CliRunner, fixtures_dir: Path, clean_env: Path) -> None:
    """`render --text` prints the plain-text part."""
    digest = _copy(fixtures_dir, clean_env, "mojibake-digest.md", "chart.png")
    result = runner.invoke(main, ["render", str(digest), "--text"])
    assert result.exit_code == 0
    view = "View in browser: http://localhost:8000/archive/mojibake-digest\n\n"
    assert result.stdout.startswith(view + "📺 Browsers, Video and Metrics\n")


def test_render_warns_about_missing_image(
    runner: CliRunner, fixtures_dir: Path, clean_env: Path
) -> None:
    """A relative image that cannot be resolved is left out with a one-line warning."""
    digest = _copy(fixtures_dir, clean_env, "mojibake-digest.md")
    result = runner.invoke(main, ["render", str(digest), "-o", "out.html"])
    assert result.exit_code == 0
    warnings = [line for line in result.stderr.splitlines() if line]
    assert (
        len(warnings) == 1 and "chart.png" in warnings[0] and "mojibake-digest.md:" in warnings[0]
    )
    assert "chart.png" not in (clean_env / "out.html").read_text("utf-8")


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        (b"---\ntitle: x\n---\ncaf\xe9\n", r"bad\.md:4: not UTF-8"),
        (b"---\ntitle: [oops\n---\nbody\n", r"bad\.md:\d+: front matter \(YAML\)"),
        (b"no heading, no title\n", r"bad\.md:1: no title"),
    ],
    ids=["not-utf8", "broken-front-matter", "no-title"],
)
def test_render_bad_input_one_line_exit_2_nothing_written(
    runner: CliRunner, clean_env: Path, content: bytes, pattern: str
) -> None:
    """Each kind of unrenderable digest: one line on stderr, exit 2, no output file."""
    (clean_env / "bad.md").write_bytes(content)
    result = runner.invoke(main, ["render", "bad.md", "-o", "out.html"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert __import__("re").search(pattern, lines[0]), lines[0]
    assert not (clean_env / "out.html").exists()
    assert list(clean_env.iterdir()) == [clean_env / "bad.md"]


HEADER_INJECTION = (
    b'---\nauthor: "Mallory"\ntitle: "Hello\\r\\nBcc: victim@example.com"\n---\nbody\n'
)
INJECTION_ERROR = (
    "evil.md:3: front matter field 'title': "
    "control characters (a header-injection attempt?) are not allowed"
)


def test_render_refuses_header_injection_in_one_line(runner: CliRunner, clean_env: Path) -> None:
    """A CR/LF in the title (YAML escapes make them real) is one line naming the file, line
    and field on stderr, exit 2, nothing written."""
    (clean_env / "evil.md").write_bytes(HEADER_INJECTION)
    result = runner.invoke(main, ["render", "evil.md", "-o", "out.html"])
    assert result.exit_code == 2
    assert result.stderr == f"error: {INJECTION_ERROR}\n"
    assert result.stdout == ""
    assert list(clean_env.iterdir()) == [clean_env / "evil.md"]


def test_check_refuses_header_injection_in_one_line(runner: CliRunner, clean_env: Path) -> None:
    """`check` prints the same one line and exits 2; a clean digest beside it adds nothing."""
    (clean_env / "evil.md").write_bytes(HEADER_INJECTION)
    (clean_env / "fine.md").write_text("---\ntitle: Fine\n---\nbody\n", "utf-8")
    result = runner.invoke(main, ["check", "evil.md", "fine.md"])
    assert result.exit_code == 2
    assert result.stdout == f"{INJECTION_ERROR}\n"


def test_check_exit_codes(runner: CliRunner, fixtures_dir: Path, clean_env: Path) -> None:
    """check: 0 with warnings for repairs, 1 for a missing image, 2 for an unreadable digest."""
    digest = _copy(fixtures_dir, clean_env, "mojibake-digest.md", "chart.png")
    fixed = runner.invoke(main, ["check", str(digest)])
    assert fixed.exit_code == 0, fixed.output
    assert f"{digest}:2: warning: repaired mojibake" in fixed.stdout

    (clean_env / "chart.png").unlink()
    must_fix = runner.invoke(main, ["check", str(digest)])
    assert must_fix.exit_code == 1
    assert any(
        line.startswith(f"{digest}:") and "chart.png" in line
        for line in must_fix.stdout.splitlines()
    )

    (clean_env / "latin1.md").write_bytes(b"# caf\xe9\n")
    broken = runner.invoke(main, ["check", str(digest), "latin1.md"])
    assert broken.exit_code == 2
    assert "latin1.md:1: not UTF-8" in broken.stdout


def test_check_reports_bad_link_with_line(runner: CliRunner, clean_env: Path) -> None:
    """A javascript: link is reported at its line and makes check exit 1."""
    (clean_env / "d.md").write_text(
        "---\ntitle: T\n---\n\ntext\n[x](javascript:void(0))\n", "utf-8"
    )
    result = runner.invoke(main, ["check", "d.md"])
    assert result.exit_code == 1
    assert result.stdout.startswith("d.md:6: error: link")


def test_bad_config_is_one_line_naming_variable(
    runner: CliRunner, fixtures_dir: Path, clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A malformed NEWSLETTER_* value is one line naming the variable, exit 2."""
    digest = _copy(fixtures_dir, clean_env, "mojibake-digest.md", "chart.png")
    monkeypatch.setenv("NEWSLETTER_SMTP_PORT", "twenty-five")
    result = runner.invoke(main, ["render", str(digest)])
    assert result.exit_code == 2
    assert (
        result.stderr.strip() == "error: NEWSLETTER_SMTP_PORT: 'twenty-five' is not a whole number"
    )


def test_unknown_option_is_usage_error(runner: CliRunner) -> None:
    """An unknown option exits 2 with click's usage message."""
    result = runner.invoke(main, ["render", "x.md", "--bogus"])
    assert result.exit_code == 2
    assert "No such option" in result.stderr


ESCAPE_DIGEST = b"---\ntitle: T\n---\n\nSome \x1b[31mred\x1b[0m text\n"
ESCAPE_ERROR = "esc.md:5: control character U+001B (ESC) at column 6; a digest is text, remove it"


def test_control_character_is_one_line_exit_2_in_check_and_render(
    runner: CliRunner, clean_env: Path
) -> None:
    """An ESC in the text: `check` prints one FILE:LINE line, `render` one error line on
    stderr; both exit 2 and write nothing."""
    (clean_env / "esc.md").write_bytes(ESCAPE_DIGEST)
    checked = runner.invoke(main, ["check", "esc.md"])
    assert (checked.exit_code, checked.stdout) == (2, f"{ESCAPE_ERROR}\n")
    rendered = runner.invoke(main, ["render", "esc.md", "-o", "out.html"])
    assert (rendered.exit_code, rendered.stderr) == (2, f"error: {ESCAPE_ERROR}\n")
    assert not (clean_env / "out.html").exists()


def test_control_character_stops_send_before_anything_happens(
    db_runner: CliRunner, clean_env: Path
) -> None:
    """`send` of a digest with an ESC exits 2 with the same one line and creates no issue."""
    (clean_env / "esc.md").write_bytes(ESCAPE_DIGEST)
    assert db_runner.invoke(main, ["subscribers", "add", "ada@example.com"]).exit_code == 0
    result = db_runner.invoke(main, ["send", "esc.md", "--yes"])
    assert (result.exit_code, result.stderr) == (2, f"error: {ESCAPE_ERROR}\n")
    listed = db_runner.invoke(main, ["issues", "list", "--format", "json"])
    assert listed.exit_code == 0 and listed.stdout.strip() == "[]"


LINES_DIGEST = """---
title: Lines
---
Mention `<script>` and\u2028 [a bad link](javascript:void(0)) here.

```html
<script>in a code block</script>
```

<script>alert(1)</script>

Again [the same bad link](javascript:void(0)).

<p>fine</p> <p onclick="x()">one</p>

![chart](missing.png) and ![chart](missing.png)

![chart](missing.png)
"""


def test_check_reports_every_finding_at_its_own_file_line(
    runner: CliRunner, clean_env: Path
) -> None:
    """Line numbers are the file's for every finding: a repeated link or image is reported
    at each of its lines, a tag mentioned in code is not mistaken for the real one, and a
    U+2028 inside a line does not shift the lines after it."""
    (clean_env / "lines.md").write_text(LINES_DIGEST, "utf-8")
    result = runner.invoke(main, ["check", "lines.md"])
    assert result.exit_code == 1
    found = [
        (int(line.split(":")[1]), line.split(": ", 2)[2]) for line in result.stdout.splitlines()
    ]
    image = "image 'missing.png' cannot be resolved"
    assert [(line, message[:38]) for line, message in found] == [
        (4, "link 'javascript:void(0)' is not http("),
        (10, "removed <script>"),
        (12, "link 'javascript:void(0)' is not http("),
        (14, "removed onclick attribute from <p>"),
        (16, image),
        (16, image),
        (18, image),
    ]


def test_check_refuses_an_oversized_or_too_deeply_nested_digest(
    runner: CliRunner, clean_env: Path
) -> None:
    """A digest over the size limit, or nesting lists deeper than Python-Markdown can
    recurse, is one `check` line naming the file, exit 2, never a traceback."""
    from newsletter.digest import MAX_DIGEST_BYTES

    (clean_env / "big.md").write_text("# Big\n\n" + "x" * (MAX_DIGEST_BYTES + 10240), "utf-8")
    (clean_env / "deep.md").write_text("# Deep\n\n" + "1. " * 3000 + "\n", "utf-8")
    result = runner.invoke(main, ["check", "big.md", "deep.md"])
    assert result.exit_code == 2
    assert result.stdout.splitlines() == [
        f"big.md: {MAX_DIGEST_BYTES // 1024 + 10} KB; a digest may have {MAX_DIGEST_BYTES // 1024} "
        "KB at most (Gmail clips an email at 102 KB): split it",
        "deep.md: lists or quotes nest too deeply to render; flatten them",
    ]
