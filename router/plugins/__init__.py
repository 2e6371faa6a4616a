"""Plugins: the hooks a config's own sections ask for, built from one table.

Each entry names a config section and the factory that builds its hook from the config. The seam
(`router.hooks`) imports no plugin, and a plugin's module (and what it needs, OpenTelemetry, psycopg, redis)
is imported only when its section is present. Entries run in table order; hooks passed to
`Router(hooks=...)` run after them.

    tracing   first, so its spans take in the other hooks' work
    cache     before budgets and the ledger: a hit answers in call_started, so budgets reserve nothing for it
              and the ledger still sees the call finish
    budgets   reserve before each request, settle after it (needs ledger:, whose database keeps the spend)
    ledger    one row per call, written in the background
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import RouterConfig
    from ..hooks import Hook
    from ..metrics import RouterMetrics

log = logging.getLogger("router")


@dataclass(frozen=True)
class Plugin:
    """A config section and the factory of its hook (None: the section is absent or switched off)."""

    section: str
    build: Callable[[RouterConfig, RouterMetrics], Hook | None]


def _tracing(config: RouterConfig, metrics: RouterMetrics) -> Hook | None:
    if config.tracing is None or not config.tracing.enabled:
        return None
    try:
        from .tracing import TracingHook
    except ImportError as exc:
        if not (exc.name or "").startswith("opentelemetry"):
            raise
        log.warning("tracing is on in the config but OpenTelemetry is not installed: pip install 'llm-router[otel]'")
        return None
    return TracingHook(config.tracing)


def _cache(config: RouterConfig, metrics: RouterMetrics) -> Hook | None:
    if config.cache is None and all(a.cache is None for a in config.aliases.values()):
        return None
    from .cache import CacheHook

    return CacheHook(config.cache, metrics, state=config.state)


def _budgets(config: RouterConfig, metrics: RouterMetrics) -> Hook | None:
    if config.ledger is None or not config.budgets:
        return None
    from .budgets import Budgets
    from .store import open_store

    return Budgets(config, metrics, open_store(config.ledger))


def _ledger(config: RouterConfig, metrics: RouterMetrics) -> Hook | None:
    if config.ledger is None:
        return None
    from .ledger import Ledger

    return Ledger(config.ledger, metrics=metrics)


PLUGINS: tuple[Plugin, ...] = (
    Plugin("tracing", _tracing),
    Plugin("cache", _cache),
    Plugin("budgets", _budgets),
    Plugin("ledger", _ledger),
)


def config_hooks(config: RouterConfig, metrics: RouterMetrics) -> list[Hook]:
    """The hooks a config's sections ask for, in the order of `PLUGINS`."""
    return [h for p in PLUGINS if (h := p.build(config, metrics)) is not None]
