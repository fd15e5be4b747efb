"""Reading digests: encoding, mojibake repair with line numbers, front matter, subject."""

from __future__ import annotations

from pathlib import Path

import pytest

from newsletter.digest import load_digest, parse_digest, repair_line
from newsletter.errors import DigestError


def test_repairs_mac_roman_emoji_with_apple_logo_byte() -> None:
    """UTF-8 read as Mac Roman, including U+F8FF that ftfy leaves alone, is restored."""
    broken = "📹 Video".encode().decode("mac_roman")
    assert "\uf8ff" in broken
    assert repair_line(broken) == "📹 Video"


@pytest.mark.parametrize(
    ("broken", "fixed"),
    [("â€™", "’"), ("‚Äî", "—"), ("‚Äú", "“"), ("cafÃ©", "café")],
)
def test_repairs_cp1252_and_mac_roman_mojibake(broken: str, fixed: str) -> None:
    """Common mojibake sequences of both encodings are repaired."""
    assert repair_line(f"a {broken} b") == f"a {fixed} b"


@pytest.mark.parametrize(
    "correct",
    ["“curly” quotes stay", "full-width ＡＢＣ stays", "&amp; stays", "naïve café — ok", "日本語"],
)
def test_leaves_correct_text_alone(correct: str) -> None:
    """Correct non-ASCII text, curly quotes and entities are not 'fixed'."""
    assert repair_line(correct) == correct


def test_fixture_subject_and_repairs_reported_with_file_lines(fixtures_dir: Path) -> None:
    """The title is repaired before use and each repair names its line in the file."""
    digest = load_digest(fixtures_dir / "mojibake-digest.md")
    assert digest.subject == "📺 Browsers, Video and Metrics"
    assert digest.preheader == "Three links and two talks"
    lines = sorted({f.line for f in digest.findings})
    source = (fixtures_dir / "mojibake-digest.md").read_text("utf-8").splitlines()
    assert lines[0] == 2
    for line in lines:
        assert not source[line - 1].isascii()
    assert all("\uf8ff" not in part and "‚Äî" not in part for part in (digest.body, digest.subject))


def test_bom_is_tolerated_and_adds_no_line(tmp_path: Path) -> None:
    """A UTF-8 BOM does not break the front matter or shift line numbers."""
    path = tmp_path / "bom.md"
    path.write_bytes(b"\xef\xbb\xbf---\ntitle: Hi\n---\nline \xe2\x80\x9a\xc3\x84\xc3\xae\n")
    digest = load_digest(path)
    assert digest.subject == "Hi"
    assert [f.line for f in digest.findings] == [4]


def test_subject_overrides_title_and_heading_is_fallback() -> None:
    """`subject` beats `title`, and the first `#` heading is used when there is neither."""
    assert parse_digest("---\ntitle: T\nsubject: S\n---\nx\n").subject == "S"
    assert parse_digest("```\n# not this\n```\n# Real heading\n").subject == "Real heading"


def test_yaml_scalars_stay_text() -> None:
    """`title: No` is the word No, and dates stay as written."""
    digest = parse_digest("---\ntitle: No\ndate: 2020-09-22\n---\nbody\n")
    assert digest.subject == "No"
    assert digest.meta["date"] == "2020-09-22"


def test_toml_front_matter() -> None:
    """Hugo's `+++` TOML front matter is read too."""
    digest = parse_digest('+++\ntitle = "From TOML"\ndescription = "pre"\n+++\nbody\n')
    assert (digest.subject, digest.preheader) == ("From TOML", "pre")


def test_not_utf8_names_file_and_line(tmp_path: Path) -> None:
    """A Latin-1 file is refused with the file and the line of the first bad byte."""
    path = tmp_path / "latin1.md"
    path.write_bytes("---\ntitle: x\n---\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(DigestError, match=r"latin1\.md:4: not UTF-8"):
        load_digest(path)


def test_broken_yaml_is_one_line_with_file_line(tmp_path: Path) -> None:
    """A YAML error is squashed to one line that names the line in the file."""
    path = tmp_path / "broken.md"
    path.write_text('---\ntitle: "ok"\nauthor: [unclosed\n---\nbody\n', "utf-8")
    with pytest.raises(DigestError) as info:
        load_digest(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:")
    assert "front matter" in message


def test_unclosed_front_matter(tmp_path: Path) -> None:
    """Front matter that never closes is an error, not a digest without a body."""
    path = tmp_path / "open.md"
    path.write_text("---\ntitle: x\nbody\n", "utf-8")
    with pytest.raises(DigestError, match="never closed"):
        load_digest(path)


def test_missing_title_and_heading(tmp_path: Path) -> None:
    """No title and no heading is a clear error naming the file."""
    path = tmp_path / "untitled.md"
    path.write_text("---\nauthor: me\n---\njust text\n", "utf-8")
    with pytest.raises(DigestError, match=r"untitled\.md:1: no title"):
        load_digest(path)


def test_missing_file() -> None:
    """A digest path that does not exist is a one-line error."""
    with pytest.raises(DigestError, match="no such file"):
        load_digest("does/not/exist.md")
