"""The response cache: a `Hook` that answers a repeated request from a store instead of a provider.

Opt-in per alias (``cache: {ttl_s: 3600}``), skipped per call with ``generate(..., cache=False)``. The key of
an answer is the sha256 of canonical JSON of the alias and the whole request one target would be sent: model,
messages (system prompt and any JSON-only instruction included), every param, the response format. Never the
API key, the timeout or the headers, so rotating keys or pinning one with ``key=`` shares the cache. A call
looks up the request of each of its planned targets in turn and the first stored answer wins; an answer is
stored under the request of the target that gave it.

Only successes are stored: a failed call, an interrupted or abandoned stream, a tool call and an empty answer
never are. A cached structured answer is validated again against the call's `response_format`: one that no
longer matches is dropped and the call goes to a provider. A hit costs nothing: `Result.cached` is True,
`cost_usd` 0 and `cost_source` "cache"; what the answer cost when it was bought is counted in
`cost_saved_usd_total`.

Stores: `MemoryStore` (this process, bounded in entries and bytes, least recently used evicted first),
`FileStore` (a SQLite file in WAL mode, shared by every worker of a host; writes go through a background thread
so the call's thread never waits on them), both standard library only, and `RedisStore` (the Redis of the
`state:` section, shared by a fleet; needs the `redis` extra).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import queue
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .. import structured
from ..engines import InvalidResponse
from ..hooks import Call, Hook
from ..types import Result, Usage

if TYPE_CHECKING:
    from ..config import CacheConfig, StateConfig
    from ..metrics import RouterMetrics

log = logging.getLogger("router")

# Request kwargs that are not part of the request itself: how it is sent, or secrets.
_NOT_HASHED = frozenset(
    {"api_key", "timeout", "max_retries", "drop_params", "extra_headers", "stream", "stream_options"}
)
# Answers that cannot be replayed from their text alone, or that a provider refused.
_NOT_STORED = frozenset({"tool_calls", "function_call", "content_filter"})
_DATA = "cache"  # this hook's key in Call.data


def _jsonable(value: Any) -> Any:
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return dump(mode="json")
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    return repr(value)  # not stable across processes at worst: a miss, never a wrong answer


def request_key(alias: str, request: Mapping[str, Any]) -> str:
    """sha256 (hex) of canonical JSON of the alias and one target's request, less key, timeout and headers."""
    body = {k: v for k, v in request.items() if k not in _NOT_HASHED}
    text = json.dumps(
        {"alias": alias, "request": body}, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_jsonable
    )
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def encode(result: Result, expires_at: float) -> bytes:
    """A stored answer: what a hit needs to rebuild the Result (never the raw response)."""
    return json.dumps(
        {
            "text": result.text,
            "provider": result.provider,
            "model": result.model,
            "usage": [result.usage.input_tokens, result.usage.output_tokens, result.usage.estimated],
            "cost_usd": result.cost_usd,
            "finish_reason": result.finish_reason,
            "expires_at": expires_at,
        },
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode("utf-8")


def storable(result: Result) -> bool:
    """Whether a successful answer can be served again from its text."""
    if not result.text or result.cached or result.finish_reason in _NOT_STORED:
        return False
    try:
        message = result.raw.choices[0].message if result.raw is not None else None
    except (AttributeError, IndexError, TypeError):
        return False
    return not (getattr(message, "tool_calls", None) or getattr(message, "function_call", None))


class Store(Protocol):
    """Where cached answers live. `get` returns a value stored under `key` that has not expired by `now`."""

    blocking: bool  # get() does I/O: agenerate() runs the lookup in a thread

    def get(self, key: str, now: float) -> bytes | None: ...

    def put(self, key: str, value: bytes, expires_at: float) -> None: ...

    def delete(self, key: str) -> None: ...

    def close(self) -> None: ...


class MemoryStore:
    """Answers in this process, bounded in entries and bytes; the least recently used are evicted first."""

    blocking = False

    def __init__(self, max_entries: int = 10_000, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def size(self) -> int:
        """Bytes held: keys and values."""
        return self._bytes

    def get(self, key: str, now: float) -> bytes | None:
        """The live value under `key`, now the most recently used; None if absent or expired."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            if item[1] <= now:
                self._drop(key)
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: str, value: bytes, expires_at: float) -> None:
        """Store `value`, evicting the least recently used until both bounds hold; too big a value is not kept."""
        size = len(key) + len(value)
        with self._lock:
            if key in self._items:
                self._drop(key)
            if size > self.max_bytes:
                return
            self._items[key] = (value, expires_at)
            self._bytes += size
            while len(self._items) > self.max_entries or self._bytes > self.max_bytes:
                self._drop(next(iter(self._items)))

    def delete(self, key: str) -> None:
        """Forget `key`."""
        with self._lock:
            if key in self._items:
                self._drop(key)

    def close(self) -> None:
        """Free every entry."""
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def _drop(self, key: str) -> None:
        value, _ = self._items.pop(key)
        self._bytes -= len(key) + len(value)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    size INTEGER NOT NULL,
    expires_at REAL NOT NULL,
    used_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS answers_used_at ON answers (used_at);
"""


class _QueuedStore:
    """What the shared stores have in common: reads on the caller's thread (off the event loop under agenerate()),
    and writes queued to one background thread, so that `put` never blocks a call."""

    blocking = True
    max_bytes: int

    def _start_writer(self) -> None:
        self._jobs: queue.Queue[tuple[str, tuple[Any, ...]] | None] = queue.Queue()
        self._closed = False
        self._writer = threading.Thread(target=self._write_loop, name="llm-router-cache-writer", daemon=True)
        self._writer.start()

    def put(self, key: str, value: bytes, expires_at: float) -> None:
        """Queue `value` for storing until `expires_at` (unix time); a value over `max_bytes` is not stored."""
        if len(key) + len(value) <= self.max_bytes and not self._closed:
            self._jobs.put(("put", (key, value, expires_at)))

    def delete(self, key: str) -> None:
        """Queue the removal of `key`."""
        if not self._closed:
            self._jobs.put(("delete", (key,)))

    def flush(self) -> None:
        """Wait until every queued write is done."""
        self._jobs.join()

    def close(self) -> None:
        """Finish the queued writes, stop the writer and close the connections."""
        if self._closed:
            return
        self._closed = True
        self._jobs.put(None)
        self._writer.join(timeout=10)
        self._disconnect()

    def _write_loop(self) -> None:
        conn = self._writer_connect()
        try:
            while True:
                job = self._jobs.get()
                try:
                    if job is None:
                        return
                    self._apply(conn, *job)
                except Exception as exc:
                    self._write_failed(exc)
                finally:
                    self._jobs.task_done()
        finally:
            self._writer_disconnect(conn)

    def _writer_connect(self) -> Any:
        return None

    def _writer_disconnect(self, conn: Any) -> None:
        pass

    def _apply(self, conn: Any, op: str, args: tuple[Any, ...]) -> None:
        raise NotImplementedError

    def _write_failed(self, exc: Exception) -> None:
        raise exc

    def _disconnect(self) -> None:
        pass


class FileStore(_QueuedStore):
    """Answers in a SQLite file that every worker of a host shares, bounded in entries and bytes.

    Writes, touches and evictions go to the background writer. Each process bounds the file after its own writes,
    so the bounds hold within what the other workers write in between.
    """

    def __init__(self, path: str | Path, max_entries: int = 10_000, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.path = Path(path)
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with contextlib.closing(self._connect()) as db:
            db.executescript(_SCHEMA)
        self._start_writer()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=5.0, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    def _reader(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = self._connect()
        return db

    def get(self, key: str, now: float) -> bytes | None:
        """The live value under `key`; None if absent or expired."""
        row = self._reader().execute("SELECT value, expires_at FROM answers WHERE key = ?", (key,)).fetchone()
        if row is None or row[1] <= now:
            return None
        self._jobs.put(("touch", (key, now)))
        return bytes(row[0])

    def _writer_connect(self) -> sqlite3.Connection:
        return self._connect()

    def _writer_disconnect(self, conn: sqlite3.Connection) -> None:
        conn.close()

    def _disconnect(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()

    def _write_failed(self, exc: Exception) -> None:
        if not isinstance(exc, sqlite3.Error):
            raise exc
        log.error("response cache: writing to %s failed (%s); the answer is not cached", self.path, exc)

    def _apply(self, db: sqlite3.Connection, op: str, args: tuple[Any, ...]) -> None:
        if op == "touch":
            db.execute("UPDATE answers SET used_at = ? WHERE key = ?", (args[1], args[0]))
        elif op == "delete":
            db.execute("DELETE FROM answers WHERE key = ?", args)
        else:
            key, value, expires_at = args
            now = time.time()
            db.execute(
                "INSERT OR REPLACE INTO answers (key, value, size, expires_at, used_at) VALUES (?, ?, ?, ?, ?)",
                (key, value, len(key) + len(value), expires_at, now),
            )
            self._bound(db, now)

    def _bound(self, db: sqlite3.Connection, now: float) -> None:
        db.execute("DELETE FROM answers WHERE expires_at <= ?", (now,))
        count, total = db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM answers").fetchone()
        if count > self.max_entries:
            db.execute(
                "DELETE FROM answers WHERE key IN (SELECT key FROM answers ORDER BY used_at LIMIT ?)",
                (count - self.max_entries,),
            )
            total = db.execute("SELECT COALESCE(SUM(size), 0) FROM answers").fetchone()[0]
        while total > self.max_bytes:
            rows = db.execute("SELECT key, size FROM answers ORDER BY used_at LIMIT 64").fetchall()
            if not rows:
                return
            drop, freed = [], 0
            for key, size in rows:
                drop.append((key,))
                freed += size
                if total - freed <= self.max_bytes:
                    break
            db.executemany("DELETE FROM answers WHERE key = ?", drop)
            total -= freed


class RedisStore(_QueuedStore):
    """Answers in Redis, shared by a fleet: one string per answer under `prefix:cache:`, expiring with its ttl.

    Redis bounds its memory itself (its `maxmemory` and `maxmemory-policy`); this store only refuses an answer
    bigger than `max_bytes`. Redis down: every lookup is a miss and every write is dropped, logged once per
    outage, with the URL shown without its credentials. A call never fails because of the cache.
    """

    def __init__(self, url: str, prefix: str, timeout_s: float, max_bytes: int = 64 * 1024 * 1024) -> None:
        import redis  # the `redis` extra, as for state.backend redis

        from ..state import redis_where

        self.where = redis_where(url)  # never the password
        self.prefix = f"{prefix}:cache:"
        self.max_bytes = max_bytes
        self._r: Any = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self._down = False
        self._start_writer()

    def get(self, key: str, now: float) -> bytes | None:
        """The live value under `key`; None if absent, expired, or Redis does not answer."""
        try:
            raw = self._r.get(self.prefix + key)
        except self._errors as exc:
            self._failed(exc)
            return None
        self._up()
        return bytes(raw) if raw is not None else None

    def _disconnect(self) -> None:
        self._r.close()

    def _write_failed(self, exc: Exception) -> None:
        if not isinstance(exc, self._errors):
            raise exc
        self._failed(exc)

    def _apply(self, conn: Any, op: str, args: tuple[Any, ...]) -> None:
        if op == "delete":
            self._r.delete(self.prefix + args[0])
        else:
            key, value, expires_at = args
            ttl_ms = int((expires_at - time.time()) * 1000)
            if ttl_ms > 0:
                self._r.set(self.prefix + key, value, px=ttl_ms)
        self._up()

    def _failed(self, exc: BaseException) -> None:
        if not self._down:
            self._down = True
            name = type(exc).__name__
            log.warning("response cache: redis at %s does not answer (%s); calls go to providers", self.where, name)

    def _up(self) -> None:
        if self._down:
            self._down = False
            log.warning("response cache: redis at %s answers again", self.where)


def make_store(config: CacheConfig | None, state: StateConfig | None = None) -> Store:
    """The store a config's `cache:` section names (default: in this process); `state`: where `redis` is."""
    if config is None:
        return MemoryStore()
    if config.store == "file":
        assert config.path is not None  # checked at load
        return FileStore(config.path, config.max_entries, config.max_bytes)
    if config.store == "redis":
        assert state is not None and state.url is not None  # checked at load: state.backend is redis
        return RedisStore(state.url.get_secret_value(), state.prefix, state.timeout_s, config.max_bytes)
    return MemoryStore(config.max_entries, config.max_bytes)


class CacheHook(Hook):
    """Answers a call from the store when its alias caches and the same request was answered before."""

    def __init__(
        self,
        config: CacheConfig | None,
        metrics: RouterMetrics,
        store: Store | None = None,
        state: StateConfig | None = None,
    ) -> None:
        self.store = store if store is not None else make_store(config, state)
        self.metrics = metrics
        self.blocking = self.store.blocking

    def call_started(self, call: Call) -> Result | None:
        """A stored, live (and for structured calls, still valid) answer to one of the call's requests."""
        alias = call.config.aliases.get(call.alias) if call.config is not None else None
        if alias is None or alias.cache is None or not call.cache or not call.requests:
            return None
        keys = {t.key: request_key(call.alias, req) for t, req in call.requests}
        call.data[_DATA] = (keys, alias.cache.ttl_s)
        now = time.time()
        for key in keys.values():
            raw = self.store.get(key, now)
            if raw is None:
                continue
            found = self._result(call, key, raw, now)
            if found is not None:
                hit, bought = found
                self.metrics.cache_lookup(call.alias, True)
                self.metrics.cache_saved(call.alias, hit.provider, hit.model, bought)
                return hit
        self.metrics.cache_lookup(call.alias, False)
        return None

    def _result(self, call: Call, key: str, raw: bytes, now: float) -> tuple[Result, float] | None:
        try:
            entry = json.loads(raw)
            if entry["expires_at"] <= now:
                return None
            parsed = structured.parse(entry["text"], call.response_format) if call.response_format else None
            inp, out, estimated = entry["usage"]
            hit = Result(
                text=entry["text"],
                alias=call.alias,
                provider=entry["provider"],
                model=entry["model"],
                usage=Usage(int(inp), int(out), bool(estimated)),
                cost_usd=0.0,
                cost_source="cache",
                latency_s=max(0.0, time.time() - call.started_at),
                attempts=(),
                finish_reason=entry["finish_reason"],
                parsed=parsed,
                cached=True,
            )
            return hit, float(entry["cost_usd"])  # what it cost when bought
        except InvalidResponse as exc:
            log.info("%s: a cached answer no longer validates (%s); asking a provider", call.alias, exc)
        except (ValueError, KeyError, TypeError):
            log.warning("%s: a cached answer is unreadable; asking a provider", call.alias)
        self.store.delete(key)
        return None

    def call_finished(self, call: Call, result: Result | None, error: BaseException | None) -> None:
        """Store a successful answer under the request of the target that gave it."""
        looked_up = call.data.get(_DATA)
        if result is None or looked_up is None or call.outcome != "success" or not storable(result):
            return
        if call.rerouted_to is not None:  # answered on another alias's request (a budget's fallback): not this one
            return
        keys, ttl_s = looked_up
        key = keys.get(f"{result.provider}/{result.model}")
        if key is not None:
            self.store.put(key, encode(result, time.time() + ttl_s), time.time() + ttl_s)

    def close(self) -> None:
        """Close the store (a file store finishes its queued writes)."""
        self.store.close()
