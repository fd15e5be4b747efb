"""Markdown as bloggers write it, made readable by Python-Markdown.

Python-Markdown nests list items only at 4-space steps, while Hugo, Jekyll and
Quarto users often indent by 2. Rewriting the indentation of list blocks to
4-space steps (outside code) lets both nest, without a list extension whose
class-level settings leak between instances.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_ITEM = re.compile(r"^( *)([*+-]|\d{1,9}[.)])( +|$)")
_FENCE = re.compile(r"^ *(`{3,}|~{3,})")
_QUOTE = re.compile(r"^ {0,3}> ?")
MAX_QUOTE_DEPTH = 16


@dataclass
class _Item:
    marker_indent: int
    content_indent: int
    new_content_indent: int


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def normalise_list_indentation(source: str) -> str:
    """Re-indent nested list content to Python-Markdown's 4-space steps; lines count stays.

    Inside a blockquote too: Python-Markdown reads a quote's lines without their ``> ``
    marker, so a quote's content is normalised the same way and its markers put back.
    """
    return "\n".join(_normalise(source.expandtabs(4).split("\n")))


def _normalise(lines: list[str], depth: int = 0) -> list[str]:
    out: list[str] = []
    stack: list[_Item] = []
    fence: str | None = None
    shift = 0
    index = 0
    while index < len(lines):
        raw = lines[index]
        index += 1
        if fence is not None:
            out.append(_reindent(raw, shift))
            if raw.strip().startswith(fence):
                fence = None
            continue
        if not raw.strip():
            out.append(raw)
            continue
        indent = _indent(raw)
        in_list = bool(stack)
        while stack and indent < stack[-1].content_indent:
            stack.pop()
        if not stack and _QUOTE.match(raw):
            end = index
            while end < len(lines) and _QUOTE.match(lines[end]):
                end += 1
            out += _quote(lines[index - 1 : end], depth + 1)
            index = end
            continue
        item = _ITEM.match(raw)
        if item and (in_list or indent < 4):
            new_marker = stack[-1].new_content_indent if stack else indent
            content = indent + len(item.group(2)) + max(len(item.group(3)), 1)
            stack.append(_Item(indent, content, new_marker + 4))
            shift = new_marker - indent
        elif stack:
            shift = stack[-1].new_content_indent - stack[-1].content_indent
        else:
            shift = 0
        if (match := _FENCE.match(raw)) is not None:
            fence = match.group(1)
        out.append(_reindent(raw, shift))
    return out


def _quote(lines: list[str], depth: int) -> list[str]:
    """A blockquote's lines, normalised as Python-Markdown will read them: without their
    marker (``>`` and one optional space), which is then put back unchanged. Quotes nested
    deeper than :data:`MAX_QUOTE_DEPTH` (no writer's) are left as they are."""
    if depth > MAX_QUOTE_DEPTH:
        return lines
    markers = [_QUOTE.match(line).group(0) for line in lines]  # type: ignore[union-attr]
    inner = _normalise(
        [line[len(marker) :] for line, marker in zip(lines, markers, strict=True)], depth
    )
    return [marker + line for marker, line in zip(markers, inner, strict=True)]


def _reindent(line: str, shift: int) -> str:
    if shift == 0 or not line.strip():
        return line
    if shift > 0:
        return " " * shift + line
    return line[min(-shift, _indent(line)) :]
