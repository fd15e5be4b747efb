"""Where an issue lives on the web, read from the digest alone: slug, canonical URL, flag."""

from __future__ import annotations

from pathlib import Path

import pytest

from newsletter.config import load_settings
from newsletter.digest import parse_digest
from newsletter.errors import DigestError
from newsletter.permalink import issue_slug, permalink
from newsletter.render import render_issue

SETTINGS = load_settings({"NEWSLETTER_SITE_URL": "https://news.example.com"}, Path("/nonexistent"))


def _digest(front: str, name: str = "2026-11-20-weekly-links.md", body: str = "Hello.\n"):
    return parse_digest(f"---\n{front}\n---\n{body}", Path("/blog/posts") / name)


def test_slug_is_the_file_name() -> None:
    """A dated blog file name is the slug, date included, so weekly issues never collide."""
    assert issue_slug(_digest('title: "Weekly links"')) == "2026-11-20-weekly-links"


def test_slug_of_a_page_bundle_is_the_title() -> None:
    """index.md (a Hugo page bundle) says nothing: the title, transliterated, is the slug."""
    digest = _digest('title: "📹 Tensorflow.js, AI in Video & Analytics"', name="index.md")
    assert issue_slug(digest) == "tensorflow-js-ai-in-video-analytics"
    assert issue_slug(_digest('title: "Привет, мир"', name="README.md")) == "privet-mir"


def test_front_matter_slug_wins() -> None:
    """`slug:` in the front matter is used as written (made URL-safe)."""
    assert issue_slug(_digest('title: "T"\nslug: "My Best Issue!"')) == "my-best-issue"


def test_a_slug_without_letters_is_refused_with_its_line() -> None:
    """A `slug:` that makes no web address is a one-line error naming file and line."""
    with pytest.raises(DigestError, match=r"weekly-links\.md:3: front matter field 'slug'"):
        issue_slug(_digest('title: "T"\nslug: "???"'))


def test_nothing_usable_falls_back_to_issue() -> None:
    """A digest whose name and title have no letters still gets a slug."""
    assert issue_slug(_digest('title: "🎉🎉"', name="index.md")) == "issue"


def test_long_titles_are_cut_at_a_word() -> None:
    """Slugs stay short enough to read in a link."""
    slug = issue_slug(_digest("title: " + "word " * 40, name="index.md"))
    assert len(slug) <= 80 and not slug.endswith("-") and slug.startswith("word-word")


def test_view_link_goes_to_the_archive_page() -> None:
    """Without canonical_url the email links to NEWSLETTER_SITE_URL/archive/SLUG."""
    link = permalink(_digest('title: "T"'), SETTINGS)
    assert link.view_url == "https://news.example.com/archive/2026-11-20-weekly-links"
    assert link.listed


def test_canonical_url_is_the_view_link() -> None:
    """canonical_url in the front matter is where "View in browser" points."""
    digest = _digest('title: "T"\ncanonical_url: https://blog.example.com/posts/weekly/')
    assert permalink(digest, SETTINGS).view_url == "https://blog.example.com/posts/weekly/"


@pytest.mark.parametrize("bad", ["javascript:alert(1)", "ftp://x.example/", "not a url", "/x"])
def test_a_bad_canonical_url_is_refused_with_its_line(bad: str) -> None:
    """A canonical_url that is not http(s) never reaches an email."""
    with pytest.raises(DigestError, match=r":4: front matter field 'canonical_url'"):
        permalink(_digest(f'title: "T"\nauthor: A\ncanonical_url: "{bad}"'), SETTINGS)


@pytest.mark.parametrize("value", ["false", "no", "off", "False"])
def test_archive_false_keeps_it_out_and_drops_the_link(value: str) -> None:
    """`archive: false` means no archive page, so the email offers no link to one."""
    link = permalink(_digest(f'title: "T"\narchive: {value}'), SETTINGS)
    assert not link.listed and link.view_url is None


def test_archive_false_with_canonical_url_still_links_the_post() -> None:
    """Out of the archive, the email may still point at the blog post."""
    digest = _digest('title: "T"\narchive: false\ncanonical_url: https://blog.example.com/p')
    assert permalink(digest, SETTINGS).view_url == "https://blog.example.com/p"


def test_toml_front_matter_booleans_are_read() -> None:
    """TOML's real booleans work as YAML's words do."""
    digest = parse_digest('+++\ntitle = "T"\narchive = false\n+++\nHi\n', Path("d.md"))
    assert not permalink(digest, SETTINGS).listed


def test_an_unclear_archive_value_is_refused() -> None:
    """`archive: maybe` is an error naming the field and line, not a guess."""
    with pytest.raises(DigestError, match=r":3: front matter field 'archive'"):
        permalink(_digest('title: "T"\narchive: maybe'), SETTINGS)


def test_archive_off_means_no_archive_link() -> None:
    """With NEWSLETTER_ARCHIVE=off emails carry no link to a page that answers 404."""
    off = load_settings({"NEWSLETTER_ARCHIVE": "off"}, Path("/nonexistent"))
    assert permalink(_digest('title: "T"'), off).view_url is None


def test_the_email_carries_the_view_link_at_the_top_of_both_parts() -> None:
    """ "View in browser" comes first in the HTML body (after the preheader) and the text."""
    issue = render_issue(_digest('title: "T"\ndescription: Pre', body="Hi {{ name }}\n"), SETTINGS)
    url = "https://news.example.com/archive/2026-11-20-weekly-links"
    assert issue.text.startswith(f"View in browser: {url}\n")
    view = issue.html.index(f'href="{url}"')
    assert issue.html.index("Pre") < view < issue.html.index("T</h1>")
    assert (
        "View in browser" not in render_issue(_digest('title: "T"\narchive: false'), SETTINGS).html
    )


def test_a_new_slug_moves_the_link_and_nothing_else() -> None:
    """with_slug changes the email's link, even when the body links the old page too."""
    old = "https://news.example.com/archive/2026-11-20-weekly-links"
    issue = render_issue(_digest('title: "T"', body=f"[last week]({old})\n"), SETTINGS)
    moved = issue.with_slug("2026-11-20-weekly-links-2")
    assert moved.page.slug == "2026-11-20-weekly-links-2"
    assert moved.text.startswith(f"View in browser: {old}-2\n")
    assert moved.html.count(f'href="{old}-2"') == 1
    assert moved.html.count(f'href="{old}"') == 1  # the body's own link is kept
    assert moved.personalize({"name": "x"})[0].count(f"{old}-2") == 1


def test_page_content_has_no_inline_styles_and_keeps_placeholders() -> None:
    """The web copy is styled by a stylesheet (the CSP refuses inline styles)."""
    body = 'Hi {{ name }}, <span style="color: red">red</span>\n'
    page = render_issue(_digest('title: "T"\nauthor: Ann', body=body), SETTINGS).page
    assert "style=" not in page.body and "@@NL_NAME@@" in page.body
    assert page.title == "T" and page.byline == "Ann"


def test_check_names_a_bad_archive_field(runner, clean_env: Path) -> None:
    """`newsletter check` stops at a bad canonical_url with one line and exit 2."""
    from newsletter.cli import main

    (clean_env / "d.md").write_text('---\ntitle: "T"\ncanonical_url: nope\n---\nHi\n', "utf-8")
    result = runner.invoke(main, ["check", "d.md"])
    assert result.exit_code == 2
    assert result.output == (
        "d.md:3: front matter field 'canonical_url': 'nope' is not an http(s) URL\n"
    )
