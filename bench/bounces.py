"""Bounce benchmark: 10,000 DSNs in one mbox through `newsletter bounces process`.

Each run is the whole command a user runs, as a process of its own, on a fresh database
holding 10,000 subscribers with one sent delivery each (bulk-inserted before it starts);
the mbox holds one returned message per delivery, in the shapes of tests/fixtures/bounces
(Postfix, Exim, Gmail, Outlook, SES, feedback reports, auto-replies) in turn, each naming
its delivery by VERP token. Time is wall-clock from starting the process to its exit;
peak memory is the process's ru_maxrss. "Flat" memory: the same command on a mbox a fifth
the size peaks within FLAT_TOLERANCE_MB of it. Medians of the runs; the last line printed
is one JSON object with the figures.

    python bench/bounces.py [--runs 3] [--count 10000] [--postgres-url URL]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from string import Template

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "bounces"
SHAPES = ("postfix", "exim", "gmail", "outlook", "ses", "arf", "autoreply")
SECRET = "bench-bounces-secret"
TARGET_SECONDS = 20.0
FLAT_TOLERANCE_MB = 10.0
OWNER = "0123456789abcdef"


def _database(url: str, count: int) -> None:
    """A fresh schema with ``count`` active subscribers and one sent delivery each."""
    sys.path.insert(0, str(ROOT))
    from sqlalchemy import insert

    from newsletter.store import Delivery, Issue, Subscriber, open_store, utcnow

    now = utcnow()
    with open_store(url) as store, store.begin() as session:
        session.add(
            Issue(
                id=1,
                digest_path="/bench.md",
                digest_name="bench.md",
                content_hash="bench",
                subject="Weekly Links #12",
                status="sent",
                finished_at=now,
                recipient_count=count,
                sent_count=count,
            )
        )
        session.flush()
        session.execute(
            insert(Subscriber),
            [
                {
                    "id": n,
                    "email": f"reader{n:06d}@example.org",
                    "status": "active",
                    "source": "cli",
                    "created_at": now,
                }
                for n in range(1, count + 1)
            ],
        )
        session.execute(
            insert(Delivery),
            [
                {
                    "id": n,
                    "issue_id": 1,
                    "subscriber_id": n,
                    "email": f"reader{n:06d}@example.org",
                    "status": "sent",
                    "attempts": 1,
                    "message_id": f"{n}.{OWNER}@example.com",
                    "sent_at": now,
                }
                for n in range(1, count + 1)
            ],
        )


def _mbox(path: Path, count: int) -> None:
    from newsletter.verp import Verp

    verp = Verp(SECRET, "bounces@example.com", "links@example.com")
    templates = {s: Template((FIXTURES / f"{s}.eml").read_text("utf-8")) for s in SHAPES}
    with path.open("w", encoding="utf-8") as box:
        for n in range(1, count + 1):
            token = verp.token(n)
            text = templates[SHAPES[n % len(SHAPES)]].substitute(
                bounce_to=f"bounces+{token}@example.com",
                recipient=f"reader{n:06d}@example.org",
                message_id=f"{n}.{OWNER}@example.com",
                token=token,
                plain_from="links@example.com",
                subject="Weekly Links #12",
                delivery_header="X-Newsletter-Delivery",
            )
            text = text.replace("\nFrom ", "\n>From ")
            box.write(f"From MAILER-DAEMON Tue Dec  1 10:00:00 2026\n{text}\n")


def _run(url: str, mbox: Path, folder: Path) -> tuple[float, float, float, str]:
    """(seconds, CPU seconds, peak MB, summary line) of one `newsletter bounces process MBOX`;
    CPU time tells what the command costs when other processes share the machine."""
    env = os.environ | {
        "NEWSLETTER_DATABASE_URL": url,
        "NEWSLETTER_SECRET_KEY": SECRET,
        "NEWSLETTER_BOUNCE_ADDRESS": "bounces@example.com",
    }
    command = [sys.executable, "-m", "newsletter", "bounces", "process", str(mbox)]
    started = time.monotonic()
    process = subprocess.Popen(
        command,
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.monotonic() - started
    out = process.stdout.read().decode().strip() if process.stdout else ""
    process.stdout.close()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"bounces process exited {process.returncode}: {out}")
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, out


def _measure(url_for, count: int, runs: int, folder: Path) -> dict:
    mbox = folder / f"dsn-{count}.mbox"
    _mbox(mbox, count)
    seconds, cpu, peaks, summary = [], [], [], ""
    for run in range(runs):
        url = url_for(f"{count}-{run}")
        _database(url, count)
        elapsed, used, peak, summary = _run(url, mbox, folder)
        seconds.append(elapsed)
        cpu.append(used)
        peaks.append(peak)
        print(
            f"  {count} DSNs, run {run + 1}: {elapsed:.2f} s ({used:.2f} s CPU), "
            f"peak {peak:.0f} MB — {summary}"
        )
    return {
        "count": count,
        "seconds": round(statistics.median(seconds), 2),
        "per_second": round(count / statistics.median(seconds)),
        "cpu_seconds": round(statistics.median(cpu), 2),
        "load_average": round(os.getloadavg()[0], 1),
        "peak_mb": round(max(peaks), 1),
        "mbox_mb": round(mbox.stat().st_size / 1048576, 1),
        "summary": summary,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--postgres-url", help="also run on PostgreSQL (a database per run)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests"))
    figures: dict = {"target_seconds": TARGET_SECONDS}
    with tempfile.TemporaryDirectory(prefix="bench-bounces-") as tmp:
        folder = Path(tmp)

        def sqlite(name: str) -> str:
            return f"sqlite:///{folder / name / 'newsletter.db'}"

        print(f"SQLite, {args.count} DSNs in one mbox:")
        big = _measure(sqlite, args.count, args.runs, folder)
        small = _measure(sqlite, args.count // 5, 1, folder)
        figures["sqlite"] = big
        figures["sqlite_small"] = small
        figures["memory_growth_mb"] = round(big["peak_mb"] - small["peak_mb"], 1)
        if args.postgres_url:
            from databases import fresh_postgres_database

            print(f"PostgreSQL, {args.count} DSNs in one mbox:")
            stack = []

            def postgres(name: str) -> str:
                context = fresh_postgres_database(args.postgres_url, "bench_bounces")
                stack.append(context)
                return context.__enter__()

            try:
                figures["postgresql"] = _measure(postgres, args.count, args.runs, folder)
            finally:
                for context in stack:
                    context.__exit__(None, None, None)
    figures["within_target"] = figures["sqlite"]["seconds"] <= TARGET_SECONDS and (
        "postgresql" not in figures or figures["postgresql"]["seconds"] <= TARGET_SECONDS
    )
    figures["memory_flat"] = figures["memory_growth_mb"] <= FLAT_TOLERANCE_MB
    print(
        f"median {figures['sqlite']['seconds']} s for {args.count} DSNs on SQLite "
        f"(target {TARGET_SECONDS:.0f} s); peak {figures['sqlite']['peak_mb']} MB, "
        f"{figures['memory_growth_mb']} MB more than at {args.count // 5}"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
