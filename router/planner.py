"""A call's plan: its alias resolved against the config in force, the targets it may try in order, and the request
body each would be sent. Worked out before the first request; no I/O but the hooks' own request rewrites.

`Snapshot` is the config in force with what is derived from it (providers switched off by the environment, the
secrets to scrub, the hooks its sections ask for); a Router swaps it whole on reload, and a call keeps the one
it started on.
"""

from __future__ import annotations

import difflib
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from . import structured
from .config import HedgeConfig, RouterConfig, Target
from .engines import engine_for, get_engine
from .errors import UnknownModelError, UnknownProviderError
from .hooks import Call, Hooks, check_tags
from .policy import build_messages, merge_params, order_tiers, plan_targets
from .structured import Format, make_format
from .types import Skip

log = logging.getLogger("router")

DISABLED_ENV = "LLM_ROUTER_DISABLED_PROVIDERS"

# Params the router sets itself; passing them to generate() would bypass routing or leak around it.
RESERVED = frozenset(
    {
        "model",
        "messages",
        "api_key",
        "api_base",
        "base_url",
        "extra_headers",
        "max_retries",
        "num_retries",
        "stream_options",
    }
)


@dataclass
class Snapshot:
    """The config in force and what is derived from it, swapped whole on reload.

    Calls `enter()` it when they start and `leave()` it when they end; once a reload has `retire()`d it and the
    last of its calls has ended, `release` lets go of its hooks (the plugins' pool closes what no snapshot uses).
    """

    config: RouterConfig
    disabled: frozenset[str]
    secrets: tuple[str, ...]
    hooks: Hooks = field(default_factory=Hooks)
    release: Callable[[], None] | None = None
    _calls: int = 0
    _retired: bool = False
    _released: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def enter(self) -> bool:
        """One more call runs on this snapshot; False when it is already released (take the one in force)."""
        with self._lock:
            if self._released:
                return False
            self._calls += 1
            return True

    def leave(self) -> None:
        """A call that entered has ended."""
        with self._lock:
            self._calls -= 1
            done = self._retired and self._calls <= 0 and not self._released
            self._released = self._released or done
        if done and self.release is not None:
            self.release()

    def retire(self) -> None:
        """A newer snapshot is in force: release this one once its calls have ended."""
        with self._lock:
            self._retired = True
            done = self._calls <= 0 and not self._released
            self._released = self._released or done
        if done and self.release is not None:
            self.release()


def disabled_providers(config: RouterConfig, env: Mapping[str, str]) -> frozenset[str]:
    """The providers LLM_ROUTER_DISABLED_PROVIDERS switches off (a name not in the config is logged)."""
    disabled = frozenset(p.strip() for p in env.get(DISABLED_ENV, "").split(",") if p.strip())
    unknown = disabled - set(config.providers)
    if unknown:
        log.warning("%s names providers not in the config: %s", DISABLED_ENV, ", ".join(sorted(unknown)))
    return disabled


@dataclass(frozen=True)
class CallArgs:
    """What generate() was asked, as given."""

    prompt: str | None = None
    messages: Sequence[Mapping[str, Any]] | None = None
    model: str | None = None
    system: str | None = None
    provider: str | None = None
    timeout: float | None = None
    key: str | None = None
    stream: bool = False
    response_format: Any = None
    tags: Mapping[str, str] | None = None
    cache: bool = True
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    """Everything a call needs, worked out before the first request."""

    snap: Snapshot
    alias: str
    targets: tuple[tuple[Target, Mapping[str, Any]], ...]  # in try order, each with its request body
    skipped: tuple[Skip, ...]
    deadline_s: float
    pinned_key: str | None
    call: Call
    stream: bool = False
    fmt: Format | None = None
    hedge: HedgeConfig | None = None


def make_plan(snap: Snapshot, args: CallArgs, rng: random.Random) -> Plan:
    """The plan of a call on `snap`; raises TypeError/ValueError for bad arguments, UnknownModelError and
    UnknownProviderError for names the config does not have."""
    cfg = snap.config
    reserved = RESERVED.intersection(args.params)
    if reserved:
        raise TypeError(f"generate() does not take {', '.join(sorted(reserved))}: the router sets it from the config")
    if args.timeout is not None and not args.timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, not {args.timeout!r}")
    alias_name = _alias_name(cfg, args.model)
    alias = cfg.aliases[alias_name]
    if args.provider is not None:
        _check_provider(cfg, alias_name, args.provider)
    if args.key is not None:
        _check_key(cfg, alias_name, args.key)
    ordered = order_tiers(cfg.tiers(alias_name), rng.random)
    usable, skipped = plan_targets(ordered, args.provider, snap.disabled, args.key)
    msgs = build_messages(args.prompt, args.messages, args.system if args.system is not None else alias.system)
    fmt = make_format(args.response_format)
    if fmt is not None and args.stream:
        raise TypeError("generate() takes stream=True or response_format=, not both")
    tags = check_tags(args.tags)
    for engine in {t.engine for t in usable}:  # the first call loads it: not inside any attempt's clock
        get_engine(engine).load()
    params = dict(args.params)
    deadline_s = args.timeout if args.timeout is not None else cfg.defaults.deadline_s
    call = Call.new(alias_name, msgs, params, tags, args.stream, config=cfg, response_format=fmt)
    call.cache = bool(args.cache)
    call.deadline_at = time.monotonic() + deadline_s
    targets = tuple((t, request_body(t, msgs, merge_params(alias, t, params), args.stream, fmt)) for t in usable)
    call.requests = targets
    return Plan(snap, alias_name, targets, tuple(skipped), deadline_s, args.key, call, args.stream, fmt, alias.hedge)


def replan(plan: Plan, alias_name: str, rng: random.Random) -> tuple[Plan, list[Skip]]:
    """The call's plan on another alias (a Reroute): its targets, the call's own messages and params, no key
    pinned; and the targets of that alias that are skipped."""
    cfg, call = plan.snap.config, plan.call
    usable, passed = plan_targets(order_tiers(cfg.tiers(alias_name), rng.random), None, plan.snap.disabled, None)
    alias = cfg.aliases[alias_name]
    targets = tuple(
        (t, request_body(t, call.messages, merge_params(alias, t, call.params), plan.stream, plan.fmt)) for t in usable
    )
    return replace(plan, targets=targets, skipped=(), pinned_key=None, hedge=alias.hedge), passed


def request_body(
    target: Target, messages: list[dict[str, Any]], params: dict[str, Any], stream: bool, fmt: Format | None
) -> dict[str, Any]:
    """A target's request body (see router.engines): the params, streaming options, the structured-output ask."""
    if stream:
        params = {**params, "stream": True, "stream_options": {"include_usage": True}}
    if fmt is not None:
        if engine_for(target).supports_schema(target):
            params = {**params, **structured.request_params(fmt, True)}
        else:
            messages = structured.with_instruction(messages, fmt)
    return {**params, "messages": messages}


def _alias_name(cfg: RouterConfig, model: str | None) -> str:
    name = model if model is not None else cfg.defaults.model
    if name is None:
        raise UnknownModelError("(none)", list(cfg.aliases), ())
    if name not in cfg.aliases:
        close = difflib.get_close_matches(name, list(cfg.aliases), n=3, cutoff=0.5)
        raise UnknownModelError(name, list(cfg.aliases), close)
    return name


def _check_provider(cfg: RouterConfig, alias: str, provider: str) -> None:
    if provider not in cfg.providers:
        raise UnknownProviderError(
            provider, alias, f"provider {provider!r} is not configured (providers: {', '.join(cfg.providers)})"
        )
    on = sorted({t.provider for t in cfg.targets(alias)})
    if provider not in on:
        raise UnknownProviderError(
            provider,
            alias,
            f"alias {alias!r} has no target on provider {provider!r} (its targets use: {', '.join(on)})",
        )


def _check_key(cfg: RouterConfig, alias: str, key: str) -> None:
    names = sorted({k.name for t in cfg.targets(alias) for k in t.keys if k.named})
    if key not in names:
        raise UnknownProviderError(
            "",
            alias,
            f"no provider of alias {alias!r} has a key named {key!r} (named keys: {', '.join(names) or 'none'})",
        )
