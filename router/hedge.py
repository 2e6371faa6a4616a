"""Hedged requests: the latencies a percentile hedge is timed by, and how long to wait before hedging.

The attempt loop (`router.loop`) decides everything about a race: when to send a hedge, to which target, which
answer wins, what each request cost. The drivers (`router.drivers`) carry out its steps.
"""

from __future__ import annotations

import threading
from collections import deque

MIN_SAMPLES = 20  # latencies a target needs before its percentile times a hedge
WINDOW = 256  # the most recent latencies kept per target


class Latencies:
    """Recent latencies per target (answers, or first text of streams), for `after_percentile` hedges."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, bool], deque[float]] = {}
        self._lock = threading.Lock()

    def add(self, target: str, stream: bool, seconds: float) -> None:
        """One more latency of `target` (stream: time to first text)."""
        with self._lock:
            self._seen.setdefault((target, stream), deque(maxlen=WINDOW)).append(seconds)

    def percentile(self, target: str, stream: bool, q: float) -> float | None:
        """The `q`th percentile (nearest rank) of the target's recent latencies; None below MIN_SAMPLES."""
        with self._lock:
            seen = sorted(self._seen.get((target, stream), ()))
        if len(seen) < MIN_SAMPLES:
            return None
        rank = max(0, min(len(seen) - 1, int(-(-q * len(seen) // 100)) - 1))
        return seen[rank]


def hedge_delay(after_s: float | None, percentile: float | None, seen: float | None) -> float | None:
    """How long to wait before hedging: the percentile when known, else `after_s` (None: do not hedge)."""
    if percentile is not None and seen is not None:
        return seen
    return after_s
