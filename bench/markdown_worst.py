"""Python-Markdown's worst cases, before and after newsletter.markdown_bounds.

Each case is one run of a short string repeated to SIZE bytes. "before" is Python-Markdown
as configured without the bounds (given up after --timeout seconds), "after" is
newsletter.render.markdown_to_html. Median of --runs runs; the last line is one JSON
object.
    python bench/markdown_worst.py [--size 20000] [--big] [--runs 3] [--timeout 60]
"""

from __future__ import annotations

import argparse
import json
import resource
import signal
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import markdown  # noqa: E402

from newsletter.digest import MAX_DIGEST_BYTES  # noqa: E402
from newsletter.embeds import expand_shortcodes  # noqa: E402
from newsletter.markdown_source import normalise_list_indentation  # noqa: E402
from newsletter.render import markdown_to_html  # noqa: E402

CASES = {
    "[": "[",
    "![": "![",
    "[^": "[^",
    "[](": "[](",
    "[a](b": "[a](b",
    "[x][": "[x][",
    "* [": "* [",
    "\\``": "\\``",
    "<a ": "<a ",
    "<http://": "<http://",
    "```a newline": "```a\n",
    "*_": "*_",
    "> ": "> ",
    "sample digest": (ROOT / "digests" / "2026-11-20-weekly-links.md").read_text("utf-8"),
}


class _TimedOut(Exception):
    pass


def _alarm(_signum, _frame) -> None:
    raise _TimedOut


def _plain(source: str) -> str:
    md = markdown.Markdown(extensions=["extra", "sane_lists"], output_format="html")
    return md.convert(normalise_list_indentation(expand_shortcodes(source)))


def _seconds(convert, source: str, runs: int, timeout: int) -> float | None:
    times = []
    for _ in range(runs):
        signal.alarm(timeout)
        try:
            start = time.perf_counter()
            convert(source)
            times.append(time.perf_counter() - start)
        except _TimedOut:
            return None
        finally:
            signal.alarm(0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=20_000, help="bytes per case (20000)")
    parser.add_argument("--big", action="store_true", help="also time 'after' at the size limit")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--timeout", type=int, default=60, help="seconds before giving up")
    args = parser.parse_args()
    signal.signal(signal.SIGALRM, _alarm)
    results = {}
    for name, unit in CASES.items():
        source = unit * max(1, args.size // len(unit))
        before = _seconds(_plain, source, args.runs, args.timeout)
        after = _seconds(markdown_to_html, source, args.runs, args.timeout)
        row = {"before_s": before, "after_s": after}
        if args.big:
            big = unit * (MAX_DIGEST_BYTES // len(unit))
            row["after_at_limit_s"] = _seconds(markdown_to_html, big, 1, args.timeout)
        results[name] = row
        shown = " ".join(
            f"{key}={'>' + str(args.timeout) if value is None else f'{value:.3f}'}"
            for key, value in row.items()
        )
        print(f"{name!r:16} {shown}", flush=True)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "size": args.size,
                "timeout_s": args.timeout,
                "peak_mb": round(peak_mb),
                "cases": results,
            }
        )
    )


if __name__ == "__main__":
    main()
