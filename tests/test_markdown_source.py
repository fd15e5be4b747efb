"""List indentation as bloggers write it: 2- and 4-space nesting both nest."""

from __future__ import annotations

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
