"""Signup load test: concurrent clients posting the form to `newsletter serve` on loopback.

Starts `newsletter serve` (gunicorn) and `newsletter worker` (which sends the confirmations)
on a fresh SQLite file and an SMTP sink (Postfix's smtp-sink when installed, else the test
suite's aiosmtpd sink), then runs CLIENTS concurrent clients for SECONDS, each posting the form
with a new address over its own keep-alive connection as soon as its last answer came; first
with 10 clients, then with 50, each RUNS times on fresh processes and a fresh database.
Each request carries a distinct X-Forwarded-For (NEWSLETTER_TRUSTED_PROXIES=1, as behind
a reverse proxy), so the per-IP limit, which would rightly stop one IP sending thousands
of signups, does not turn the test into a rate-limit test.

Then it checks what a user relies on: no error answers, every accepted signup stored as
pending, and exactly one confirmation email per address at the SMTP server. It prints
the figures; the last line is one JSON object.

    python bench/signup.py [--quick] [--runs 3] [--clients 10 50] [--seconds 20] [--workers 1]
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
TARGETS = {10: {"p99_ms": 50.0}, 50: {"p99_ms": 250.0, "rps": 400.0}}  # by client count
DRAIN_SECONDS = 15.0


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


def start_worker(directory: Path, env: dict[str, str]) -> tuple:
    """`newsletter worker` beside the server, once it says it started."""
    log_path = directory / "worker.log"
    log = log_path.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "newsletter", "worker"],
        cwd=directory,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while b"worker started" not in log_path.read_bytes():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit("newsletter worker did not start:\n" + log_path.read_text())
        time.sleep(0.05)
    return process, log


def start_server(directory: Path, env: dict[str, str], workers: int, threads: int) -> tuple:
    port = free_port()
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

    from newsletter.store import Delivery, Subscriber, open_store

    with open_store(env["NEWSLETTER_DATABASE_URL"]) as store, store.session() as session:
        stored = set(
            session.scalars(select(Subscriber.email).where(Subscriber.status == "pending"))
        )
        rows = dict(
            session.execute(
                select(Delivery.status, func.count())
                .where(Delivery.issue_id.is_(None))
                .group_by(Delivery.status)
            ).all()
        )
    return {
        "stored": len(addresses & stored),
        "queued": rows.get("queued", 0),
        "sent": rows.get("sent", 0),
        "failed": rows.get("failed", 0),
    }


def peak_rss_mb(serve_pid: int, worker_pid: int) -> dict[str, float]:
    """Peak resident memory (VmHWM) of each process: gunicorn's master (`newsletter serve`
    itself), its web workers, and `newsletter worker`."""

    def hwm(pid: int) -> float:
        status = Path(f"/proc/{pid}/status").read_text()
        found = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
        return round(int(found[1]) / 1024, 1) if found else 0.0

    def children(pid: int) -> list[int]:
        tasks = Path(f"/proc/{pid}/task").iterdir()
        return [int(kid) for task in tasks for kid in (task / "children").read_text().split()]

    peaks = {"serve (gunicorn master)": hwm(serve_pid)}
    for number, web in enumerate(children(serve_pid), 1):
        peaks[f"web worker {number}"] = hwm(web)
    peaks["newsletter worker"] = hwm(worker_pid)
    return peaks


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else 0.0


def run_once(args: argparse.Namespace, clients: int) -> dict:
    """One load run against a fresh server, worker and sink; its figures."""
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
            "NEWSLETTER_SITE_URL": "https://news.example.com",
        }
        threads = args.threads or 8
        process, port, log = start_server(directory, env, args.workers, threads)
        worker, worker_log = start_worker(directory, env)
        peak_rss: dict[str, float] = {}
        try:
            run = f"{int(time.time())}"
            asyncio.run(load(port, 4, 0.5, f"{run}-warm"))  # first requests compile templates
            results, accepted, elapsed = asyncio.run(load(port, clients, seconds, run))
            accepted_set = set(accepted)
            deadline = time.monotonic() + DRAIN_SECONDS
            while time.monotonic() < deadline:
                got = sink.recipients()
                if sum(got[a] for a in accepted_set) >= len(accepted_set):
                    break
                time.sleep(0.2)
            time.sleep(0.5)  # a duplicate would arrive now
            peak_rss = peak_rss_mb(process.pid, worker.pid)
        finally:
            process.send_signal(signal.SIGTERM)
            worker.send_signal(signal.SIGTERM)
            exit_code = process.wait(timeout=30) or worker.wait(timeout=60)
            log.close()
            worker_log.close()
            sink.stop()
        received = sink.recipients()
        counts = database_counts(env, accepted_set)

    latencies = [seconds_ * 1000 for seconds_, status in results if status]
    errors = sum(1 for _, status in results if status != 303)
    per_address = [received[a] for a in accepted_set]
    figures = {
        "clients": clients,
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
        "confirmations_left_queued": counts["queued"],
        "sink": sink.kind,
        "database": env["NEWSLETTER_DATABASE_URL"].partition(":")[0].split("+")[0],
        "server_exit_code": exit_code,
        "cpus": os.cpu_count(),
        "peak_rss_mb": peak_rss,
    }
    figures["correct"] = (
        errors == 0
        and figures["stored"] == figures["accepted"]
        and figures["confirmations"] == figures["accepted"]
        and exit_code == 0
    )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one 4-second run of each")
    parser.add_argument("--clients", type=int, nargs="+", default=sorted(TARGETS))
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--workers", type=int, default=1, help="gunicorn worker processes")
    parser.add_argument("--threads", type=int, default=None, help="threads per worker")
    parser.add_argument(
        "--database-url", help="e.g. a PostgreSQL database (default: a fresh SQLite file)"
    )
    parser.add_argument("--runs", type=int, default=3, help="median of this many runs")
    args = parser.parse_args()
    result: dict = {"bench": "signup", "quick": args.quick, "by_clients": {}, "targets": {}}
    for clients in args.clients:
        runs = []
        for number in range(1, (1 if args.quick else args.runs) + 1):
            figures = run_once(args, clients)
            runs.append(figures)
            print(
                f"{clients} clients, run {number}: {figures['requests']} signups, "
                f"{figures['rps']} req/s, {figures['errors']} errors; latency p50 "
                f"{figures['p50_ms']} ms, p90 {figures['p90_ms']} ms, p99 {figures['p99_ms']} ms, "
                f"max {figures['max_ms']} ms; exactly one confirmation for "
                f"{figures['confirmations']}/{figures['accepted']}, missing "
                f"{figures['missing_confirmations']}, duplicates "
                f"{figures['duplicate_confirmations']}, correct: {figures['correct']}",
                flush=True,
            )
        summary = {
            key: statistics.median(run[key] for run in runs)
            for key in ("rps", "p50_ms", "p90_ms", "p99_ms", "max_ms")
        }
        first = runs[0]
        print(
            f"{clients} clients for {first['seconds']} s against gunicorn ({args.workers} × "
            f"{first['threads']} threads), {first['database']}, {first['sink']}, median of "
            f"{len(runs)} runs: {summary['rps']} req/s, p50 {summary['p50_ms']} ms, p99 "
            f"{summary['p99_ms']} ms; peak RSS "
            + ", ".join(f"{name} {mb:.1f} MB" for name, mb in first["peak_rss_mb"].items())
        )
        correct = all(run["correct"] for run in runs)
        result["by_clients"][clients] = {"median": summary, "correct": correct, "runs": runs}
        target = TARGETS.get(clients, {})
        result["targets"][f"{clients}_clients_correct"] = correct
        if "p99_ms" in target:
            result["targets"][f"{clients}_clients_p99_le_{target['p99_ms']:.0f}ms"] = (
                summary["p99_ms"] <= target["p99_ms"]
            )
        if "rps" in target:
            result["targets"][f"{clients}_clients_rps_ge_{target['rps']:.0f}"] = (
                summary["rps"] >= target["rps"]
            )
    result["targets_met"] = all(result["targets"].values())
    print(
        "targets: "
        + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in result["targets"].items())
    )
    print(json.dumps(result))
    sys.exit(
        0 if all(result["targets"][k] for k in result["targets"] if k.endswith("correct")) else 1
    )


if __name__ == "__main__":
    main()
