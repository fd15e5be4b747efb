"""Video embeds into email-safe linked thumbnails, and active content out of digests.

Email clients show no iframes, run no scripts and drop forms, so a digest written for the web
must lose them before it is mailed. Everything here is pure: strings and lxml trees in, strings,
edited trees and findings out.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, replace
from urllib.parse import SplitResult, parse_qs, parse_qsl, quote, urlencode, urlsplit, urlunsplit

import lxml.html
from lxml.html import HtmlElement
from lxml.html.builder import CLASS, E

YOUTUBE_THUMBNAIL = "https://i.ytimg.com/vi/{id}/hqdefault.jpg"
VIMEO_THUMBNAIL = "https://vumbnail.com/{id}.jpg"
THUMBNAIL_WIDTH = "536"  # the 600 px layout less its side padding

_YOUTUBE_HOSTS = frozenset(
    {"youtube.com", "www.youtube.com", "m.youtube.com", "music.youtube.com", "youtu.be"}
    | {"youtube-nocookie.com", "www.youtube-nocookie.com"}
)
_YOUTUBE_PATHS = frozenset({"embed", "shorts", "live", "v", "e"})
_YOUTUBE_ID = re.compile(r"[A-Za-z0-9_-]{11}")
_VIMEO_ID = re.compile(r"[0-9]+")
_VIMEO_HASH = re.compile(r"[A-Za-z0-9]+")
_DURATION = re.compile(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s?)?")
_HOST_PREFIXES = ("www.", "player.", "embed.")
_LABELS = {"youtube": "YouTube", "vimeo": "Vimeo"}

_FENCE = re.compile(r"\s*(`{3,}|~{3,})(.*)")
_CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`).*?(?<!`)\1(?!`)")
_SHORTCODE = re.compile(
    r"\{\{(?P<open>[<%])(?P<hugo>.*?)(?P<close>[>%])\}\}|\{%-?(?P<liquid>.*?)-?%\}"
)
_NAMED_ARG = re.compile(r"([A-Za-z_][\w-]*)=(.*)", re.DOTALL)
_QUOTED_ID = re.compile(r"\bid\s*=\s*[\"']")
_INCLUDES = {"youtube.html": "youtube", "vimeo.html": "vimeo"}

_REMOVED_TAGS = frozenset(
    {"script", "style", "object", "embed", "form", "applet", "frame", "frameset"}
    | {"base", "link", "meta", "svg"}  # SVG: <a xlink:href>, <animate>, <set> run script
)
_HEAD_TAGS = frozenset({"style", "link", "meta"})
_MATH_ANNOTATIONS = frozenset({"annotation", "annotation-xml"})
_LINK_SCHEMES = frozenset({"", "http", "https", "mailto", "cid"})
_IMAGE_SCHEMES = frozenset({"", "http", "https", "cid"})
# Attributes (by local name, so xlink:href too) that a client may follow or fetch, and the
# schemes each may use. `<a href>` and `<img src>` are handled on their own, keeping text.
_URL_ATTRIBUTES = {
    **dict.fromkeys(("href", "action", "formaction", "cite", "longdesc"), _LINK_SCHEMES),
    **dict.fromkeys(("src", "background", "poster", "data", "lowsrc", "dynsrc"), _IMAGE_SCHEMES),
}
_SRCSET_ATTRIBUTES = frozenset({"srcset", "imagesrcset"})
_CSS_COMMENT = re.compile(r"/\*.*?(?:\*/|\Z)", re.DOTALL)
_CSS_ESCAPE = re.compile(r"\\(?:([0-9a-fA-F]{1,6})[ \t\r\n\f]?|(.))", re.DOTALL)
_CSS_URL_START = re.compile(r"url\(", re.IGNORECASE)
_CSS_URL = re.compile(r"url\(\s*(?:\"([^\"]*)\"|'([^']*)'|([^\"'()\s]*))\s*\)", re.IGNORECASE)
_CSS_SCRIPT = (
    "javascript:",
    "vbscript:",
    "livescript:",
    "expression(",
    "-moz-binding",
    "behavior:",
)


@dataclass(frozen=True)
class Embed:
    """One video embed as the email shows it: a link, and a thumbnail when one is known."""

    provider: str
    url: str
    thumbnail: str | None
    title: str
    known: bool
    line: int | None = None


@dataclass(frozen=True)
class Removal:
    """Something :func:`strip_active_content` took out of a digest, said for ``check``.

    ``tag`` is the element it was on, ``attribute`` the attribute that went (None when the
    whole element or only its link went), ``url`` the refused link or image address: what
    the caller needs to find its line in the source.
    """

    message: str
    tag: str
    attribute: str | None = None
    url: str | None = None


def classify(src: str, title: str | None = None) -> Embed | None:
    """Read an embed URL the way bloggers paste it; None when it is not an http(s) URL."""
    url = src.strip()
    if url.startswith("//"):
        url = "https:" + url
    parts = _split(url)
    host = (parts.hostname or "").lower() if parts else ""
    if parts is None or parts.scheme not in ("http", "https") or not host:
        return None
    name = " ".join((title or "").split())
    return _youtube(parts, host, name) or _vimeo(parts, host, name) or _other(url, host, name)


def _youtube(parts: SplitResult, host: str, title: str) -> Embed | None:
    if host not in _YOUTUBE_HOSTS:
        return None
    query = parse_qs(parts.query)
    segments = [segment for segment in parts.path.split("/") if segment]
    if host == "youtu.be" and len(segments) == 1:
        video_id = segments[0]
    elif host != "youtu.be" and len(segments) == 2 and segments[0] in _YOUTUBE_PATHS:
        video_id = segments[1]
    elif host != "youtu.be" and segments == ["watch"]:
        video_id = query.get("v", [""])[0]
    else:
        return None
    if video_id == "videoseries" or not _YOUTUBE_ID.fullmatch(video_id):
        return None
    url = f"https://www.youtube.com/watch?v={video_id}"
    if start := _start_seconds(parts):
        url += f"&t={start}s"
    thumbnail = YOUTUBE_THUMBNAIL.format(id=video_id)
    return Embed("youtube", url, thumbnail, title or "YouTube video", True)


def _vimeo(parts: SplitResult, host: str, title: str) -> Embed | None:
    segments = [segment for segment in parts.path.split("/") if segment]
    if host == "player.vimeo.com" and len(segments) == 2 and segments[0] == "video":
        video_id, secret = segments[1], parse_qs(parts.query).get("h", [""])[0]
    elif host in ("vimeo.com", "www.vimeo.com") and 1 <= len(segments) <= 2:
        video_id, secret = segments[0], (segments[1:] or [""])[0]
    else:
        return None
    if not _VIMEO_ID.fullmatch(video_id):
        return None
    url = f"https://vimeo.com/{video_id}"
    if _VIMEO_HASH.fullmatch(secret):
        url += f"/{secret}"
    if start := _start_seconds(parts):
        url += f"#t={start}s"
    thumbnail = VIMEO_THUMBNAIL.format(id=video_id)
    return Embed("vimeo", url, thumbnail, title or "Vimeo video", True)


def _other(url: str, host: str, title: str) -> Embed:
    provider = host
    for prefix in _HOST_PREFIXES:
        provider = provider.removeprefix(prefix)
    return Embed(provider, url, None, title or f"Video on {provider}", False)


def _start_seconds(parts: SplitResult) -> int | None:
    """Start time from ``t``/``start`` in the query or fragment, as players accept either."""
    for component in (parts.query, parts.fragment):
        params = parse_qs(component)
        for key in ("t", "start"):
            for value in params.get(key, []):
                if seconds := _seconds(value):
                    return seconds
    return None


def _seconds(value: str) -> int | None:
    match = _DURATION.fullmatch(value.strip().lower())
    if not match or not any(match.groups()):
        return None
    hours, minutes, seconds = (int(group or 0) for group in match.groups())
    return hours * 3600 + minutes * 60 + seconds or None


def expand_shortcodes(source: str) -> str:
    """Turn video shortcodes into iframes outside code, so one embed path handles them all.

    Works line by line and never adds or removes a line, so later line numbers still point
    into the digest file.
    """
    lines = source.split("\n")
    fence: tuple[str, int] | None = None
    for index, line in enumerate(lines):
        match = _FENCE.fullmatch(line)
        marker, info = (match[1], match[2]) if match else ("", "")
        if fence is not None:
            if marker[:1] == fence[0] and len(marker) >= fence[1] and not info.strip():
                fence = None
            lines[index] = _rewrite(line, in_code=True)
        elif marker and not (marker[0] == "`" and "`" in info):
            fence = (marker[0], len(marker))
            lines[index] = _rewrite(line, in_code=True)
        else:
            lines[index] = _outside_code_spans(line)
    return "\n".join(lines)


def _outside_code_spans(line: str) -> str:
    """Rewrite a line, treating `…`/``…`` spans (CommonMark's matching backtick runs) as code."""
    pieces, start = [], 0
    for span in _CODE_SPAN.finditer(line):
        pieces += [_rewrite(line[start : span.start()], False), _rewrite(span[0], True)]
        start = span.end()
    return "".join([*pieces, _rewrite(line[start:], False)])


def _rewrite(text: str, in_code: bool) -> str:
    """Hugo's ``{{</* x */>}}`` means literal even inside code; real shortcodes only outside."""

    def substitute(match: re.Match[str]) -> str:
        if match["open"]:
            body = match["hugo"].strip()
            if len(body) >= 4 and body.startswith("/*") and body.endswith("*/"):
                return "{{" + match["open"] + body[2:-2] + match["close"] + "}}"
            if not in_code and match["open"] + match["close"] in ("<>", "%%"):
                return _shortcode(body.removesuffix("/"), liquid=False) or match[0]
        elif not in_code:
            return _shortcode(match["liquid"], liquid=True) or match[0]
        return match[0]

    return _SHORTCODE.sub(substitute, text)


def _arguments(body: str) -> tuple[str, list[str], dict[str, str]] | None:
    try:
        tokens = shlex.split(body)
    except ValueError:
        return None
    if not tokens:
        return None
    positional: list[str] = []
    named: dict[str, str] = {}
    for token in tokens[1:]:
        if match := _NAMED_ARG.fullmatch(token):
            named[match[1].lower()] = match[2]
        else:
            positional.append(token)
    return tokens[0].lower(), positional, named


def _shortcode(body: str, liquid: bool) -> str | None:
    """The iframe for a video shortcode's body, or None to leave the text as written."""
    parsed = _arguments(body)
    if parsed is None:
        return None
    name, positional, named = parsed
    value = named.get("id") or named.get("src") or (positional or [""])[0]
    if liquid and name == "include":
        include = positional[0].lower() if positional else ""
        provider = named.get("provider", "") if include in ("video", "video.html") else ""
        name = _INCLUDES.get(include, provider.lower())
        value = named.get("id", "") if _QUOTED_ID.search(body) else ""
    if not value or (name not in _LABELS and name != "video"):
        return None
    src = value if name == "video" else _provider_src(name, value)
    return _iframe(src, named.get("start"), named.get("title"))


def _provider_src(provider: str, value: str) -> str:
    if "/" in value:
        return value
    if provider == "vimeo":
        return f"https://player.vimeo.com/video/{quote(value, safe='')}"
    return f"https://www.youtube.com/embed/{quote(value, safe='')}"


def _iframe(src: str, start: str | None, title: str | None) -> str:
    """An iframe in Markdown, built by lxml so quotes in titles are escaped for us."""
    seconds, parts = _seconds(start or ""), _split(src)
    if seconds and parts:
        query = [(key, value) for key, value in parse_qsl(parts.query) if key not in ("t", "start")]
        src = urlunsplit(parts._replace(query=urlencode([*query, ("start", seconds)])))
    attributes = {"src": src, "title": title} if title else {"src": src}
    return lxml.html.tostring(E.iframe(**attributes), encoding="unicode")


def replace_embeds(root: HtmlElement) -> list[Embed]:
    """Replace every iframe and video with inline link markup that stays inside its <p>/<li>.

    Returns the embeds in document order; an embed without a usable URL is simply removed.
    """
    embeds: list[Embed] = []
    for element in list(root.iter("iframe", "video")):
        if not any(ancestor is root for ancestor in element.iterancestors()):
            continue
        if embed := _embed_for(element):
            embeds.append(embed)
            nodes = _markup(embed)
            for node in [E.p(*nodes)] if element.getparent() is root else nodes:
                element.addprevious(node)
        element.drop_tree()
    return embeds


def _embed_for(element: HtmlElement) -> Embed | None:
    candidates = [element.get("src"), element.get("data-src")]
    if element.tag == "video":
        candidates = [element.get("src")] + [source.get("src") for source in element.iter("source")]
    for src in candidates:
        if src and (embed := classify(src, element.get("title"))):
            poster = _split((element.get("poster") or "").strip())
            if embed.thumbnail is None and poster and poster.scheme in ("http", "https"):
                embed = replace(embed, thumbnail=poster.geturl())
            return replace(embed, line=element.sourceline)
    return None


def _markup(embed: Embed) -> list[HtmlElement]:
    label = _LABELS.get(embed.provider, embed.provider)
    defaults = {f"{label} video", f"Video on {embed.provider}"}
    caption = f"▶ Watch on {label}" + ("" if embed.title in defaults else f": {embed.title}")
    if embed.thumbnail is None:
        return [E.a(CLASS("nl-embed-card"), caption, href=embed.url)]
    image = E.img(
        CLASS("nl-embed-img"),
        src=embed.thumbnail,
        alt=f"Video: {embed.title}",
        width=THUMBNAIL_WIDTH,
    )
    return [
        E.a(CLASS("nl-embed"), image, href=embed.url),
        E.br(),
        E.a(CLASS("nl-embed-caption"), caption, href=embed.url),
    ]


def strip_active_content(root: HtmlElement) -> list[Removal]:
    """Remove what an email must not carry (scripts, forms, SVG, handlers, script URLs), in place.

    Every attribute a client could follow or fetch goes through one scheme allow-list, and
    so does every ``url()`` of an inline style, because a ``javascript:`` URL hidden in
    MathML, SVG or CSS is just as live as one in ``<a href>``. Iframes and videos are left
    to ``replace_embeds``, so the two can run in either order. Returns one
    :class:`Removal` per thing removed, in document order.
    """
    findings: list[Removal] = []
    for element in list(root.iter()):
        if not isinstance(element.tag, str) or not any(a is root for a in element.iterancestors()):
            continue
        tag = _local(element.tag)
        in_head = any(ancestor.tag == "head" for ancestor in element.iterancestors())
        if tag in _REMOVED_TAGS and not (in_head and tag in _HEAD_TAGS):
            findings.append(Removal(f"removed <{tag}>", tag))
            element.drop_tree()
            continue
        if tag == "math":  # few clients show MathML; its words read fine as text
            findings.append(Removal("removed <math> markup, keeping its text", tag))
            for annotation in [e for e in element.iter() if _local(e.tag) in _MATH_ANNOTATIONS]:
                annotation.drop_tree()  # the TeX source would repeat the formula
            element.tail = element.text_content() + (element.tail or "")
            element.drop_tree()
            continue
        findings += _strip_attributes(element, tag)
        if tag == "a" and (kind := _disallowed(element.get("href"), _LINK_SCHEMES)):
            message = f"removed {kind} link '{_snippet(element.text_content())}'"
            findings.append(Removal(message, tag, url=element.get("href")))
            element.drop_tag()
        elif tag == "img" and (kind := _disallowed(element.get("src"), _IMAGE_SCHEMES)):
            alt = element.get("alt", "")
            findings.append(
                Removal(f"removed {kind} image '{_snippet(alt)}'", tag, url=element.get("src"))
            )
            element.tail = alt + (element.tail or "")
            element.drop_tree()
        elif tag == "noscript":
            element.drop_tag()
    return findings


def _strip_attributes(element: HtmlElement, tag: str) -> list[Removal]:
    """Drop event handlers, script-bearing styles and URL attributes with a scheme that is
    not allowed; ``<a href>`` and ``<img src>`` are left to the caller, which keeps text."""
    findings: list[Removal] = []
    for name in list(element.attrib):
        local = _local(name)
        value = element.attrib[name]
        if local.startswith("on"):
            reason = f"removed {name} attribute from <{tag}>"
        elif local == "style" and (kind := _unsafe_style(value)):
            reason = f"removed style attribute with {kind} from <{tag}>"
        elif (tag, name) in (("a", "href"), ("img", "src")):
            continue
        elif kind := _url_problem(local, value):
            reason = f"removed {kind} {name} attribute from <{tag}>"
        else:
            continue
        del element.attrib[name]
        findings.append(Removal(reason, tag, attribute=local))
    return findings


def _url_problem(local: str, value: str) -> str | None:
    """The disallowed scheme of a URL-bearing attribute's value, or None."""
    if local in _URL_ATTRIBUTES:
        return _disallowed(value, _URL_ATTRIBUTES[local])
    if local in _SRCSET_ATTRIBUTES:
        return _disallowed_srcset(value)
    return None


def _local(name: str) -> str:
    """``svg:a``, ``xlink:href`` or ``{namespace}href`` without its prefix, in lower case."""
    return name.rsplit("}", 1)[-1].rsplit(":", 1)[-1].lower()


def _unsafe_style(style: str) -> str | None:
    """What makes an inline style run script or fetch a non-http(s) URL, as a short label;
    None for an ordinary style. CSS escapes are undone first, as a client would; comments
    are read both as comments and as text, since inside a string they are not comments."""
    unescaped = _CSS_ESCAPE.sub(_css_unescape, style)
    for css in (unescaped, _CSS_ESCAPE.sub(_css_unescape, _CSS_COMMENT.sub("", style))):
        squeezed = re.sub(r"[\s\x00]+", "", css).lower()
        for keyword in _CSS_SCRIPT:
            if keyword in squeezed:
                return keyword.removesuffix("(") + ("()" if keyword.endswith("(") else "")
        position = 0
        while found := _CSS_URL_START.search(css, position):
            match = _CSS_URL.match(css, found.start())
            if match is None:
                return "unparsable url()"
            url = next(group for group in match.groups() if group is not None)
            if kind := _disallowed(url, _IMAGE_SCHEMES):
                return f"{kind} url()"
            position = match.end()
    return None


def _css_unescape(match: re.Match[str]) -> str:
    if match[1] is None:
        return match[2]
    code = int(match[1], 16)
    return chr(code) if 0 < code <= 0x10FFFF and not 0xD800 <= code <= 0xDFFF else "\ufffd"


def _disallowed_srcset(srcset: str) -> str | None:
    """The first disallowed scheme among a ``srcset``'s candidate URLs, or None."""
    for candidate in _srcset_urls(srcset):
        if kind := _disallowed(candidate, _IMAGE_SCHEMES):
            return kind
    return None


def _srcset_urls(srcset: str) -> list[str]:
    """The URLs of ``url [descriptor], …`` candidates, read as the HTML standard does: a URL
    may itself contain commas (``data:``), so only a comma after whitespace or at its end
    ends one."""
    urls: list[str] = []
    position, length = 0, len(srcset)
    while position < length:
        while position < length and (srcset[position].isspace() or srcset[position] == ","):
            position += 1
        start = position
        while position < length and not srcset[position].isspace():
            position += 1
        url = srcset[start:position]
        if url.endswith(","):
            url = url.rstrip(",")
        else:
            while position < length and srcset[position] != ",":
                position += 1
        if url:
            urls.append(url)
    return urls


def _disallowed(url: str | None, allowed: frozenset[str]) -> str | None:
    """A label such as "javascript:" when the URL's scheme is not allowed; None when it is."""
    url = (url or "").strip()
    parts = _split(url)
    if url.startswith("#") or (parts and parts.scheme in allowed):
        return None
    return f"{parts.scheme}:" if parts else "unparsable"


def _split(url: str) -> SplitResult | None:
    try:
        return urlsplit(url)
    except ValueError:
        return None


def _snippet(text: str, limit: int = 40) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
