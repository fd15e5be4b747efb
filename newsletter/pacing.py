"""One pace for all connections: the configured rate, slowed when a provider pushes back;
and how long one message waits before its next try.

Providers answer 421/451/454 when a sender goes too fast. Failing those deliveries
would lose mail and retrying at full speed would make it worse, so every worker
waits on one shared pacer that halves the pace on each throttling answer and
creeps back up while the server accepts mail (additive increase, multiplicative
decrease, as TCP does).
"""

from __future__ import annotations

import threading
import time
from collections import deque

MIN_RATE = 0.1  # messages per second: never slower than this
RECOVERY = 1.25  # the pace grows by 25% per second without a throttling answer
REACTION = 1.0  # seconds: answers within this long after a slow-down count as one


def backoff(attempts: int, base: float, longest: float) -> float:
    """Seconds before retry number ``attempts`` (1, 2, …) of one message: ``base``, doubled
    after each failure, at most ``longest``."""
    return min(base * 2 ** (attempts - 1), longest)


class Pacer:
    """A thread-safe pace shared by every worker of a send."""

    def __init__(self, rate: float | None = None, clock=time.monotonic, sleep=time.sleep) -> None:
        self.limit = rate
        self.current = rate
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._next = 0.0
        self._recent: deque[float] = deque(maxlen=200)
        self._last_change = clock()
        self._last_decrease = float("-inf")
        self.throttles = 0

    def wait(self) -> None:
        """Block until the next message may go."""
        with self._lock:
            now = self._clock()
            self._recover(now)
            if self.current is None:
                self._recent.append(now)
                return
            slot = max(now, self._next)
            self._next = slot + 1.0 / self.current
            self._recent.append(slot)
        if slot > now:
            self._sleep(slot - now)

    def throttled(self) -> None:
        """A server asked us to slow down: halve the pace of the whole send."""
        with self._lock:
            now = self._clock()
            self.throttles += 1
            if now - self._last_decrease < REACTION:
                return  # the answers of messages already in flight: one slow-down is enough
            self._last_decrease = now
            base = self.current if self.current is not None else self._observed_rate(now)
            self.current = max(MIN_RATE, base / 2)
            self._next = max(self._next, now + 1.0 / self.current)
            self._last_change = now

    def _observed_rate(self, now: float) -> float:
        if len(self._recent) < 2:
            return 10.0
        span = max(now - self._recent[0], 1e-3)
        return len(self._recent) / span

    def _recover(self, now: float) -> None:
        """Grow the pace back after a quiet second, up to the configured limit (or none)."""
        if self.current is None or self.current == self.limit or now - self._last_change < 1.0:
            return
        steps = int(now - self._last_change)
        grown = self.current * RECOVERY**steps
        self._last_change += steps
        if self.limit is not None:
            self.current = min(self.limit, grown)
        elif grown > 4 * self._observed_rate(now):
            self.current = None  # the server keeps up: back to full speed
        else:
            self.current = grown
