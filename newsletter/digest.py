"""Reading a digest file: encoding, mojibake repair, front matter, subject.

Repair happens line by line on the raw text *before* the front matter is parsed,
so the title is repaired too and every repair can be reported with the line
number a user sees in their editor (front matter included).
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import ftfy
import yaml

from newsletter.errors import DigestError

# Gmail clips an email at 102 KB, so a digest over this is no newsletter, and Python-Markdown
# has quadratic corners (newsletter.markdown_bounds): the limit keeps any render to seconds.
MAX_DIGEST_BYTES = 256 * 1024

# Severities of a finding, as `newsletter check` maps them to exit codes.
FIXED = "fixed"  # repaired automatically: exit 0, reported as a warning
MUST_FIX = "must-fix"  # renders, but must be fixed before sending: exit 1
WARNING = "warning"  # worth a look, nothing was changed: exit 0, reported as a warning

_NON_ASCII_RUN = re.compile(r"[^\x00-\x7f]+")
_HEADING = re.compile(r"^#\s+(.+?)\s*#*\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")
_FENCE_MARK = re.compile(r"^\s*(`{3,}|~{3,})")
_URL_STARTS = frozenset("(<\"'= \t")
_CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`).*?(?<!`)\1(?!`)")
# Control characters a subject or preheader must not carry: C0 but tab (whitespace, collapsed
# like a space), DEL, C1 (NEL among them) and the Unicode line and paragraph separators. A CR
# or LF in a subject is how a header is smuggled into a message.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
_HEADER_FIELDS = ("subject", "title", "description")  # description becomes the preheader
_INJECTION = "control characters (a header-injection attempt?) are not allowed"
# Characters that continue a URL: a match of one URL inside a longer one is not where it is.
_URL_BEFORE = r"(?<![\w/?#&=%+.:@~-])"
_URL_AFTER = r"(?![\w/?#&=%+@~-]|\.\w)"
# What no digest may hold anywhere: C0 controls but tab and the line breaks, and what XML 1.0
# (so lxml, so every HTML step) refuses. An ESC pasted from a terminal is a typo to point at,
# not a reason for a traceback.
_NOT_TEXT = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff\ud800-\udfff]")
_C0_NAMES = (
    *("NUL", "SOH", "STX", "ETX", "EOT", "ENQ", "ACK", "BEL", "BS", "HT", "LF", "VT"),
    *("FF", "CR", "SO", "SI", "DLE", "DC1", "DC2", "DC3", "DC4", "NAK", "SYN", "ETB"),
    *("CAN", "EM", "SUB", "ESC", "FS", "GS", "RS", "US"),
)
# Lines end as an editor counts them: LF, CRLF or a lone CR. Not at FF, NEL or U+2028, which
# str.splitlines() also splits at and which would shift every line number after them.
_LINE_END = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True)
class Finding:
    """One thing `check` reports about a digest, at a line of the file."""

    line: int
    message: str
    severity: str = FIXED


@dataclass
class Digest:
    """A parsed digest: front matter, Markdown body and what was repaired on the way."""

    path: Path
    meta: dict
    body: str
    body_line: int
    subject: str
    preheader: str | None
    findings: list[Finding] = field(default_factory=list)
    source: str = ""

    @property
    def content_hash(self) -> str:
        """Identity of the content, for 'this was already sent' across renames."""
        return hashlib.sha256(self.source.encode("utf-8")).hexdigest()

    @property
    def title(self) -> str:
        return " ".join(str(self.meta.get("title") or self.subject).split())

    def lines(self) -> LineFinder:
        """A fresh :class:`LineFinder` over this digest's body."""
        return LineFinder(self.body, self.body_line)

    def field_line(self, key: str) -> int:
        """File line of front matter field ``key``, for an error about its value."""
        return _field_line(self.source.splitlines(), self.body_line - 1, key)

    def lines_of_url(self, url: str) -> tuple[int, ...]:
        """File lines where ``url`` is written whole (plain or ``&amp;``-escaped), outside
        fenced code: where a reader of `check` must edit it."""
        variants = {url, url.replace("&", "&amp;")}
        pattern = re.compile(
            _URL_BEFORE + "(?:" + "|".join(map(re.escape, variants)) + ")" + _URL_AFTER
        )
        found = []
        in_code = False
        for offset, text in enumerate(self.body.splitlines()):
            if _FENCE.match(text):
                in_code = not in_code
            elif not in_code and pattern.search(text):
                found.append(self.body_line + offset)
        return tuple(found)


class LineFinder:
    """The file line each element of the rendered HTML came from, found by what it carries.

    Python-Markdown keeps no source positions, so an element is placed by searching the
    body for a needle (its URL, its tag, its attribute). The HTML keeps the source's order,
    so each needle's search goes on after its previous occurrence: the second of two
    identical bad links is reported at its own line, not the first's. Fenced code and code
    spans are not searched (nothing in them becomes an element, but they often *mention*
    ``<script>``), and case is ignored, as HTML does for tags and schemes.
    """

    def __init__(self, body: str, first_line: int) -> None:
        self._first = first_line
        self._lines = _searchable(split_lines(body))
        self._after: dict[str, tuple[int, int]] = {}

    def line(self, *needles: str | None, url: bool = False) -> int:
        """File line of the next occurrence of the first needle that occurs at all; the
        body's first line when none does. A ``url`` needle must start a URL (after ``(``,
        a quote, ``<``, ``=`` or a space), so ``.env`` is not found inside ``../.env``."""
        for needle in needles:
            key = (needle or "").strip().lower()
            if key and (found := self._next(key, url)) is not None:
                return self._first + found
        return self._first

    def _next(self, key: str, url: bool) -> int | None:
        line, column = self._after.get(key, (0, 0))
        for start_line, start_column in ((line, column), (0, 0)):  # then from the top again
            for index in range(start_line, len(self._lines)):
                text = self._lines[index]
                at = text.find(key, start_column if index == start_line else 0)
                while url and at > 0 and text[at - 1] not in _URL_STARTS:
                    at = text.find(key, at + 1)
                if at >= 0:
                    self._after[key] = (index, at + len(key))
                    return index
        return None


def _searchable(lines: list[str]) -> list[str]:
    """Lower-cased lines with fenced code and code spans blanked (same columns, same count)."""
    out: list[str] = []
    fence: str | None = None
    for line in lines:
        marker = _FENCE_MARK.match(line)
        if fence is not None:
            if marker and marker[1].startswith(fence):
                fence = None
            out.append("")
        elif marker:
            fence = marker[1]
            out.append("")
        else:
            out.append(_CODE_SPAN.sub(lambda m: " " * len(m[0]), line).lower())
    return out


def _repair_mac_roman(text: str) -> str:
    """Re-decode non-ASCII runs that are UTF-8 bytes read as Mac Roman (ftfy misses U+F8FF)."""

    def fix(match: re.Match[str]) -> str:
        run = match.group(0)
        try:
            return run.encode("mac_roman").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            return run

    return _NON_ASCII_RUN.sub(fix, text)


def repair_line(line: str) -> str:
    """Undo mojibake in one line without touching correct text (no quote straightening)."""
    if line.isascii():
        return line
    return _repair_mac_roman(ftfy.fix_encoding(line))


def _decode(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DigestError(
            f"{path}:{line}: not UTF-8 (byte 0x{raw[exc.start]:02x}); save the file as UTF-8"
        ) from None


def split_lines(text: str) -> list[str]:
    """The lines of ``text`` as an editor numbers them (no empty line after a final break)."""
    lines = _LINE_END.split(text)
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _character(char: str) -> str:
    code = ord(char)
    name = f" ({_C0_NAMES[code]})" if code < len(_C0_NAMES) else ""
    return f"U+{code:04X}{name}"


def _refuse_control_characters(lines: list[str], path: Path) -> None:
    for number, line in enumerate(lines, start=1):
        if match := _NOT_TEXT.search(line):
            raise DigestError(
                f"{path}:{number}: control character {_character(match[0])} at column "
                f"{match.start() + 1}; a digest is text, remove it"
            )


def _refuse_control_characters_in_meta(
    value: object, key: str, where: Callable[[str], str]
) -> None:
    """Front matter values reach the template, so YAML escapes such as ``"\\e"`` count too."""
    if isinstance(value, dict):
        for item in value.values():
            _refuse_control_characters_in_meta(item, key, where)
    elif isinstance(value, list):
        for item in value:
            _refuse_control_characters_in_meta(item, key, where)
    elif isinstance(value, str) and (match := _NOT_TEXT.search(value)):
        raise DigestError(
            f"{where(key)}: front matter field {key!r}: control character "
            f"{_character(match[0])}; remove it"
        )


def _one_line(message: str) -> str:
    return " ".join(message.split())


def _split_front_matter(lines: list[str], path: Path) -> tuple[dict, int]:
    """Return the front matter mapping and the 0-based index of the first body line."""
    if not lines or lines[0].strip() not in {"---", "+++"}:
        return {}, 0
    fence = lines[0].strip()
    closers = {"---", "..."} if fence == "---" else {"+++"}
    for end in range(1, len(lines)):
        if lines[end].strip() in closers:
            break
    else:
        raise DigestError(f"{path}:1: front matter opened with {fence} is never closed")
    text = "\n".join(lines[1:end])
    if fence == "+++":
        try:
            meta = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise DigestError(f"{path}:2: front matter (TOML): {_one_line(str(exc))}") from None
    else:
        try:
            meta = yaml.load(text, Loader=yaml.BaseLoader) if text.strip() else {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = 2 + (mark.line if mark is not None else 0)
            problem = getattr(exc, "problem", None) or str(exc)
            raise DigestError(f"{path}:{line}: front matter (YAML): {_one_line(problem)}") from None
    if not isinstance(meta, dict):
        raise DigestError(f"{path}:2: front matter must be key: value pairs")
    return meta, end + 1


def _field_line(lines: list[str], body_index: int, key: str) -> int:
    """File line of top-level front matter ``key`` (the front matter's first line when it
    cannot be told), so an error points where the user must edit."""
    front = lines[1 : body_index - 1]
    if lines[0].strip() == "---":
        try:
            node = yaml.compose("\n".join(front), Loader=yaml.BaseLoader)
        except yaml.YAMLError:
            return 2
        if isinstance(node, yaml.MappingNode):
            found = [k.start_mark.line for k, _ in node.value if k.value == key]
            return 2 + found[-1] if found else 2  # YAML keeps the last of repeated keys
        return 2
    quoted = "|".join(re.escape(f"{q}{key}{q}") for q in ("", '"', "'"))
    assignment = re.compile(rf"\s*(?:{quoted})\s*=")
    for offset, line in enumerate(front):
        if line.lstrip().startswith("["):  # a table: the keys after it are not top-level
            break
        if assignment.match(line):
            return 2 + offset
    return 2


def _scalar(meta: dict, key: str, where: Callable[[str], str]) -> str | None:
    """A front matter field as one line of text; None when absent or empty.

    Leading and trailing line breaks (a YAML ``|`` or ``>`` block ends with one) are
    dropped, tabs and runs of spaces collapse, but a control character inside the text is
    refused rather than collapsed: a subject must say what its author typed, and a CR or LF
    in it is an attempt to add a header, not a typo to tidy away.
    """
    value = meta.get(key)
    if value is None or value == "":
        return None
    if isinstance(value, list | dict):
        raise DigestError(f"{where(key)}: front matter field {key!r} must be text")
    text = str(value).strip(" \t\r\n")
    if _CONTROL.search(text):
        raise DigestError(f"{where(key)}: front matter field {key!r}: {_INJECTION}")
    return " ".join(text.split()) or None


def _first_heading(lines: list[str]) -> tuple[str, int] | None:
    """The first ``#`` heading outside fenced code, and its index in ``lines``."""
    in_code = False
    for index, line in enumerate(lines):
        if _FENCE.match(line):
            in_code = not in_code
        elif not in_code and (match := _HEADING.match(line)):
            return match.group(1), index
    return None


def _too_big(path: Path, size: int) -> DigestError:
    limit = MAX_DIGEST_BYTES // 1024
    amount = f"{size // 1024} KB" if size // 1024 > limit else f"over {limit} KB"
    return DigestError(
        f"{path}: {amount}; a digest may have {limit} KB at most "
        "(Gmail clips an email at 102 KB): split it"
    )


def parse_digest(text: str, path: Path | str = "<digest>") -> Digest:
    """Parse digest text (already decoded) into a :class:`Digest`, repairing mojibake."""
    path = Path(path)
    if (size := len(text.encode("utf-8", "surrogatepass"))) > MAX_DIGEST_BYTES:
        raise _too_big(path, size)
    findings: list[Finding] = []
    lines = split_lines(text)
    for number, line in enumerate(lines, start=1):
        fixed = repair_line(line)
        if fixed != line:
            findings.append(Finding(number, f"repaired mojibake: {_changed(line, fixed)}"))
            lines[number - 1] = fixed
    meta, body_index = _split_front_matter(lines, path)
    body_lines = lines[body_index:]

    def where(key: str) -> str:
        return f"{path}:{_field_line(lines, body_index, key)}"

    # Every field that reaches a header or the inbox preview is checked, used or not.
    subject, title, preheader = (_scalar(meta, key, where) for key in _HEADER_FIELDS)
    for key, value in meta.items():
        _refuse_control_characters_in_meta(value, str(key), where)
    subject = subject or title
    if not subject and (heading := _first_heading(body_lines)):
        text, index = heading
        if _CONTROL.search(text):
            raise DigestError(f"{path}:{body_index + index + 1}: heading: {_INJECTION}")
        subject = " ".join(text.split())
    if not subject:
        raise DigestError(
            f"{path}:1: no title: add 'title:' to the front matter or a '# heading' to the text"
        )
    _refuse_control_characters(lines, path)
    return Digest(
        path=path,
        meta=meta,
        body="\n".join(body_lines) + "\n",
        body_line=body_index + 1,
        subject=subject,
        preheader=preheader,
        findings=findings,
        source="\n".join(lines) + "\n",
    )


def _changed(before: str, after: str) -> str:
    """A short 'old' → 'new' excerpt of what a repair changed."""
    start = 0
    while start < min(len(before), len(after)) and before[start] == after[start]:
        start += 1
    end_b, end_a = len(before), len(after)
    while end_b > start and end_a > start and before[end_b - 1] == after[end_a - 1]:
        end_b -= 1
        end_a -= 1
    old, new = before[start:end_b], after[start:end_a]
    if len(old) > 40:
        old, new = old[:37] + "...", new[:37] + "..."
    return f"{old!r} -> {new!r}"


def load_digest(path: Path | str) -> Digest:
    """Read a digest file from disk; every problem is a ``DigestError`` naming the file."""
    path = Path(path)
    try:
        with path.open("rb") as handle:  # a bounded read: /dev/zero or a FIFO ends too
            raw = handle.read(MAX_DIGEST_BYTES + 1)
    except FileNotFoundError:
        raise DigestError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DigestError(f"{path}: is a directory, not a digest file") from None
    except OSError as exc:
        raise DigestError(f"{path}: cannot read: {exc.strerror}") from None
    if len(raw) > MAX_DIGEST_BYTES:
        try:
            size = max(path.stat().st_size, len(raw))
        except OSError:
            size = len(raw)
        raise _too_big(path, size)
    return parse_digest(_decode(raw, path), path)
