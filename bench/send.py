"""Send benchmark: one issue of the sample digest to 10,000 subscribers over SMTP, against a
bare-smtplib baseline, then peak memory at 100,000 subscribers and the same send on PostgreSQL.

The SMTP server is Postfix's ``smtp-sink`` on 127.0.0.1 (a fast sink that accepts and discards),
or the aiosmtpd sink of tests/smtp_sink.py in its own process when smtp-sink is not installed.
Every measured send runs in a child process of its own on a fresh database, so its peak memory
(ru_maxrss) is that send's alone; subscribers are bulk-inserted before the child starts. The
timed part is what `newsletter send DIGEST --yes` does: plan_send, start_send (which writes the
ledger) and Sender.run. The baseline sends the same rendered message, built once, N times with
smtplib.SMTP.sendmail over one reused connection. Rates are medians of the runs; the last line
printed is one JSON object with the figures.

    python bench/send.py [--quick] [--postgres-url URL] [--sink auto|smtp-sink|aiosmtpd]
    python bench/send.py --profile [--connections 4]   (cProfile of one in-process 10k send)

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
TARGET_RATE = 1_500.0  # messages per second
TARGET_RATIO = 1.3  # times the bare-smtplib baseline
TARGET_MB = 150.0
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


def _settings(url: str, port: int, connections: int):
    _import_root()
    from newsletter.config import load_settings

    return load_settings(app_env(url, port, connections), dotenv_path=Path("/nonexistent"))


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


def child_send(spec: dict[str, Any]) -> dict[str, Any]:
    """What `newsletter send DIGEST --yes` does, timed from plan_send to the end of Sender.run."""
    _import_root()
    from newsletter.sender import Sender, check_transport, plan_send, start_send
    from newsletter.sender import transport_factory as factory
    from newsletter.store import open_store

    settings = _settings(spec["url"], spec["port"], spec["connections"])
    with open_store(settings) as store:
        ready_mb = _peak_mb()
        start = time.perf_counter()
        plan = plan_send(store, settings, SAMPLE)
        check_transport(factory(settings))
        issue_id = start_send(store, plan)
        ledger_done = time.perf_counter()
        report = Sender(store, settings).run(issue_id)
        seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "plan_and_ledger_seconds": ledger_done - start,
        "sent": report.sent,
        "open": report.open,
        "failed": report.failed + report.bounced,
        "rate": report.sent / seconds,
        "ready_mb": ready_mb,
        "peak_mb": _peak_mb(),
    }


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

    def send(self, url: str, count: int, connections: int, label: str) -> dict[str, Any]:
        """One send in a child; SystemExit unless every message was accepted."""
        before = self.sink.accepted()
        result = in_child(
            "send", url=url, port=self.sink.port, connections=connections, count=count
        )
        self._check(label, result, count, before)
        print(
            f"  {label}: {result['rate']:7,.0f} msg/s  ({result['sent']:,} in "
            f"{result['seconds']:.2f} s, plan + ledger {result['plan_and_ledger_seconds']:.2f} s)"
            f"  peak RSS {result['peak_mb']:.1f} MB (before sending {result['ready_mb']:.1f} MB)",
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


def sqlite_send(bench: Bench, count: int, connections: int, label: str) -> dict[str, Any]:
    """One send on a SQLite file of its own, so no run sees another's ledger or WAL."""
    with sqlite_database(bench.work) as url:
        populate(url, count)
        return bench.send(url, count, connections, label)


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
            measure(options, Bench(sink, Path(tmp)), results, postgres_server, postgres_problem)
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
    print(f"{SMALL:,} subscribers, SQLite, {CONNECTIONS} connections vs bare smtplib:")
    for run in range(1, runs + 1):  # interleaved, so drift hits both alike
        results.sends.append(sqlite_send(bench, SMALL, CONNECTIONS, f"run {run}/{runs} sender  "))
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
    baseline = median_of(results.baselines, "rate")
    ratio = rate / baseline
    single = results.single["rate"] if results.single else None
    rss_small = median_of(results.sends, "peak_mb")
    rss_large = results.big["peak_mb"]
    growth = rss_large - rss_small
    pg_rate = median_of(results.postgres, "rate") if results.postgres else None
    pg_rss = median_of(results.postgres, "peak_mb") if results.postgres else None
    peaks = [rss_small, rss_large] + ([pg_rss] if pg_rss is not None else [])
    targets = {
        "msgs_per_s_sqlite_ge_1500": rate >= TARGET_RATE,
        "ratio_ge_1_3": ratio >= TARGET_RATIO,
        "peak_rss_le_150mb": max(peaks) <= TARGET_MB,
        f"peak_rss_flat_10k_to_{large // 1000}k": growth <= FLAT_TOLERANCE_MB,
        "msgs_per_s_postgres_ge_1500": pg_rate >= TARGET_RATE if pg_rate is not None else None,
    }
    missed = [name for name, ok in targets.items() if ok is False]
    print(f"summary (medians of {results.runs} run(s) for the 10k figures):")
    print(f"  sender, SQLite, {CONNECTIONS} connections:     {rate:7,.0f} msg/s")
    if single is not None:
        print(f"  sender, SQLite, 1 connection:      {single:7,.0f} msg/s")
    print(
        f"  bare smtplib, 1 connection:        {baseline:7,.0f} msg/s"
        f"  (sender / smtplib = {ratio:.2f}x)"
    )
    if pg_rate is not None:
        print(f"  sender, PostgreSQL, {CONNECTIONS} connections: {pg_rate:7,.0f} msg/s")
    print(
        f"  peak RSS: {rss_small:.1f} MB at {SMALL:,}, {rss_large:.1f} MB at {large:,} "
        f"({growth:+.1f} MB)" + (f", {pg_rss:.1f} MB on PostgreSQL" if pg_rss is not None else "")
    )
    print(
        f"targets (>= {TARGET_RATE:,.0f} msg/s, >= {TARGET_RATIO}x smtplib, peak RSS <= "
        f"{TARGET_MB:.0f} MB, + <= {FLAT_TOLERANCE_MB:.0f} MB from 10k to {large // 1000}k): "
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
        "msgs_per_s_sqlite_4conn": round(rate),
        "msgs_per_s_sqlite_1conn": _round(single),
        "baseline_smtplib_msgs_per_s": round(baseline),
        "ratio": round(ratio, 2),
        "peak_rss_mb_10k": round(rss_small, 1),
        f"peak_rss_mb_{large // 1000}k": round(rss_large, 1),
        "memory_check_subscribers": large,
        "msgs_per_s_postgres_4conn": _round(pg_rate),
        "peak_rss_mb_postgres": _round(pg_rss, 1),
        "plan_and_ledger_seconds_10k": round(
            median_of(results.sends, "plan_and_ledger_seconds"), 2
        ),
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
        try:
            with sqlite_database(work) as url:
                populate(url, SMALL)
                profile_send(url, sink.port, options.connections, options.profile_out)
            with sqlite_database(work) as url:
                populate(url, SMALL)
                step_costs(url, sink.port)
            for threads in (1, options.connections):
                ceiling(sink.port, threads)
        finally:
            sink.close()


def profile_send(url: str, port: int, connections: int, out: Path | None) -> None:
    import cProfile
    import pstats

    _import_root()
    from newsletter import sender as sender_module
    from newsletter.sender import Sender, plan_send, start_send
    from newsletter.store import open_store

    profiles: list[cProfile.Profile] = []
    original = sender_module.Sender._work

    def profiled_work(self, *args: Any) -> None:
        """cProfile sees only the thread that enables it: give each worker its own."""
        profile = cProfile.Profile()
        profiles.append(profile)
        profile.enable()
        try:
            original(self, *args)
        finally:
            profile.disable()

    settings = _settings(url, port, connections)
    main = cProfile.Profile()
    sender_module.Sender._work = profiled_work  # type: ignore[method-assign]
    try:
        with open_store(settings) as store:
            start = time.perf_counter()
            main.enable()
            plan = plan_send(store, settings, SAMPLE)
            issue_id = start_send(store, plan)
            report = Sender(store, settings).run(issue_id)
            main.disable()
            seconds = time.perf_counter() - start
    finally:
        sender_module.Sender._work = original  # type: ignore[method-assign]
    print(
        f"cProfile: {report.sent:,} sent with {connections} connection(s) in {seconds:.2f} s "
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
        r"sender.py.*\((_deliver|_record|_work_loop)\)|\{method 'recv_into'|\{method 'sendall'|"
        r"\{method 'commit'|\{method 'execute' of 'sqlite3"
    )


def _per_message(label: str, count: int, seconds: float) -> None:
    print(f"  {label:<44} {seconds / count * 1e6:8.1f} us/msg  ({count / seconds:9,.0f}/s)")


def step_costs(url: str, port: int) -> None:
    """Each per-message step of Sender._deliver timed alone, on one thread."""
    _import_root()
    from newsletter.ledger import claim, mark, new_owner
    from newsletter.message import MessageTemplate, Recipient, new_message_id
    from newsletter.pacing import Pacer
    from newsletter.sender import plan_send, secret_key, start_send
    from newsletter.store import open_store
    from newsletter.tokens import Tokens, unsubscribe_url
    from newsletter.transports import SmtpTransport

    settings = _settings(url, port, 1)
    print(f"per-message cost of each step alone, one thread, {SMALL:,} messages:")
    with open_store(settings) as store:
        plan = plan_send(store, settings, SAMPLE)
        start = time.perf_counter()
        issue_id = start_send(store, plan)
        print(f"  start_send (ledger of {SMALL:,} rows): {time.perf_counter() - start:.3f} s")
        template = MessageTemplate(
            plan.rendered,
            from_address=settings.from_address,
            list_name=settings.list_name,
            site_url=settings.site_url,
        )
        tokens = Tokens(secret_key(settings, store))
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


def ceiling(port: int, threads: int) -> None:
    """The sender's per-message work (token, Message-ID, build, SMTP) in ``threads`` threads
    with no database at all: what the sender could reach if the ledger cost nothing."""
    import threading

    _import_root()
    from newsletter.digest import load_digest
    from newsletter.message import MessageTemplate, Recipient, new_message_id
    from newsletter.render import render_issue
    from newsletter.tokens import Tokens, unsubscribe_url
    from newsletter.transports import SmtpTransport

    settings = _settings("sqlite://", port, threads)
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
            transport.send(template.envelope_from, email, template.build(recipient))
        transport.close()

    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    start = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    rate = SMALL / _since(start)
    print(f"ceiling without any database, {threads} thread(s): {rate:7,.0f} msg/s")


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
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        mode, spec = options.child
        children = {"send": child_send, "baseline": child_baseline}
        print(json.dumps(children[mode](json.loads(spec))))
    elif options.profile:
        run_profile(options)
    else:
        run_benchmark(options)


if __name__ == "__main__":
    main()
