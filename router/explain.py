"""The plan a call to an alias would follow right now, as text for people (`llm-router explain`)."""

from __future__ import annotations

import json
from collections.abc import Callable

from .config import RouterConfig, Target
from .secrets import redact_url

Peek = Callable[[Target], tuple[str, float]]


def _closed(t: Target) -> tuple[str, float]:
    return ("closed", 0.0)


def key_state(t: Target) -> str:
    """Where the target's key(s) come from; never a character of a key."""
    if not t.keys:
        return "no key configured"
    parts = []
    for k in t.keys:
        src = f"${k.env_vars[0]}" if k.env_vars else "literal in file"
        label = f"{k.name} ({src})" if k.named or len(t.keys) > 1 else f"key from {src}"
        parts.append(label if k.usable else f"MISSING: set {' or '.join(k.env_vars) or 'the key'}")
    return ("key pool: " if len(t.keys) > 1 else "") + ", ".join(parts)


def price_text(t: Target) -> str:
    """The target's price as configured, or where the price will come from."""
    if t.pricing is None:
        return "price: provider-reported or litellm's price map"
    return f"price: ${t.pricing.input_per_token * 1e6:g} in / ${t.pricing.output_per_token * 1e6:g} out per 1M tokens"


def skip_reason(t: Target, disabled: frozenset[str], peek: Peek, now: float) -> str | None:
    """Why a call made now would pass the target over, or None."""
    if not t.enabled:
        return "SKIPPED: disabled in the config (enabled: false)"
    if t.provider in disabled:
        return "SKIPPED: disabled by LLM_ROUTER_DISABLED_PROVIDERS"
    if not t.has_credentials:
        return f"SKIPPED: MISSING: set {' or '.join(t.key_env_vars) or 'api_key'}"
    state, until = peek(t)
    if state == "open" and until > now:
        return f"SKIPPED: circuit open for another {until - now:.1f}s"
    if state != "closed":
        return "circuit half-open: the next call probes it"
    return None


def explain(
    cfg: RouterConfig,
    alias: str | None = None,
    disabled: frozenset[str] = frozenset(),
    peek: Peek = _closed,
    now: float = 0.0,
) -> str:
    """Each alias (or just `alias`): tiers and weights in order, what is skipped and why, prices."""
    d = cfg.defaults
    out = [
        f"{cfg.source}: timeout {d.timeout_s:g}s per attempt, deadline {d.deadline_s:g}s per call, "
        f"{d.retry.attempts} tries per target on transient errors",
        f"fall back on: {', '.join(d.fallback_on)}",
    ]
    if disabled:
        out.append(f"disabled by LLM_ROUTER_DISABLED_PROVIDERS: {', '.join(sorted(disabled))}")
    for name in [alias] if alias else list(cfg.aliases):
        a = cfg.aliases[name]
        out += ["", f"{name}{' (default)' if name == d.model else ''}"]
        if a.system:
            out.append(f"  system: {a.system if len(a.system) <= 60 else a.system[:57] + '...'}")
        if a.params:
            out.append(f"  params: {json.dumps(a.params, sort_keys=True)}")
        usable = 0
        for i, tier in enumerate(cfg.tiers(name), 1):
            total = sum(t.weight for t in tier)
            if len(tier) > 1:
                out.append(f"  {i}. tier, traffic shared by weight:")
            for t in tier:
                lead = f"     - {t.weight / total:.0%} " if len(tier) > 1 else f"  {i}. "
                params = f"  params {json.dumps(dict(t.params), sort_keys=True)}" if t.params else ""
                base = f", at {redact_url(t.api_base)}" if t.api_base else ""
                out.append(f"{lead}{t.key}  (litellm model {t.litellm_model}{base}, timeout {t.timeout_s:g}s){params}")
                reason = skip_reason(t, disabled, peek, now)
                usable += reason is None or not reason.startswith("SKIPPED")
                keys = key_state(t) + "; " if t.has_credentials else ""
                out.append(f"       {reason + '; ' if reason else ''}{keys}{price_text(t)}")
        if not usable:
            out.append("  ! every target is skipped right now: calls will fail without a request")
    return "\n".join(out)
