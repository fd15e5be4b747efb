"""List indentation as bloggers write it: 2- and 4-space nesting both nest."""

from __future__ import annotations

import pytest

from newsletter.markdown_source import normalise_list_indentation
from newsletter.render import markdown_to_html


def test_two_space_nested_list_nests() -> None:
    """Items indented by 2 spaces under a loose list item become a nested list."""
    html = markdown_to_html("* parent:\n\n  * a\n  * b\n  * c\n\n* next\n")
    assert html.count("<ul>") == 2
    assert "<li>a</li>" in html and "<li>next" not in html.split("</ul>")[0]


def test_four_space_nested_list_nests() -> None:
    """4-space nesting keeps working, to three levels."""
    html = markdown_to_html("- a\n    - b\n        - c\n- d\n")
    assert html.count("<ul>") == 3


def test_loose_list_is_one_list() -> None:
    """Blank lines between items do not split the list into one list per item."""
    html = markdown_to_html("* one\n\n* two\n\n* three\n")
    assert html.count("<ul>") == 1 and html.count("<li>") == 3


def test_code_is_not_reindented() -> None:
    """List-looking lines inside fenced code stay as written."""
    source = "```\n  * not a list\n```\n"
    assert normalise_list_indentation(source) == source


def test_line_count_is_kept() -> None:
    """The rewrite never adds or removes lines, so findings keep their line numbers."""
    source = "* a\n\n  * b\n  text\n\n```\nx\n```\n"
    assert normalise_list_indentation(source).count("\n") == source.count("\n")


def test_tables_footnotes_fenced_code_and_raw_html() -> None:
    """The Markdown bloggers use: tables, footnotes, fenced code, raw HTML blocks."""
    html = markdown_to_html(
        "| a | b |\n|---|---|\n| 1 | 2 |\n\nText[^1]\n\n```py\nx = 1\n```\n\n"
        '<div class="note">raw</div>\n\n[^1]: note\n'
    )
    assert "<table>" in html and "<td>1</td>" in html
    assert 'class="footnote"' in html
    assert "<pre><code" in html and "x = 1" in html
    assert '<div class="note">raw</div>' in html


@pytest.mark.parametrize("step", [2, 4])
def test_nested_lists_inside_blockquotes_nest(step: int) -> None:
    """`> * item` then `>   * sub-item` (2 spaces, or 4) nest inside the quote as they do
    outside it, in a quote within a quote too, and no line is added or removed."""
    pad = " " * step
    source = (
        f"> * item\n> {pad}* sub-item\n> {pad}* sub-two\n> * next\n\n"
        f"between\n\n> > * a\n> > {pad}* b\n"
    )
    html = markdown_to_html(source)
    assert html.count("<blockquote>") == 3 and html.count("<ul>") == 4
    assert "<li>item<ul>\n<li>sub-item</li>\n<li>sub-two</li>\n</ul>\n</li>\n<li>next</li>" in html
    assert "<li>a<ul>\n<li>b</li>\n</ul>" in html
    assert normalise_list_indentation(source).count("\n") == source.count("\n")


def test_quote_markers_and_code_in_quotes_are_kept() -> None:
    """A quote's `>` markers are put back as written, and quote-like lines inside fenced
    code are left as they are."""
    source = ">* a\n>   * b\n\n```\n> * not\n>   * touched\n```\n"
    expected = ">* a\n>     * b\n\n```\n> * not\n>   * touched\n```\n"
    assert normalise_list_indentation(source) == expected


def test_quotes_nested_thousands_deep_render_without_recursing_forever() -> None:
    """A line of thousands of `>` markers renders (deep quotes are left to Python-Markdown
    past a depth no writer uses) instead of exhausting the stack."""
    html = markdown_to_html("> " * 5000 + "deep\n")
    assert "deep" in html and html.count("<blockquote>") > 100
