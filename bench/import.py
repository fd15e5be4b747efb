"""Import benchmark: 100,000 generated subscribers into a fresh SQLite database, then list
and export them at 10,000 and 100,000 rows to show that memory stays flat.

Every measurement is one `newsletter subscribers …` command run in a child process of its
own, so its peak memory (ru_maxrss) is that command's alone; times are medians of the runs.
The last line printed is one JSON object with the figures.

    python bench/import.py [--quick]      (--quick: one run of each, well under 30 s)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = 100_000
SMALL = 10_000
IMPORT_TARGET_SECONDS = 10.0
IMPORT_TARGET_MB = 150.0
FLAT_TOLERANCE_MB = 10.0
NAMES = ["Ada Lovelace", "Zoë Łukasiewicz", "", "Grace Hopper", "José Müller", "", "李小龍"]


def write_csv(path: Path, rows: int) -> None:
    """A list as people export it: names missing here and there, a few unsubscribed rows."""
    with path.open("w", encoding="utf-8", newline="") as out:
        out.write("email,name,status\n")
        for n in range(rows):
            status = "unsubscribed" if n % 50 == 0 else ""
            out.write(f"Reader.{n}@Example{n % 7}.com,{NAMES[n % len(NAMES)]},{status}\n")


def child(args: list[str]) -> None:
    """Run one CLI command with its output discarded; print seconds and peak memory as JSON."""
    sys.path.insert(0, str(ROOT))
    from newsletter.cli import main

    start = time.perf_counter()
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        try:
            main(args, standalone_mode=False)
        except SystemExit as exit_:
            if exit_.code:
                raise
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_mb": peak_mb}))


def measure(database: Path, *command: str) -> dict[str, float]:
    """One command in a fresh child process, against the SQLite file ``database``."""
    env = os.environ | {"NEWSLETTER_DATABASE_URL": f"sqlite:///{database}"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, __file__, "--child", *command],
        env=env,
        cwd=database.parent,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"`newsletter {' '.join(command)}` failed:\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def median(results: list[dict[str, float]]) -> dict[str, float]:
    return {key: round(statistics.median(r[key] for r in results), 2) for key in results[0]}


def bench_import(work: Path, csv_file: Path, rows: int, runs: int) -> tuple[dict, Path]:
    """Import into a new database ``runs`` times; returns the median and the last database."""
    results = []
    for run in range(runs):
        database = work / f"import-{rows}-{run}" / "newsletter.db"
        database.parent.mkdir()
        results.append(measure(database, "subscribers", "import", str(csv_file)))
    figures = median(results)
    print(f"import {rows:>7,} rows: {figures['seconds']:6.2f} s, peak {figures['peak_mb']:6.1f} MB")
    return figures, database


def bench_streaming(database: Path, rows: int, runs: int) -> dict[str, dict]:
    """list (table and JSON) and export of a database holding ``rows`` subscribers."""
    commands = {
        "list_table": ["subscribers", "list"],
        "list_json": ["subscribers", "list", "--format", "json"],
        "export": ["subscribers", "export", str(database.parent / "export.csv")],
    }
    figures = {}
    for name, command in commands.items():
        figures[name] = median([measure(database, *command) for _ in range(runs)])
        print(
            f"{name:<10} {rows:>7,} rows: {figures[name]['seconds']:6.2f} s, "
            f"peak {figures[name]['peak_mb']:6.1f} MB"
        )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one run of each measurement")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child is not None:
        child(options.child)
        return
    runs = 1 if options.quick else 3
    with tempfile.TemporaryDirectory(prefix="newsletter-bench-") as tmp:
        work = Path(tmp)
        big, small = work / f"{ROWS}.csv", work / f"{SMALL}.csv"
        write_csv(big, ROWS)
        write_csv(small, SMALL)
        imported, big_db = bench_import(work, big, ROWS, runs)
        _, small_db = bench_import(work, small, SMALL, 1)
        streaming = {
            SMALL: bench_streaming(small_db, SMALL, runs),
            ROWS: bench_streaming(big_db, ROWS, runs),
        }
    growth = {
        name: round(streaming[ROWS][name]["peak_mb"] - streaming[SMALL][name]["peak_mb"], 1)
        for name in streaming[ROWS]
    }
    ok = (
        imported["seconds"] <= IMPORT_TARGET_SECONDS
        and imported["peak_mb"] <= IMPORT_TARGET_MB
        and all(mb <= FLAT_TOLERANCE_MB for mb in growth.values())
    )
    print(
        f"targets: import <= {IMPORT_TARGET_SECONDS:.0f} s and <= {IMPORT_TARGET_MB:.0f} MB, "
        f"list/export memory growth 10k -> 100k <= {FLAT_TOLERANCE_MB:.0f} MB: "
        f"{'met' if ok else 'NOT met'}"
    )
    print(
        json.dumps(
            {
                "bench": "import",
                "quick": options.quick,
                "runs": runs,
                "rows": ROWS,
                "import_seconds": imported["seconds"],
                "import_peak_mb": imported["peak_mb"],
                "import_rows_per_second": round(ROWS / imported["seconds"]),
                "streaming": {str(rows): figures for rows, figures in streaming.items()},
                "peak_mb_growth_10k_to_100k": growth,
                "targets_met": ok,
            }
        )
    )


if __name__ == "__main__":
    main()
