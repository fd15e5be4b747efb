"""Python-Markdown's worst cases, bounded to time linear in the digest's length.

Python-Markdown was not written for text built to be slow, and several of its parsers
rescan the rest of a paragraph, or of the document, for every opener that is never
closed, or rebuild the whole paragraph for every match. The ones that a few kilobytes
turn into minutes are bounded here; the size limit of a digest
(:data:`newsletter.digest.MAX_DIGEST_BYTES`) bounds the rest.

Huge paragraphs. Each inline match (a link, an emphasis, an escape, an entity) rebuilds
the string of its whole paragraph (Python-Markdown issue #161), and each entity or
escape was then added to its element's text by copying all the text before it, so a
paragraph of n characters with a match every few of them cost n squared twice over. Text
longer than :data:`INLINE_CHUNK` characters, which no writer puts in one paragraph, is
parsed in chunks of about that size, cut at white space (a link or emphasis across a cut
stays literal text), and the pieces of an element's text are joined once.

Links. To find where a link's text ends, Python-Markdown scans from its ``[`` to the matching
``]``; to find its URL, from ``(`` to the matching ``)``. An opener that is never closed
is scanned to the end of its paragraph, and so is the next one, and the next
(Python-Markdown issue #798, open since 2019): 20 KB of ``[`` took over a minute, and
``[](``, ``[a](b`` or ``[x][`` runs behave alike.

Here every such scan of one conversion draws on a budget of a few characters per
character of the source. A real digest scans each character of its links about once or
twice and never comes near it; a text built to be slow exhausts it, after which its
remaining brackets stay literal text. The scans are Python-Markdown's own, so what a link
is does not change; finding the matching ``]`` jumps from bracket to bracket with a
regular expression instead of stepping through every character. Code spans (a backtick
run looks ahead for a run of the same length) draw on the same budget.

Footnote references: their pattern scans from each ``[^`` to the next ``]``; an id is
bounded to :data:`FOOTNOTE_ID_LIMIT` characters.

Unclosed fences and ``<``: the fenced-code pattern scans from each opening fence (```lang) line
that is never closed to the end of the document, and the standard library's HTML parser
(which Python-Markdown feeds the whole document) does the same from each ``<`` with no
``>`` after it. Neither is code or a tag, so when a digest has more than
:data:`UNCLOSED_LIMIT` of them, :func:`escape_unclosed` writes them as entities: the
same characters, shown literally (the backticks of an unclosed fence no longer pair up
into code spans, which in such a text is no loss).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as etree

from markdown import Markdown
from markdown.extensions import Extension
from markdown.extensions.fenced_code import FencedBlockPreprocessor
from markdown.extensions.footnotes import FootnoteInlineProcessor
from markdown.inlinepatterns import (
    BACKTICK_RE,
    IMAGE_LINK_RE,
    IMAGE_REFERENCE_RE,
    LINK_RE,
    REFERENCE_RE,
    BacktickInlineProcessor,
    ImageInlineProcessor,
    ImageReferenceInlineProcessor,
    LinkInlineProcessor,
    ReferenceInlineProcessor,
    ShortImageReferenceInlineProcessor,
    ShortReferenceInlineProcessor,
)
from markdown.preprocessors import Preprocessor
from markdown.treeprocessors import InlineProcessor
from markdown.util import ETX, INLINE_PLACEHOLDER_PREFIX, STX, AtomicString

SCANS_PER_CHARACTER = 4
MINIMUM_BUDGET = 64 * 1024
FOOTNOTE_ID_LIMIT = 256
UNCLOSED_LIMIT = 16  # more unclosed openers than this are no longer typos
INLINE_CHUNK = 32 * 1024

_BRACKET = re.compile(r"[\[\]]")
# Python-Markdown's private methods that _LinearInline overrides or calls.
_PRIVATE = ("handleInline", "processPlaceholders", "findPlaceholder", "processElementText")
_FOOTNOTE_RE = rf"\[\^([^\]]{{0,{FOOTNOTE_ID_LIMIT}}})\]"
# An opening fence as Python-Markdown's FencedBlockPreprocessor reads one (a whole line).
_OPENING_FENCE = re.compile(
    r"(?P<fence>~{3,}|`{3,})[ ]*((\{[^\n]*\})|(\.?[\w#.+-]*[ ]*)?"
    r"(hl_lines=(?P<quot>\"|')(.*?)(?P=quot)[ ]*)?)"
)
_ENTITY = {"`": "&#96;", "~": "&#126;", "<": "&lt;"}


class ScanBudget:
    """How many more characters link parsing may scan in the current conversion."""

    def __init__(self) -> None:
        self.remaining = MINIMUM_BUDGET

    def reset(self, source_length: int) -> None:
        self.remaining = SCANS_PER_CHARACTER * source_length + MINIMUM_BUDGET

    def spend(self, scanned: int) -> None:
        self.remaining = max(0, self.remaining - scanned)


class _Link(LinkInlineProcessor):
    """The scans of a link processor, charged to a shared :class:`ScanBudget`."""

    budget: ScanBudget

    def getText(self, data: str, index: int) -> tuple[str, int, bool]:
        stop = index + min(len(data) - index, self.budget.remaining)
        depth = 1
        for bracket in _BRACKET.finditer(data, index, stop):
            depth += 1 if bracket[0] == "[" else -1
            if depth == 0:
                end = bracket.start()
                self.budget.spend(end + 1 - index)
                return data[index:end], end + 1, True
        self.budget.spend(stop - index)
        return data[index:stop], stop, False

    def getLink(self, data: str, index: int) -> tuple[str, str | None, int, bool]:
        if not data.startswith("(", index):
            return super().getLink(data, index)  # not a link: refused without a scan
        allowed = min(len(data) - index, self.budget.remaining)
        if allowed < len(data) - index:
            if allowed <= 1:
                return "", None, index, False
            data = data[: index + allowed]
        href, title, end, handled = super().getLink(data, index)
        self.budget.spend((end if handled else len(data)) - index)
        return href, title, end, handled


class _Reference(_Link, ReferenceInlineProcessor):
    """Reference links (``[text][id]``, ``[id]``): the id's scan is charged too."""

    def evalId(self, data: str, index: int, text: str) -> tuple[str | None, int, bool]:
        if self.budget.remaining <= 0:
            return None, index, False
        found, end, handled = super().evalId(data, index, text)
        if handled:
            self.budget.spend(end - index)
        elif data[index : index + 2].lstrip().startswith("["):  # the regex ran to a `]` or the end
            close = data.find("]", index)
            self.budget.spend((close if close >= 0 else len(data)) - index)
        return found, end, handled


class _Backtick(BacktickInlineProcessor):
    """Code spans: the look-ahead for a closing run of backticks, charged to the budget."""

    budget: ScanBudget

    def find_code_spans(self, start: int, text: str) -> tuple[int, int | None]:
        allowed = min(len(text) - start, self.budget.remaining)
        if allowed < len(text) - start:
            ticks = len(text) - len(text[start:].lstrip("`")) - start
            if allowed <= ticks:
                return start + ticks, None  # out of budget: the run is literal backticks
            text = text[: start + allowed]
        first, end = super().find_code_spans(start, text)
        self.budget.spend((len(text) if end is None else end) - start)
        return first, end


class _Image(_Link, ImageInlineProcessor):
    pass


class _ImageReference(_Reference, ImageReferenceInlineProcessor):
    pass


class _ShortReference(_Reference, ShortReferenceInlineProcessor):
    pass


class _ShortImageReference(_Reference, ShortImageReferenceInlineProcessor):
    pass


# Python-Markdown's own names, patterns and priorities (markdown.inlinepatterns).
_PROCESSORS = (
    ("backtick", _Backtick, BACKTICK_RE, 190),
    ("reference", _Reference, REFERENCE_RE, 170),
    ("link", _Link, LINK_RE, 160),
    ("image_link", _Image, IMAGE_LINK_RE, 150),
    ("image_reference", _ImageReference, IMAGE_REFERENCE_RE, 140),
    ("short_reference", _ShortReference, REFERENCE_RE, 130),
    ("short_image_ref", _ShortImageReference, IMAGE_REFERENCE_RE, 125),
)


class _LinearInline(InlineProcessor):
    """Python-Markdown's inline tree processor, fed huge texts a chunk at a time and
    putting the text between stashed elements together once.

    Both override the base class's private, name-mangled methods (its own calls reach
    them under these names); :class:`MarkdownBounds` installs this class only if they exist.
    """

    def _InlineProcessor__handleInline(self, data: str, patternIndex: int = 0) -> str:
        handle = super()._InlineProcessor__handleInline  # type: ignore[misc]
        if len(data) <= INLINE_CHUNK:
            return handle(data, patternIndex)
        return "".join(handle(chunk, patternIndex) for chunk in _chunks(data))

    def _InlineProcessor__processPlaceholders(
        self, data: str | None, parent: etree.Element, isText: bool = True
    ) -> list[tuple[etree.Element, list[str]]]:
        # Python-Markdown's, except that its linkText() added each piece of text (an
        # entity, an escaped character) to the element's text with +=, which is quadratic
        # in their number: here the pieces wait in a list and are joined once.
        find = self._InlineProcessor__findPlaceholder  # type: ignore[attr-defined]
        process = self._InlineProcessor__processElementText  # type: ignore[attr-defined]
        result: list[tuple[etree.Element, list[str]]] = []
        pending: list[str] = []

        def flush() -> None:
            if not pending:
                return
            if result:
                target, attribute = result[-1][0], "tail"
            else:
                target, attribute = parent, "text" if isText else "tail"
            before = getattr(target, attribute)
            text = pending[0] if len(pending) == 1 else "".join(pending)
            setattr(target, attribute, text if not before else before + text)
            pending.clear()

        start = 0
        while data:
            index = data.find(INLINE_PLACEHOLDER_PREFIX, start)
            if index == -1:
                text = data[start:]
                pending.append(AtomicString(text) if isinstance(data, AtomicString) else text)
                break
            identifier, end = find(data, index)
            if identifier not in self.stashed_nodes:  # not a placeholder after all
                end = index + len(INLINE_PLACEHOLDER_PREFIX)
                pending.append(data[start:end])
                start = end
                continue
            node = self.stashed_nodes.get(identifier)
            if index > 0 and data[start:index]:
                pending.append(data[start:index])
            start = end
            if isinstance(node, str):
                pending.append(node)
                continue
            for child in [node, *node]:
                if child.tail and child.tail.strip():
                    process(node, child, False)
                if child.text and child.text.strip():
                    process(child, child)
            flush()
            result.append((node, self.ancestors[:]))
        flush()
        return result


def _chunks(data: str) -> list[str]:
    """``data`` in pieces of at most about :data:`INLINE_CHUNK`, cut after white space and
    never inside a stash placeholder (``STX…ETX``)."""
    pieces, start = [], 0
    while len(data) - start > INLINE_CHUNK:
        limit = start + INLINE_CHUNK
        cut = max(data.rfind(" ", start + 1, limit), data.rfind("\n", start + 1, limit)) + 1
        if cut <= start:
            cut = limit
        opened = data.rfind(STX, start, cut)
        if opened > start and data.find(ETX, opened, cut) == -1:
            cut = opened
        pieces.append(data[start:cut])
        start = cut
    pieces.append(data[start:])
    return pieces


class _SetBudget(Preprocessor):
    """Sizes the budget from the source, before any inline processor runs."""

    def __init__(self, md: Markdown, budget: ScanBudget) -> None:
        super().__init__(md)
        self.budget = budget

    def run(self, lines: list[str]) -> list[str]:
        self.budget.reset(sum(len(line) + 1 for line in lines))
        return lines


class MarkdownBounds(Extension):
    """Installs the bounds: budgeted link, image, reference and code-span processors, a
    bounded footnote pattern and the linear inline tree processor."""

    def extendMarkdown(self, md: Markdown) -> None:
        budget = ScanBudget()
        md.preprocessors.register(_SetBudget(md, budget), "newsletter_scan_budget", 1000)
        for name, processor, pattern, priority in _PROCESSORS:
            instance = processor(pattern) if processor is _Backtick else processor(pattern, md)
            instance.budget = budget
            md.inlinePatterns.register(instance, name, priority)
        if all(hasattr(InlineProcessor, f"_InlineProcessor__{name}") for name in _PRIVATE):
            md.treeprocessors.register(_LinearInline(md), "inline", 20)
        if "footnote" in md.inlinePatterns:  # the footnotes extension is loaded before this one
            footnotes = md.inlinePatterns["footnote"].footnotes
            bounded = FootnoteInlineProcessor(_FOOTNOTE_RE, footnotes)
            md.inlinePatterns.register(bounded, "footnote", 175)


def escape_unclosed(source: str) -> str:
    """``source`` with its unclosed fences and ``<`` written as entities, when it has more
    than :data:`UNCLOSED_LIMIT` of them; otherwise unchanged. Fences first: the pattern that
    finds fenced blocks, needed to tell where a ``<`` is code, is itself slow on them."""
    return _escape_unclosed_angles(_escape_unclosed_fences(source))


def _escape_unclosed_fences(source: str) -> str:
    lines = source.split("\n")
    last_closer: dict[str, int] = {}
    for index, line in enumerate(lines):
        if line[:3] in ("```", "~~~"):
            last_closer[line.rstrip(" ")] = index
    unclosed: list[int] = []
    closing: str | None = None
    for index, line in enumerate(lines):
        if closing is not None:
            if line.rstrip(" ") == closing:
                closing = None
            continue
        if line[:3] not in ("```", "~~~") or not (opening := _OPENING_FENCE.fullmatch(line)):
            continue
        if last_closer.get(opening["fence"], -1) > index:
            closing = opening["fence"]
        else:
            unclosed.append(index)
    if len(unclosed) <= UNCLOSED_LIMIT:
        return source
    for index in unclosed:
        fence = _OPENING_FENCE.match(lines[index])["fence"]
        lines[index] = _ENTITY[fence[0]] * len(fence) + lines[index][len(fence) :]
    return "\n".join(lines)


def _escape_unclosed_angles(source: str) -> str:
    # The stretches outside fenced blocks: what the HTML parser is fed.
    fenced = [match.span() for match in FencedBlockPreprocessor.FENCED_BLOCK_RE.finditer(source)]
    starts = [0, *(end for _, end in fenced)]
    ends = [*(start for start, _ in fenced), len(source)]
    last_close = max(source.rfind(">", a, b) for a, b in zip(starts, ends, strict=True))
    after = [(max(a, last_close + 1), b) for a, b in zip(starts, ends, strict=True)]
    after = [(a, b) for a, b in after if a < b]
    if sum(source.count("<", a, b) for a, b in after) <= UNCLOSED_LIMIT:
        return source
    pieces, position = [], 0
    for a, b in after:
        pieces += [source[position:a], source[a:b].replace("<", _ENTITY["<"])]
        position = b
    pieces.append(source[position:])
    return "".join(pieces)
