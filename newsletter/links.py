"""Whether a digest's links still work: each URL fetched once, concurrently, politely.

HEAD first (no body to download), then GET when a server refuses or fumbles HEAD, as
many do; only a few requests at a time go to one host, so a digest of twenty links to
one site does not look like an attack; redirects are followed, and a chain that starts
with permanent ones (301, 308) is reported so the digest can carry the new address.
Names under ``.invalid`` (RFC 6761) never resolve and are not looked up.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from enum import Enum
from importlib.metadata import PackageNotFoundError, version
from itertools import pairwise
from urllib.parse import urlsplit

import httpx

DEFAULT_TIMEOUT = 10.0
PER_HOST = 8
CONCURRENCY = 64
MAX_REDIRECTS = 10
PERMANENT_REDIRECTS = frozenset({301, 308})
TOO_MANY_REQUESTS = 429
_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


class Failure(Enum):
    """Why no HTTP answer came; the value is what a user reads."""

    DNS = "DNS lookup failed"
    TIMEOUT = "timed out"
    REFUSED = "connection refused"
    CONNECTION = "cannot connect"
    TLS = "TLS failed"
    BROKEN = "broken answer"
    REDIRECT_LOOP = "too many redirects"
    INVALID = "not a valid URL"


@dataclass(frozen=True)
class LinkResult:
    """What fetching one URL found: an HTTP status, or the failure that stopped it."""

    url: str
    status: int | None = None
    failure: Failure | None = None
    moved_to: str | None = None  # where permanent redirects at the start of the chain lead
    final_url: str | None = None  # where the last answer came from, after every redirect

    @property
    def dead(self) -> bool:
        """No answer, or an error answer other than 'slow down' (429 says nothing of the page)."""
        if self.failure is not None:
            return True
        return self.status is not None and self.status >= 400 and self.status != TOO_MANY_REQUESTS

    @property
    def rate_limited(self) -> bool:
        return self.status == TOO_MANY_REQUESTS


def user_agent() -> str:
    """Names the tool, so a site owner reading their logs knows what knocked."""
    try:
        release = version("newsletter")
    except PackageNotFoundError:
        release = "dev"
    return f"newsletter/{release} (link checker)"


def check_links(
    urls: Iterable[str],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    per_host: int = PER_HOST,
) -> dict[str, LinkResult]:
    """Fetch every URL (fragments aside, each once) and say what answered, by URL given."""
    given = list(dict.fromkeys(urls))
    fetched = list(dict.fromkeys(_page(url) for url in given))
    if not fetched:
        return {}
    results = _in_own_loop(fetched, timeout, per_host)
    return {url: _as_given(url, results[_page(url)]) for url in given}


def _page(url: str) -> str:
    """The URL without its fragment, which never reaches the server."""
    return url.split("#", 1)[0]


def _in_own_loop(urls: list[str], timeout: float, per_host: int) -> dict[str, LinkResult]:
    """Run the fetches on an event loop of their own, in a thread of their own: it works
    whether or not the caller already runs a loop (a notebook, Playwright's sync API), and
    asyncio.run sets no SIGINT handler outside the main thread (library code sets none)."""
    answer: Future[dict[str, LinkResult]] = Future()

    def run() -> None:
        try:
            answer.set_result(asyncio.run(_check_all(urls, timeout, per_host)))
        except BaseException as exc:
            answer.set_exception(exc)

    threading.Thread(target=run, name="link-check", daemon=True).start()
    return answer.result()


def _as_given(url: str, result: LinkResult) -> LinkResult:
    if result.url == url:
        return result
    return LinkResult(url, result.status, result.failure, result.moved_to, result.final_url)


async def _check_all(urls: list[str], timeout: float, per_host: int) -> dict[str, LinkResult]:
    everyone = asyncio.Semaphore(CONCURRENCY)
    hosts: defaultdict[str, asyncio.Semaphore] = defaultdict(lambda: asyncio.Semaphore(per_host))
    async with httpx.AsyncClient(
        follow_redirects=True,
        max_redirects=MAX_REDIRECTS,
        timeout=timeout,
        limits=httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY),
        headers={"User-Agent": user_agent(), "Accept": _ACCEPT},
    ) as client:

        async def one(url: str) -> LinkResult:
            try:
                parts = urlsplit(url)
                host, _ = (parts.hostname or "").lower(), parts.port
            except ValueError:  # an unclosed IPv6 bracket, a port out of range
                return LinkResult(url, failure=Failure.INVALID)
            if not host or parts.scheme.lower() not in ("http", "https"):
                return LinkResult(url, failure=Failure.INVALID)
            if host == "invalid" or host.endswith(".invalid"):
                return LinkResult(url, failure=Failure.DNS)
            async with hosts[host], everyone:
                return await _check_one(client, url, timeout)

        results = await asyncio.gather(*(one(url) for url in urls))
    return {result.url: result for result in results}


async def _check_one(client: httpx.AsyncClient, url: str, timeout: float) -> LinkResult:
    try:
        async with asyncio.timeout(timeout):
            response = await _fetch(client, url)
    except Exception as exc:  # one odd URL or server must not stop the check of the others
        return LinkResult(url, failure=_failure(exc))
    final = str(response.url)
    return LinkResult(
        url,
        status=response.status_code,
        moved_to=_permanent_target(response),
        final_url=final if final != url else None,
    )


async def _fetch(client: httpx.AsyncClient, url: str) -> httpx.Response:
    """HEAD, then GET (headers only) when HEAD got an error answer or a broken one."""
    try:
        response = await client.head(url)
        if response.status_code < 400 or response.status_code == TOO_MANY_REQUESTS:
            return response
    except (httpx.RemoteProtocolError, httpx.ReadError):
        pass
    async with client.stream("GET", url) as response:
        return response


def _permanent_target(response: httpx.Response) -> str | None:
    target = None
    chain = [*response.history, response]
    for hop, following in pairwise(chain):
        if hop.status_code not in PERMANENT_REDIRECTS:
            break
        target = str(following.request.url)
    return target


def _causes(exc: BaseException) -> list[BaseException]:
    """The exception, what caused it, and so on; a group stands for its first member."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        if isinstance(current, BaseExceptionGroup) and current.exceptions:
            current = current.exceptions[0]
        else:
            current = current.__cause__ or current.__context__
    return chain


def _failure(exc: BaseException) -> Failure:
    """The failure an exception stands for, read from its type and the types of its causes."""
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        return Failure.TIMEOUT
    if isinstance(exc, httpx.TooManyRedirects):
        return Failure.REDIRECT_LOOP
    causes = _causes(exc)
    invalid = (httpx.InvalidURL, httpx.UnsupportedProtocol, ValueError, OverflowError)
    if any(isinstance(cause, invalid) for cause in causes):
        return Failure.INVALID
    if any(isinstance(cause, socket.gaierror) for cause in causes):
        return Failure.DNS
    if any(isinstance(cause, ssl.SSLError) for cause in causes):
        return Failure.TLS
    if any(isinstance(cause, ConnectionRefusedError) for cause in causes):
        return Failure.REFUSED
    if isinstance(exc, httpx.ConnectError):
        return Failure.CONNECTION
    return Failure.BROKEN
