"""Send benchmark: one issue of the sample digest to 10,000 subscribers over SMTP, against a
bare-smtplib baseline, then peak memory at 100,000 subscribers and the same send on PostgreSQL.

The SMTP server is Postfix's ``smtp-sink`` on 127.0.0.1 (a fast sink that accepts and discards),
or the aiosmtpd sink of tests/smtp_sink.py in its own process when smtp-sink is not installed.
Every measured send is the whole command a user runs, `newsletter send DIGEST --yes`, as a
process of its own on a fresh database (subscribers bulk-inserted before it starts): its
end-to-end rate is the messages over the wall-clock time from starting the process to its
exit, start-up, rendering and ledger included; its sending phase is what its summary line
reports (the delivery engine alone); its peak memory is its ru_maxrss. The baseline sends the
same rendered message, built once, N times with smtplib.SMTP.sendmail over one reused
connection, timed from the connection to the last answer. Rates are medians of the runs,
interleaved with the baseline's; the last line printed is one JSON object with the figures.
Each run also sends the 10k issue DKIM-signed (a 2048-bit RSA key made for the run), so the
signed and unsigned rates come from the same run and the same machine state.

    python bench/send.py [--quick] [--postgres-url URL] [--sink auto|smtp-sink|aiosmtpd]
    python bench/send.py --profile [--connections 4] [--dkim]   (cProfile of one in-process
        10k send, DKIM-signed with --dkim; then each step's cost alone, signing included)

--quick: one run of each, 30,000 instead of 100,000 subscribers for the memory check; < 1 min.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "digests" / "2026-11-20-weekly-links.md"
SMTP_SINK = Path("/usr/sbin/smtp-sink")
TEST_SINK = ROOT / "tests" / "smtp_sink.py"
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"

SMALL, LARGE, QUICK_LARGE = 10_000, 100_000, 30_000
CONNECTIONS = 4
TARGET_RATIO = 1.5  # the whole command, times the bare-smtplib baseline
TARGET_PHASE_RATIO = 2.0  # the sending phase, times the bare-smtplib baseline
TARGET_MB = 150.0
TARGET_SIGNED = 800.0  # msg/s end to end with DKIM (RSA 2048) at 10k subscribers
DKIM_SELECTOR = "bench"
FLAT_TOLERANCE_MB = 10.0  # "flat": 10k -> 100k grows peak RSS by at most this
INSERT_BATCH = 5_000
NAMES = ["Ada Lovelace", "Zoë Łukasiewicz", "", "Grace Hopper", "José Müller", "", "李小龍"]
FROM = "Weekly Links <links@example.com>"
SITE_URL = "https://news.example.com"


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _import_root() -> None:
    """Make ``newsletter`` importable from this checkout, installed or not."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def app_env(url: str, port: int, connections: int) -> dict[str, str]:
    """The NEWSLETTER_* settings of a send to the sink: plain SMTP, no pace limit."""
    return {
        "NEWSLETTER_DATABASE_URL": url,
        "NEWSLETTER_FROM": FROM,
        "NEWSLETTER_NAME": "Weekly Links",
        "NEWSLETTER_SITE_URL": SITE_URL,
        "NEWSLETTER_SMTP_HOST": "127.0.0.1",
        "NEWSLETTER_SMTP_PORT": str(port),
        "NEWSLETTER_SMTP_SECURITY": "none",
        "NEWSLETTER_SMTP_CONNECTIONS": str(connections),
        "NEWSLETTER_SMTP_TIMEOUT": "30",
    }


def _settings(url: str, port: int, connections: int, extra: dict[str, str] | None = None):
    _import_root()
    from newsletter.config import load_settings

    env = app_env(url, port, connections) | (extra or {})
    return load_settings(env, dotenv_path=Path("/nonexistent"))


# The SMTP sink ---------------------------------------------------------------------------


class Sink:
    """An SMTP server on 127.0.0.1 in a process of its own, started once for the whole run."""

    def __init__(self, kind: str, work: Path) -> None:
        self.kind = kind
        self._log = work / "sink.log"
        if kind == "smtp-sink":
            self.port = _free_port()
            privileges = ["-u", "nobody"] if os.geteuid() == 0 else []  # required as root
            with self._log.open("wb") as log:
                self._process = subprocess.Popen(
                    [str(SMTP_SINK), *privileges, "-c", f"127.0.0.1:{self.port}", "1000"],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            _wait_for_port(self.port, self._process)
        else:
            self._process = subprocess.Popen(
                [sys.executable, str(TEST_SINK), "--port", "0", "--cert-dir", str(work)],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            line = self._process.stdout.readline() if self._process.stdout else ""
            match = re.search(r"listening on [\d.]+:(\d+)", line)
            if not match:
                self._process.kill()
                raise SystemExit(f"tests/smtp_sink.py did not start: {line!r}")
            self.port = int(match.group(1))

    def accepted(self) -> int | None:
        """Messages accepted so far (smtp-sink's -c counter); None when the sink cannot say."""
        if self.kind != "smtp-sink":
            return None
        counts = re.findall(rb"mesg=(\d+)", self._log.read_bytes())
        return int(counts[-1]) if counts else 0

    def close(self) -> None:
        self._process.send_signal(signal.SIGTERM)
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"smtp-sink exited with status {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise SystemExit(f"smtp-sink is not listening on 127.0.0.1:{port}")


# Databases ------------------------------------------------------------------------------


def populate(url: str, count: int) -> None:
    """Create the schema and ``count`` active subscribers with bulk INSERTs (not timed)."""
    _import_root()
    from sqlalchemy import insert

    from newsletter.store import Subscriber, open_store, utcnow

    now = utcnow()
    with open_store(url) as store, store.engine.begin() as connection:
        for first in range(0, count, INSERT_BATCH):
            rows = [
                {
                    "email": f"reader.{n}@example{n % 7}.com",
                    "name": NAMES[n % len(NAMES)] or None,
                    "status": "active",
                    "source": "import",
                    "created_at": now,
                    "confirmed_at": now,
                }
                for n in range(first, min(first + INSERT_BATCH, count))
            ]
            connection.execute(insert(Subscriber), rows)


@contextlib.contextmanager
def sqlite_database(work: Path) -> Iterator[str]:
    """A new SQLite file in a directory of its own, removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="db-", dir=work))
    try:
        yield f"sqlite:///{folder / 'newsletter.db'}"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def postgres_database(server_url: str):
    """A database of its own on ``server_url``'s server, dropped afterwards."""
    _import_root()
    sys.path.insert(0, str(ROOT / "tests"))
    from databases import fresh_postgres_database

    return fresh_postgres_database(server_url, prefix="newsletter_bench")


def postgres_unreachable(server_url: str) -> str | None:
    """Why the PostgreSQL server cannot be used, or None when it can."""
    _import_root()
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    try:
        engine = create_engine(server_url, poolclass=NullPool, connect_args={"connect_timeout": 3})
        with engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")
        engine.dispose()
    except Exception as exc:
        return " ".join(str(getattr(exc, "orig", None) or exc).split())[:200]
    return None


# Children: each prints one JSON line ------------------------------------------------------


SUMMARY = re.compile(r"issue \d+: sent (\d+), failed (\d+), bounced (\d+).*; ([\d.]+) s, ")


def command_send(
    url: str, port: int, connections: int, work: Path, extra: dict[str, str] | None = None
) -> dict[str, Any]:
    """`newsletter send SAMPLE --yes` as a process: wall clock from start to exit, its peak
    memory, and the sending phase's seconds from its summary line. ``extra`` settings are
    added to the environment (the DKIM key of a signed send)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    env |= app_env(url, port, connections) | (extra or {})
    script = Path(sys.executable).with_name("newsletter")
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "newsletter"]
    out = work / "send.out"
    with out.open("wb") as stdout:
        start = time.perf_counter()
        process = subprocess.Popen(
            [*argv, "send", str(SAMPLE), "--yes"],
            stdout=stdout,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=work,
            env=env,
        )
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    text = out.read_text("utf-8", "replace")
    found = SUMMARY.search(text)
    if process.returncode != 0 or not found:
        raise SystemExit(f"newsletter send failed ({process.returncode}):\n{text}")
    sent = int(found.group(1))
    phase = float(found.group(4))
    return {
        "seconds": seconds,
        "sending_seconds": phase,
        "startup_seconds": seconds - phase,
        "sent": sent,
        "failed": int(found.group(2)) + int(found.group(3)),
        "open": 0,
        "rate": sent / seconds,
        "sending_rate": sent / phase,
        "peak_mb": usage.ru_maxrss / 1024,
    }


def dkim_settings(work: Path) -> dict[str, str]:
    """The settings of a signed send: a 2048-bit RSA key made for this run, in a child, so
    this process never loads cryptography (a child's peak RSS counts its parent's at fork)."""
    return in_child("dkim_key", path=str(work / "dkim-bench.pem"))


def child_dkim_key(spec: dict[str, Any]) -> dict[str, str]:
    """Write a new RSA 2048 key; its settings, once they are shown to turn signing on."""
    _import_root()
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from newsletter.signing import DkimSigner, message_signer

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    Path(spec["path"]).write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    dkim = {"NEWSLETTER_DKIM_PRIVATE_KEY": spec["path"], "NEWSLETTER_DKIM_SELECTOR": DKIM_SELECTOR}
    if not isinstance(message_signer(_settings("sqlite://", 25, 1, dkim)), DkimSigner):
        raise SystemExit("the DKIM settings do not turn signing on: the signed figures would lie")
    return dkim


def baseline_message() -> tuple[str, bytes]:
    """The sample digest's message for one recipient, as smtplib takes it (not dot-stuffed)."""
    _import_root()
    from newsletter.config import load_settings
    from newsletter.digest import load_digest
    from newsletter.message import MessageTemplate, Recipient
    from newsletter.render import render_issue
    from newsletter.transports import from_wire

    settings = load_settings(app_env("sqlite://", 25, 1), dotenv_path=Path("/nonexistent"))
    template = MessageTemplate(
        render_issue(load_digest(SAMPLE), settings),
        from_address=settings.from_address,
        list_name=settings.list_name,
        site_url=settings.site_url,
    )
    recipient = Recipient(
        "reader.1@example1.com",
        "Zoë Łukasiewicz",
        f"{SITE_URL}/unsubscribe/{'x' * 60}",
        f"{uuid.uuid4().hex}@example.com",
    )
    return template.envelope_from, from_wire(template.build(recipient))


def child_baseline(spec: dict[str, Any]) -> dict[str, Any]:
    """Bare smtplib: one connection, sendmail() of the same pre-built message N times."""
    import smtplib

    sender, message = baseline_message()
    count = spec["count"]
    start = time.perf_counter()
    with smtplib.SMTP("127.0.0.1", spec["port"], timeout=30) as connection:
        for n in range(count):
            connection.sendmail(sender, [f"reader.{n}@example{n % 7}.com"], message)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "sent": count,
        "rate": count / seconds,
        "message_bytes": len(message),
        "peak_mb": _peak_mb(),
    }


def in_child(mode: str, **spec: Any) -> dict[str, Any]:
    """Run ``child_<mode>(spec)`` in a fresh interpreter; its last stdout line is the result."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, __file__, "--child", mode, json.dumps(spec)],
        env=env,
        cwd=tempfile.gettempdir(),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"{mode} child failed ({spec}):\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


# Measurements ---------------------------------------------------------------------------


@dataclass
class Bench:
    """What every measurement shares: the sink, a scratch folder and the print-as-you-go log."""

    sink: Sink
    work: Path
    dkim: dict[str, str] = field(default_factory=dict)

    def send(
        self, url: str, count: int, connections: int, label: str, signed: bool = False
    ) -> dict[str, Any]:
        """One `newsletter send` (DKIM-signed if ``signed``); SystemExit unless every message
        was accepted."""
        before = self.sink.accepted()
        extra = self.dkim if signed else None
        result = command_send(url, self.sink.port, connections, self.work, extra)
        self._check(label, result, count, before)
        print(
            f"  {label}: {result['rate']:7,.0f} msg/s end to end ({result['sent']:,} in "
            f"{result['seconds']:.2f} s); sending phase {result['sending_rate']:,.0f} msg/s "
            f"({result['sending_seconds']:.2f} s, start-up {result['startup_seconds']:.2f} s); "
            f"peak RSS {result['peak_mb']:.1f} MB",
            flush=True,
        )
        return result

    def baseline(self, count: int, label: str) -> dict[str, Any]:
        before = self.sink.accepted()
        result = in_child("baseline", port=self.sink.port, count=count)
        self._check(label, result, count, before)
        print(
            f"  {label}: {result['rate']:7,.0f} msg/s  ({count:,} in {result['seconds']:.2f} s, "
            f"{result['message_bytes'] / 1024:.1f} KB each)  peak RSS {result['peak_mb']:.1f} MB",
            flush=True,
        )
        return result

    def _check(self, label: str, result: dict, count: int, before: int | None) -> None:
        if result["sent"] != count or result.get("open") or result.get("failed"):
            raise SystemExit(f"{label}: incomplete send: {result}")
        if before is None:
            return
        accepted = (self.sink.accepted() or 0) - before
        for _ in range(20):  # smtp-sink writes its counter a moment after the last 250
            if accepted >= count:
                break
            time.sleep(0.05)
            accepted = (self.sink.accepted() or 0) - before
        if accepted != count:
            raise SystemExit(f"{label}: smtp-sink counted {accepted:,} messages, not {count:,}")


def median_of(results: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in results)


def sqlite_send(
    bench: Bench, count: int, connections: int, label: str, signed: bool = False
) -> dict[str, Any]:
    """One send on a SQLite file of its own, so no run sees another's ledger or WAL."""
    with sqlite_database(bench.work) as url:
        populate(url, count)
        return bench.send(url, count, connections, label, signed)


def postgres_send(bench: Bench, server: str, count: int, label: str) -> dict[str, Any]:
    with postgres_database(server) as url:
        populate(url, count)
        return bench.send(url, count, CONNECTIONS, label)


@dataclass
class Results:
    """Every child's result, grouped by measurement."""

    runs: int
    large: int
    sink: str
    sends: list[dict[str, Any]] = field(default_factory=list)
    baselines: list[dict[str, Any]] = field(default_factory=list)
    signed: list[dict[str, Any]] = field(default_factory=list)
    single: dict[str, Any] | None = None
    big: dict[str, Any] = field(default_factory=dict)
    postgres: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def run_benchmark(options: argparse.Namespace) -> None:
    """Every figure of the 'done means' item, printed as measured, then the JSON line."""
    started = time.monotonic()
    kind = options.sink
    if kind == "auto":
        kind = "smtp-sink" if SMTP_SINK.exists() else "aiosmtpd"
    results = Results(
        runs=1 if options.quick else 3, large=QUICK_LARGE if options.quick else LARGE, sink=kind
    )
    postgres_server = options.postgres_url or DEFAULT_POSTGRES_URL
    postgres_problem = postgres_unreachable(postgres_server)
    with tempfile.TemporaryDirectory(prefix="newsletter-bench-send-") as tmp:
        sink = Sink(kind, Path(tmp))
        try:
            bench = Bench(sink, Path(tmp), dkim_settings(Path(tmp)))
            measure(options, bench, results, postgres_server, postgres_problem)
        finally:
            sink.close()
    results.seconds = time.monotonic() - started
    report(options, results)


def measure(
    options: argparse.Namespace,
    bench: Bench,
    results: Results,
    postgres_server: str,
    postgres_problem: str | None,
) -> None:
    """The runs in a fixed order, each printed as it ends, so a slow machine shows progress."""
    runs, large = results.runs, results.large
    where = f"{results.sink} on 127.0.0.1:{bench.sink.port}"
    print(f"sample digest {SAMPLE.name}; SMTP server: {where}; {os.cpu_count()} CPUs")
    if results.sink != "smtp-sink":
        print(
            "  note: not Postfix's smtp-sink: the aiosmtpd sink is slower, and keeps every message"
        )
    print(
        f"{SMALL:,} subscribers, SQLite, {CONNECTIONS} connections, unsigned and DKIM-signed "
        "(RSA 2048), vs bare smtplib:"
    )
    for run in range(1, runs + 1):  # interleaved, so drift hits all alike
        results.sends.append(sqlite_send(bench, SMALL, CONNECTIONS, f"run {run}/{runs} sender  "))
        label = f"run {run}/{runs} DKIM    "
        results.signed.append(sqlite_send(bench, SMALL, CONNECTIONS, label, signed=True))
        results.baselines.append(bench.baseline(SMALL, f"run {run}/{runs} smtplib "))
    if options.quick:
        print("1 connection: skipped in --quick")
    else:
        print(f"{SMALL:,} subscribers, SQLite, 1 connection (for comparison):")
        results.single = sqlite_send(bench, SMALL, 1, "run 1/1 sender  ")
    note = f" (--quick: {QUICK_LARGE:,} instead of {LARGE:,})" if options.quick else ""
    print(f"{large:,} subscribers, SQLite, {CONNECTIONS} connections, memory check{note}:")
    results.big = sqlite_send(bench, large, CONNECTIONS, "run 1/1 sender  ")
    if postgres_problem:
        print(f"PostgreSQL skipped: {postgres_server} is unreachable: {postgres_problem}")
        return
    print(f"{SMALL:,} subscribers, PostgreSQL, {CONNECTIONS} connections:")
    for run in range(1, runs + 1):
        label = f"run {run}/{runs} sender  "
        results.postgres.append(postgres_send(bench, postgres_server, SMALL, label))


def _round(value: float | None, digits: int = 0) -> float | int | None:
    if value is None:
        return None
    return round(value, digits) if digits else round(value)


def report(options: argparse.Namespace, results: Results) -> None:
    """The summary lines, the targets, and the JSON line."""
    large = results.large
    rate = median_of(results.sends, "rate")
    phase = median_of(results.sends, "sending_rate")
    startup = median_of(results.sends, "startup_seconds")
    baseline = median_of(results.baselines, "rate")
    ratio, phase_ratio = rate / baseline, phase / baseline
    single = results.single["rate"] if results.single else None
    signed = median_of(results.signed, "rate")
    signed_phase = median_of(results.signed, "sending_rate")
    rss_small = max(r["peak_mb"] for r in results.sends)
    rss_large = results.big["peak_mb"]
    growth = rss_large - rss_small
    pg_rate = median_of(results.postgres, "rate") if results.postgres else None
    pg_rss = max(r["peak_mb"] for r in results.postgres) if results.postgres else None
    peaks = [rss_small, rss_large] + ([pg_rss] if pg_rss is not None else [])
    targets = {
        "command_vs_smtplib_ge_1_5": ratio >= TARGET_RATIO,
        "sending_phase_vs_smtplib_ge_2": phase_ratio >= TARGET_PHASE_RATIO,
        "peak_rss_le_150mb": max(peaks) <= TARGET_MB,
        "dkim_signed_ge_800": signed >= TARGET_SIGNED,
        f"peak_rss_flat_10k_to_{large // 1000}k": growth <= FLAT_TOLERANCE_MB,
    }
    missed = [name for name, ok in targets.items() if ok is False]
    print(f"summary (medians of {results.runs} run(s) for the 10k figures):")
    print(
        f"  `newsletter send`, SQLite, {CONNECTIONS} connections: {rate:7,.0f} msg/s end to end"
        f" ({ratio:.2f}x smtplib; start-up {startup:.2f} s), sending phase {phase:7,.0f} msg/s"
        f" ({phase_ratio:.2f}x smtplib)"
    )
    print(
        f"  the same, DKIM-signed (RSA 2048):          {signed:7,.0f} msg/s end to end "
        f"({signed / rate:.0%} of unsigned), sending phase {signed_phase:7,.0f} msg/s"
    )
    if single is not None:
        print(f"  `newsletter send`, SQLite, 1 connection:  {single:7,.0f} msg/s end to end")
    print(f"  bare smtplib, 1 connection:                {baseline:7,.0f} msg/s")
    if pg_rate is not None:
        print(f"  `newsletter send`, PostgreSQL:            {pg_rate:7,.0f} msg/s end to end")
    print(
        f"  peak RSS: {rss_small:.1f} MB at {SMALL:,}, {rss_large:.1f} MB at {large:,} "
        f"({growth:+.1f} MB)" + (f", {pg_rss:.1f} MB on PostgreSQL" if pg_rss is not None else "")
    )
    print(
        f"targets (command >= {TARGET_RATIO}x smtplib, sending phase >= {TARGET_PHASE_RATIO}x, "
        f"peak RSS <= {TARGET_MB:.0f} MB, + <= {FLAT_TOLERANCE_MB:.0f} MB from 10k to "
        f"{large // 1000}k, DKIM-signed >= {TARGET_SIGNED:.0f} msg/s): "
        + (f"NOT met: {', '.join(missed)}" if missed else "met")
    )
    print(f"benchmark took {results.seconds:.0f} s")
    figures = {
        "bench": "send",
        "quick": options.quick,
        "runs": results.runs,
        "sink": results.sink,
        "subscribers": SMALL,
        "connections": CONNECTIONS,
        "command_msgs_per_s_sqlite": round(rate),
        "sending_phase_msgs_per_s_sqlite": round(phase),
        "command_msgs_per_s_sqlite_dkim_rsa2048": round(signed),
        "sending_phase_msgs_per_s_sqlite_dkim_rsa2048": round(signed_phase),
        "startup_seconds": round(startup, 2),
        "baseline_smtplib_msgs_per_s": round(baseline),
        "command_vs_smtplib": round(ratio, 2),
        "sending_phase_vs_smtplib": round(phase_ratio, 2),
        "command_msgs_per_s_sqlite_1conn": _round(single),
        "command_msgs_per_s_postgres": _round(pg_rate),
        "peak_rss_mb_10k": round(rss_small, 1),
        f"peak_rss_mb_{large // 1000}k": round(rss_large, 1),
        "memory_check_subscribers": large,
        "peak_rss_mb_postgres": _round(pg_rss, 1),
        "seconds": round(results.seconds),
        "targets": targets,
        "targets_met": not missed,
    }
    print(json.dumps(figures))


# Profiling ------------------------------------------------------------------------------


def run_profile(options: argparse.Namespace) -> None:
    """cProfile of one 10k send in this process, every worker thread included, plus the
    per-message cost of each step measured alone, to show where the time goes."""
    with tempfile.TemporaryDirectory(prefix="newsletter-bench-profile-") as tmp:
        work = Path(tmp)
        kind = "smtp-sink" if SMTP_SINK.exists() and options.sink != "aiosmtpd" else "aiosmtpd"
        sink = Sink(kind, work)
        dkim = dkim_settings(work)
        try:
            with sqlite_database(work) as url:
                populate(url, SMALL)
                extra = dkim if options.dkim else None
                profile_send(url, sink.port, options.connections, options.profile_out, extra)
            with sqlite_database(work) as url:
                populate(url, SMALL)
                step_costs(url, sink.port, dkim)
            for threads in (1, options.connections):
                ceiling(sink.port, threads)
                ceiling(sink.port, threads, dkim)
        finally:
            sink.close()


def profile_send(
    url: str, port: int, connections: int, out: Path | None, extra: dict[str, str] | None
) -> None:
    import cProfile
    import pstats

    _import_root()
    from newsletter import sender as sender_module
    from newsletter.sender import plan_send, send_issue
    from newsletter.store import open_store

    profiles: list[cProfile.Profile] = []
    original = sender_module._Run.work

    def profiled_work(self, *args: Any) -> None:
        """cProfile sees only the thread that enables it: give each worker its own."""
        profile = cProfile.Profile()
        profiles.append(profile)
        profile.enable()
        try:
            original(self, *args)
        finally:
            profile.disable()

    settings = _settings(url, port, connections, extra)
    main = cProfile.Profile()
    sender_module._Run.work = profiled_work  # type: ignore[method-assign]
    try:
        with open_store(settings) as store:
            start = time.perf_counter()
            main.enable()
            report = send_issue(store, settings, plan_send(store, settings, SAMPLE))
            main.disable()
            seconds = time.perf_counter() - start
    finally:
        sender_module._Run.work = original  # type: ignore[method-assign]
    signed = ", DKIM-signed (RSA 2048)" if extra else ""
    print(
        f"cProfile: {report.sent:,} sent{signed} with {connections} connection(s) "
        f"in {seconds:.2f} s "
        f"({report.sent / seconds:,.0f} msg/s under the profiler)"
    )
    stats = pstats.Stats(main)
    for profile in profiles:
        stats.add(profile)
    if out:
        stats.dump_stats(out)
        print(f"profile written to {out} (python -m pstats {out})")
    stats.strip_dirs().sort_stats("tottime").print_stats(20)
    stats.sort_stats("cumulative").print_stats(
        r"ledger.py.*\((claim|mark)\)|session.py.*\((commit|execute)\)|tokens.py.*token|"
        r"message.py.*\((build|new_message_id)\)|pacing.py.*\(wait\)|transports.py.*\(send\)|"
        r"sender.py.*\((_deliver|_record_failure|_message)\)|\{method 'recv_into'|"
        r"signing.py.*\((signature|relaxed_body|_unstuff)\)|\{method 'sign' of|"
        r"\{method 'sendall'|\{method 'commit'|\{method 'execute' of 'sqlite3"
    )


def _per_message(label: str, count: int, seconds: float) -> None:
    print(f"  {label:<44} {seconds / count * 1e6:8.1f} us/msg  ({count / seconds:9,.0f}/s)")


def step_costs(url: str, port: int, dkim: dict[str, str]) -> None:
    """Each per-message step of Sender._deliver timed alone, on one thread; ``dkim`` are the
    settings of the signature step."""
    _import_root()
    from newsletter.ledger import claim, create_issue, mark, new_owner
    from newsletter.message import MessageTemplate, Recipient, new_message_id
    from newsletter.pacing import Pacer
    from newsletter.sender import plan_send
    from newsletter.signing import message_signer
    from newsletter.store import open_store
    from newsletter.tokens import Tokens, unsubscribe_url
    from newsletter.transports import SmtpTransport

    settings = _settings(url, port, 1)
    print(f"per-message cost of each step alone, one thread, {SMALL:,} messages:")
    with open_store(settings) as store:
        plan = plan_send(store, settings, SAMPLE)
        start = time.perf_counter()
        issue, _ = create_issue(
            store,
            digest_path=str(SAMPLE),
            digest_name=SAMPLE.name,
            content_hash=plan.digest.content_hash,
            rendered=plan.rendered,
            force=False,
        )
        issue_id = issue.id
        print(f"  create_issue (ledger of {SMALL:,} rows): {time.perf_counter() - start:.3f} s")
        template = MessageTemplate(
            plan.rendered,
            from_address=settings.from_address,
            list_name=settings.list_name,
            site_url=settings.site_url,
        )
        tokens = Tokens(store.secret_key(settings.secret_key))
        owner = new_owner()
        with store.session() as session:
            start = time.perf_counter()
            claimed = []
            while batch := claim(session, issue_id, owner, 20):
                claimed.extend(batch)
            _per_message("ledger.claim (batches of 20, 2 commits each)", SMALL, _since(start))
            start = time.perf_counter()
            urls = [
                unsubscribe_url(settings.site_url, tokens.unsubscribe_token(d.email))
                for d in claimed
            ]
            _per_message("Tokens.unsubscribe_token + unsubscribe_url", SMALL, _since(start))
            start = time.perf_counter()
            ids = [new_message_id(template.domain) for _ in claimed]
            _per_message("new_message_id (uuid4)", SMALL, _since(start))
            start = time.perf_counter()
            messages = [
                template.build(Recipient(d.email, d.name, u, i))
                for d, u, i in zip(claimed, urls, ids, strict=True)
            ]
            _per_message("MessageTemplate.build", SMALL, _since(start))
            signer = message_signer(_settings(url, port, 1, dkim))
            start = time.perf_counter()
            for data in messages:
                signer(data)
            _per_message("DKIM signature, RSA 2048 (signing.py)", SMALL, _since(start))
            pacer = Pacer(None)
            start = time.perf_counter()
            for _ in claimed:
                pacer.wait()
            _per_message("Pacer.wait (no rate limit)", SMALL, _since(start))
            transport = SmtpTransport("127.0.0.1", port, "none")
            start = time.perf_counter()
            for d, data in zip(claimed, messages, strict=True):
                transport.send(template.envelope_from, d.email, data)
            transport.close()
            _per_message("SmtpTransport.send (pipelined, smtp-sink)", SMALL, _since(start))
            start = time.perf_counter()
            for d, i in zip(claimed, ids, strict=True):
                mark(session, d.id, owner, "sent", last_answer="250 2.0.0 Ok", message_id=i)
                session.commit()
            _per_message("ledger.mark + commit, one per message", SMALL, _since(start))


def ceiling(port: int, threads: int, dkim: dict[str, str] | None = None) -> None:
    """The sender's per-message work (token, Message-ID, build, DKIM signature with ``dkim``,
    SMTP) in ``threads`` threads with no database at all: what the sender could reach if
    the ledger cost nothing."""
    import threading

    _import_root()
    from newsletter.digest import load_digest
    from newsletter.message import MessageTemplate, Recipient, new_message_id
    from newsletter.render import render_issue
    from newsletter.signing import message_signer
    from newsletter.tokens import Tokens, unsubscribe_url
    from newsletter.transports import SmtpTransport

    settings = _settings("sqlite://", port, threads, dkim)
    sign = message_signer(settings)
    template = MessageTemplate(
        render_issue(load_digest(SAMPLE), settings),
        from_address=settings.from_address,
        list_name=settings.list_name,
        site_url=settings.site_url,
    )
    tokens = Tokens("a secret key of the usual length, 43 chars.")

    def work(first: int) -> None:
        transport = SmtpTransport("127.0.0.1", port, "none")
        for n in range(first, SMALL, threads):
            email = f"reader.{n}@example{n % 7}.com"
            url = unsubscribe_url(settings.site_url, tokens.unsubscribe_token(email))
            recipient = Recipient(email, NAMES[n % 7] or None, url, new_message_id(template.domain))
            transport.send(template.envelope_from, email, sign(template.build(recipient)))
        transport.close()

    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    start = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    rate = SMALL / _since(start)
    signed = ", DKIM-signed" if dkim else ""
    print(f"ceiling without any database, {threads} thread(s){signed}: {rate:7,.0f} msg/s")


def _since(start: float) -> float:
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one run of each, 30k for memory")
    parser.add_argument(
        "--postgres-url",
        help=f"server for the PostgreSQL send (default: "
        f"{DEFAULT_POSTGRES_URL}); a database is created there and dropped",
    )
    parser.add_argument("--sink", choices=["auto", "smtp-sink", "aiosmtpd"], default="auto")
    parser.add_argument("--profile", action="store_true", help="profile one 10k send instead")
    parser.add_argument("--connections", type=int, default=CONNECTIONS, help="for --profile")
    parser.add_argument("--profile-out", type=Path, help="--profile: save the pstats here")
    parser.add_argument("--dkim", action="store_true", help="--profile: a DKIM-signed send")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        mode, spec = options.child
        children = {"baseline": child_baseline, "dkim_key": child_dkim_key}
        print(json.dumps(children[mode](json.loads(spec))))
    elif options.profile:
        run_profile(options)
    else:
        run_benchmark(options)


if __name__ == "__main__":
    main()
