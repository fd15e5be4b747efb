"""`check --links` and newsletter.links against a real local HTTP server; no network used."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from click.testing import CliRunner
from link_server import LinkServer

from newsletter.cli import main
from newsletter.links import Failure, check_links

TIMEOUT = "0.5"


@pytest.fixture
def link_server():
    """The link server of tests/link_server.py, stopped after the test."""
    with LinkServer() as server:
        yield server


def _digest(directory: Path, base: str) -> Path:
    path = directory / "links.md"
    path.write_text(
        "---\n"  # 1
        "title: Links of the week\n"  # 2
        "---\n"  # 3
        "Some links.\n"  # 4
        "\n"  # 5
        f"* [fine]({base}/ok)\n"  # 6
        f"* [moved]({base}/moved)\n"  # 7
        f"* [gone]({base}/gone)\n"  # 8
        f"* [broken]({base}/broken)\n"  # 9
        f"* [slow]({base}/slow)\n"  # 10
        "* [nowhere](http://nowhere.invalid/page)\n"  # 11
        f"* [no HEAD]({base}/no-head)\n"  # 12
        f"* [permanent]({base}/moved-308)\n"  # 13
        f"* [temporary]({base}/found)\n"  # 14
        f"* and [gone]({base}/gone) again, [fine]({base}/ok#part) again\n",  # 15
        "utf-8",
    )
    return path


def test_check_links_reports_each_kind_on_its_line(
    runner: CliRunner, clean_env: Path, link_server: LinkServer
) -> None:
    """404, 500, a timeout and an unknown host are errors at their lines (exit 1), permanent
    redirects are warnings with the new URL, and working links say nothing."""
    base = link_server.base
    _digest(clean_env, base)
    result = runner.invoke(main, ["check", "--links", "--timeout", TIMEOUT, "links.md"])
    assert result.exit_code == 1, result.output
    assert result.stdout.splitlines() == [
        f"links.md:7: warning: link {base}/moved moved permanently to {base}/ok",
        f"links.md:8: error: dead link {base}/gone (404)",
        f"links.md:9: error: dead link {base}/broken (500)",
        f"links.md:10: error: dead link {base}/slow (timed out)",
        "links.md:11: error: dead link http://nowhere.invalid/page (DNS lookup failed)",
        f"links.md:13: warning: link {base}/moved-308 moved permanently to {base}/ok",
        f"links.md:15: error: dead link {base}/gone (404)",
    ]
    assert result.stderr == ""


def test_check_without_links_fetches_nothing(
    runner: CliRunner, clean_env: Path, link_server: LinkServer
) -> None:
    """Plain `check` never touches the network: no request reaches the server."""
    _digest(clean_env, link_server.base)
    result = runner.invoke(main, ["check", "links.md"])
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert link_server.requests == []


def test_head_first_get_when_head_is_refused(link_server: LinkServer) -> None:
    """HEAD is tried first; a server that refuses HEAD (405) is asked again with GET."""
    results = check_links([link_server.url("/ok"), link_server.url("/no-head")], timeout=5)
    assert results[link_server.url("/no-head")].status == 200
    assert not results[link_server.url("/no-head")].dead
    methods = sorted((method, path) for method, path, _ in link_server.requests)
    assert methods == [("GET", "/no-head"), ("HEAD", "/no-head"), ("HEAD", "/ok")]


def test_user_agent_names_the_tool(link_server: LinkServer) -> None:
    """Every request says it comes from newsletter's link checker."""
    check_links([link_server.url("/ok")], timeout=5)
    agents = {agent for _, _, agent in link_server.requests}
    assert len(agents) == 1 and agents.pop().startswith("newsletter/")


def test_one_host_gets_a_few_requests_at_a_time() -> None:
    """Twenty links to one host never have more than ``per_host`` requests in flight."""
    with LinkServer(latency=0.05) as server:
        urls = [server.url(f"/page/{n}") for n in range(20)]
        results = check_links(urls, timeout=10, per_host=3)
    assert all(results[url].status == 200 for url in urls)
    assert 1 <= server.peak_in_flight <= 3


def test_each_url_fetched_once(link_server: LinkServer) -> None:
    """The same page linked with different fragments is one request, answered for each."""
    urls = [link_server.url("/ok#one"), link_server.url("/ok#two"), link_server.url("/ok")]
    results = check_links(urls, timeout=5)
    assert set(results) == set(urls)
    assert all(result.status == 200 for result in results.values())
    assert len(link_server.requests) == 1


def test_redirect_to_a_dead_page_is_dead(link_server: LinkServer) -> None:
    """A permanent redirect that ends at a 404 is reported dead, with where it ended."""
    result = check_links([link_server.url("/moved-then-gone")], timeout=5)[
        link_server.url("/moved-then-gone")
    ]
    assert result.dead and result.status == 404
    assert result.final_url == link_server.url("/gone")


def test_too_many_requests_is_not_dead(link_server: LinkServer) -> None:
    """429 asks to slow down; it says nothing about the page, so it is not a dead link."""
    result = check_links([link_server.url("/busy")], timeout=5)[link_server.url("/busy")]
    assert not result.dead and result.rate_limited


def test_dns_failure_from_the_resolver(monkeypatch: pytest.MonkeyPatch) -> None:
    """A name the resolver does not know is a DNS failure (the resolver made to fail here,
    so no query leaves the machine); a refused connection is told apart from it."""
    real = socket.getaddrinfo

    def resolver(host, *args, **kwargs):
        if host == "no-such-host.example":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{closed.getsockname()[1]}/"
        results = check_links(["http://no-such-host.example/x", refused], timeout=5)
    assert results["http://no-such-host.example/x"].failure is Failure.DNS
    assert results[refused].failure is Failure.REFUSED


def test_reserved_invalid_names_are_not_looked_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """Names under .invalid (RFC 6761) fail at once without asking the resolver."""
    asked: list[str] = []
    real = socket.getaddrinfo

    def resolver(host, *args, **kwargs):
        asked.append(host)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    result = check_links(["https://nowhere.invalid/"], timeout=5)["https://nowhere.invalid/"]
    assert result.failure is Failure.DNS
    assert asked == []


def test_check_links_timeout_must_be_positive(runner: CliRunner, clean_env: Path) -> None:
    """`--timeout 0` is bad usage: exit 2 before anything is fetched."""
    (clean_env / "d.md").write_text("# T\n", "utf-8")
    result = runner.invoke(main, ["check", "--links", "--timeout", "0", "d.md"])
    assert result.exit_code == 2
    assert "--timeout" in result.output


def test_malformed_urls_are_invalid_not_a_crash() -> None:
    """A port out of range or an unclosed IPv6 bracket is reported as not a valid URL, and
    the other links are still checked."""
    urls = ["http://127.0.0.1:99999/", "http://[::1/x", "ftp://example.invalid/", "http:///x"]
    results = check_links(urls, timeout=5)
    assert {url: results[url].failure for url in urls} == dict.fromkeys(urls, Failure.INVALID)
