"""Everything `newsletter check` reports about digests, as findings at lines of each file.

What the render finds (mojibake, unsafe links, unresolvable images, images without alt
text, Gmail's clipping size), links an earlier issue already carried, and, when asked,
links that no longer answer. Links are fetched once for all digests together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from newsletter.config import Settings
from newsletter.digest import MUST_FIX, WARNING, Digest, Finding, load_digest
from newsletter.errors import DigestError
from newsletter.history import SentLinks, repeated_links
from newsletter.links import DEFAULT_TIMEOUT, LinkResult, check_links
from newsletter.render import RenderedIssue, render_issue


@dataclass(frozen=True)
class DigestCheck:
    """One digest's findings in line order, or the error that kept it from rendering."""

    path: Path
    findings: tuple[Finding, ...] = ()
    error: DigestError | None = None


def offline_findings(digest: Digest, issue: RenderedIssue, sent: SentLinks | None) -> list[Finding]:
    """The render's findings and the links sent before: what needs no network."""
    found = list(issue.findings)
    if sent is not None:
        found += repeated_links(digest, issue, sent)
    return found


def link_findings(issue: RenderedIssue, results: dict[str, LinkResult]) -> list[Finding]:
    """Dead links as errors, permanent redirects and rate limits as warnings, at each line."""
    found = []
    for link in issue.links:
        result = results.get(link.url)
        if result is None:
            continue
        if result.dead:
            reason = result.failure.value if result.failure else str(result.status)
            if result.final_url and result.status is not None:
                reason += f" at {result.final_url}"
            finding = (f"dead link {link.url} ({reason})", MUST_FIX)
        elif result.moved_to:
            finding = (f"link {link.url} moved permanently to {result.moved_to}", WARNING)
        elif result.rate_limited:
            finding = (f"link {link.url} not checked: the server asks to slow down (429)", WARNING)
        else:
            continue
        found += [Finding(line, *finding) for line in link.lines]
    return found


def check_digests(
    paths: Sequence[Path],
    settings: Settings,
    *,
    sent: SentLinks | None = None,
    fetch_links: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
) -> list[DigestCheck]:
    """Check each digest; with ``fetch_links``, every link of them all is fetched at once."""
    rendered: dict[Path, tuple[Digest, RenderedIssue]] = {}
    errors: dict[Path, DigestError] = {}
    for path in paths:
        try:
            digest = load_digest(path)
            rendered[path] = (digest, render_issue(digest, settings))
        except DigestError as exc:
            errors[path] = exc
    results: dict[str, LinkResult] = {}
    if fetch_links:
        urls = [link.url for _, issue in rendered.values() for link in issue.links]
        results = check_links(urls, timeout=timeout)
    checks = []
    for path in paths:
        if path in errors:
            checks.append(DigestCheck(path, error=errors[path]))
            continue
        digest, issue = rendered[path]
        found = offline_findings(digest, issue, sent) + link_findings(issue, results)
        checks.append(DigestCheck(path, tuple(sorted(found, key=lambda f: f.line))))
    return checks
