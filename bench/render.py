"""Render benchmark: time to render the sample digest once, and per-recipient fill cost.

Prints the median of several runs and peak memory; the last line is one JSON object.
    python bench/render.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from newsletter.config import load_settings  # noqa: E402
from newsletter.digest import load_digest  # noqa: E402
from newsletter.render import render_issue  # noqa: E402

SAMPLE = ROOT / "digests" / "2026-11-20-weekly-links.md"


def _render_once(settings) -> float:
    start = time.perf_counter()
    render_issue(load_digest(SAMPLE), settings)
    return time.perf_counter() - start


def _fill_rate(issue, recipients: int) -> float:
    """Personalised (html, text) pairs per second on one core."""
    values = [
        {
            "name": f"Reader {i} <&>",
            "email": f"reader{i}@example.com",
            "unsubscribe_url": f"https://news.example.com/unsubscribe/token-{i:08d}",
        }
        for i in range(recipients)
    ]
    start = time.perf_counter()
    for value in values:
        issue.personalize(value)
    return recipients / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer runs (under 30 s)")
    args = parser.parse_args()
    runs, rounds, recipients = (20, 3, 20_000) if args.quick else (100, 7, 100_000)
    settings = load_settings({}, dotenv_path=Path("/nonexistent"))
    _render_once(settings)  # warm caches: Markdown instance, templates, imports
    render_ms = statistics.median(_render_once(settings) * 1000 for _ in range(runs))
    issue = render_issue(load_digest(SAMPLE), settings)
    fill_rate = statistics.median(_fill_rate(issue, recipients) for _ in range(rounds))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    html_kb = len(issue.html.encode()) / 1024
    print(f"sample digest: {SAMPLE.name} ({html_kb:.1f} KB of HTML)")
    print(f"render (parse -> inlined HTML + text): median {render_ms:.2f} ms over {runs} runs")
    print(
        f"personalise: median {fill_rate:,.0f} recipients/s over {rounds} rounds of {recipients:,}"
    )
    print(f"peak RSS: {peak_mb:.1f} MB")
    print(
        json.dumps(
            {
                "render_ms_median": round(render_ms, 2),
                "personalisations_per_s": round(fill_rate),
                "html_kb": round(html_kb, 1),
                "peak_rss_mb": round(peak_mb, 1),
                "runs": runs,
            }
        )
    )


if __name__ == "__main__":
    main()
