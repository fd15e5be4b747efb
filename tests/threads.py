"""Running work in many threads that start at the same moment."""

from __future__ import annotations

import threading
from collections.abc import Callable


def at_once(count: int, work: Callable[[int], object]) -> dict[int, object]:
    """Run ``work(n)`` for n in range(count), each in a thread, all released together by a
    barrier; what each returned or raised, by n."""
    results: dict[int, object] = {}
    start = threading.Barrier(count)

    def run(n: int) -> None:
        start.wait()
        try:
            results[n] = work(n)
        except BaseException as exc:
            results[n] = exc

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def errors(results: dict[int, object]) -> list[BaseException]:
    """The exceptions among ``at_once``'s results."""
    return [result for result in results.values() if isinstance(result, BaseException)]
