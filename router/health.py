"""Live health of targets and keys: circuit breakers and benched keys.

State lives behind small store interfaces (`CircuitStore`, `KeyStore`) with in-process defaults; the config's
`state:` section swaps in stores shared by a host's workers (SQLite) or a fleet (Redis), see `router.state`,
without touching the attempt loop. Transitions are pure functions of plain data (`Circuit`, `CircuitConfig`,
a timestamp); the stores only add locking (and, shared, a local view synced in the background).

Circuit states: ``closed`` (requests flow) → ``open`` after `failure_threshold` consecutive counted failures,
or a failure ratio over `window_s` → after `cooldown_s`, ``half_open``: one probe request is let through →
``closed`` if it succeeds, ``open`` again if it fails.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from .config import ApiKey, CircuitConfig

CircuitState = Literal["closed", "half_open", "open"]
STATE_VALUE = {"closed": 0, "half_open": 1, "open": 2}


@dataclass
class Circuit:
    """One target's breaker."""

    state: CircuitState = "closed"
    consecutive_failures: int = 0
    open_until: float = 0.0
    probe_started: float | None = None
    # Results per whole second, [second, requests, failures]: memory and work stay bounded by window_s.
    window: deque[list[int]] = field(default_factory=deque)


@dataclass(frozen=True)
class Admission:
    """May a request go to the target now? `probe`: yes, as the one half-open probe."""

    allowed: bool
    probe: bool = False
    open_until: float = 0.0
    transition: CircuitState | None = None


def admit(c: Circuit, cfg: CircuitConfig, now: float) -> Admission:
    """Let a request through a closed circuit; through an expired open one as the single probe."""
    if c.state == "closed":
        return Admission(True)
    if c.state == "open" and now >= c.open_until:
        c.state, c.probe_started = "half_open", now
        return Admission(True, probe=True, transition="half_open")
    if c.state == "half_open" and (c.probe_started is None or now - c.probe_started > cfg.cooldown_s):
        # The last probe never reported back (its caller went away): let another one through.
        c.probe_started = now
        return Admission(True, probe=True)
    if c.state == "open":
        return Admission(False, open_until=c.open_until)
    # half-open with its probe still out: no answer before that probe's time is up
    return Admission(False, open_until=(c.probe_started or now) + cfg.cooldown_s)


def record(c: Circuit, cfg: CircuitConfig, now: float, failed: bool | None, probe: bool) -> CircuitState | None:
    """Count one attempt's result (None: says nothing about health, e.g. a 400); return the new state on a change."""
    if failed is None:
        if probe and c.state == "half_open":
            c.probe_started = None  # let the next request probe instead
        return None
    second = int(now)
    while c.window and second - c.window[0][0] >= cfg.window_s:
        c.window.popleft()
    if not c.window or c.window[-1][0] != second:
        c.window.append([second, 0, 0])
    c.window[-1][1] += 1
    c.window[-1][2] += failed
    if not failed:
        c.consecutive_failures = 0
        if c.state != "closed":
            c.state, c.probe_started = "closed", None
            c.window.clear()
            return "closed"
        return None
    c.consecutive_failures += 1
    if c.state == "half_open" or _should_open(c, cfg):
        was_open = c.state == "open"
        c.state, c.open_until, c.probe_started = "open", now + cfg.cooldown_s, None
        return None if was_open else "open"
    return None


def _should_open(c: Circuit, cfg: CircuitConfig) -> bool:
    if c.consecutive_failures >= cfg.failure_threshold:
        return True
    if cfg.failure_ratio is None:
        return False
    requests = sum(b[1] for b in c.window)
    failures = sum(b[2] for b in c.window)
    return requests >= cfg.min_requests and failures / requests >= cfg.failure_ratio


class CircuitStore(Protocol):
    """Where breakers live. The in-process default is `MemoryCircuitStore`."""

    def admit(self, key: str, cfg: CircuitConfig, now: float) -> Admission:
        """Whether a request to `key` may go now (see `admit`)."""
        ...

    def record(self, key: str, cfg: CircuitConfig, now: float, failed: bool | None, probe: bool) -> CircuitState | None:
        """Count an attempt's result; return the new state on a transition."""
        ...

    def peek(self, key: str) -> tuple[CircuitState, float]:
        """The state and, when open, until when; without changing anything."""
        ...


class MemoryCircuitStore:
    """Breakers in this process, keyed by target ("provider/model"); survive config reloads."""

    def __init__(self) -> None:
        self._circuits: dict[str, Circuit] = {}
        self._lock = threading.Lock()

    def admit(self, key: str, cfg: CircuitConfig, now: float) -> Admission:
        """See `CircuitStore.admit`."""
        with self._lock:
            c = self._circuits.get(key)
            return Admission(True) if c is None else admit(c, cfg, now)

    def record(self, key: str, cfg: CircuitConfig, now: float, failed: bool | None, probe: bool) -> CircuitState | None:
        """See `CircuitStore.record`."""
        with self._lock:
            c = self._circuits.setdefault(key, Circuit())
            return record(c, cfg, now, failed, probe)

    def peek(self, key: str) -> tuple[CircuitState, float]:
        """See `CircuitStore.peek`."""
        with self._lock:
            c = self._circuits.get(key)
            return ("closed", 0.0) if c is None else (c.state, c.open_until)


class KeyStore(Protocol):
    """Round-robin position and benched keys per provider. The in-process default is `MemoryKeyStore`."""

    def pick(
        self, provider: str, keys: Sequence[ApiKey], now: float, exclude: frozenset[str] = frozenset()
    ) -> ApiKey | None:
        """The next usable, unbenched key not in `exclude`; None if there is none."""
        ...

    def bench(self, provider: str, key: str, until: float) -> None:
        """Take a key out of rotation until `until`."""
        ...

    def benched_until(self, provider: str, key: str) -> float:
        """Until when a key is benched (0: it is not)."""
        ...


class MemoryKeyStore:
    """Key rotation state in this process."""

    def __init__(self) -> None:
        self._next: dict[str, int] = {}
        self._benched: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def pick(
        self, provider: str, keys: Sequence[ApiKey], now: float, exclude: frozenset[str] = frozenset()
    ) -> ApiKey | None:
        """See `KeyStore.pick`."""
        with self._lock:
            start = self._next.get(provider, 0)
            for i in range(len(keys)):
                k = keys[(start + i) % len(keys)]
                if k.usable and k.name not in exclude and self._benched.get((provider, k.name), 0.0) <= now:
                    self._next[provider] = (start + i + 1) % len(keys)
                    return k
            return None

    def bench(self, provider: str, key: str, until: float) -> None:
        """See `KeyStore.bench`."""
        with self._lock:
            self._benched[(provider, key)] = until

    def benched_until(self, provider: str, key: str) -> float:
        """See `KeyStore.benched_until`."""
        with self._lock:
            return self._benched.get((provider, key), 0.0)
