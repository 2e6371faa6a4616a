"""Hedged requests: the latencies a percentile hedge is timed by, and how long to wait before hedging.

The attempt loop (`router.loop`) decides everything about a race: when to send a hedge, to which target, which
answer wins, what each request cost. The drivers (`router.drivers`) carry out its steps.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Hashable

MIN_SAMPLES = 20  # latencies a target needs before its percentile times a hedge
WINDOW = 256  # the most recent latencies kept per (alias, target)


class Latencies:
    """Recent latencies per (alias, target) of completed answers (or first text of streams), for
    `after_percentile` hedges: one alias's traffic never moves another's percentile, and a loser cut off by the
    race is no answer, so the moment it was stopped is not a latency."""

    def __init__(self) -> None:
        self._seen: dict[tuple[Hashable, bool], deque[float]] = {}
        self._lock = threading.Lock()

    def add(self, key: Hashable, stream: bool, seconds: float) -> None:
        """One more latency under `key`, (alias, target key) (stream: time to first text)."""
        with self._lock:
            self._seen.setdefault((key, stream), deque(maxlen=WINDOW)).append(seconds)

    def percentile(self, key: Hashable, stream: bool, q: float) -> float | None:
        """The `q`th percentile (nearest rank) of the recent latencies under `key`; None below MIN_SAMPLES."""
        with self._lock:
            seen = sorted(self._seen.get((key, stream), ()))
        if len(seen) < MIN_SAMPLES:
            return None
        rank = max(0, min(len(seen) - 1, int(-(-q * len(seen) // 100)) - 1))
        return seen[rank]


def hedge_delay(after_s: float | None, percentile: float | None, seen: float | None) -> float | None:
    """How long to wait before hedging: the percentile when known, else `after_s` (None: do not hedge)."""
    if percentile is not None and seen is not None:
        return seen
    return after_s
