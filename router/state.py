"""Health state shared by processes: breakers and benched keys in SQLite (a host's workers) or Redis (a fleet).

Each process keeps the in-process stores of `router.health` as its local view, so no call ever waits on the
shared store. A background thread per process pulls the shared state every `state.sync_s` and pushes this
process's changes as soon as they happen: a circuit opening (or its cooldown being extended) or closing,
a key benched. Failure counting stays local; what is shared is the verdict. So once one worker opens a
circuit, the others skip the target from their next pull on (within `sync_s` plus one exchange).

The one exchange on a call's path: when a circuit's cooldown ends, the process about to send the half-open
probe first claims it in the store (a compare-and-set that doubles as a lease of `cooldown_s`), so one probe
goes out for the whole fleet, not one per worker; the others keep the target skipped until its verdict (or
the lease's end). That is once per cooldown per target, and skipped while the store is known to be down.

Shared records, in wall-clock (unix) time so that every host reads them alike::

    circuit  "provider/model"   -> (at, state "open" | "closed", until)   the latest change (by `at`) wins
    bench    (provider, key)    -> until                                  the latest `until` wins

Hosts' clocks must agree (NTP) to well within a cooldown: an open circuit's end is shared as a unix time.
Writes are conditional (an older change never overwrites a newer one), so a process that comes back from an
outage can push what it did meanwhile without undoing what others did since. While the store cannot be
reached, calls go on with local state: the outage is logged once, counted in `state_store_errors_total`,
shown by `state_store_up`, and the next exchange that works pushes and pulls everything again.

The thread and the store's connection belong to one process: a Router created before a fork (gunicorn
`--preload`) starts a new thread, with its own connection, in each child on first use.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol
from urllib.parse import urlsplit

from .config import ApiKey, CircuitConfig, StateConfig
from .errors import redact
from .health import STATE_VALUE, Admission, Circuit, CircuitState, MemoryCircuitStore, MemoryKeyStore, record
from .secrets import url_secrets

if TYPE_CHECKING:
    from .metrics import RouterMetrics

log = logging.getLogger("router")

Shared = Literal["open", "closed"]


@dataclass(frozen=True)
class CircuitRecord:
    """A breaker's shared state: open until `until`, or closed; `at` is when it changed (unix time)."""

    state: Shared
    until: float
    at: float


BenchKey = tuple[str, str]  # (provider, key name)


class Backend(Protocol):
    """A shared store: conditional writes of changes, and reads of everything."""

    def push(self, circuits: Mapping[str, CircuitRecord], benched: Mapping[BenchKey, float]) -> None:
        """Write these changes, each only where it is newer than what the store has."""
        ...

    def pull(self) -> tuple[dict[str, CircuitRecord], dict[BenchKey, float]]:
        """Every circuit record and every benched key."""
        ...

    def claim(self, key: str, expect: CircuitRecord | None, rec: CircuitRecord) -> CircuitRecord | None:
        """Write `rec` if the store's record of `key` is still `expect` (or it has none): None when written,
        else the record found."""
        ...

    def close(self) -> None:
        """Release the connection."""
        ...


class SharedState:
    """The local view of one process over a shared `Backend`; `.circuits` and `.keys` are the Router's stores."""

    def __init__(
        self,
        connect: Callable[[], Backend],
        backend: str,
        where: str,
        sync_s: float,
        metrics: RouterMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        secrets: Sequence[str] = (),
    ) -> None:
        self.backend = backend
        self.where = where  # for logs: a path, or host:port (never credentials)
        self.sync_s = sync_s
        self._connect = connect
        self._metrics = metrics
        self._clock = clock
        self._wall = wall
        self._secrets = tuple(secrets)
        self.circuits = SharedCircuitStore(self)
        self.keys = SharedKeyStore(self)
        self._pending_c: dict[str, CircuitRecord] = {}
        self._pending_b: dict[BenchKey, float] = {}
        self._records: dict[str, CircuitRecord] = {}  # per circuit, the record last applied or written here
        self.up: bool | None = None  # None: no exchange yet
        self.syncs = 0  # exchanges that worked, for tests and health checks
        self.failures = 0  # exchanges that failed
        self._closed = False
        self._reset()
        _LIVE.add(self)
        self.ensure()

    def _reset(self) -> None:
        """Fresh locks and no thread: at construction, and in a forked child (whose parent's may be held)."""
        self.lock = threading.Lock()
        self.circuits._lock = self.keys._lock = self.lock
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._claimers = threading.local()  # a connection per calling thread, for probe claims
        self._claim_backends: list[Backend] = []

    def ensure(self) -> None:
        """Start this process's sync thread if it has none (first use, or first use after a fork)."""
        if self._thread is not None or self._closed:
            return
        with self.lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(
                target=_sync_loop,
                args=(weakref.ref(self), self._stop, self._wake),
                name="llm-router-state",
                daemon=True,
            )
            self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Push what is pending, stop the thread and close the connection."""
        self._closed = True
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        with self.lock:
            backends, self._claim_backends = self._claim_backends, []
        for backend in backends:
            with contextlib.suppress(Exception):
                backend.close()

    def wait_synced(self, timeout: float = 5.0) -> bool:
        """Block until one more exchange with the store has worked (for tests and readiness checks); False
        if the store keeps failing, or on timeout."""
        target, failed = self.syncs + 1, self.failures
        deadline = time.monotonic() + timeout
        while self.syncs < target:
            if time.monotonic() > deadline or self.failures > failed + 1:
                return False
            self._wake.set()
            time.sleep(0.01)
        return True

    # -- changes made here ----------------------------------------------------------------------------------

    def _to_wall(self, local: float) -> float:
        return local - self._clock() + self._wall()

    def circuit_changed(self, key: str, state: Shared, until: float) -> None:
        """Called with `lock` held: this process opened (until `until`, its clock) or closed a circuit."""
        last = self._records.get(key)
        at = max(self._wall(), last.at + 1e-6 if last else 0.0)  # a change made here is newer than any seen
        rec = self._records[key] = CircuitRecord(state, self._to_wall(until) if state == "open" else 0.0, at)
        self._pending_c[key] = rec
        self._wake.set()

    def key_benched(self, provider: str, key: str, until: float) -> None:
        """Called with `lock` held: this process benched a key until `until` (its clock)."""
        k = (provider, key)
        self._pending_b[k] = max(self._pending_b.get(k, 0.0), self._to_wall(until))
        self._wake.set()

    def claim_probe(self, key: str, cooldown_s: float) -> CircuitRecord | None:
        """This process is about to probe `key`: claim the probe for the whole fleet, in one exchange (once per
        cooldown, not per call). None: go ahead (claimed, or the store is down: probe locally); else the
        record another process wrote first (its own probe's lease, or a newer verdict)."""
        if self.up is False:
            return None
        with self.lock:
            last = self._records.get(key)
            wall = self._wall()
            rec = CircuitRecord("open", wall + cooldown_s, max(wall, last.at + 1e-6 if last else 0.0))
        try:
            backend = getattr(self._claimers, "backend", None)
            if backend is None:
                backend = self._claimers.backend = self._connect()
                with self.lock:
                    self._claim_backends.append(backend)
            found = backend.claim(key, last, rec)
        except Exception as exc:
            if backend is not None:
                with contextlib.suppress(Exception):
                    backend.close()
                with self.lock:
                    if backend in self._claim_backends:
                        self._claim_backends.remove(backend)
            self._claimers.backend = None
            self._status(False, exc)
            return None
        with self.lock:
            if found is None:  # a lease: the others see the circuit open until it ends
                self._records[key] = rec
            return found

    # -- one exchange -----------------------------------------------------------------------------------------

    def exchange(self, backend: Backend, full: bool = False) -> None:
        """Push the pending changes (`full`: everything this process knows, as after connecting: the store may
        have restarted empty), then pull and apply everything; on failure the changes stay pending."""
        with self.lock:
            circuits, benched = self._pending_c, self._pending_b
            self._pending_c, self._pending_b = {}, {}
            if full:
                now, wall = self._clock(), self._wall()
                circuits = {**self._records, **circuits}
                for bk, until in self.keys._benched.items():
                    if until > now:
                        benched[bk] = max(benched.get(bk, 0.0), until - now + wall)
        try:
            if circuits or benched:
                backend.push(circuits, benched)
            pulled_c, pulled_b = backend.pull()
        except BaseException:
            with self.lock:  # keep them for the next exchange, unless something newer came meanwhile
                for k, rec in circuits.items():
                    self._pending_c.setdefault(k, rec)
                for bk, until in benched.items():
                    self._pending_b[bk] = max(self._pending_b.get(bk, 0.0), until)
            raise
        self._apply(pulled_c, pulled_b)

    def _apply(self, circuits: Mapping[str, CircuitRecord], benched: Mapping[BenchKey, float]) -> None:
        now, wall = self._clock(), self._wall()
        changes: list[tuple[str, CircuitState]] = []
        with self.lock:
            local = self.circuits._circuits
            for key, rec in circuits.items():
                last = self._records.get(key)
                if last is not None and rec.at <= last.at:
                    continue
                self._records[key] = rec
                c = local.get(key)
                if rec.state == "open":
                    if rec.until <= wall:
                        continue  # its cooldown is over: nothing to skip for
                    until = now + (rec.until - wall)
                    if c is None:
                        c = local[key] = Circuit()
                    if c.state == "open" and c.open_until >= until:
                        continue
                    was = c.state
                    c.state, c.open_until, c.probe_started = "open", until, None
                    if was != "open":
                        changes.append((key, "open"))
                elif c is not None and c.state != "closed":
                    c.state, c.probe_started, c.consecutive_failures = "closed", None, 0
                    c.window.clear()
                    changes.append((key, "closed"))
            bench = self.keys._benched
            for bk, until_wall in benched.items():
                until = now + (until_wall - wall)
                if until > bench.get(bk, 0.0) and until_wall > wall:
                    bench[bk] = until
        for key, state in changes:
            self.learnt(key, state)

    def learnt(self, key: str, state: CircuitState) -> None:
        """A circuit changed here because of what another process did: show it, count no transition."""
        if self._metrics is not None:
            provider, _, model = key.partition("/")
            # The state this process now acts on; the transition was counted where it happened.
            self._metrics.circuit(provider, model, state, STATE_VALUE[state], False)
        log.info("circuit of %s is now %s (from the %s state store)", key, state, self.backend)

    def _status(self, up: bool, exc: BaseException | None = None) -> None:
        if self._metrics is not None:
            self._metrics.state_store(self.backend, up, not up)
        was, self.up = self.up, up
        if not up:
            self.failures += 1
        if up:
            self.syncs += 1
            if was is False:
                log.warning("%s state store at %s is reachable again; state resynchronised", self.backend, self.where)
        elif was is not False:
            why = redact(f"{type(exc).__name__}: {exc}", self._secrets) if exc is not None else "?"
            log.warning(
                "%s state store at %s unreachable (%s); calls go on with this process's own health state "
                "until it is back",
                self.backend,
                self.where,
                why,
            )


def _sync_loop(ref: weakref.ReferenceType[SharedState], stop: threading.Event, wake: threading.Event) -> None:
    """The sync thread: an exchange every sync_s (sooner when a change is pending), and a last one at close."""
    backend: Backend | None = None
    try:
        while True:
            state = ref()
            if state is None:
                return
            wake.clear()
            try:
                full = backend is None
                if backend is None:
                    backend = state._connect()
                state.exchange(backend, full)
                state._status(True)
            except Exception as exc:
                state._status(False, exc)
                if backend is not None:
                    with contextlib.suppress(Exception):
                        backend.close()
                    backend = None
            sync_s = state.sync_s
            del state
            if stop.is_set():
                return
            wake.wait(sync_s)
    finally:
        if backend is not None:
            with contextlib.suppress(Exception):
                backend.close()


_LIVE: weakref.WeakSet[SharedState] = weakref.WeakSet()


def _after_fork() -> None:
    for state in list(_LIVE):
        state._reset()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


class SharedCircuitStore(MemoryCircuitStore):
    """`MemoryCircuitStore` as the local view of a `SharedState`: opening and closing are written through."""

    def __init__(self, shared: SharedState) -> None:
        super().__init__()
        self._shared = shared

    def admit(self, key: str, cfg: CircuitConfig, now: float) -> Admission:
        """See `CircuitStore.admit`; the half-open probe is claimed fleet-wide, so one process sends it."""
        shared = self._shared
        shared.ensure()
        for _ in range(3):
            adm = super().admit(key, cfg, now)
            if not adm.probe:
                return adm
            found = shared.claim_probe(key, cfg.cooldown_s)
            if found is None:
                return adm
            # Another process probes (or has decided): take its record instead, and decide again.
            wall = shared._wall()
            with self._lock:
                shared._records[key] = found
                c = self._circuits.setdefault(key, Circuit())
                if found.state == "open":
                    c.state, c.open_until, c.probe_started = "open", now + (found.until - wall), None
                else:
                    c.state, c.probe_started, c.consecutive_failures = "closed", None, 0
                    c.window.clear()
            if found.state == "closed":
                shared.learnt(key, "closed")
        return super().admit(key, cfg, now)

    def record(self, key: str, cfg: CircuitConfig, now: float, failed: bool | None, probe: bool) -> CircuitState | None:
        """See `CircuitStore.record`; a circuit opened, held open longer, or closed is shared."""
        self._shared.ensure()
        with self._lock:
            c = self._circuits.setdefault(key, Circuit())
            until = c.open_until
            to = record(c, cfg, now, failed, probe)
            if to == "closed":
                self._shared.circuit_changed(key, "closed", 0.0)
            elif c.state == "open" and c.open_until != until:
                self._shared.circuit_changed(key, "open", c.open_until)
            return to


class SharedKeyStore(MemoryKeyStore):
    """`MemoryKeyStore` as the local view of a `SharedState`: benching is written through; rotation stays local."""

    def __init__(self, shared: SharedState) -> None:
        super().__init__()
        self._shared = shared

    def pick(
        self, provider: str, keys: Sequence[ApiKey], now: float, exclude: frozenset[str] = frozenset()
    ) -> ApiKey | None:
        """See `KeyStore.pick`."""
        self._shared.ensure()
        return super().pick(provider, keys, now, exclude)

    def bench(self, provider: str, key: str, until: float) -> None:
        """See `KeyStore.bench`; shared with every process."""
        self._shared.ensure()
        with self._lock:
            k = (provider, key)
            self._benched[k] = max(self._benched.get(k, 0.0), until)
            self._shared.key_benched(provider, key, until)


# -- SQLite: every worker of a host ----------------------------------------------------------------------------


class SqliteBackend:
    """State in a SQLite file in WAL mode: readers never block the writer, and no server is needed."""

    def __init__(self, path: str, prefix: str, timeout_s: float) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._prefix = prefix
        # One thread uses it at a time; another may close it (SharedState.close).
        self._db = sqlite3.connect(path, timeout=timeout_s, isolation_level=None, check_same_thread=False)
        try:
            self._db.execute(f"PRAGMA busy_timeout = {int(timeout_s * 1000)}")
            self._db.execute("PRAGMA journal_mode = WAL")
            # Health state: losing the last change to a power cut is fine; an fsync per change is not needed.
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS circuits (prefix TEXT NOT NULL, key TEXT NOT NULL, state TEXT NOT NULL,"
                " until REAL NOT NULL, at REAL NOT NULL, PRIMARY KEY (prefix, key))"
            )
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS benched (prefix TEXT NOT NULL, provider TEXT NOT NULL, key TEXT NOT NULL,"
                " until REAL NOT NULL, PRIMARY KEY (prefix, provider, key))"
            )
        except BaseException:
            self._db.close()
            raise

    def push(self, circuits: Mapping[str, CircuitRecord], benched: Mapping[BenchKey, float]) -> None:
        """See `Backend.push`."""
        db, p = self._db, self._prefix
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                "INSERT INTO circuits VALUES (?, ?, ?, ?, ?) ON CONFLICT (prefix, key) DO UPDATE SET"
                " state = excluded.state, until = excluded.until, at = excluded.at WHERE excluded.at > circuits.at",
                [(p, k, r.state, r.until, r.at) for k, r in circuits.items()],
            )
            db.executemany(
                "INSERT INTO benched VALUES (?, ?, ?, ?) ON CONFLICT (prefix, provider, key) DO UPDATE SET"
                " until = max(benched.until, excluded.until)",
                [(p, prov, key, until) for (prov, key), until in benched.items()],
            )
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise

    def pull(self) -> tuple[dict[str, CircuitRecord], dict[BenchKey, float]]:
        """See `Backend.pull`."""
        db, p = self._db, self._prefix
        circuits = {
            k: CircuitRecord(s, u, a)
            for k, s, u, a in db.execute("SELECT key, state, until, at FROM circuits WHERE prefix = ?", (p,))
        }
        benched = {
            (prov, k): u for prov, k, u in db.execute("SELECT provider, key, until FROM benched WHERE prefix = ?", (p,))
        }
        return circuits, benched

    def claim(self, key: str, expect: CircuitRecord | None, rec: CircuitRecord) -> CircuitRecord | None:
        """See `Backend.claim`."""
        db, p = self._db, self._prefix
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT state, until, at FROM circuits WHERE prefix = ? AND key = ?", (p, key)).fetchone()
            found = CircuitRecord(*row) if row else None
            if found is None or found.at == (expect.at if expect else None):
                db.execute(
                    "INSERT INTO circuits VALUES (?, ?, ?, ?, ?) ON CONFLICT (prefix, key) DO UPDATE SET"
                    " state = excluded.state, until = excluded.until, at = excluded.at",
                    (p, key, rec.state, rec.until, rec.at),
                )
                found = None
            db.execute("COMMIT")
            return found
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        """See `Backend.close`."""
        self._db.close()


# -- Redis: a fleet -------------------------------------------------------------------------------------------

# KEYS: circuits hash, benched hash. ARGV: n, then n × (field, at, value), then (field, until) pairs.
# A circuit value is "at state until": the write happens only where `at` is newer; a bench only where later.
_PUSH_LUA = """
local n = tonumber(ARGV[1])
local i = 2
for _ = 1, n do
  local cur = redis.call('HGET', KEYS[1], ARGV[i])
  if (not cur) or tonumber(string.match(cur, '^(%S+)')) < tonumber(ARGV[i + 1]) then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 2])
  end
  i = i + 3
end
while i <= #ARGV do
  local cur = redis.call('HGET', KEYS[2], ARGV[i])
  if (not cur) or tonumber(cur) < tonumber(ARGV[i + 1]) then
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  end
  i = i + 2
end
return 1
"""


# KEYS: circuits hash. ARGV: field, the `at` expected (as written; "" for none), the new value.
_CLAIM_LUA = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if (not cur) or string.match(cur, '^(%S+)') == ARGV[2] then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  return ''
end
return cur
"""


class RedisBackend:
    """State in two Redis hashes under `prefix`: one round trip to push (a Lua script), one to pull."""

    def __init__(self, url: str, prefix: str, timeout_s: float) -> None:
        import redis  # the `redis` extra: imported only when state.backend is redis

        self._r: Any = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, decode_responses=True
        )
        self._keys = (f"{prefix}:circuits", f"{prefix}:benched")
        self._script = self._r.register_script(_PUSH_LUA)
        self._claim = self._r.register_script(_CLAIM_LUA)
        self._r.ping()

    def push(self, circuits: Mapping[str, CircuitRecord], benched: Mapping[BenchKey, float]) -> None:
        """See `Backend.push`."""
        args: list[Any] = [len(circuits)]
        for k, r in circuits.items():
            args += [k, repr(r.at), _value(r)]
        for bk, until in benched.items():
            args += [json.dumps(list(bk)), repr(until)]
        self._script(keys=list(self._keys), args=args)

    def pull(self) -> tuple[dict[str, CircuitRecord], dict[BenchKey, float]]:
        """See `Backend.pull`."""
        pipe = self._r.pipeline(transaction=False)
        pipe.hgetall(self._keys[0])
        pipe.hgetall(self._keys[1])
        raw_c, raw_b = pipe.execute()
        circuits = {k: r for k, v in raw_c.items() if (r := _record(v)) is not None}
        benched: dict[BenchKey, float] = {}
        for f, v in raw_b.items():
            provider, key = json.loads(f)
            benched[(provider, key)] = float(v)
        return circuits, benched

    def claim(self, key: str, expect: CircuitRecord | None, rec: CircuitRecord) -> CircuitRecord | None:
        """See `Backend.claim`."""
        found = self._claim(keys=[self._keys[0]], args=[key, repr(expect.at) if expect else "", _value(rec)])
        return _record(found) if found else None

    def close(self) -> None:
        """See `Backend.close`."""
        self._r.close()


def _value(r: CircuitRecord) -> str:
    return f"{r.at!r} {r.state} {r.until!r}"


def _record(v: str) -> CircuitRecord | None:
    at, state, until = v.split(" ")
    if state not in ("open", "closed"):
        return None
    return CircuitRecord("open" if state == "open" else "closed", float(until), float(at))


def redis_where(url: str) -> str:
    """host:port/db of a Redis URL, without its credentials: what logs may show."""
    u = urlsplit(url)
    if u.scheme == "unix":
        return u.path
    return f"{u.hostname or '?'}:{u.port or 6379}{u.path or ''}"


def shared_state(
    cfg: StateConfig, metrics: RouterMetrics | None = None, clock: Callable[[], float] = time.monotonic
) -> SharedState:
    """The `SharedState` a config's `state:` section asks for (backend sqlite or redis)."""
    timeout_s, prefix = cfg.timeout_s, cfg.prefix
    if cfg.backend == "sqlite":
        assert cfg.path is not None
        path = os.path.abspath(os.path.expanduser(cfg.path))
        return SharedState(lambda: SqliteBackend(path, prefix, timeout_s), "sqlite", path, cfg.sync_s, metrics, clock)
    if cfg.backend == "redis":
        assert cfg.url is not None
        url = cfg.url.get_secret_value()
        return SharedState(
            lambda: RedisBackend(url, prefix, timeout_s),
            "redis",
            redis_where(url),
            cfg.sync_s,
            metrics,
            clock,
            secrets=url_secrets(url),
        )
    raise ValueError(f"state backend {cfg.backend!r} is not shared")
