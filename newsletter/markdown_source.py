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


@dataclass
class _Item:
    marker_indent: int
    content_indent: int
    new_content_indent: int


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def normalise_list_indentation(source: str) -> str:
    """Re-indent nested list content to Python-Markdown's 4-space steps; lines count stays."""
    out: list[str] = []
    stack: list[_Item] = []
    fence: str | None = None
    shift = 0
    for raw in source.expandtabs(4).split("\n"):
        if fence is not None:
            out.append(_reindent(raw, shift))
            if raw.strip().startswith(fence):
                fence = None
            continue
        if not raw.strip():
            out.append(raw)
            continue
        indent = _indent(raw)
        item = _ITEM.match(raw)
        if item and (stack or indent < 4):
            while stack and indent < stack[-1].content_indent:
                stack.pop()
            new_marker = stack[-1].new_content_indent if stack else indent
            content = indent + len(item.group(2)) + max(len(item.group(3)), 1)
            stack.append(_Item(indent, content, new_marker + 4))
            shift = new_marker - indent
        elif stack:
            while stack and indent < stack[-1].content_indent:
                stack.pop()
            shift = stack[-1].new_content_indent - stack[-1].content_indent if stack else 0
        else:
            shift = 0
        if (match := _FENCE.match(raw)) is not None:
            fence = match.group(1)
        out.append(_reindent(raw, shift))
    return "\n".join(out)


def _reindent(line: str, shift: int) -> str:
    if shift == 0 or not line.strip():
        return line
    if shift > 0:
        return " " * shift + line
    return line[min(-shift, _indent(line)) :]
