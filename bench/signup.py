"""Signup load test: concurrent clients posting the form to `newsletter serve` on loopback.

Starts `newsletter serve` (gunicorn, its outbound worker sending confirmations) on a fresh
SQLite file and an SMTP sink (Postfix's smtp-sink when installed, else the test suite's
aiosmtpd sink), then runs CLIENTS concurrent clients for SECONDS, each posting the form
with a new address over its own keep-alive connection as soon as its last answer came.
Each request carries a distinct X-Forwarded-For (NEWSLETTER_TRUSTED_PROXIES=1, as behind
a reverse proxy), so the per-IP limit, which would rightly stop one IP sending thousands
of signups, does not turn the test into a rate-limit test.

Then it checks what a user relies on: no error answers, every accepted signup stored as
pending, and exactly one confirmation email per address at the SMTP server. It prints
the figures; the last line is one JSON object.

    python bench/signup.py [--quick] [--runs 3] [--clients 50] [--seconds 20] [--workers 1]
                           [--threads 8]
                           [--database-url postgresql+psycopg://…]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_P99_MS = 100.0
DRAIN_SECONDS = 8.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Sink:
    """An SMTP server that records the recipient of every message it accepts."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        postfix = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
        if Path(postfix).exists():
            self.kind = "postfix smtp-sink"
            directory.chmod(0o777)  # it drops privileges to nobody before writing
            self.dump = directory / "sink.dump"
            command = [postfix, "-u", "nobody", "-D", str(self.dump), f"127.0.0.1:{self.port}"]
            command.append("256")
        else:
            self.kind = "aiosmtpd sink"
            self.dump = directory / "sink.jsonl"
            script = ROOT / "tests" / "smtp_sink.py"
            command = [sys.executable, str(script), "--port", str(self.port)]
            command += ["--jsonl", str(self.dump)]
        self.process = subprocess.Popen(
            command, cwd=directory, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise SystemExit("the SMTP sink did not start")

    def recipients(self) -> Counter[str]:
        if not self.dump.exists():
            return Counter()
        text = self.dump.read_text("utf-8", "replace")
        if self.dump.suffix == ".jsonl":
            return Counter(r for line in text.splitlines() for r in json.loads(line)["recipients"])
        return Counter(m.lower() for m in re.findall(r"^X-Rcpt-Args: <([^>]+)>", text, re.M))

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def start_server(directory: Path, env: dict[str, str], workers: int, threads: int) -> tuple:
    port = free_port()
    env = env | {"NEWSLETTER_SITE_URL": f"http://127.0.0.1:{port}"}
    log = (directory / "serve.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "newsletter",
            "serve",
            "--port",
            str(port),
            "--workers",
            f"{workers}",
            "--threads",
            f"{threads}",
        ],
        cwd=directory,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                return process, port, log
        except OSError:
            if process.poll() is not None:
                break
            time.sleep(0.1)
    process.kill()
    process.wait()
    log.close()
    raise SystemExit("newsletter serve did not start:\n" + (directory / "serve.log").read_text())


async def client(
    number: int, port: int, run: str, until: float, results: list, accepted: list
) -> None:
    """One visitor after another on a keep-alive connection; latency from send to answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sent = 0
    try:
        while time.perf_counter() < until:
            address = f"bench-{run}-{number}-{sent}@example.com"
            ip = 10 << 24 | number << 16 | sent
            body = f"email={address}&name=Reader+{number}".encode()
            request = (
                "POST /subscribe HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                "Content-Type: application/x-www-form-urlencoded\r\n"
                f"X-Forwarded-For: {ip >> 24}.{ip >> 16 & 255}.{ip >> 8 & 255}.{ip & 255}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode() + body
            started = time.perf_counter()
            writer.write(request)
            status_line = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            await reader.readexactly(length)
            elapsed = time.perf_counter() - started
            status = int(status_line.split()[1]) if status_line else 0
            results.append((elapsed, status))
            if status == 303:
                accepted.append(address)
            sent += 1
    finally:
        writer.close()
        await writer.wait_closed()


async def load(port: int, clients: int, seconds: float, run: str) -> tuple[list, list, float]:
    results: list[tuple[float, int]] = []
    accepted: list[str] = []
    started = time.perf_counter()
    until = started + seconds
    outcomes = await asyncio.gather(
        *(client(n, port, run, until, results, accepted) for n in range(clients)),
        return_exceptions=True,
    )
    elapsed = time.perf_counter() - started
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    results += [(0.0, 0)] * len(failures)  # a dropped connection counts as an error
    return results, accepted, elapsed


def database_counts(env: dict[str, str], addresses: set[str]) -> dict[str, int]:
    """Pending subscribers and sent confirmations among ``addresses``, read from the store."""
    sys.path.insert(0, str(ROOT))
    from sqlalchemy import func, select

    from newsletter.store import OutboundMail, Subscriber, open_store

    with open_store(env["NEWSLETTER_DATABASE_URL"]) as store, store.session() as session:
        stored = set(
            session.scalars(select(Subscriber.email).where(Subscriber.status == "pending"))
        )
        rows = dict(
            session.execute(
                select(OutboundMail.status, func.count()).group_by(OutboundMail.status)
            ).all()
        )
    return {
        "stored": len(addresses & stored),
        "queued": rows.get("queued", 0),
        "sent": rows.get("sent", 0),
        "failed": rows.get("failed", 0),
    }


def peak_rss_mb(serve_pid: int) -> dict[str, float]:
    """Peak resident memory (VmHWM) of each process of ``newsletter serve``: itself, the
    gunicorn master and its workers, and the outbound mail process."""

    def hwm(pid: int) -> float:
        status = Path(f"/proc/{pid}/status").read_text()
        found = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
        return round(int(found[1]) / 1024, 1) if found else 0.0

    def children(pid: int) -> list[int]:
        tasks = Path(f"/proc/{pid}/task").iterdir()
        return [int(kid) for task in tasks for kid in (task / "children").read_text().split()]

    peaks = {"supervisor": hwm(serve_pid)}
    for child in children(serve_pid):
        workers = children(child)
        peaks["gunicorn master" if workers else "outbound"] = hwm(child)
        for number, worker in enumerate(workers, 1):
            peaks[f"web worker {number}"] = hwm(worker)
    return peaks


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else 0.0


def run_once(args: argparse.Namespace) -> dict:
    """One load run against a fresh server and sink; its figures."""
    seconds = 4.0 if args.quick else args.seconds

    with tempfile.TemporaryDirectory(prefix="signup-bench-") as tmp:
        directory = Path(tmp)
        env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        sink = Sink(directory)
        env |= {
            "NEWSLETTER_DATABASE_URL": args.database_url
            or f"sqlite:///{directory / 'newsletter.db'}",
            "NEWSLETTER_SMTP_HOST": "127.0.0.1",
            "NEWSLETTER_SMTP_PORT": str(sink.port),
            "NEWSLETTER_SMTP_SECURITY": "none",
            "NEWSLETTER_TRUSTED_PROXIES": "1",
            "NEWSLETTER_FROM": "Bench <bench@example.com>",
        }
        threads = args.threads or 8
        process, port, log = start_server(directory, env, args.workers, threads)
        peak_rss: dict[str, float] = {}
        try:
            run = f"{int(time.time())}"
            asyncio.run(load(port, 4, 0.5, f"{run}-warm"))  # first requests compile templates
            results, accepted, elapsed = asyncio.run(load(port, args.clients, seconds, run))
            accepted_set = set(accepted)
            deadline = time.monotonic() + DRAIN_SECONDS
            while time.monotonic() < deadline:
                got = sink.recipients()
                if sum(got[a] for a in accepted_set) >= len(accepted_set):
                    break
                time.sleep(0.2)
            peak_rss = peak_rss_mb(process.pid)
        finally:
            process.send_signal(signal.SIGTERM)
            exit_code = process.wait(timeout=30)
            log.close()
            sink.stop()
        received = sink.recipients()
        counts = database_counts(env, accepted_set)

    latencies = [seconds_ * 1000 for seconds_, status in results if status]
    errors = sum(1 for _, status in results if status != 303)
    per_address = [received[a] for a in accepted_set]
    figures = {
        "clients": args.clients,
        "seconds": round(elapsed, 1),
        "workers": args.workers,
        "threads": threads,
        "requests": len(results),
        "accepted": len(accepted_set),
        "errors": errors,
        "rps": round(len(results) / elapsed, 1),
        "p50_ms": round(percentile(latencies, 0.50), 1),
        "p90_ms": round(percentile(latencies, 0.90), 1),
        "p99_ms": round(percentile(latencies, 0.99), 1),
        "max_ms": round(max(latencies, default=0.0), 1),
        "mean_ms": round(statistics.fmean(latencies), 1) if latencies else 0.0,
        "stored": counts["stored"],
        "confirmations": sum(1 for n in per_address if n == 1),
        "missing_confirmations": sum(1 for n in per_address if n == 0),
        "duplicate_confirmations": sum(1 for n in per_address if n > 1),
        "outbound_left_queued": counts["queued"],
        "sink": sink.kind,
        "database": env["NEWSLETTER_DATABASE_URL"].partition(":")[0].split("+")[0],
        "server_exit_code": exit_code,
        "target_p99_ms": TARGET_P99_MS,
        "cpus": os.cpu_count(),
        "peak_rss_mb": peak_rss,
    }
    figures["correct"] = (
        errors == 0
        and figures["stored"] == figures["accepted"]
        and figures["confirmations"] == figures["accepted"]
        and exit_code == 0
    )
    figures["p99_within_target"] = figures["p99_ms"] <= TARGET_P99_MS
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 4-second run")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--workers", type=int, default=1, help="gunicorn worker processes")
    parser.add_argument("--threads", type=int, default=None, help="threads per worker")
    parser.add_argument(
        "--database-url", help="e.g. a PostgreSQL database (default: a fresh SQLite file)"
    )
    parser.add_argument("--runs", type=int, default=3, help="median of this many runs")
    args = parser.parse_args()
    runs = []
    for number in range(1, (1 if args.quick else args.runs) + 1):
        figures = run_once(args)
        runs.append(figures)
        print(
            f"run {number}: {figures['requests']} signups, {figures['rps']} req/s, "
            f"{figures['errors']} errors; latency p50 {figures['p50_ms']} ms, p90 "
            f"{figures['p90_ms']} ms, p99 {figures['p99_ms']} ms, max {figures['max_ms']} ms; "
            f"exactly one confirmation for {figures['confirmations']}/{figures['accepted']}, "
            f"missing {figures['missing_confirmations']}, duplicates "
            f"{figures['duplicate_confirmations']}, correct: {figures['correct']}",
            flush=True,
        )
    summary = {
        key: statistics.median(run[key] for run in runs)
        for key in ("rps", "p50_ms", "p90_ms", "p99_ms", "max_ms")
    }
    first = runs[0]
    print(
        f"{first['clients']} clients for {first['seconds']} s against gunicorn "
        f"({args.workers} × {first['threads']} threads), {first['database']}, {first['sink']}, "
        f"median of {len(runs)} runs: {summary['rps']} req/s, p50 {summary['p50_ms']} ms, "
        f"p99 {summary['p99_ms']} ms (target {TARGET_P99_MS:.0f}); peak RSS "
        + ", ".join(f"{name} {mb:.1f} MB" for name, mb in first["peak_rss_mb"].items())
    )
    correct = all(run["correct"] for run in runs)
    result = {"median": summary, "runs": runs, "correct": correct}
    result["p99_within_target"] = summary["p99_ms"] <= TARGET_P99_MS
    print(json.dumps(result))
    sys.exit(0 if correct else 1)


if __name__ == "__main__":
    main()
