"""Routing decisions as pure functions of plain data: no I/O, no clock, no litellm. Tested as tables.

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
from collections.abc import Mapping, Sequence
from typing import Any

from .config import AliasConfig, RetryConfig, Target
from .types import CostSource, Skip, Usage

# Failures that may go away on their own: worth another try on the same target.
TRANSIENT = frozenset({"rate_limit", "timeout", "connection", "server_error", "invalid_response"})


class Step(enum.Enum):
    """What the attempt loop does after a failed attempt."""

    RETRY = "retry"
    FALLBACK = "fallback"
    FAIL = "fail"


def plan_targets(targets: Sequence[Target], provider: str | None = None) -> tuple[list[Target], list[Skip]]:
    """Split an alias's targets (restricted to `provider` if given) into those to try and those skipped."""
    usable: list[Target] = []
    skipped: list[Skip] = []
    for t in targets:
        if provider is not None and t.provider != provider:
            continue
        if t.has_credentials:
            usable.append(t)
        else:
            skipped.append(Skip(t.provider, t.model, "no_credentials", t.key_env_vars))
    return usable, skipped


def next_step(
    outcome: str,
    tries_on_target: int,
    retry: RetryConfig,
    fallback_on: Sequence[str],
    has_next_target: bool,
) -> Step:
    """Retry a transient failure while tries remain; then fall back if the outcome allows it; else fail."""
    if outcome in TRANSIENT and tries_on_target < retry.attempts:
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
    ceiling = min(retry.max_backoff_s, retry.backoff_s * 2 ** (retry_number - 1))
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
