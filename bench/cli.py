"""CLI start-up: how long `newsletter --help` and `newsletter render --help` take as processes.

Each command runs RUNS times as a fresh process (the installed `newsletter` script beside
this Python, else `python -m newsletter`), after one warm-up run that fills the OS file
cache; the figures are the median and the slowest run, and each process's peak memory.
A bare `python -c pass` is timed the same way as the floor no CLI can go under. The last
line printed is one JSON object.

    python bench/cli.py [--runs 10]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_SECONDS = 0.3
COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "newsletter --help": ["--help"],
    "newsletter render --help": ["render", "--help"],
    "newsletter send --help": ["send", "--help"],
}


def _argv(args: list[str]) -> list[str]:
    if args[0] == sys.executable:
        return args
    script = Path(sys.executable).with_name("newsletter")
    return [str(script), *args] if script.exists() else [sys.executable, "-m", "newsletter", *args]


def _once(argv: list[str]) -> tuple[float, float]:
    """Wall-clock seconds and peak RSS (MB) of one run, measured by wait4 on the child."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    started = time.perf_counter()
    process = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, env=env
    )
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(argv)} failed")
    process.returncode = os.waitstatus_to_exitcode(status)
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    options = parser.parse_args()
    figures: dict[str, dict[str, float]] = {}
    print(f"{options.runs} runs each, after one warm-up; {os.cpu_count()} CPUs")
    for label, args in COMMANDS.items():
        argv = _argv(args)
        _once(argv)
        runs = [_once(argv) for _ in range(options.runs)]
        seconds = [s for s, _ in runs]
        figures[label] = {
            "median_s": round(statistics.median(seconds), 3),
            "max_s": round(max(seconds), 3),
            "peak_rss_mb": round(max(mb for _, mb in runs), 1),
        }
        print(
            f"  {label:<26} median {figures[label]['median_s']:.3f} s, slowest "
            f"{figures[label]['max_s']:.3f} s, peak RSS {figures[label]['peak_rss_mb']:.1f} MB"
        )
    targets = {
        f"{label} <= {TARGET_SECONDS} s": figures[label]["median_s"] <= TARGET_SECONDS
        for label in ("newsletter --help", "newsletter render --help")
    }
    met = all(targets.values())
    print(f"target: median <= {TARGET_SECONDS} s: {'met' if met else 'NOT met'}")
    self_usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "bench": "cli",
                "runs": options.runs,
                "commands": figures,
                "bench_peak_rss_mb": round(self_usage, 1),
                "targets": targets,
                "targets_met": met,
            }
        )
    )


if __name__ == "__main__":
    main()
