"""Link-check benchmark: `check --links` on a digest of 200 links to one local server that
answers each request after 50 ms, as `newsletter check --links` runs it (render, find the
lines, fetch every link with the per-host limit).

Prints each run, the median and peak memory; the last line is one JSON object.
    python bench/links.py [--quick] [--links N] [--latency SECONDS]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from link_server import LinkServer  # noqa: E402

from newsletter.checks import check_digests  # noqa: E402
from newsletter.config import load_settings  # noqa: E402
from newsletter.links import PER_HOST  # noqa: E402

TARGET_SECONDS = 3.0


def _digest(directory: Path, base: str, count: int) -> Path:
    path = directory / "links.md"
    items = "\n".join(
        f"* [Link {n}]({base}/page/{n}) — why it is worth a read" for n in range(count)
    )
    path.write_text(f"---\ntitle: {count} links\n---\n{items}\n", "utf-8")
    return path


def _run(path: Path, settings) -> tuple[float, int]:
    start = time.perf_counter()
    [checked] = check_digests([path], settings, fetch_links=True, timeout=10)
    elapsed = time.perf_counter() - start
    if checked.error is not None:
        raise SystemExit(f"digest did not render: {checked.error}")
    return elapsed, len(checked.findings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="3 runs instead of 7")
    parser.add_argument("--links", type=int, default=200)
    parser.add_argument("--latency", type=float, default=0.05, help="server delay per request")
    args = parser.parse_args()
    runs = 3 if args.quick else 7
    settings = load_settings({}, dotenv_path=Path("/nonexistent"))
    with tempfile.TemporaryDirectory() as temporary, LinkServer(latency=args.latency) as server:
        path = _digest(Path(temporary), server.base, args.links)
        times = []
        for run in range(runs):
            before = len(server.requests)
            elapsed, findings = _run(path, settings)
            requests = len(server.requests) - before
            if findings or requests != args.links:
                raise SystemExit(f"run {run + 1}: {findings} findings, {requests} requests")
            times.append(elapsed)
            print(f"run {run + 1}: {args.links} links in {elapsed:.3f} s ({requests} requests)")
        peak_in_flight = server.peak_in_flight
    median = statistics.median(times)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"median {median:.3f} s for {args.links} links at {args.latency * 1000:.0f} ms each, "
        f"at most {peak_in_flight} in flight (limit {PER_HOST} per host); "
        f"target {TARGET_SECONDS:.0f} s"
    )
    print(f"peak RSS: {peak_mb:.1f} MB")
    print(
        json.dumps(
            {
                "links": args.links,
                "latency_ms": round(args.latency * 1000),
                "median_s": round(median, 3),
                "runs_s": [round(t, 3) for t in times],
                "peak_in_flight": peak_in_flight,
                "per_host_limit": PER_HOST,
                "peak_rss_mb": round(peak_mb, 1),
                "target_s": TARGET_SECONDS,
                "within_target": median <= TARGET_SECONDS,
            }
        )
    )


if __name__ == "__main__":
    main()
