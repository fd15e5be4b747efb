"""Embeds become linked thumbnails and active content leaves the email."""

from __future__ import annotations

import lxml.html
import markdown
import pytest

from newsletter.embeds import (
    VIMEO_THUMBNAIL,
    Embed,
    classify,
    expand_shortcodes,
    replace_embeds,
    strip_active_content,
)

VIDEO_ID = "fZ1rzawCPD4"
WATCH = f"https://www.youtube.com/watch?v={VIDEO_ID}"
THUMB = f"https://i.ytimg.com/vi/{VIDEO_ID}/hqdefault.jpg"


def fragment(html: str) -> lxml.html.HtmlElement:
    """Parse HTML the way the render module does."""
    return lxml.html.fragment_fromstring(html, create_parent="div")


def _stripped(root: lxml.html.HtmlElement) -> list[str]:
    """What strip_active_content says it removed, as check prints it."""
    return [removal.message for removal in strip_active_content(root)]


def html_of(root: lxml.html.HtmlElement) -> str:
    return lxml.html.tostring(root, encoding="unicode")


@pytest.mark.parametrize(
    "src",
    [
        f"https://www.youtube.com/embed/{VIDEO_ID}",
        f"https://www.youtube.com/embed/{VIDEO_ID}?controls=0&rel=0",
        f"https://www.youtube-nocookie.com/embed/{VIDEO_ID}?controls=0",
        f"https://youtu.be/{VIDEO_ID}",
        f"https://www.youtube.com/watch?v={VIDEO_ID}",
        f"https://www.youtube.com/watch?v={VIDEO_ID}&feature=youtu.be",
        f"https://www.youtube.com/watch?feature=share&v={VIDEO_ID}",
        f"https://m.youtube.com/watch?v={VIDEO_ID}",
        f"https://youtube.com/shorts/{VIDEO_ID}",
        f"//www.youtube.com/embed/{VIDEO_ID}",
        f"http://www.youtube.com/embed/{VIDEO_ID}/",
        f"  https://www.youtube.com/embed/{VIDEO_ID}  ",
    ],
)
def test_youtube_url_forms_link_to_watch_page_with_thumbnail(src: str) -> None:
    """Every YouTube URL form bloggers paste gives the watch link and the hqdefault thumbnail."""
    embed = classify(src)
    assert embed == Embed("youtube", WATCH, THUMB, "YouTube video", True)


@pytest.mark.parametrize(
    ("src", "seconds"),
    [
        (f"https://youtu.be/{VIDEO_ID}?t=42", 42),
        (f"https://www.youtube.com/watch?v={VIDEO_ID}&t=42s", 42),
        (f"https://www.youtube.com/watch?v={VIDEO_ID}&t=1m30s", 90),
        (f"https://www.youtube.com/watch?v={VIDEO_ID}&t=1h0m5s", 3605),
        (f"https://www.youtube.com/embed/{VIDEO_ID}?start=90", 90),
        (f"https://www.youtube.com/watch?v={VIDEO_ID}#t=1m30s", 90),
    ],
)
def test_youtube_start_time_is_kept_in_seconds(src: str, seconds: int) -> None:
    """A start time in query or fragment, in any notation, becomes &t=NNs on the watch link."""
    embed = classify(src)
    assert embed is not None
    assert embed.url == f"{WATCH}&t={seconds}s"


def test_zero_or_garbage_start_time_is_dropped() -> None:
    """A start of 0 or an unreadable one adds nothing to the link."""
    assert classify(f"https://youtu.be/{VIDEO_ID}?t=0").url == WATCH
    assert classify(f"https://youtu.be/{VIDEO_ID}?t=soon").url == WATCH


@pytest.mark.parametrize(
    "src",
    [
        "https://www.youtube.com/embed/short",
        "https://www.youtube.com/embed/fZ1rzawCPD4xx",
        "https://www.youtube.com/embed/videoseries?list=PL590L5WQmH8fJ54F369BLDSqIwcs-TCfs",
        "https://www.youtube.com/watch?list=PL590L5WQmH8fJ54F369BLDSqIwcs",
    ],
)
def test_invalid_youtube_id_is_treated_as_unknown_provider(src: str) -> None:
    """A malformed ID (or a playlist) never yields a broken thumbnail; it links to the src."""
    embed = classify(src)
    assert embed == Embed("youtube.com", src, None, "Video on youtube.com", False)


def test_vimeo_player_links_to_vimeo_page_with_thumbnail() -> None:
    """A Vimeo player URL links to vimeo.com/ID with the configured thumbnail service."""
    embed = classify("https://player.vimeo.com/video/76979871?title=0&byline=0", "The New Vimeo")
    assert embed == Embed(
        "vimeo",
        "https://vimeo.com/76979871",
        VIMEO_THUMBNAIL.format(id="76979871"),
        "The New Vimeo",
        True,
    )


def test_vimeo_unlisted_hash_and_start_time_survive() -> None:
    """An unlisted video's h= hash and a #t= start stay on the link, or the page would 404."""
    embed = classify("https://player.vimeo.com/video/76979871?h=8a7b6c5d4e#t=1m")
    assert embed is not None
    assert embed.url == "https://vimeo.com/76979871/8a7b6c5d4e#t=60s"


def test_unknown_provider_links_to_its_src_by_host_name() -> None:
    """Any other iframe becomes a link to its src named after the host, without a thumbnail."""
    src = "https://player.twitch.tv/?video=v40464143&parent=example.com"
    assert classify(src) == Embed("twitch.tv", src, None, "Video on twitch.tv", False)
    assert classify("https://www.loom.com/embed/abc").provider == "loom.com"


@pytest.mark.parametrize(
    "src",
    ["javascript:alert(1)", "data:text/html,hi", "/videos/local.mp4", "clip.mp4", "", "http://[x"],
)
def test_non_http_src_is_not_an_embed(src: str) -> None:
    """Only http(s) URLs can be linked from an email."""
    assert classify(src) is None


def test_title_is_taken_and_whitespace_collapsed() -> None:
    """The iframe title becomes the embed title, one line."""
    embed = classify(f"https://youtu.be/{VIDEO_ID}", "  Talk:\n  the  sequel ")
    assert embed is not None
    assert embed.title == "Talk: the sequel"


def test_single_quoted_src_and_escaped_ampersands_are_read() -> None:
    """src='…' and &amp; in the query, as WordPress exports them, still find ID and start."""
    root = fragment(
        f"<p><iframe src='https://www.youtube.com/watch?v={VIDEO_ID}&amp;feature=share"
        "&amp;t=42s' width='560'></iframe></p>"
    )
    [embed] = replace_embeds(root)
    assert embed.url == f"{WATCH}&t=42s"
    assert root.xpath("//a[@class='nl-embed']/@href") == [f"{WATCH}&t=42s"]


def test_thumbnail_markup_is_linked_image_then_caption() -> None:
    """A known embed becomes <a><img></a><br><a>caption</a> with the agreed classes and alt."""
    root = fragment(f'<p><iframe src="https://youtu.be/{VIDEO_ID}" title="Demo"></iframe></p>')
    replace_embeds(root)
    paragraph = root[0]
    assert [child.tag for child in paragraph] == ["a", "br", "a"]
    link, _, caption = paragraph
    assert link.get("class") == "nl-embed" and link.get("href") == WATCH
    image = link[0]
    assert (image.tag, image.get("src"), image.get("alt")) == ("img", THUMB, "Video: Demo")
    assert image.get("width") == "536" and image.get("class") == "nl-embed-img"
    assert caption.get("class") == "nl-embed-caption" and caption.get("href") == WATCH
    assert caption.text == "▶ Watch on YouTube: Demo"


def test_caption_without_title_does_not_repeat_provider() -> None:
    """Without a title attribute the caption is just "Watch on YouTube"."""
    root = fragment(f'<p><iframe src="https://youtu.be/{VIDEO_ID}"></iframe></p>')
    replace_embeds(root)
    assert root.xpath("//a[@class='nl-embed-caption']/text()") == ["▶ Watch on YouTube"]


@pytest.mark.parametrize(
    ("html", "container"),
    [
        (f'<p>Look: <iframe src="https://youtu.be/{VIDEO_ID}"></iframe> nice.</p>', "p"),
        (f'<ul><li>Look: <iframe src="https://youtu.be/{VIDEO_ID}"></iframe></li></ul>', "li"),
        ('<ul><li><p>x <iframe src="https://player.twitch.tv/?v=1"></iframe></p></li></ul>', "p"),
    ],
)
def test_embed_stays_inside_its_paragraph_or_list_item_after_reparsing(
    html: str, container: str
) -> None:
    """Inline markup only, so serialising and re-parsing (as premailer does) keeps it in place."""
    root = fragment(html)
    replace_embeds(root)
    reparsed = lxml.html.fromstring(html_of(root))
    links = reparsed.xpath("//a[starts-with(@class, 'nl-embed')]")
    assert links
    assert all(link.getparent().tag == container for link in links)
    assert not reparsed.xpath("//div//div | //table | //iframe")


def test_tail_text_is_kept() -> None:
    """Text after the iframe stays where it was."""
    root = fragment(f'<p>Before <iframe src="https://youtu.be/{VIDEO_ID}"></iframe> after.</p>')
    replace_embeds(root)
    assert root[0].text == "Before "
    assert root[0][-1].tail == " after."


def test_raw_html_block_iframe_is_wrapped_in_a_paragraph() -> None:
    """An iframe at the top level (a raw HTML block) becomes a paragraph, its tail kept after it."""
    root = fragment(f'<p>one</p>\n<iframe src="https://youtu.be/{VIDEO_ID}"></iframe>\n<p>two</p>')
    replace_embeds(root)
    assert [child.tag for child in root] == ["p", "p", "p"]
    assert root[1][0].get("class") == "nl-embed"
    assert root[1].tail == "\n"


def test_unknown_provider_becomes_a_link_card() -> None:
    """Without a thumbnail the embed is a single caption-style link to the src."""
    src = "https://player.twitch.tv/?video=v1&parent=example.com"
    root = fragment(f'<p><iframe src="{src}" title="Speedrun"></iframe></p>')
    [embed] = replace_embeds(root)
    assert embed.known is False
    assert html_of(root) == (
        f'<div><p><a href="{src.replace("&", "&amp;")}" class="nl-embed-card">'
        "▶ Watch on twitch.tv: Speedrun</a></p></div>"
    )


def test_iframe_without_usable_src_is_removed_keeping_tail() -> None:
    """An iframe with no src, or a non-http one, disappears and reports no embed."""
    root = fragment(
        '<p>a<iframe srcdoc="&lt;b&gt;x"></iframe>b<iframe src="javascript:x"></iframe>c</p>'
    )
    assert replace_embeds(root) == []
    assert html_of(root) == "<div><p>abc</p></div>"


def test_lazy_loaded_iframe_uses_data_src() -> None:
    """Lazy-loading themes put the URL in data-src; it is used when src is missing."""
    root = fragment(f'<p><iframe data-src="https://youtu.be/{VIDEO_ID}"></iframe></p>')
    assert [embed.url for embed in replace_embeds(root)] == [WATCH]


def test_video_elements_become_links_with_poster_as_thumbnail() -> None:
    """<video src> and <video><source> link to the file; an http(s) poster is the thumbnail."""
    root = fragment(
        '<p><video src="https://cdn.example.com/a.mp4" title="A"></video></p>'
        '<p><video poster="https://cdn.example.com/b.jpg">'
        '<source src="clip.webm"><source src="https://cdn.example.com/b.mp4">Fallback</video></p>'
    )
    first, second = replace_embeds(root)
    assert (first.provider, first.url, first.thumbnail) == (
        "cdn.example.com",
        "https://cdn.example.com/a.mp4",
        None,
    )
    assert second.thumbnail == "https://cdn.example.com/b.jpg"
    assert not root.xpath("//video | //source") and "Fallback" not in html_of(root)


def test_embeds_are_returned_in_document_order_with_lines() -> None:
    """Each embed records the source line of its element, for `check` messages."""
    root = fragment(
        "<p>x</p>\n"
        '<p><iframe src="https://player.vimeo.com/video/1"></iframe></p>\n'
        f'<p><iframe src="https://youtu.be/{VIDEO_ID}"></iframe></p>'
    )
    embeds = replace_embeds(root)
    assert [(embed.provider, embed.line) for embed in embeds] == [("vimeo", 2), ("youtube", 3)]


def test_real_digest_snippet_becomes_two_thumbnails() -> None:
    """The fixture digest's two iframes become thumbnails linked to their watch pages."""
    source = (
        "* [Analyze emotions](https://enjoyingthe.show/#explainer), no more silence.\n\n"
        '<iframe width="560" height="315" '
        'src="https://www.youtube-nocookie.com/embed/fZ1rzawCPD4?controls=0" frameborder="0" '
        'allow="accelerometer; autoplay" allowfullscreen></iframe>\n\n'
        "## AI in Video\n\n"
        "* Wanted to play Federer against Federer? Well, now you can:\n\n"
        '<iframe width="560" height="315" src="https://www.youtube.com/embed/GnZUIuOzgQc" '
        'frameborder="0" allowfullscreen></iframe>\n'
    )
    root = fragment(markdown.markdown(source))
    embeds = replace_embeds(root)
    html = html_of(root)
    assert [embed.url for embed in embeds] == [
        "https://www.youtube.com/watch?v=fZ1rzawCPD4",
        "https://www.youtube.com/watch?v=GnZUIuOzgQc",
    ]
    for video_id in ("fZ1rzawCPD4", "GnZUIuOzgQc"):
        link = root.xpath(f"//a[@href='https://www.youtube.com/watch?v={video_id}']/img")
        assert link[0].get("src") == f"https://i.ytimg.com/vi/{video_id}/hqdefault.jpg"
    assert "<iframe" not in html


@pytest.mark.parametrize(
    ("shortcode", "src"),
    [
        (f"{{{{< youtube {VIDEO_ID} >}}}}", f"https://www.youtube.com/embed/{VIDEO_ID}"),
        (f"{{{{<youtube {VIDEO_ID}>}}}}", f"https://www.youtube.com/embed/{VIDEO_ID}"),
        (f"{{{{% youtube {VIDEO_ID} %}}}}", f"https://www.youtube.com/embed/{VIDEO_ID}"),
        (
            f'{{{{< youtube id="{VIDEO_ID}" start="42" >}}}}',
            f"https://www.youtube.com/embed/{VIDEO_ID}?start=42",
        ),
        ("{{< vimeo 146022717 >}}", "https://player.vimeo.com/video/146022717"),
        ("{{< vimeo id=146022717 >}}", "https://player.vimeo.com/video/146022717"),
        (f"{{{{< video https://youtu.be/{VIDEO_ID} >}}}}", f"https://youtu.be/{VIDEO_ID}"),
        (
            f"{{{{< video https://www.youtube.com/watch?v={VIDEO_ID} start=90 >}}}}",
            f"https://www.youtube.com/watch?v={VIDEO_ID}&start=90",
        ),
        (f"{{% youtube {VIDEO_ID} %}}", f"https://www.youtube.com/embed/{VIDEO_ID}"),
        (f"{{%- youtube {VIDEO_ID} -%}}", f"https://www.youtube.com/embed/{VIDEO_ID}"),
        (f'{{% youtube "https://youtu.be/{VIDEO_ID}" %}}', f"https://youtu.be/{VIDEO_ID}"),
        (
            f'{{% include youtube.html id="{VIDEO_ID}" %}}',
            f"https://www.youtube.com/embed/{VIDEO_ID}",
        ),
        (
            '{% include video id="146022717" provider="vimeo" %}',
            "https://player.vimeo.com/video/146022717",
        ),
    ],
)
def test_video_shortcodes_become_iframes(shortcode: str, src: str) -> None:
    """Hugo, Quarto and Jekyll video shortcodes become iframes that classify reads."""
    root = fragment(expand_shortcodes(f"Watch {shortcode} now"))
    assert root.text == "Watch "
    assert root[0].tag == "iframe" and root[0].get("src") == src
    assert root[0].tail == " now"
    assert classify(src) is not None and classify(src).known


def test_shortcode_title_is_escaped_into_the_attribute() -> None:
    """A title with quotes and angle brackets survives as the iframe title, not as markup."""
    expanded = expand_shortcodes(
        f'{{{{< video https://youtu.be/{VIDEO_ID} title="Tom\'s <b>\\"best\\"</b>" >}}}}'
    )
    [iframe] = fragment(expanded).xpath("//iframe")
    assert iframe.get("title") == 'Tom\'s <b>"best"</b>'
    assert not fragment(expanded).xpath("//b")


def test_shortcodes_in_fenced_code_are_left_alone() -> None:
    """Inside ``` and ~~~ fences shortcodes are documentation, not embeds."""
    source = (
        "```markdown\n{{< youtube fZ1rzawCPD4 >}}\n```\n"
        "~~~~\n{% youtube fZ1rzawCPD4 %}\n```\nstill code\n~~~~\n"
        "{{< youtube fZ1rzawCPD4 >}}\n"
    )
    lines = expand_shortcodes(source).split("\n")
    assert lines[1] == "{{< youtube fZ1rzawCPD4 >}}"
    assert lines[4] == "{% youtube fZ1rzawCPD4 %}"
    assert lines[8].startswith("<iframe ")


def test_shortcodes_in_inline_code_are_left_alone() -> None:
    """Inside `…` and ``…`` spans shortcodes stay literal; outside them they expand."""
    source = "Use `{{< youtube ID >}}` or ``{{< vimeo 1 >}}`` like this: {{< vimeo 1 >}}"
    expanded = expand_shortcodes(source)
    assert expanded.startswith("Use `{{< youtube ID >}}` or ``{{< vimeo 1 >}}`` like this: <iframe")


def test_unmatched_backtick_does_not_hide_a_shortcode() -> None:
    """A lone backtick opens no code span, so the shortcode after it still expands."""
    assert "<iframe" in expand_shortcodes("It`s here: {{< vimeo 1 >}}")


def test_hugo_escaped_shortcode_becomes_literal_text() -> None:
    """{{</* youtube ID */>}} is Hugo's way to show a shortcode; it becomes the literal text."""
    expanded = expand_shortcodes("Write {{</* youtube fZ1rzawCPD4 */>}} to embed.")
    assert expanded == "Write {{< youtube fZ1rzawCPD4 >}} to embed."


def test_hugo_escaped_shortcode_is_unescaped_inside_code_too() -> None:
    """Hugo docs put the escaped form in code blocks; readers should see the real syntax."""
    source = "```\n{{</* vimeo 1 */>}}\n```\n`{{%/* youtube x */%}}`"
    assert expand_shortcodes(source) == "```\n{{< vimeo 1 >}}\n```\n`{{% youtube x %}}`"


def test_other_shortcodes_and_liquid_tags_are_untouched() -> None:
    """Only video shortcodes are expanded; figures, ifs and variable includes stay as written."""
    source = (
        '{{< figure src="a.png" >}} {% if x %}{% endif %} {% include youtube.html id=page.v %}\n'
        '{{< youtube "unbalanced >}} {{< video >}}'
    )
    assert expand_shortcodes(source) == source


def test_expand_shortcodes_keeps_line_count_and_line_endings() -> None:
    """Line numbers in `check` must still match the file, CRLF files included."""
    source = "a\r\n{{< youtube fZ1rzawCPD4 >}}\r\n```\r\n{{< vimeo 1 >}}\r\n```\r\n\r\nend"
    expanded = expand_shortcodes(source)
    assert expanded.count("\n") == source.count("\n")
    assert expanded.count("\r\n") == source.count("\r\n")
    assert expanded.split("\r\n")[1].startswith("<iframe")


def test_expanded_shortcode_renders_to_a_thumbnail() -> None:
    """Shortcode -> Markdown -> replace_embeds ends in a linked thumbnail inside the paragraph."""
    html = markdown.markdown(expand_shortcodes("See {{< youtube fZ1rzawCPD4 >}} here."))
    root = fragment(html)
    [embed] = replace_embeds(root)
    assert embed.url == WATCH
    assert root.xpath("//p/a[@class='nl-embed']/img/@src") == [THUMB]


def test_script_style_form_object_embed_are_removed_with_content() -> None:
    """Active elements go with everything inside them, and each removal is reported."""
    root = fragment(
        "<p>keep</p><script>alert('x')</script><style>p{color:red}</style>"
        "<form action='/x'><input name='q'>Form text</form>"
        "<object data='movie.swf'><embed src='movie.swf'>Object text</object>"
        "<applet code='A'>Applet text</applet>"
    )
    findings = _stripped(root)
    assert html_of(root) == "<div><p>keep</p></div>"
    assert findings == [
        "removed <script>",
        "removed <style>",
        "removed <form>",
        "removed <object>",
        "removed <applet>",
    ]


def test_event_handler_attributes_are_removed() -> None:
    """on* attributes in any case are dropped; other attributes stay."""
    root = fragment('<p onclick="a()" class="x"><img src="https://e.com/i.png" OnError="b()"></p>')
    findings = _stripped(root)
    assert html_of(root) == '<div><p class="x"><img src="https://e.com/i.png"></p></div>'
    assert findings == [
        "removed onclick attribute from <p>",
        "removed onerror attribute from <img>",
    ]


@pytest.mark.parametrize(
    "href",
    ["javascript:alert('hi')", " JavaScript:void(0)", "java\tscript:x", "vbscript:x", "data:,x"],
)
def test_script_links_are_unwrapped_keeping_their_text(href: str) -> None:
    """A javascript:/vbscript:/data: link loses its <a> but keeps its words."""
    root = fragment("<p>Please <a>x</a></p>")
    root[0][0].set("href", href)
    root[0][0].text = "click"
    findings = _stripped(root)
    assert html_of(root) == "<div><p>Please click</p></div>"
    scheme = href.strip().replace("\t", "").split(":")[0].lower()
    assert findings == [f"removed {scheme}: link 'click'"]


def test_safe_links_are_kept() -> None:
    """Footnote fragments, mailto:, cid:, http(s) and relative links are not active content."""
    html = (
        '<p><a href="#fn:1">1</a> <a href="mailto:me@example.com">mail</a> '
        '<a href="cid:logo">logo</a> <a href="https://example.com/?a=1&amp;b=2">web</a> '
        '<a href="/about">about</a> <a name="top">anchor</a></p>'
    )
    root = fragment(html)
    assert _stripped(root) == []
    assert html_of(root) == f"<div>{html}</div>"


def test_markdown_javascript_link_is_neutralised() -> None:
    """Python-Markdown's odd output for [x](javascript:…) loses its link all the same."""
    root = fragment(
        markdown.markdown(
            "[x](javascript:alert('hi')) and [^1]\n\n[^1]: note", extensions=["footnotes"]
        )
    )
    findings = _stripped(root)
    assert not root.xpath("//a[starts-with(normalize-space(@href), 'javascript')]")
    assert root.xpath("//a[starts-with(@href, '#fn')]")
    assert findings == ["removed javascript: link 'x'"]


def test_data_and_script_images_become_their_alt_text() -> None:
    """An image with a data:/javascript: src is removed, its alt text left in its place."""
    root = fragment(
        '<p>See <img src="data:image/png;base64,AAAA" alt="chart">, '
        '<img src="javascript:x" alt="">!</p><p><img src="https://e.com/a.png" alt="ok"></p>'
    )
    findings = _stripped(root)
    assert root[0].text_content() == "See chart, !"
    assert root.xpath("//img/@alt") == ["ok"]
    assert findings == ["removed data: image 'chart'", "removed javascript: image ''"]


def test_noscript_is_unwrapped_because_email_has_no_javascript() -> None:
    """<noscript> fallback content is what an email reader should see."""
    root = fragment("<noscript><p>Fallback <b>text</b></p></noscript><p>after</p>")
    assert _stripped(root) == []
    assert html_of(root) == "<div><p>Fallback <b>text</b></p><p>after</p></div>"


def test_head_styles_of_a_whole_document_are_kept() -> None:
    """Only body styles are the digest's; a template's <head> style (media queries) stays."""
    root = lxml.html.document_fromstring(
        "<html><head><style>@media (max-width:600px){p{margin:0}}</style></head>"
        "<body><style>p{color:red}</style><p>x</p></body></html>"
    )
    assert _stripped(root) == ["removed <style>"]
    assert len(root.xpath("//head/style")) == 1 and not root.xpath("//body//style")


def test_math_is_unwrapped_to_its_text_and_its_script_links_go() -> None:
    """MathML with an xlink:href="javascript:…" becomes its plain words; TeX annotations,
    which would repeat the formula, go too."""
    root = fragment(
        '<p>a<math><mi xlink:href="javascript:alert(9)">m</mi></math>b</p>'
        "<p>E: <math><semantics><mrow><mi>x</mi><mo>=</mo><mn>2</mn></mrow>"
        '<annotation encoding="application/x-tex">x=2</annotation></semantics></math>.</p>'
    )
    findings = _stripped(root)
    assert html_of(root) == "<div><p>amb</p><p>E: x=2.</p></div>"
    assert findings == ["removed <math> markup, keeping its text"] * 2


def test_svg_goes_with_everything_inside_it() -> None:
    """Inline SVG (whose <a xlink:href>, <set> and <animate> can run script) is dropped
    whole, prefixed or not; the text after it stays."""
    root = fragment(
        '<p>x<svg><a xlink:href="javascript:x"><text>hi</text></a><path d="M0"/></svg>after</p>'
        '<svg:svg><svg:a xlink:href="javascript:1">y</svg:a></svg:svg>'
    )
    findings = _stripped(root)
    assert html_of(root) == "<div><p>xafter</p></div>"
    assert findings == ["removed <svg>", "removed <svg>"]


@pytest.mark.parametrize(
    ("html", "kept", "finding"),
    [
        (
            '<mi xlink:href="javascript:alert(9)">m</mi>',
            "<mi>m</mi>",
            "removed javascript: xlink:href attribute from <mi>",
        ),
        (
            '<a href="https://e.com/" xlink:href="javascript:x">ok</a>',
            '<a href="https://e.com/">ok</a>',
            "removed javascript: xlink:href attribute from <a>",
        ),
        (
            '<area href="vbscript:x" alt="map">',
            '<area alt="map">',
            "removed vbscript: href attribute from <area>",
        ),
        (
            '<button formaction="javascript:x">b</button>',
            "<button>b</button>",
            "removed javascript: formaction attribute from <button>",
        ),
        (
            '<table background="javascript:x"><tr><td>t</td></tr></table>',
            "<table><tr><td>t</td></tr></table>",
            "removed javascript: background attribute from <table>",
        ),
        (
            '<blockquote cite="javascript:x">q</blockquote>',
            "<blockquote>q</blockquote>",
            "removed javascript: cite attribute from <blockquote>",
        ),
        (
            '<img src="https://e.com/a.png" srcset="https://e.com/a.png 1x, javascript:x 2x">',
            '<img src="https://e.com/a.png">',
            "removed javascript: srcset attribute from <img>",
        ),
        (
            '<img src="https://e.com/a.png" lowsrc="javascript:x">',
            '<img src="https://e.com/a.png">',
            "removed javascript: lowsrc attribute from <img>",
        ),
        (
            '<source src="data:video/mp4;base64,AA">',
            "<source></source>",
            "removed data: src attribute from <source>",
        ),
    ],
)
def test_every_url_attribute_goes_through_the_scheme_allow_list(
    html: str, kept: str, finding: str
) -> None:
    """href, xlink:href, src, srcset, action, formaction, background, cite… on any element:
    a disallowed scheme takes the attribute away, and the element stays."""
    root = fragment(html)
    assert _stripped(root) == [finding]
    assert html_of(root) == f"<div>{kept}</div>"


def test_safe_url_attributes_are_kept() -> None:
    """http(s), cid:, relative and fragment URLs stay, including a srcset whose URLs hold
    commas and a table background."""
    html = (
        '<img src="https://e.com/a.png" srcset="https://e.com/a,b.png 1x, /b.png 2x" alt="a">'
        '<table background="cid:bg"><tr><td background="https://e.com/bg.png">x</td></tr></table>'
        '<blockquote cite="https://e.com/q">q</blockquote><area href="#top" alt="top">'
    )
    root = fragment(html)
    assert _stripped(root) == []
    assert html_of(root) == f"<div>{html}</div>"


@pytest.mark.parametrize(
    ("style", "kind"),
    [
        ("background:url(javascript:alert(1))", "javascript:"),
        ("background:url( 'data:image/png;base64,AA' )", "data: url()"),
        ('background-image:URL("vbscript:x")', "vbscript:"),
        ("width:expression(alert(1))", "expression()"),
        ("width:ex\\70 ression(alert(1))", "expression()"),
        ("background:u\\72l(jav\\61script:x)", "javascript:"),
        ("width:expr/**/ession(alert(1))", "expression()"),
        ("font-family:'/*'; background:url(file:///etc/passwd); /*'*/", "file: url()"),
        ("background:url(ftp://e.com/a.png)", "ftp: url()"),
        ("background:url(javascript:x", "javascript:"),
        ("background:url(a b)", "unparsable url()"),
        ("-moz-binding:url(https://e.com/x.xml#x)", "-moz-binding"),
    ],
)
def test_styles_with_script_or_foreign_urls_are_removed(style: str, kind: str) -> None:
    """An inline style with javascript:, vbscript:, expression( or a url() that is not
    http(s), cid: or relative loses the whole style attribute, CSS escapes and comments
    notwithstanding; the element and its text stay."""
    root = fragment('<p class="c">s</p>')
    root[0].set("style", style)
    assert _stripped(root) == [f"removed style attribute with {kind} from <p>"]
    assert html_of(root) == '<div><p class="c">s</p></div>'


def test_ordinary_styles_are_kept() -> None:
    """Colours, http(s)/cid:/relative background images and quoted URLs are not active."""
    html = (
        "<p style='color:red; background:url(\"https://e.com/a.png\")'>a</p>"
        "<p style=\"background-image:url('cid:bg'), url(/img/b.png)\">b</p>"
    )
    root = fragment(html)
    assert _stripped(root) == []
    assert html_of(root) == f"<div>{html}</div>"
