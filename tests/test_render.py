"""Rendering a digest once into inline-styled HTML and a plain-text part."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from lxml import html as lxml_html

from newsletter.config import load_settings
from newsletter.digest import FIXED, MUST_FIX, load_digest, parse_digest
from newsletter.render import SAMPLE_RECIPIENT, Personalizer, placeholder, render_issue

SHARED_SAMPLE = (
    Path(__file__).resolve().parents[2]
    / "shared"
    / "fixtures"
    / "2020-09-22-tensorflow-js-ai-video-analytics.md"
)
MOJIBAKE = ("‚Äî", "‚Äô", "üìπ", "\uf8ff", "â€")
ASSETS = {"NEWSLETTER_ASSET_BASE_URL": "https://blog.example.com/posts"}


def _render(path: Path, **env: str):
    issue = render_issue(load_digest(path), load_settings(env, dotenv_path=Path("/nonexistent")))
    html, text = issue.personalize(SAMPLE_RECIPIENT)
    return issue, html, text


def _assert_email_invariants(html: str, text: str, subject: str, video_ids: list[str]) -> None:
    for bad in MOJIBAKE:
        assert bad not in html and bad not in text and bad not in subject
    assert "<iframe" not in html.lower()
    tree = lxml_html.fromstring(html)
    for video in video_ids:
        links = tree.xpath(f'//a[starts-with(@href, "https://www.youtube.com/watch?v={video}")]')
        assert links, video
        assert links[0].xpath(f".//img[contains(@src, 'ytimg.com/vi/{video}/')]")
    for tag in ("p", "a", "h2", "li", "blockquote"):
        elements = tree.xpath(f"//body//{tag}")
        assert elements, tag
        assert all(el.get("style") for el in elements), tag


def test_own_fixture_renders_like_the_specified_sample(fixtures_dir: Path) -> None:
    """The project's own mojibake digest: subject, nesting, thumbnails, styles, no iframe."""
    issue, html, text = _render(fixtures_dir / "mojibake-digest.md", **ASSETS)
    assert issue.subject == "📺 Browsers, Video and Metrics"
    _assert_email_invariants(html, text, issue.subject, ["fZ1rzawCPD4", "GnZUIuOzgQc"])
    tree = lxml_html.fromstring(html)
    nested = tree.xpath("//li[contains(., 'Service')]/ul/li")
    assert [li.text_content().strip() for li in nested] == [
        "Pick a narrator",
        "Type the script",
        "Wait a few minutes",
    ]
    assert tree.xpath('//img[@src="https://blog.example.com/posts/chart.png"]')
    assert "watch?v=GnZUIuOzgQc&t=90s" in html.replace("&amp;", "&")


@pytest.mark.skipif(not SHARED_SAMPLE.exists(), reason="../shared fixtures not present")
def test_shared_sample_digest() -> None:
    """The digest the project was specified from renders as the issue demands."""
    issue, html, text = _render(SHARED_SAMPLE, **ASSETS)
    assert issue.subject == "📹 Tensorflow.js, AI in Video and Analytics"
    _assert_email_invariants(html, text, issue.subject, ["fZ1rzawCPD4", "GnZUIuOzgQc"])
    tree = lxml_html.fromstring(html)
    nested = tree.xpath("//li[contains(., 'Synthesia')]/ul/li")
    assert len(nested) == 3
    assert tree.xpath(
        '//img[@src="https://blog.example.com/posts/2020-09-22-analytics-netflix.png"]'
    )


def test_preheader_is_first_in_body_and_hidden(fixtures_dir: Path) -> None:
    """The description is a hidden preheader at the very start of the body."""
    _, html, _ = _render(fixtures_dir / "mojibake-digest.md", **ASSETS)
    body = lxml_html.fromstring(html).body
    first = body[0]
    assert first.text_content().startswith("Three links and two talks")
    assert "display:none" in first.get("style").replace(" ", "")


def test_media_queries_kept_with_important(fixtures_dir: Path) -> None:
    """Responsive and dark-mode rules survive in a <style> block with !important intact."""
    _, html, _ = _render(fixtures_dir / "mojibake-digest.md", **ASSETS)
    style = "".join(lxml_html.fromstring(html).xpath("//style/text()"))
    assert "@media only screen and (max-width: 620px)" in style
    assert "prefers-color-scheme: dark" in style
    assert "!important" in style


def test_local_image_is_attached_inline_without_asset_base(fixtures_dir: Path) -> None:
    """With no asset base URL, an image next to the digest is attached and referenced by cid."""
    issue, html, _ = _render(fixtures_dir / "mojibake-digest.md")
    assert len(issue.images) == 1
    image = issue.images[0]
    assert image.content_type == "image/png" and image.data.startswith(b"\x89PNG")
    assert f'src="cid:{image.cid}"' in html


def test_missing_relative_image_is_left_out_and_reported(tmp_path: Path) -> None:
    """An unresolvable relative image is dropped (alt text kept) and reported as must-fix."""
    path = tmp_path / "d.md"
    path.write_text("# T\n\nBefore ![the alt](missing.png) after\n", "utf-8")
    issue, html, _ = _render(path)
    assert "missing.png" not in html
    assert "the alt" in html
    finding = next(f for f in issue.findings if f.severity == MUST_FIX)
    assert finding.line == 3 and "missing.png" in finding.message


def test_unsafe_links_and_active_content_never_reach_the_email(tmp_path: Path) -> None:
    """javascript: links, scripts, forms, objects and embeds are removed; footnotes stay."""
    path = tmp_path / "d.md"
    path.write_text(
        "# T\n\n[bad](javascript:alert(1)) and a note[^1]\n\n"
        "<script>alert('x')</script>\n\n<form action='x'><input></form>\n\n"
        "<object data='x.swf'></object><embed src='y.swf'>\n\n"
        '<p onclick="steal()">click</p>\n\n[^1]: the note\n',
        "utf-8",
    )
    issue, html, text = _render(path)
    lowered = html.lower()
    for needle in ("<script", "<form", "<object", "<embed", "javascript:", "onclick", "alert"):
        assert needle not in lowered
        assert needle not in text.lower()
    assert "#fn:1" in html
    assert any("javascript" in f.message and f.severity == MUST_FIX for f in issue.findings)


def test_script_urls_in_math_svg_styles_and_srcset_never_reach_the_email(
    tmp_path: Path,
) -> None:
    """javascript: hidden in MathML, SVG, an inline style or a srcset is gone from both
    parts, and each removal is a warning at its line of the file."""
    path = tmp_path / "d.md"
    path.write_text(
        '# T\n\nMaths: <math><mi xlink:href="javascript:alert(9)">m</mi></math> here.\n\n'
        '<p style="background:url(javascript:alert(1))">styled</p>\n\n'
        '<svg><a xlink:href="javascript:alert(2)"><text>icon</text></a></svg>\n\n'
        '<img src="https://e.com/a.png" srcset="https://e.com/a.png 1x, javascript:alert(3) 2x"'
        ' alt="pic">\n',
        "utf-8",
    )
    issue, html, text = _render(path)
    for needle in ("javascript:", "alert", "xlink", "<svg", "<math", "srcset"):
        assert needle not in html.lower() and needle not in text.lower()
    assert "Maths: m here." in html and "styled" in html and "e.com/a.png" in html
    assert [(f.line, f.message, f.severity) for f in issue.findings] == [
        (3, "removed <math> markup, keeping its text", FIXED),
        (5, "removed style attribute with javascript: from <p>", FIXED),
        (7, "removed <svg>", FIXED),
        (9, "removed javascript: srcset attribute from <img>", FIXED),
    ]


def test_personal_fields_are_placeholders_escaped_per_recipient(fixtures_dir: Path) -> None:
    """`{{ name }}` in prose is personalised and escaped; in code it stays literal."""
    issue = render_issue(
        load_digest(fixtures_dir / "mojibake-digest.md"),
        load_settings({}, dotenv_path=Path("/nonexistent")),
    )
    assert placeholder("unsubscribe_url") in issue.html
    values = {
        "name": "<b>Bob</b> & co",
        "email": "bob@example.com",
        "unsubscribe_url": "https://x/u/T",
    }
    html, text = issue.personalize(values)
    assert "&lt;b&gt;Bob&lt;/b&gt; &amp; co will find here" in html
    assert "<b>Bob</b> & co will find here" in text
    assert "{{ name }} stays literal in code" in html
    assert 'href="https://x/u/T"' in html and "https://x/u/T" in text
    assert "@@NL_" not in html and "@@NL_" not in text


def test_personalizer_fills_every_occurrence() -> None:
    """Each placeholder occurrence is filled, unknown fields become empty."""
    template = Personalizer(f"a {placeholder('name')} b {placeholder('name')} {placeholder('x')}")
    assert template.fill({"name": "N"}) == "a N b N "


def test_text_part_reads_well(fixtures_dir: Path) -> None:
    """Headings, nested lists, links as URLs, videos as 'Video: TITLE URL', unsubscribe URL."""
    _, _, text = _render(fixtures_dir / "mojibake-digest.md", **ASSETS)
    assert "In the Browser\n--------------" in text
    assert "* First link (https://example.com/one)" in text
    assert re.search(r"\n {2}\* Pick a narrator", text)
    assert re.search(r"Video: .+ https://www\.youtube\.com/watch\?v=fZ1rzawCPD4", text)
    assert "> A quote with “quoted” words." in text
    assert SAMPLE_RECIPIENT["unsubscribe_url"] in text
    assert "<" not in text.replace("<reader@", "")


def test_templates_dir_overrides_defaults(tmp_path: Path) -> None:
    """NEWSLETTER_TEMPLATES_DIR replaces a shipped template and keeps the others."""
    override = tmp_path / "tpl"
    override.mkdir()
    (override / "email.html").write_text(
        "<html><body><p class='custom'>{{ title }}</p>{{ body }}</body></html>", "utf-8"
    )
    digest = parse_digest("# Hello\n\ntext\n", tmp_path / "d.md")
    settings = load_settings({"NEWSLETTER_TEMPLATES_DIR": str(override)}, Path("/nonexistent"))
    issue = render_issue(digest, settings)
    assert 'class="custom"' in issue.html and "Hello" in issue.html
    assert "Unsubscribe:" in issue.text


def test_renders_sample_digest_shipped_with_project() -> None:
    """The digest the quick start sends renders with its chart attached and no findings to fix."""
    sample = Path(__file__).resolve().parents[1] / "digests" / "2026-11-20-weekly-links.md"
    issue, html, _ = _render(sample)
    assert not [f for f in issue.findings if f.severity == MUST_FIX]
    assert len(issue.images) == 1
    assert {e.provider for e in issue.embeds} == {"youtube", "vimeo"}
    assert "<iframe" not in html


def test_oversized_html_is_reported(tmp_path: Path) -> None:
    """An HTML part over 100 KB is a must-fix finding (Gmail clips at 102 KB)."""
    path = tmp_path / "big.md"
    path.write_text(
        "# Big\n\n" + "\n\n".join(f"para {i} " + "x" * 200 for i in range(600)), "utf-8"
    )
    issue, _, _ = _render(path)
    assert any("Gmail clips" in f.message for f in issue.findings)


def test_render_does_not_touch_the_network(tmp_path: Path, fixtures_dir: Path) -> None:
    """Rendering works with an asset base URL that does not resolve (no fetching)."""
    shutil.copy(fixtures_dir / "mojibake-digest.md", tmp_path / "d.md")
    _issue, html, _ = _render(
        tmp_path / "d.md", NEWSLETTER_ASSET_BASE_URL="https://invalid.invalid"
    )
    assert "https://invalid.invalid/chart.png" in html


LINKED = """---
title: Links
---
* [page](https://example.com/a)
* [longer page](https://example.com/a/b)
* [query](https://example.com/q?x=1&y=2)

```
https://example.com/a in a code block is not a link
```

<a href="https://example.com/q?x=1&amp;y=2">again, as raw HTML</a>
<iframe src="https://www.youtube.com/embed/dQw4w9WgXcQ"></iframe>
"""


def test_body_links_carry_the_lines_they_are_written_on() -> None:
    """Each distinct http(s) link of the body, with every file line holding it whole (a link
    inside a longer one and code blocks do not count); an embed's link points at its line."""
    issue = render_issue(
        parse_digest(LINKED, "links.md"), load_settings({}, dotenv_path=Path("/nonexistent"))
    )
    lines = {link.url: link.lines for link in issue.links}
    assert lines == {
        "https://example.com/a": (4,),
        "https://example.com/a/b": (5,),
        "https://example.com/q?x=1&y=2": (6, 12),
        "https://www.youtube.com/watch?v=dQw4w9WgXcQ": (13,),
    }


def test_images_without_alt_text_are_warnings() -> None:
    """An image with no or blank alt text is a warning at its line; one with alt text is not."""
    digest = parse_digest(
        "# T\n\n![](https://example.com/a.png)\n\n![ok](https://example.com/b.png)\n\n"
        '<img src="https://example.com/c.png" alt=" ">\n',
        "d.md",
    )
    issue = render_issue(digest, load_settings({}, dotenv_path=Path("/nonexistent")))
    warnings = [(f.line, f.severity) for f in issue.findings if "no alt text" in f.message]
    assert warnings == [(3, "warning"), (7, "warning")]


def test_unparsable_link_is_must_fix_not_a_crash() -> None:
    """A link whose URL does not parse (an unclosed IPv6 bracket) must be fixed; it renders."""
    digest = parse_digest("# T\n\n[x](http://[::1)\n", "d.md")
    issue = render_issue(digest, load_settings({}, dotenv_path=Path("/nonexistent")))
    assert [(f.line, f.message, f.severity) for f in issue.findings] == [
        (3, "link 'http://[::1' is not a valid URL", MUST_FIX)
    ]
    assert issue.links == ()


@pytest.mark.parametrize(
    ("front_matter", "shown"),
    [
        ('---\ndate: "2024-10-11T08:30:00+02:00"\n---', "11 October 2024"),
        ("---\ndate: 2019-03-14 09:00:00 +0100\n---", "14 March 2019"),
        ("---\ndate: 2020-09-22\n---", "22 September 2020"),
        ("+++\ndate = 2024-10-11T23:30:00-05:00\n+++", "11 October 2024"),
        ('---\ndate: "sometime in spring"\n---', "sometime in spring"),
    ],
    ids=["iso-with-offset", "jekyll", "date", "toml-datetime", "free-text"],
)
def test_byline_shows_the_date_as_a_reader_reads_it(
    tmp_path: Path, front_matter: str, shown: str
) -> None:
    """The byline of both parts reads `Ada · 11 October 2024`, the day the author wrote in
    their own zone; a date that cannot be read is shown as written."""
    author = 'author = "Ada"' if front_matter.startswith("+++") else "author: Ada"
    head, tail = front_matter.split("\n", 1)
    path = tmp_path / "d.md"
    path.write_text(f"{head}\n{author}\n{tail}\n# Title\n\ntext\n", "utf-8")
    _issue, html, text = _render(path)
    assert f"Ada · {shown}</p>" in html
    assert f"\nAda · {shown}\n" in text
    assert "08:30" not in html + text and "+0100" not in html + text


def test_custom_templates_get_the_raw_date_and_the_filter(tmp_path: Path) -> None:
    """A custom template still gets the front matter's date as typed, and `long_date`."""
    override = tmp_path / "tpl"
    override.mkdir()
    (override / "email.html").write_text(
        "<html><body><p>{{ date }}|{{ date | long_date }}</p>{{ body }}</body></html>", "utf-8"
    )
    digest = parse_digest('---\ntitle: T\ndate: "2024-10-11T08:30:00+02:00"\n---\nx\n', "d.md")
    settings = load_settings({"NEWSLETTER_TEMPLATES_DIR": str(override)}, Path("/nonexistent"))
    assert "2024-10-11T08:30:00+02:00|11 October 2024" in render_issue(digest, settings).html


SAMPLE_DIGEST = Path(__file__).resolve().parents[1] / "digests" / "2026-11-20-weekly-links.md"


@pytest.mark.parametrize("name", ["", "   "])
def test_no_greeting_without_a_name(name: str) -> None:
    """A subscriber without a name gets no "Hi ," in either part; one with a name is
    greeted by it, escaped in the HTML."""
    issue = render_issue(load_digest(SAMPLE_DIGEST), load_settings({}, Path("/nonexistent")))
    values = {"email": "linus@example.com", "unsubscribe_url": "https://x/u/T"}
    html, text = issue.personalize(values | {"name": name})
    assert "Hi " not in html and "Hi " not in text and "@@NL_" not in html + text
    html, text = issue.personalize(values | {"name": "Ada & Co"})
    assert ">Hi Ada &amp; Co,</p>" in html and "\nHi Ada & Co,\n" in text


def test_if_set_sections_in_custom_templates(tmp_path: Path) -> None:
    """A custom template's `if_set` block shows for recipients whose field is set only."""
    override = tmp_path / "tpl"
    override.mkdir()
    (override / "email.txt").write_text(
        '{% call if_set("name") %}Dear {{ name }}!{% endcall %}|{{ body }}', "utf-8"
    )
    settings = load_settings({"NEWSLETTER_TEMPLATES_DIR": str(override)}, Path("/nonexistent"))
    issue = render_issue(parse_digest("# T\n\nx\n", "d.md"), settings)
    assert issue.personalize({"name": "Bo"})[1].startswith("Dear Bo!|")
    assert issue.personalize({"name": ""})[1].startswith("|")
