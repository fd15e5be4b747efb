"""Digest → finished email, rendered once per issue.

Markdown → HTML → embeds and active content cleaned → images resolved →
Jinja2 template → CSS inlined by premailer, plus the plain-text part. Personal
fields become opaque placeholders that survive premailer untouched, so each
recipient's copy is a cheap string substitution (:class:`Personalizer`).
"""

from __future__ import annotations

import hashlib
import html
import logging
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from functools import cache
from pathlib import Path
from typing import ClassVar
from urllib.parse import parse_qsl, urljoin, urlsplit

import markdown
from jinja2 import ChoiceLoader, Environment, FileSystemLoader, StrictUndefined, select_autoescape
from lxml import html as lxml_html
from markupsafe import Markup
from premailer import Premailer

from newsletter.config import Settings
from newsletter.digest import MUST_FIX, WARNING, Digest, Finding, LineFinder
from newsletter.embeds import (
    Embed,
    Removal,
    expand_shortcodes,
    replace_embeds,
    strip_active_content,
)
from newsletter.errors import DigestError
from newsletter.local_images import LocalImage, load_local_image
from newsletter.markdown_bounds import MarkdownBounds, escape_unclosed
from newsletter.markdown_source import normalise_list_indentation
from newsletter.permalink import permalink
from newsletter.plaintext import html_to_text

PERSONAL_FIELDS = ("name", "email", "unsubscribe_url")
GMAIL_CLIP_BYTES = 102 * 1024
HTML_LIMIT_BYTES = 100 * 1024
SAMPLE_RECIPIENT = {
    "name": "Sample Reader",
    "email": "reader@example.com",
    "unsubscribe_url": "https://example.com/unsubscribe/sample",
}

_PLACEHOLDER = re.compile(r"@@NL_([A-Z_]+)@@")
_SECTION = re.compile(r"@@NL_IF_([A-Z_]+)@@(.*?)@@NL_END_\1@@", re.DOTALL)
_DIGEST_FIELD = re.compile(r"\{\{\s*(name|email|unsubscribe_url)\s*\}\}")
_SAFE_SCHEMES = {"http", "https", "mailto", "cid"}
# Stands for the "View in browser" URL until the issue's slug is final (see with_slug).
_VIEW_MARK = "@@NL_VIEW_URL@@"


def placeholder(name: str) -> str:
    """The opaque token that stands for a personal field until a recipient is known."""
    return f"@@NL_{name.upper()}@@"


def if_set(field: str, caller: Callable[[], str]) -> str:
    """The ``if_set`` call block of the templates: what it wraps is kept for a recipient
    whose ``field`` is set and dropped for one whose field is empty, so a template can say
    ``{% call if_set("name") %}Hi {{ name }},{% endcall %}`` and nobody reads "Hi ,"."""
    inner = caller()
    opening, closing = f"@@NL_IF_{field.upper()}@@", f"@@NL_END_{field.upper()}@@"
    if isinstance(inner, Markup):
        return Markup(opening) + inner + Markup(closing)
    return opening + inner + closing


def keep_sections(text: str, present: Collection[str]) -> str:
    """``text`` with each ``if_set`` section of a field in ``present`` kept (its markers
    removed) and every other section dropped."""
    return _SECTION.sub(lambda m: m[2] if m[1].lower() in present else "", text)


class Personalizer:
    """A text pre-split at its placeholders: filling it is one ``str.join``.

    ``if_set`` sections are resolved first, once for each combination of fields set or
    empty that the recipients show."""

    __slots__ = ("_sections", "_text", "_variants")

    def __init__(self, text: str) -> None:
        self._text = text
        self._sections = tuple(sorted({m[1].lower() for m in _SECTION.finditer(text)}))
        self._variants: dict[frozenset[str], _Fields] = {}

    def fill(self, values: dict[str, str], escape: bool = False) -> str:
        """The text with each placeholder replaced by its value (HTML-escaped when asked)."""
        present = frozenset(f for f in self._sections if (values.get(f) or "").strip())
        variant = self._variants.get(present)
        if variant is None:
            variant = self._variants[present] = _Fields(keep_sections(self._text, present))
        return variant.fill(values, escape)


class _Fields:
    __slots__ = ("_fields", "_parts")

    def __init__(self, text: str) -> None:
        pieces = _PLACEHOLDER.split(text)
        self._parts = pieces
        self._fields = [piece.lower() for piece in pieces[1::2]]

    def fill(self, values: dict[str, str], escape: bool) -> str:
        parts = self._parts.copy()
        for index, name in enumerate(self._fields):
            value = values.get(name, "")
            parts[2 * index + 1] = html.escape(value) if escape else value
        return "".join(parts)


@dataclass(frozen=True)
class InlineImage:
    """A local image sent inside the message and referenced as ``cid:``."""

    cid: str
    filename: str
    content_type: str
    data: bytes


@dataclass(frozen=True)
class Link:
    """An http(s) link of the digest's body and the file lines it is written on."""

    url: str
    lines: tuple[int, ...]


@dataclass(frozen=True)
class IssuePage:
    """The issue as a web page: where it lives, and its content without the email's frame
    (no inline styles; personal fields as placeholders, local images as ``cid:``)."""

    slug: str
    listed: bool  # front matter ``archive`` (the issue may still be taken out later)
    canonical_url: str | None
    view_url: str | None  # the email's "View in browser" link; None: the email has none
    title: str
    byline: str | None
    body: str
    lang: str = "en"


@dataclass(frozen=True)
class RenderedIssue:
    """An issue rendered once: HTML and text with placeholders, and what to attach."""

    subject: str
    preheader: str | None
    html: str
    text: str
    images: tuple[InlineImage, ...] = ()
    embeds: tuple[Embed, ...] = ()
    findings: tuple[Finding, ...] = ()
    links: tuple[Link, ...] = ()
    page: IssuePage | None = None
    # html and text with the "View in browser" URL still a mark, for with_slug
    _marked: tuple[str, str] | None = field(default=None, repr=False, compare=False)
    _html_fill: Personalizer = field(init=False, repr=False, compare=False)
    _text_fill: Personalizer = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_html_fill", Personalizer(self.html))
        object.__setattr__(self, "_text_fill", Personalizer(self.text))

    def personalize(self, values: dict[str, str]) -> tuple[str, str]:
        """One recipient's (html, text); values are escaped in the HTML part."""
        return self._html_fill.fill(values, escape=True), self._text_fill.fill(values)

    def with_slug(self, slug: str) -> RenderedIssue:
        """The same issue living at archive page ``slug``: its "View in browser" link
        follows unless it points at the post's canonical URL."""
        page = self.page
        if page is None or slug == page.slug:
            return self
        view = page.view_url
        html_, text = self.html, self.text
        if view is not None and page.canonical_url is None and self._marked is not None:
            view = view[: len(view) - len(page.slug)] + slug
            html_, text = _fill_view(*self._marked, view)
        return replace(self, html=html_, text=text, page=replace(page, slug=slug, view_url=view))


def _fill_view(html_: str, text: str, url: str | None) -> tuple[str, str]:
    """HTML and text with the "View in browser" mark replaced by ``url``."""
    url = url or ""
    return html_.replace(_VIEW_MARK, html.escape(url)), text.replace(_VIEW_MARK, url)


def default_templates_dir() -> Path:
    """Templates shipped in the wheel, or the checkout's ``templates/`` in development."""
    packaged = Path(__file__).parent / "templates"
    return packaged if packaged.is_dir() else Path(__file__).parent.parent / "templates"


_MONTHS = (
    *("January", "February", "March", "April", "May", "June", "July"),
    *("August", "September", "October", "November", "December"),
)
# The calendar date at the start of what front matter holds: 2024-10-11, 2024-10-11T08:30:00+02:00,
# 2019-03-14 09:00:00 +0100 (Jekyll). The date as its author wrote it, in their own zone.
_DATE_PREFIX = re.compile(r"\s*(\d{4})-(\d{1,2})-(\d{1,2})(?!\d)")


def long_date(value: object) -> str:
    """A front matter date as a reader reads it (``11 October 2024``); what cannot be read
    as a date is shown as written. The ``long_date`` filter of every template."""
    if isinstance(value, datetime | date):
        day = value if not isinstance(value, datetime) else value.date()
    elif match := _DATE_PREFIX.match(str(value or "")):
        try:
            day = date(*(int(part) for part in match.groups()))
        except ValueError:
            return str(value)
    else:
        return "" if value is None else str(value)
    return f"{day.day} {_MONTHS[day.month - 1]} {day.year}"


@cache
def template_environment(override: Path | None = None) -> Environment:
    """Jinja2 environment: an override directory first, the shipped defaults behind it."""
    loaders = [FileSystemLoader(str(override))] if override else []
    loaders.append(FileSystemLoader(str(default_templates_dir())))
    environment = Environment(
        loader=ChoiceLoader(loaders),
        autoescape=select_autoescape(["html", "htm", "xml"]),
        undefined=StrictUndefined,
        keep_trailing_newline=True,
    )
    environment.filters["long_date"] = long_date
    environment.globals["if_set"] = if_set
    return environment


@cache
def _markdown() -> markdown.Markdown:
    return markdown.Markdown(
        extensions=["extra", "sane_lists", MarkdownBounds()],
        output_format="html",
    )


def markdown_to_html(source: str) -> str:
    """Markdown as bloggers write it (2- or 4-space nesting, shortcodes) to an HTML fragment."""
    md = _markdown()
    md.reset()
    try:
        return md.convert(escape_unclosed(normalise_list_indentation(expand_shortcodes(source))))
    except BaseException:
        _markdown.cache_clear()  # reset() does not undo a half-done parse (its state stack)
        raise


def _mark_personal_fields(root: lxml_html.HtmlElement) -> None:
    """Turn ``{{ name }}``-style fields in prose (not code) into placeholders."""
    for el in root.iter():
        if not isinstance(el.tag, str) or el.tag in {"code", "pre"}:
            continue
        inside_code = any(a.tag in {"code", "pre"} for a in el.iterancestors())
        if not inside_code and el.text:
            el.text = _DIGEST_FIELD.sub(lambda m: placeholder(m.group(1)), el.text)
        if el.tail and not (el.getparent() is not None and inside_code):
            el.tail = _DIGEST_FIELD.sub(lambda m: placeholder(m.group(1)), el.tail)


def _drop_title_heading(root: lxml_html.HtmlElement, title: str) -> None:
    """The template shows the title; a leading ``# Title`` in the body would repeat it."""
    first = root[0] if len(root) else None
    if first is not None and first.tag == "h1" and first.text_content().strip() == title:
        root.remove(first)


def _scheme(url: str) -> str | None:
    """The URL's scheme in lower case ("" for a relative one); None when it does not parse."""
    try:
        return urlsplit(url).scheme.lower()
    except ValueError:  # an unclosed IPv6 bracket, a bad port
        return None


def _url_needles(url: str) -> tuple[str, ...]:
    """How a URL may be written in the source: as is, HTML-escaped (raw ``<a href>``), or up
    to a parenthesis (Python-Markdown ends ``[x](javascript:f(1))`` early)."""
    return (url, html.escape(url, quote=False), url.split("(")[0])


def _check_links(root: lxml_html.HtmlElement, lines: LineFinder) -> list[Finding]:
    findings = []
    for link in root.iter("a"):
        href = (link.get("href") or "").strip()
        scheme = _scheme(href)
        if href and not href.startswith("#") and scheme not in _SAFE_SCHEMES:
            line = lines.line(*_url_needles(href), url=True)
            problem = "is not a valid URL" if scheme is None else "is not http(s) or mailto"
            findings.append(Finding(line, f"link {href!r} {problem}", MUST_FIX))
    return findings


def _body_links(root: lxml_html.HtmlElement, digest: Digest) -> list[Link]:
    """Each distinct http(s) link of the body, in order, with the lines that hold it."""
    urls = dict.fromkeys(
        href
        for a in root.iter("a")
        if _scheme(href := (a.get("href") or "").strip()) in {"http", "https"}
    )
    return [Link(url, digest.lines_of_url(url) or (_nearest_line(url, digest),)) for url in urls]


def _nearest_line(url: str, digest: Digest) -> int:
    """A line for a link written differently than it is sent (an embed's page, a video id)."""
    parts = urlsplit(url)
    tokens = [parts.netloc + parts.path, parts.path.rsplit("/", 1)[-1]]
    tokens += [value for _, value in parse_qsl(parts.query)]
    wanted = sorted((t for t in tokens if len(t) >= 6), key=len, reverse=True)
    return digest.lines().line(*wanted)


def _check_alt_text(root: lxml_html.HtmlElement, digest: Digest) -> list[Finding]:
    """Images without alt text: what readers with images blocked and screen readers miss."""
    lines = digest.lines()
    return [
        Finding(
            lines.line(src, url=True),
            f"image {src!r} has no alt text (shown when images are blocked, read aloud "
            "by screen readers)",
            WARNING,
        )
        for img in root.iter("img")
        if not ((img.get("alt") or "").strip())
        for src in [(img.get("src") or "").strip()]
    ]


def _removal_line(removal: Removal, lines: LineFinder) -> int:
    if removal.url:
        return lines.line(*_url_needles(removal.url), url=True)
    if removal.attribute is not None:
        return lines.line(f"{removal.attribute}=", removal.attribute, f"<{removal.tag}")
    return lines.line(f"<{removal.tag}")


def _resolve_images(
    root: lxml_html.HtmlElement, digest: Digest, lines: LineFinder, asset_base: str | None
) -> tuple[list[InlineImage], list[Finding]]:
    """Make every image absolute, inline (cid:) or gone, so no relative URL reaches a reader."""
    images: dict[Path, InlineImage] = {}
    findings: list[Finding] = []
    for img in list(root.iter("img")):
        src = (img.get("src") or "").strip()
        if _scheme(src) in {"http", "https", "cid"}:
            continue
        if src.startswith("//"):
            img.set("src", "https:" + src)
            continue
        if asset_base:
            img.set("src", urljoin(asset_base + "/", src.lstrip("/")))
            continue
        found = load_local_image(digest.path.parent, src)
        if isinstance(found, LocalImage):
            if found.path not in images:
                digest_of = hashlib.sha1(found.data).hexdigest()[:12]
                cid = f"img{len(images) + 1}.{digest_of}@newsletter"
                images[found.path] = InlineImage(
                    cid, found.path.name, found.content_type, found.data
                )
            img.set("src", f"cid:{images[found.path].cid}")
            continue
        line = lines.line(*_url_needles(src), url=True)
        findings.append(Finding(line, f"image {src!r} {found.reason}", MUST_FIX))
        _replace_with_text(img, img.get("alt") or "")
    return list(images.values()), findings


def _replace_with_text(el: lxml_html.HtmlElement, text: str) -> None:
    parent = el.getparent()
    joined = text + (el.tail or "")
    previous = el.getprevious()
    if previous is not None:
        previous.tail = (previous.tail or "") + joined
    else:
        parent.text = (parent.text or "") + joined
    parent.remove(el)


class _CachingPremailer(Premailer):
    """Premailer that formats each stylesheet's rules once per process, not once per render.

    The template's CSS is the same for every issue; re-serialising its rules through
    cssutils was half of the render time.
    """

    _rules_cache: ClassVar[dict[tuple[str, int], tuple]] = {}
    _leftover_css: ClassVar[dict[int, tuple[list, str]]] = {}

    def _parse_style_rules(self, css_body, ruleset_index):
        key = (css_body, ruleset_index)
        if key not in self._rules_cache:
            if len(self._rules_cache) > 64:
                self._rules_cache.clear()
            self._rules_cache[key] = super()._parse_style_rules(css_body, ruleset_index)
        return self._rules_cache[key]

    def _css_rules_to_string(self, rules):
        cached = self._leftover_css.get(id(rules))
        if cached is None or cached[0] is not rules:
            if len(self._leftover_css) > 64:
                self._leftover_css.clear()
            cached = (rules, super()._css_rules_to_string(rules))
            self._leftover_css[id(rules)] = cached
        return cached[1]


def _inline_css(document: str) -> str:
    return _CachingPremailer(
        document,
        strip_important=False,
        disable_basic_attributes=["width", "height"],
        cssutils_logging_level=logging.CRITICAL,
        allow_network=False,
        keep_style_tags=False,
        remove_classes=False,
        disable_validation=True,  # cssutils only logs what it finds: no output changes
    ).transform(pretty_print=False)


def render_issue(digest: Digest, settings: Settings) -> RenderedIssue:
    """Render a digest once: HTML and text with personal placeholders, images, findings."""
    try:
        body = markdown_to_html(digest.body)
    except RecursionError:  # Python-Markdown recurses once per level of nesting
        raise DigestError(
            f"{digest.path}: lists or quotes nest too deeply to render; flatten them"
        ) from None
    root = lxml_html.fragment_fromstring(body, create_parent="div")
    _drop_title_heading(root, digest.title)
    findings = list(digest.findings)
    lines = digest.lines()
    findings += _check_links(root, lines)
    for removal in strip_active_content(root):
        if removal.tag == "a" and removal.url is not None:
            continue  # a bad link is reported by _check_links
        findings.append(Finding(_removal_line(removal, lines), removal.message))
    embeds = replace_embeds(root)
    for embed in embeds:
        if not embed.known:
            line = lines.line(embed.url, urlsplit(embed.url).netloc)
            findings.append(Finding(line, f"embed from {embed.provider} turned into a link"))
    findings += _check_alt_text(root, digest)
    links = _body_links(root, digest)
    images, image_findings = _resolve_images(root, digest, lines, settings.asset_base_url)
    findings += image_findings
    _mark_personal_fields(root)
    body_html = _inner_html(root)
    link = permalink(digest, settings)
    page = IssuePage(
        slug=link.slug,
        listed=link.listed,
        canonical_url=link.canonical_url,
        view_url=link.view_url,
        title=digest.title,
        byline=_byline(digest.meta),
        body=_page_body(root),
        lang=str(digest.meta.get("lang") or "en"),
    )
    context = {
        "subject": digest.subject,
        "title": digest.title,
        "preheader": digest.preheader,
        "list_name": settings.list_name,
        "site_url": settings.site_url,
        "meta": digest.meta,
        "author": digest.meta.get("author"),
        "date": digest.meta.get("date"),
        "view_url": _VIEW_MARK if link.view_url else "",
        **{name: placeholder(name) for name in PERSONAL_FIELDS},
    }
    env = template_environment(settings.templates_dir)
    document = env.get_template("email.html").render(body=Markup(body_html), **context)
    marked = _inline_css(document)
    text_body = html_to_text(root)
    marked_text = env.get_template("email.txt").render(body=text_body, **context)
    inlined, text = _fill_view(marked, marked_text, link.view_url)
    size = len(inlined.encode("utf-8"))
    if size > HTML_LIMIT_BYTES:
        findings.append(
            Finding(
                digest.body_line,
                f"HTML part is {size // 1024} KB; Gmail clips messages over "
                f"{GMAIL_CLIP_BYTES // 1024} KB",
                MUST_FIX,
            )
        )
    return RenderedIssue(
        subject=digest.subject,
        preheader=digest.preheader,
        html=inlined,
        text=text,
        images=tuple(images),
        embeds=tuple(embeds),
        findings=tuple(sorted(findings, key=lambda finding: finding.line)),
        links=tuple(links),
        page=page,
        _marked=(marked, marked_text),
    )


def _inner_html(root: lxml_html.HtmlElement) -> str:
    body = "".join(lxml_html.tostring(child, encoding="unicode") for child in root)
    return (html.escape(root.text) if root.text else "") + body


def _page_body(root: lxml_html.HtmlElement) -> str:
    """The body for the web page: a page's Content-Security-Policy refuses inline styles,
    so the stylesheet styles it, by the same classes and elements as the email."""
    page = lxml_html.fragment_fromstring(_inner_html(root), create_parent="div")
    for el in page.iter():
        if isinstance(el.tag, str) and "style" in el.attrib:
            del el.attrib["style"]
    return _inner_html(page)


def _byline(meta: dict) -> str | None:
    """ "Author · date" as the email shows it under the title."""
    parts = [str(meta[key]) for key in ("author", "date") if meta.get(key)]
    return " · ".join(parts) or None
