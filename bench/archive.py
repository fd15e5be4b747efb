"""Archive benchmark: 500 sent issues in the database, then the latency of /archive, an
issue page and /feed.xml on `newsletter serve` (gunicorn, as in production), and the
time and peak memory of a full `newsletter archive build`.

Each issue is the sample digest (with its inline chart), so pages are real-sized.
Requests go one at a time over a kept-alive connection, so the figures are the server's
own time plus loopback; "issue page (any)" walks all 500 pages, "issue page (same)"
asks for one page again and again. Builds run as the CLI does, each into a fresh
folder, then once more into the same folder (nothing changed: nothing written).

Prints the median of several runs and peak memory; the last line is one JSON object.
    python bench/archive.py [--quick] [--issues N] [--database-url URL]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from newsletter.config import load_settings  # noqa: E402
from newsletter.digest import load_digest  # noqa: E402
from newsletter.ledger import create_issue, finish_if_done  # noqa: E402
from newsletter.render import render_issue  # noqa: E402
from newsletter.store import open_store  # noqa: E402

SAMPLE = ROOT / "digests" / "2026-11-20-weekly-links.md"


def populate(env: dict[str, str], issues: int) -> list[str]:
    """``issues`` sent issues (no subscribers, so each is finished at once); their slugs."""
    settings = load_settings(env, Path("/nonexistent"))
    rendered = render_issue(load_digest(SAMPLE), settings)
    slugs = []
    with open_store(settings) as store:
        for n in range(issues):
            issue, _ = create_issue(
                store,
                digest_path=f"/digests/issue-{n:04d}.md",
                digest_name=f"issue-{n:04d}.md",
                content_hash=f"{n:064x}",
                rendered=rendered.with_slug(f"2026-issue-{n:04d}"),
                force=False,
            )
            with store.session() as session:
                finish_if_done(session, issue.id)
            slugs.append(issue.archive_page.slug)
    return slugs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(directory: Path, env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    port = free_port()
    log = (directory / "serve.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "newsletter", "serve", "--port", str(port)],
        cwd=directory,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).raise_for_status()
            return process, port
        except httpx.HTTPError:
            if process.poll() is not None:
                break
            time.sleep(0.1)
    process.kill()
    process.wait()
    raise SystemExit("newsletter serve did not start:\n" + (directory / "serve.log").read_text())


def timed(client: httpx.Client, paths: list[str], server: int) -> tuple[list[float], float]:
    """Milliseconds per request, in order, and the server's CPU milliseconds per request
    (what the figures would be on an idle machine); every answer must be a 200."""
    times = []
    cpu = cpu_seconds(server)
    for path in paths:
        start = time.perf_counter()
        answer = client.get(path)
        times.append((time.perf_counter() - start) * 1000)
        if answer.status_code != 200:
            raise SystemExit(f"{path}: {answer.status_code}")
    return times, (cpu_seconds(server) - cpu) * 1000 / len(paths)


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process and its children (gunicorn's workers)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for task in [pid, *_children(pid)]:
        fields = Path(f"/proc/{task}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / ticks


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory (VmHWM) of a process and its children, the largest."""
    peaks = []
    for task in [pid, *_children(pid)]:
        status = Path(f"/proc/{task}/status").read_text()
        found = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
        peaks.append(int(found[1]) / 1024 if found else 0.0)
    return round(max(peaks), 1)


def _children(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task").iterdir()
    return [int(kid) for task in tasks for kid in (task / "children").read_text().split()]


def build(directory: Path, env: dict[str, str], out: Path) -> tuple[float, float, str]:
    """One `newsletter archive build OUT`: seconds, the process's peak RSS in MB, output."""
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "newsletter", "archive", "build", str(out)],
        cwd=directory,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    output = process.stdout.read().decode()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit("archive build failed:\n" + output)
    return seconds, usage.ru_maxrss / 1024, output.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer requests and builds")
    parser.add_argument("--issues", type=int, default=500)
    parser.add_argument("--database-url", help="default: an SQLite file in a temp folder")
    args = parser.parse_args()
    requests, builds = (200, 2) if args.quick else (1000, 5)

    with tempfile.TemporaryDirectory(prefix="archive-bench-") as tmp:
        directory = Path(tmp)
        env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
        env |= {
            "NEWSLETTER_DATABASE_URL": args.database_url or f"sqlite:///{directory / 'news.db'}",
            "NEWSLETTER_SITE_URL": "https://news.example.com",
            "NEWSLETTER_NAME": "Weekly Links",
            "NEWSLETTER_SECRET_KEY": "archive-benchmark-secret-key-0123456789",
            "NEWSLETTER_OUTBOX_DIR": str(directory / "outbox"),
        }
        start = time.perf_counter()
        slugs = populate(env, args.issues)
        print(f"{len(slugs)} issues created in {time.perf_counter() - start:.1f} s")

        server, port = start_server(directory, env)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
                every = [f"/archive/{slugs[n % len(slugs)]}" for n in range(requests)]
                middle = f"/archive/{slugs[len(slugs) // 2]}"
                pages = [f"/archive?page={1 + n % 25}" for n in range(requests)]
                timed(client, ["/archive", "/feed.xml", middle], server.pid)  # warm up
                results = {
                    "/archive": timed(client, ["/archive"] * requests, server.pid),
                    "/archive?page=N": timed(client, pages, server.pid),
                    "issue page (any)": timed(client, every, server.pid),
                    "issue page (same)": timed(client, [middle] * requests, server.pid),
                    "/feed.xml": timed(client, ["/feed.xml"] * (requests // 2), server.pid),
                }
                sizes = {
                    "archive_kb": len(client.get("/archive").content) / 1024,
                    "issue_kb": len(client.get(middle).content) / 1024,
                    "feed_kb": len(client.get("/feed.xml").content) / 1024,
                }
            serve_peak = peak_rss_mb(server.pid)
        finally:
            server.terminate()
            server.wait(timeout=30)

        load = round(os.getloadavg()[0], 1)
        figures: dict[str, object] = {"issues": len(slugs), "requests": requests, "load": load}
        print(f"machine load average while measuring: {load} on {os.cpu_count()} cores")
        for name, (times, cpu) in results.items():
            median, p99 = statistics.median(times), percentile(times, 0.99)
            print(
                f"{name:20} median {median:6.2f} ms   p99 {p99:6.2f} ms   "
                f"server CPU {cpu:5.2f} ms/request   ({len(times)} requests)"
            )
            key = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
            figures[f"{key}_median_ms"] = round(median, 2)
            figures[f"{key}_p99_ms"] = round(p99, 2)
            figures[f"{key}_cpu_ms"] = round(cpu, 2)
        print(
            f"sizes: /archive {sizes['archive_kb']:.1f} KB, issue page {sizes['issue_kb']:.1f} KB,"
            f" feed {sizes['feed_kb']:.1f} KB; serve peak RSS {serve_peak} MB"
        )

        full, peaks = [], []
        for n in range(builds):
            out = directory / f"site-{n}"
            seconds, peak, output = build(directory, env, out)
            full.append(seconds)
            peaks.append(peak)
            if n == 0:
                print(f"archive build: {output}")
        seconds, _, output = build(directory, env, directory / "site-0")
        print(f"archive build again, nothing changed: {seconds:.2f} s ({output})")
        files = sum(1 for p in (directory / "site-0").rglob("*") if p.is_file())
        median = statistics.median(full)
        print(
            f"archive build of {len(slugs)} issues ({files} files): median {median:.2f} s"
            f" over {builds} runs, peak RSS {max(peaks):.1f} MB"
        )
        shutil.rmtree(directory / "outbox", ignore_errors=True)
        figures |= {
            "build_s_median": round(statistics.median(full), 2),
            "rebuild_unchanged_s": round(seconds, 2),
            "build_peak_rss_mb": round(max(peaks), 1),
            "build_files": files,
            "serve_peak_rss_mb": serve_peak,
        } | {k: round(v, 1) for k, v in sizes.items()}
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
