"""Links that earlier issues already carried, so a links digest does not repeat itself.

Reads the sent issues' stored emails (the very HTML subscribers got) without changing
the database: no migration runs and a missing SQLite file means nothing was sent yet.
Links are compared by a key that ignores what does not change the page: the scheme,
``www.``, a trailing slash, the fragment and tracking parameters.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

from lxml import html as lxml_html
from sqlalchemy import select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from newsletter.digest import WARNING, Digest, Finding
from newsletter.errors import ConfigError
from newsletter.ledger import load_rendered
from newsletter.render import RenderedIssue
from newsletter.store import Issue, make_engine

_TRACKING = ("utm_", "mc_")
_TRACKING_NAMES = frozenset({"fbclid", "gclid", "dclid", "msclkid", "mkt_tok", "ref_src"})
_DEFAULT_PORTS = {"http": 80, "https": 443}
CONNECT_TIMEOUT_SECONDS = 5


@dataclass(frozen=True)
class SentIssue:
    """An issue that went to the list, as a warning names it."""

    id: int
    subject: str
    sent_at: datetime | None
    digest_path: str
    content_hash: str

    def describe(self) -> str:
        when = f" on {self.sent_at:%Y-%m-%d}" if self.sent_at else ""
        return f"issue {self.id} {self.subject!r}{when}"


@dataclass(frozen=True)
class SentLinks:
    """Every link of every sent issue, by comparison key, newest issue first."""

    by_key: dict[str, tuple[SentIssue, ...]]

    def issues_with(self, url: str) -> tuple[SentIssue, ...]:
        return self.by_key.get(link_key(url), ())


NOTHING_SENT = SentLinks({})


def link_key(url: str) -> str:
    """What two URLs of the same page have in common, for "was this sent before?"."""
    parts = urlsplit(url.strip())
    host = (parts.hostname or "").lower().removeprefix("www.")
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is not None and port != _DEFAULT_PORTS.get(parts.scheme.lower()):
        host = f"{host}:{port}"
    query = [
        (name, value)
        for name, value in parse_qsl(parts.query, keep_blank_values=True)
        if not name.lower().startswith(_TRACKING) and name.lower() not in _TRACKING_NAMES
    ]
    path = parts.path.rstrip("/")
    return f"{host}{path}" + (f"?{urlencode(query)}" if query else "")


def http_links(html: str) -> set[str]:
    """The http(s) link targets of an HTML document."""
    if not html.strip():
        return set()
    root = lxml_html.document_fromstring(html)
    found = set()
    for anchor in root.iter("a"):
        href = (anchor.get("href") or "").strip()
        if urlsplit(href).scheme.lower() in {"http", "https"}:
            found.add(href)
    return found


def sent_links(session: Session) -> SentLinks:
    """Links of every issue whose send finished, read from the emails they were sent as."""
    query = (
        select(
            Issue.id,
            Issue.subject,
            Issue.finished_at,
            Issue.started_at,
            Issue.digest_path,
            Issue.content_hash,
            Issue.rendered,
        )
        .where(Issue.status == "sent", Issue.rendered.is_not(None))
        .order_by(Issue.id.desc())
        .execution_options(yield_per=20)
    )
    by_key: defaultdict[str, list[SentIssue]] = defaultdict(list)
    for row in session.execute(query):
        issue = SentIssue(row.id, row.subject, row.finished_at or row.started_at, *row[4:6])
        for key in {link_key(url) for url in http_links(load_rendered(row.rendered).html)}:
            by_key[key].append(issue)
    return SentLinks({key: tuple(issues) for key, issues in by_key.items()})


def read_sent_links(database_url: str) -> SentLinks:
    """:func:`sent_links` of the configured database, opened only to read.

    Raises ``ConfigError`` naming the database when it cannot be read; a SQLite file that
    does not exist yet holds no sent issue.
    """
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:" and not Path(url.database).is_file():
            return NOTHING_SENT
    elif "connect_timeout" not in url.query:
        url = url.update_query_dict({"connect_timeout": str(CONNECT_TIMEOUT_SECONDS)})
    where = url.render_as_string(hide_password=True)
    try:
        engine = make_engine(url)
    except SQLAlchemyError as exc:
        raise ConfigError(f"NEWSLETTER_DATABASE_URL: cannot open {where}: {exc}") from None
    try:
        with Session(engine) as session:
            return sent_links(session)
    except SQLAlchemyError as exc:
        orig = getattr(exc, "orig", None)
        reason = str(orig or exc).strip().splitlines()[0]
        raise ConfigError(f"NEWSLETTER_DATABASE_URL: cannot read {where}: {reason}") from None
    finally:
        engine.dispose()


def repeated_links(digest: Digest, issue: RenderedIssue, sent: SentLinks) -> list[Finding]:
    """A warning at each line of a body link that an earlier issue already carried.

    Issues sent from this very digest (same file or same content) are not "earlier".
    """
    here = str(digest.path.resolve())
    own = digest.content_hash
    findings = []
    for link in issue.links:
        earlier = [
            sent_issue
            for sent_issue in sent.issues_with(link.url)
            if sent_issue.content_hash != own and _resolved(sent_issue.digest_path) != here
        ]
        if not earlier:
            continue
        more = f" and {len(earlier) - 1} more" if len(earlier) > 1 else ""
        message = f"link {link.url} was already sent in {earlier[0].describe()}{more}"
        findings += [Finding(line, message, WARNING) for line in link.lines]
    return findings


def _resolved(path: str) -> str:
    try:
        return str(Path(path).resolve())
    except OSError:
        return path
