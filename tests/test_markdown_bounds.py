"""Python-Markdown's worst cases bounded: work grows linearly, and real text renders as before.

Work is counted in Python line events (sys.settrace), not seconds, so these tests neither
race the clock nor depend on the machine; bench/markdown_worst.py has the timings.
"""

from __future__ import annotations

import sys
from pathlib import Path

import markdown
import pytest
from lxml import html as lxml_html

from newsletter.embeds import expand_shortcodes
from newsletter.markdown_bounds import UNCLOSED_LIMIT, escape_unclosed
from newsletter.markdown_source import normalise_list_indentation
from newsletter.render import markdown_to_html

ROOT = Path(__file__).resolve().parents[1]
EVENT_CAP = 3_000_000


class _TooMuchWork(Exception):
    pass


def _line_events(source: str) -> int:
    """Python lines executed to render ``source``; gives up past EVENT_CAP."""
    count = 0

    def local(frame, event, arg):
        nonlocal count
        count += 1
        if count > EVENT_CAP:
            raise _TooMuchWork
        return local

    def trace(frame, event, arg):
        return local

    sys.settrace(trace)
    try:
        markdown_to_html(source)
    finally:
        sys.settrace(None)
    return count


@pytest.mark.parametrize(
    "unit",
    ["[", "![", "[^", "[](", "[a](b", "[x][", "* [", "\\``", "[a](b) "],
)
def test_pathological_runs_take_linear_work(unit: str) -> None:
    """Doubling a run of unclosed brackets, parentheses or backticks (quadratic in
    Python-Markdown: 20 KB of `[` took over a minute), or of real links, about doubles
    the work."""
    small = unit * (3000 // len(unit))
    try:
        ratio = _line_events(small * 2) / _line_events(small)
    except _TooMuchWork:
        pytest.fail(f"{unit!r}: more than {EVENT_CAP} Python lines for {len(small) * 2} chars")
    assert ratio < 2.6, f"{unit!r}: doubling the input multiplied the work by {ratio:.1f}"


def _plain(source: str) -> str:
    md = markdown.Markdown(extensions=["extra", "sane_lists"], output_format="html")
    return md.convert(normalise_list_indentation(expand_shortcodes(source)))


REAL_TEXT = [
    ROOT / "digests" / "2026-11-20-weekly-links.md",
    ROOT / "tests" / "fixtures" / "mojibake-digest.md",
]


@pytest.mark.parametrize("path", REAL_TEXT, ids=lambda path: path.name)
def test_real_digests_render_exactly_as_python_markdown_does(path: Path) -> None:
    """The bounds change nothing in real text: same HTML as Python-Markdown unbounded."""
    source = path.read_text("utf-8")
    assert markdown_to_html(source) == _plain(source)


@pytest.mark.parametrize(
    "source",
    [
        "[a [nested] link](https://e.com/x_(y)) and [ref][r] and ![i](p.png 'title')\n\n"
        "[r]: https://e.com/r\n",
        "a `code [` span` and ``double ` tick`` and [unclosed\n\n[^1] note\n\n[^1]: the note\n",
        "x < y and <b>bold</b> and a <stray\n\n```\nif a < b:\n```\n\n<!-- comment -->\n",
        "```python\nclosed\n```\n\n```never closed\ntext *em*\n",
        "A " + "long paragraph [with a link](https://e.com) and *emphasis* " * 400 + "\n",
        "a &amp; b \\* c <b>bold &copy; *em*</b> d &#96; " * 300 + "\n\n* &lt; item\n",
        "x " * 20_000 + "[cut?](https://e.com) " + "&amp; " * 8000 + "\n",
    ],
    ids=["links", "code-and-footnotes", "angles", "fences", "long-paragraph", "entities", "huge"],
)
def test_links_code_and_html_render_as_before(source: str) -> None:
    """Links, references, code spans, footnotes, stray `<` and an unclosed fence, and a long
    paragraph with links, render exactly as Python-Markdown renders them unbounded."""
    assert markdown_to_html(source) == _plain(source)


def test_many_unclosed_angles_and_fences_become_entities_that_read_the_same() -> None:
    """Past UNCLOSED_LIMIT, each `<` with no `>` after it and each fence that never closes
    is written as entities (what the HTML parser and the fence pattern rescan), and shows
    the same characters; a `<` before the last `>`, and a fenced block, are left alone."""
    count = UNCLOSED_LIMIT + 1
    source = (
        "<b>ok</b>\n\n```\n<kept in code\n```\n\n" + "a <x " * count + "\n\n" + "```y\n" * count
    )
    escaped = escape_unclosed(source)
    assert escaped.startswith("<b>ok</b>\n\n```\n<kept in code\n```\n\n")
    assert escaped.count("&lt;x") == count and escaped.count("&#96;&#96;&#96;y") == count
    shown = lxml_html.fromstring(markdown_to_html(source)).text_content()
    assert shown.count("<x") == count and shown.count("```y") == count
    few = "a <x " * UNCLOSED_LIMIT
    assert escape_unclosed(few) == few


def test_a_render_that_fails_leaves_the_next_one_intact() -> None:
    """Lists nested past Python's recursion limit fail that render only: the next digest
    renders normally (Python-Markdown's reset() does not undo a half-done parse)."""
    with pytest.raises(RecursionError):
        markdown_to_html("1. " * 3000)
    assert markdown_to_html("[a](https://e.com)") == '<p><a href="https://e.com">a</a></p>'
