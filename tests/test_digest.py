"""Reading digests: encoding, mojibake repair with line numbers, front matter, subject."""

from __future__ import annotations

import re
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


INJECTION = "control characters (a header-injection attempt?) are not allowed"


@pytest.mark.parametrize(
    ("front_matter", "line", "key"),
    [
        ('title: "Hello\\r\\nBcc: victim@example.com"', 2, "title"),
        ('author: me\ntitle: "Hello\\nBcc: victim@example.com"', 3, "title"),
        ('title: ok\nsubject: "Hi\\rBcc: victim@example.com"', 3, "subject"),
        ('subject: ok\ntitle: "Hi\\nthere"', 3, "title"),
        ('title: ok\ndate: "2020-09-22"\ndescription: "pre\\nheader"', 4, "description"),
        ('title: "nul\\0byte"', 2, "title"),
        ('title: "escape\\e[31m"', 2, "title"),
        ('title: "next\\Nline"', 2, "title"),
        ('title: "line\\Lseparator"', 2, "title"),
        ("title: |\n  two\n  lines", 2, "title"),
        ('"title": "quoted\\nkey"', 2, "title"),
        ('{title: "flow\\nmapping"}', 2, "title"),
        ('title: first\ntitle: "second\\nwins"', 3, "title"),
    ],
)
def test_control_characters_in_header_fields_are_refused_at_their_line(
    front_matter: str, line: int, key: str
) -> None:
    """CR, LF, NUL, ESC, NEL or U+2028 in subject, title or description (YAML escapes make
    them real) is a one-line error naming the file and the key's line, never collapsed."""
    with pytest.raises(DigestError) as info:
        parse_digest(f"---\n{front_matter}\n---\nbody\n", "news/d.md")
    assert str(info.value) == f"news/d.md:{line}: front matter field {key!r}: {INJECTION}"


@pytest.mark.parametrize(
    ("front_matter", "line"),
    [
        ('title = "Hello\\r\\nBcc: victim@example.com"', 2),
        ('author = "me"\n"title" = """two\nlines"""', 3),
        ('author = "me"\n\n  title = "tab\\u0007bell"\n[extra]\ntitle = "x"', 4),
    ],
)
def test_control_characters_in_toml_front_matter_are_refused_at_their_line(
    front_matter: str, line: int
) -> None:
    """TOML escapes and multi-line strings are caught the same way, at the key's line."""
    with pytest.raises(DigestError) as info:
        parse_digest(f"+++\n{front_matter}\n+++\nbody\n", "d.md")
    assert str(info.value) == f"d.md:{line}: front matter field 'title': {INJECTION}"


def test_control_character_in_the_heading_subject_is_refused_at_its_line() -> None:
    """A heading used as the subject with a NUL in it is refused at its file line."""
    with pytest.raises(DigestError, match=rf"^d\.md:5: heading: {re.escape(INJECTION)}$"):
        parse_digest("---\nauthor: me\n---\ntext\n# Head\x00ing\n", "d.md")


def test_tabs_and_block_scalar_line_ends_are_not_injection() -> None:
    """Tabs collapse to a space and the line break ending a YAML `|` or `>` block is dropped:
    ordinary front matter keeps working."""
    digest = parse_digest(
        '---\ntitle: "a\\tb"\nsubject: |\n  One line\ndescription: >\n  folded long\n'
        "  description\n---\n# Head\ting\n"
    )
    assert (digest.subject, digest.title, digest.preheader) == (
        "One line",
        "a b",
        "folded long description",
    )
    assert parse_digest("# Head\ting\n").subject == "Head ing"


def test_list_as_title_names_its_line() -> None:
    """A title that is not text names its line too."""
    with pytest.raises(DigestError, match=r"^d\.md:3: front matter field 'title' must be text$"):
        parse_digest("---\nauthor: me\ntitle: [a, b]\n---\nbody\n", "d.md")


@pytest.mark.parametrize(
    ("char", "shown"),
    [
        ("\x1b", "U+001B (ESC)"),
        ("\x00", "U+0000 (NUL)"),
        ("\x07", "U+0007 (BEL)"),
        ("\x0b", "U+000B (VT)"),
        ("\x0c", "U+000C (FF)"),
        ("\x1c", "U+001C (FS)"),
        ("\ufffe", "U+FFFE"),
    ],
)
def test_control_characters_in_the_text_are_one_line_at_their_line(char: str, shown: str) -> None:
    """A control character lxml cannot hold (ESC from a terminal, a form feed) is a
    DigestError naming the file, its line and column, never a ValueError from lxml."""
    text = f"---\ntitle: T\n---\n\nline five\n\nred {char}[31m here\n"
    with pytest.raises(DigestError) as info:
        parse_digest(text, "news/d.md")
    assert str(info.value) == (
        f"news/d.md:7: control character {shown} at column 5; a digest is text, remove it"
    )


def test_control_characters_in_other_front_matter_fields_name_the_field() -> None:
    """A YAML escape that makes a control character in a field the template shows (author)
    is refused at the field's line."""
    with pytest.raises(DigestError) as info:
        parse_digest('---\ntitle: T\nauthor: "Ada\\e[1m"\n---\nbody\n', "d.md")
    assert (
        str(info.value)
        == "d.md:3: front matter field 'author': control character U+001B (ESC); remove it"
    )


def test_tabs_crlf_and_lone_cr_are_line_ends_not_errors() -> None:
    """Tabs, CRLF and old Mac CR line ends are ordinary text; U+2028 and U+2029 are
    characters inside a line, not line breaks that would shift line numbers."""
    digest = parse_digest("# T\r\n\r\na\tb\rc \u2029 d \u2028 e\rlast ‚Äî\n", "d.md")
    assert digest.body.splitlines()[3].startswith("c ")
    assert [finding.line for finding in digest.findings] == [5]


def test_line_finder_gives_each_occurrence_its_own_line() -> None:
    """Asking for the same needle again finds its next occurrence (two on one line count
    twice), code is never searched, and past the last one it starts from the top."""
    digest = parse_digest("---\ntitle: T\n---\nA <B> and <b>\n```\n<b>\n```\n`<b>` then <B>\n")
    finder = digest.lines()
    assert [finder.line("<b>") for _ in range(4)] == [4, 4, 8, 4]
    assert finder.line("absent", "then") == 8
    assert finder.line("absent") == digest.body_line == 4


def test_digest_over_the_size_limit_is_refused_naming_the_file(tmp_path: Path) -> None:
    """A digest over MAX_DIGEST_BYTES is a one-line DigestError with the file and its size,
    read no further than the limit (a device or FIFO that never ends is refused too)."""
    from newsletter.digest import MAX_DIGEST_BYTES

    path = tmp_path / "huge.md"
    path.write_text("# Huge\n\n" + "word " * (MAX_DIGEST_BYTES // 5 + 4096), "utf-8")
    limit = MAX_DIGEST_BYTES // 1024
    with pytest.raises(
        DigestError, match=rf"^{re.escape(str(path))}: \d+ KB; .* {limit} KB at most"
    ):
        load_digest(path)
    with pytest.raises(DigestError, match=rf"^d\.md: \d+ KB; .* {limit} KB at most"):
        parse_digest(path.read_text("utf-8"), "d.md")
    with pytest.raises(DigestError, match=rf"^/dev/zero: over {limit} KB; "):
        load_digest("/dev/zero")
    fits = "# Fits\n\n" + "é" * ((MAX_DIGEST_BYTES - 10) // 2)
    assert parse_digest(fits).subject == "Fits"
