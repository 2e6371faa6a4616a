"""Every way a request can fail, in one table, with what each means for routing.

An engine classifies a failed request into one of these names (`Engine.classify`); the attempt loop and the
routing policy read only the flags below, never a list of names. Adding an outcome is one entry here plus its
classification rule in the engines.

    transient        may go away on its own: worth another try on the same target (within retry.attempts)
    against_target   says the target is unhealthy: counts towards its circuit breaker
    key_fault        in a key pool, the key's fault: the key is benched and the next one tried at once
    rotate_key       in a key pool, the next key is tried at once (a key fault, or a key's own rate limit)
    falls_back       in `defaults.fallback_on` by default: the call moves on to the next target

Calls end with one of these, or with a call-level outcome (`success`, `cancelled`, `stream_interrupted`,
`budget_exceeded`, `refused`, or why no target was usable: `no_credentials`, `keys_benched`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Outcome:
    """One failure outcome and its routing properties (see the module docstring)."""

    name: str
    doc: str
    transient: bool = False
    against_target: bool = False
    key_fault: bool = False
    rotate_key: bool = False
    falls_back: bool = False


_TABLE = (
    Outcome("rate_limit", "429, or the provider's own rate-limit error", True, True, False, True, True),
    Outcome("timeout", "no answer (or no first text) within the attempt's time", True, True, falls_back=True),
    Outcome("connection", "the connection failed or dropped", True, True, falls_back=True),
    Outcome("server_error", "5xx", True, True, falls_back=True),
    Outcome("invalid_response", "a 2xx the router cannot use: not JSON, no choices", True, True, falls_back=True),
    Outcome("auth", "401/403: the key is refused", False, True, True, True, True),
    Outcome("payment_required", "402: the account is out of credit", False, True, True, True, True),
    Outcome("not_found", "404: no such model at this provider", falls_back=True),
    Outcome("context_window", "the request is longer than the model takes", falls_back=True),
    Outcome("bad_request", "400/422: the provider refuses the request itself"),
    Outcome("content_filter", "the provider's content filter stopped the answer"),
    Outcome("other", "anything else (not fallen back from by default)"),
)

OUTCOMES: dict[str, Outcome] = {o.name: o for o in _TABLE}
FAILURE_OUTCOMES: tuple[str, ...] = tuple(OUTCOMES)
DEFAULT_FALLBACK_ON: tuple[str, ...] = tuple(o.name for o in _TABLE if o.falls_back)


def outcome(name: str) -> Outcome:
    """The table entry of a failure outcome (an unknown name reads as `other`)."""
    return OUTCOMES.get(name) or OUTCOMES["other"]
