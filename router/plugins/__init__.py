"""Plugins: the hooks a config's own sections ask for, built from one table, and rebuilt when a reload changes them.

Each entry of `PLUGINS` names a config section, the settings its hook is built from, and the factory that builds
it. The seam (`router.hooks`) imports no plugin, and a plugin's module (and what it needs: OpenTelemetry, psycopg,
redis) is imported only when its section is present. Entries run in table order; hooks passed to
`Router(hooks=...)` run after them.

    tracing   first, so its spans take in the other hooks' work
    cache     before budgets and the ledger: a hit answers in call_started, so budgets reserve nothing for it
              and the ledger still sees the call finish
    budgets   reserve before each request, settle after it (needs ledger:, whose database keeps the spend)
    ledger    one row per call, written in the background

Hooks follow reload: every config snapshot gets its hooks from a `Pool` keyed by each hook's own settings, so a
reload that leaves a section alone keeps its hook (and its connection), and one that changes it builds a new hook
for the next call. What the old snapshot held is closed once the last call that started on it has ended. Stores
that hooks share (the budgets' connection to the ledger's database) are pooled the same way: changing a budget's
limit does not reconnect.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from pydantic import BaseModel, SecretStr

if TYPE_CHECKING:
    from ..config import RouterConfig
    from ..hooks import Hook
    from ..metrics import RouterMetrics
    from .store import Store

log = logging.getLogger("router")


def identity(*parts: Any) -> str:
    """A stable digest of config parts (secrets included, so that a changed password counts as a change)."""

    def plain(value: Any) -> Any:
        if isinstance(value, BaseModel):
            return {k: plain(v) for k, v in value}
        if isinstance(value, SecretStr):
            return value.get_secret_value()
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    text = json.dumps([plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class Pool:
    """What hooks are and share, kept while a config snapshot uses it: acquired by key (a new one is made only for
    a key no snapshot holds), and closed when the last holder releases it."""

    def __init__(self) -> None:
        self._items: dict[Hashable, list[Any]] = {}  # key -> [thing, holders, close]
        self._lock = threading.Lock()

    def acquire(self, key: Hashable, make: Callable[[], Any], close: Callable[[Any], None]) -> Any:
        """The thing held under `key`, made now if none is (one more holder either way)."""
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                item[1] += 1
                return item[0]
        thing = make()  # outside the lock: a factory may connect to a database
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self._items[key] = [thing, 1, close]
                return thing
            item[1] += 1
        close(thing)  # another thread made one meanwhile: keep theirs
        return item[0]

    def release(self, key: Hashable) -> None:
        """One holder less; the last one closes it."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return
            item[1] -= 1
            if item[1] > 0:
                return
            del self._items[key]
        try:
            item[2](item[0])
        except Exception:  # a plugin's close failing must not stop the others' or a reload
            log.exception("closing %s failed", type(item[0]).__name__)

    def close(self) -> None:
        """Close everything, whoever holds it (the Router is closed)."""
        with self._lock:
            items, self._items = list(self._items.values()), {}
        for thing, _, close in reversed(items):
            try:
                close(thing)
            except Exception:
                log.exception("closing %s failed", type(thing).__name__)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


@dataclass(frozen=True)
class Plugin:
    """A config section: the settings its hook is built from (None: no hook), and the factory of that hook."""

    section: str
    settings: Callable[[RouterConfig], Hashable | None]
    build: Callable[[RouterConfig, RouterMetrics, Pool], Hook | None]


# -- tracing --


def _tracing_settings(config: RouterConfig) -> Hashable | None:
    return identity(config.tracing) if config.tracing is not None and config.tracing.enabled else None


def _tracing(config: RouterConfig, metrics: RouterMetrics, pool: Pool) -> Hook | None:
    try:
        from .tracing import TracingHook
    except ImportError as exc:
        if not (exc.name or "").startswith("opentelemetry"):
            raise
        log.warning("tracing is on in the config but OpenTelemetry is not installed: pip install 'llm-router[otel]'")
        return None
    return TracingHook(config.tracing)


# -- cache (the TTL of each alias is read from the call's own config) --


def _cache_settings(config: RouterConfig) -> Hashable | None:
    if config.cache is None and all(a.cache is None for a in config.aliases.values()):
        return None
    uses_redis = config.cache is not None and config.cache.store == "redis"
    return identity(config.cache, config.state if uses_redis else None)


def _cache(config: RouterConfig, metrics: RouterMetrics, pool: Pool) -> Hook | None:
    from .cache import CacheHook

    return CacheHook(config.cache, metrics, state=config.state)


# -- budgets: a new hook when a budget changes, on the same connection while the ledger's database is the same --


def _budgets_settings(config: RouterConfig) -> Hashable | None:
    if config.ledger is None or not config.budgets:
        return None
    return identity(config.budgets, config.ledger)


def _budgets(config: RouterConfig, metrics: RouterMetrics, pool: Pool) -> Hook | None:
    from .budgets import Budgets
    from .store import open_store

    ledger = config.ledger
    assert ledger is not None
    key = ("ledger-store", identity(ledger))
    store = pool.acquire(key, lambda: open_store(ledger), lambda s: s.close())
    try:
        hook = Budgets(config, metrics, cast("Store", _Borrowed(store, lambda: pool.release(key))))
    except BaseException:
        pool.release(key)
        raise
    return hook


def _ledger_settings(config: RouterConfig) -> Hashable | None:
    return identity(config.ledger) if config.ledger is not None else None


def _ledger(config: RouterConfig, metrics: RouterMetrics, pool: Pool) -> Hook | None:
    from .ledger import Ledger

    assert config.ledger is not None
    return Ledger(config.ledger, metrics=metrics)


PLUGINS: tuple[Plugin, ...] = (
    Plugin("tracing", _tracing_settings, _tracing),
    Plugin("cache", _cache_settings, _cache),
    Plugin("budgets", _budgets_settings, _budgets),
    Plugin("ledger", _ledger_settings, _ledger),
)


def _close_hook(hook: Hook | None) -> None:
    if hook is not None:
        hook.close()


def wire(config: RouterConfig, metrics: RouterMetrics, pool: Pool) -> tuple[list[Hook], list[Hashable]]:
    """The hooks a config's sections ask for, in table order, from `pool`; and the keys to release them by."""
    hooks: list[Hook] = []
    keys: list[Hashable] = []
    try:
        for p in PLUGINS:
            settings = p.settings(config)
            if settings is None:
                continue
            key: Hashable = (p.section, settings)
            hook = pool.acquire(key, lambda p=p: p.build(config, metrics, pool), _close_hook)  # type: ignore[misc]
            keys.append(key)
            if hook is not None:
                hooks.append(hook)
    except BaseException:
        for held in keys:
            pool.release(held)
        raise
    return hooks, keys


class _Borrowed:
    """A shared store lent to one hook: everything but close() is the store's; close() gives it back to the pool."""

    def __init__(self, store: Store, give_back: Callable[[], None]) -> None:
        self._store = store
        self._give_back: Callable[[], None] | None = give_back

    def close(self) -> None:
        """Give the store back (once)."""
        give_back, self._give_back = self._give_back, None
        if give_back is not None:
            give_back()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def __repr__(self) -> str:
        return repr(self._store)


__all__ = ["PLUGINS", "Plugin", "Pool", "identity", "wire"]

