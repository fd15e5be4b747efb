"""The plain-text alternative, built from the same cleaned tree as the HTML part.

Spam filters (SpamAssassin's MPART_ALT_DIFF) and text-only readers both want the
text part to say what the HTML says: same words, same links, videos as
"Video: TITLE URL".
"""

from __future__ import annotations

import re
import textwrap

from lxml import html as lxml_html

_BLOCKS = {
    "p",
    "div",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "ul",
    "ol",
    "pre",
    "blockquote",
    "table",
    "hr",
    "dl",
    "figure",
    "section",
    "article",
    "header",
    "footer",
}
_SPACES = re.compile(r"[ \t\r\n]+")
WIDTH = 76


def _inline(el: lxml_html.HtmlElement) -> str:
    """Text of an inline run, with links written out as 'text (URL)'."""
    parts: list[str] = [el.text or ""] if el.tag not in {"img", "br"} else []
    for child in el:
        parts.append(_inline_element(child))
        parts.append(child.tail or "")
    return "".join(parts)


def _inline_element(el: lxml_html.HtmlElement) -> str:
    tag = el.tag if isinstance(el.tag, str) else ""
    if tag == "br":
        return "\n"
    if tag == "img":
        alt = (el.get("alt") or "").strip()
        return f"[{alt}]" if alt else ""
    if tag == "a":
        return _link(el)
    if tag in {"script", "style"} or not tag:
        return ""
    return _inline(el)


def _link(el: lxml_html.HtmlElement) -> str:
    href = (el.get("href") or "").strip()
    label = _SPACES.sub(" ", _inline(el)).strip()
    klass = el.get("class") or ""
    if "nl-embed" in klass.split() and not label:
        return ""
    if "nl-embed-caption" in klass.split() or "nl-embed-card" in klass.split():
        title = label.split(":", 1)[-1].strip() if ":" in label else label
        return f"Video: {title} {href}".strip()
    if not href or href.startswith("#"):
        return label
    if href.startswith("mailto:"):
        address = href[len("mailto:") :]
        return label if label == address else f"{label} <{address}>"
    if not label or label == href:
        return href
    return f"{label} ({href})"


def _collapse(text: str) -> str:
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return "\n".join(line for line in lines if line)


def _wrap(text: str, prefix: str = "", first: str | None = None) -> str:
    out: list[str] = []
    head = prefix if first is None else first
    for index, line in enumerate(_collapse(text).split("\n")):
        lead = head if index == 0 else prefix
        out.append(
            textwrap.fill(
                line,
                WIDTH,
                initial_indent=lead,
                subsequent_indent=prefix,
                break_long_words=False,
                break_on_hyphens=False,
            )
        )
    return "\n".join(out)


def _blocks(el: lxml_html.HtmlElement, prefix: str = "") -> list[str]:
    """Block-level pieces of ``el``'s children, each already wrapped."""
    out: list[str] = []
    inline: list[str] = [el.text or ""]

    def flush() -> None:
        text = "".join(inline)
        if text.strip():
            out.append(_wrap(text, prefix))
        inline.clear()

    for child in el:
        tag = child.tag if isinstance(child.tag, str) else ""
        if tag in _BLOCKS or tag == "li":
            flush()
            out.extend(_block(child, prefix))
        else:
            inline.append(_inline_element(child))
        inline.append(child.tail or "")
    flush()
    return out


def _block(el: lxml_html.HtmlElement, prefix: str) -> list[str]:
    tag = el.tag
    if tag in {"h1", "h2"}:
        title = _collapse(_inline(el))
        return [
            f"{prefix}{title}\n{prefix}{('=' if tag == 'h1' else '-') * min(len(title), WIDTH)}"
        ]
    if tag in {"h3", "h4", "h5", "h6"}:
        return [f"{prefix}{_collapse(_inline(el)).upper()}"]
    if tag == "hr":
        return [f"{prefix}{'-' * 20}"]
    if tag == "pre":
        code = el.text_content().rstrip("\n")
        return ["\n".join(prefix + "    " + line for line in code.split("\n"))]
    if tag == "blockquote":
        return ["\n".join(_blocks(el, prefix + "> ")).replace("\n\n", f"\n{prefix}>\n")]
    if tag in {"ul", "ol"}:
        return [_list(el, prefix)]
    if tag == "table":
        rows = []
        for row in el.iter("tr"):
            cells = [_collapse(_inline(cell)) for cell in row if cell.tag in {"td", "th"}]
            rows.append(prefix + " | ".join(cells))
        return ["\n".join(rows)]
    return _blocks(el, prefix)


def _list(el: lxml_html.HtmlElement, prefix: str) -> str:
    items: list[str] = []
    ordered = el.tag == "ol"
    for number, li in enumerate((c for c in el if c.tag == "li"), start=1):
        bullet = f"{number}. " if ordered else "* "
        inner = _blocks(li, prefix + " " * len(bullet))
        if not inner:
            continue
        first = inner[0]
        first = prefix + bullet + first[len(prefix) + len(bullet) :]
        items.append("\n".join([first, *inner[1:]]))
    return "\n".join(items)


def html_to_text(root: lxml_html.HtmlElement) -> str:
    """Readable plain text of a cleaned body tree (headings, lists, links as URLs)."""
    return "\n\n".join(piece for piece in _blocks(root) if piece.strip()) + "\n"
