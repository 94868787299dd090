"""Exponential backoff with jitter, bounded by attempts and by wall time.

One ``Attempts`` object spans one logical operation (a request with its
redirects, a resumed blob download), so its retries share one budget.
"""

from __future__ import annotations

import email.utils
import random
import time
from typing import Callable, Optional

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


def parse_retry_after(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class Attempts:
    """``while True: try ... except transient: delay = attempts.next_delay(); if delay is None: raise``."""

    def __init__(
        self,
        max_attempts: int,
        budget: float,
        initial: float,
        maximum: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.max_attempts = max_attempts
        self.initial = initial
        self.maximum = maximum
        self._clock = clock
        self._sleep = sleep
        self._rand = rand
        self.started = clock()
        self.deadline = self.started + budget
        self.count = 1  # the attempt in progress
        self.gave_up_reason = ""

    def remaining(self) -> float:
        return self.deadline - self._clock()

    def next_delay(self, retry_after: Optional[float] = None) -> Optional[float]:
        """The pause before the next attempt, or None when the budget is spent.

        Backoff doubles from ``initial`` up to ``maximum`` with jitter in
        [50%, 100%] so clients that failed together do not retry together; a
        server's Retry-After is honoured as the minimum.
        """
        if self.count >= self.max_attempts:
            self.gave_up_reason = f"after {self.count} attempts"
            return None
        delay = min(self.maximum, self.initial * (2 ** (self.count - 1)))
        delay *= 0.5 + 0.5 * self._rand()
        if retry_after is not None:
            delay = max(delay, retry_after)
        if delay >= self.remaining():
            elapsed = self._clock() - self.started
            self.gave_up_reason = f"after {self.count} attempts in {elapsed:.1f}s (retry budget exhausted)"
            return None
        self.count += 1
        return delay

    def sleep(self, delay: float) -> None:
        self._sleep(delay)

    def wait(self, retry_after: Optional[float] = None) -> bool:
        """Sleep the next delay; False when no attempt is left."""
        delay = self.next_delay(retry_after)
        if delay is None:
            return False
        self._sleep(delay)
        return True
