"""Routing decisions as pure functions of plain data: no I/O, no clock, no litellm. Tested as tables.

- `order_tiers()`   the order a call tries targets in: tier by tier, members by weighted draw
- `plan_targets()`  which targets a call may use, in order, and which are skipped (no key)
- `next_step()`     after a failed attempt: retry the same target, fall back to the next, or fail
- `backoff_delay()` how long to wait before a retry (exponential, full jitter, Retry-After honoured)
- `parse_retry_after()` a Retry-After header value in seconds
- `price()`         the cost of a usage, and where the price came from
- `merge_params()`  call params over target params over alias params
"""

from __future__ import annotations

import email.utils
import enum
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .config import AliasConfig, RetryConfig, Target
from .outcomes import outcome as outcome_of
from .types import CostSource, Skip, Usage


class Step(enum.Enum):
    """What the attempt loop does after a failed attempt."""

    RETRY = "retry"
    FALLBACK = "fallback"
    FAIL = "fail"


def order_tier(tier: Sequence[Target], draws: Sequence[float]) -> list[Target]:
    """A tier's members in the order to try them: a weighted draw without replacement (zero weights last).

    `draws` holds one uniform number in [0, 1) per member, so the order is a pure function of its inputs.
    """
    left = [t for t in tier if t.weight > 0]
    out: list[Target] = []
    for u in draws:
        if not left:
            break
        total = sum(t.weight for t in left)
        point, acc = u * total, 0.0
        for i, t in enumerate(left):
            acc += t.weight
            if point < acc or i == len(left) - 1:
                out.append(left.pop(i))
                break
    return out + left + [t for t in tier if t.weight <= 0]


def order_tiers(tiers: Sequence[Sequence[Target]], draw: Callable[[], float]) -> list[Target]:
    """Every target of an alias in the order a call tries them: tier by tier, each tier by weight."""
    out: list[Target] = []
    for tier in tiers:
        out.extend(tier if len(tier) == 1 else order_tier(tier, [draw() for _ in tier]))
    return out


def static_skip(target: Target, disabled: frozenset[str], pinned_key: str | None) -> Skip | None:
    """Why a target is passed over before any request (disabled, no key, pinned key absent), or None."""
    if not target.enabled or target.provider in disabled:
        return Skip(target.provider, target.model, "disabled")
    if not target.has_credentials:
        return Skip(target.provider, target.model, "no_credentials", target.key_env_vars)
    if pinned_key is not None and not any(k.name == pinned_key and k.usable for k in target.keys):
        return Skip(target.provider, target.model, "key_not_in_pool")
    return None


def plan_targets(
    targets: Sequence[Target],
    provider: str | None = None,
    disabled: frozenset[str] = frozenset(),
    pinned_key: str | None = None,
) -> tuple[list[Target], list[Skip]]:
    """Split targets (restricted to `provider` if given) into those a call may try, in order, and those skipped."""
    usable: list[Target] = []
    skipped: list[Skip] = []
    for t in targets:
        if provider is not None and t.provider != provider:
            continue
        skip = static_skip(t, disabled, pinned_key)
        if skip is None:
            usable.append(t)
        else:
            skipped.append(skip)
    return usable, skipped


def next_step(
    outcome: str,
    tries_on_target: int,
    retry: RetryConfig,
    fallback_on: Sequence[str],
    has_next_target: bool,
) -> Step:
    """Retry a transient failure while tries remain; then fall back if the outcome allows it; else fail."""
    if outcome_of(outcome).transient and tries_on_target < retry.attempts:
        return Step.RETRY
    if outcome in fallback_on and has_next_target:
        return Step.FALLBACK
    return Step.FAIL


def backoff_delay(
    retry_number: int,
    retry: RetryConfig,
    retry_after: float | None,
    jitter: float,
) -> float:
    """Seconds to wait before retry number `retry_number` (1-based).

    Exponential with full jitter (`jitter` is a uniform draw in [0, 1)), capped by `max_backoff_s`. A
    Retry-After from the provider replaces it when `honor_retry_after` is set, under the same cap.
    """
    if retry_after is not None and retry.honor_retry_after:
        return max(0.0, min(retry_after, retry.max_backoff_s))
    ceiling: float = min(retry.max_backoff_s, retry.backoff_s * 2.0 ** (retry_number - 1))
    return ceiling * jitter


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """A Retry-After header in seconds: delta-seconds or an HTTP date; None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def price(
    usage: Usage,
    target: Target,
    provider_cost: float | None,
    litellm_cost: float | None,
) -> tuple[float, CostSource]:
    """Cost in USD of a successful call: config price, else provider-reported, else litellm's map, else unknown."""
    if target.pricing is not None:
        p = target.pricing
        return usage.input_tokens * p.input_per_token + usage.output_tokens * p.output_per_token, "config"
    if provider_cost is not None:
        return provider_cost, "provider"
    if litellm_cost is not None:
        return litellm_cost, "litellm"
    return 0.0, "unknown"


def merge_params(alias: AliasConfig, target: Target, call: Mapping[str, Any]) -> dict[str, Any]:
    """Call-time params override the target's, which override the alias's."""
    return {**alias.params, **target.params, **call}


def build_messages(
    prompt: str | None,
    messages: Sequence[Mapping[str, Any]] | None,
    system: str | None,
) -> list[dict[str, Any]]:
    """The chat messages of a call; `system` is prepended unless the messages already start with one."""
    if (prompt is None) == (messages is None):
        raise TypeError("generate() takes a prompt or messages=[...], exactly one of them")
    if messages is not None:
        out = [dict(m) for m in messages]
        if not out:
            raise TypeError("messages=[] is empty; give at least one message")
        for i, m in enumerate(out):
            if "role" not in m:
                raise TypeError(f"messages[{i}] has no 'role'")
    else:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, not {type(prompt).__name__}")
        out = [{"role": "user", "content": prompt}]
    if system and out[0].get("role") != "system":
        out.insert(0, {"role": "system", "content": system})
    return out
