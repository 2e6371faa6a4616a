"""Plain data the router hands back: `Result`, `Usage`, `Attempt`, `Skip` (outcome names: `router.outcomes`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

CostSource = Literal["config", "provider", "litellm", "unknown", "cache"]


@dataclass(frozen=True)
class Usage:
    """Tokens of one answer."""

    input_tokens: int = 0
    output_tokens: int = 0
    estimated: bool = False  # counted by litellm's tokenizer because the provider reported none

    @property
    def total_tokens(self) -> int:
        """Input plus output tokens."""
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True)
class Attempt:
    """One request to one target: what it was, how it ended and how long it took."""

    provider: str
    model: str
    outcome: str
    latency_s: float
    error: str | None = None
    status_code: int | None = None


@dataclass(frozen=True)
class Skip:
    """A target passed over without a request, and why (`no_credentials`)."""

    provider: str
    model: str
    reason: str
    env_vars: tuple[str, ...] = ()


@dataclass(frozen=True)
class Result:
    """The answer of a `generate()` call, with where it came from and what it cost."""

    text: str
    alias: str
    provider: str
    model: str
    usage: Usage
    cost_usd: float
    cost_source: CostSource
    latency_s: float
    attempts: tuple[Attempt, ...]
    skipped: tuple[Skip, ...] = ()
    finish_reason: str | None = None
    parsed: Any = None  # with response_format=: the validated pydantic model (or dict for a JSON Schema)
    cached: bool = False  # answered from the response cache: no request, cost_usd 0, cost_source "cache"
    # The tools the model asked to call (generate(tools=[...])), OpenAI-shaped:
    # {"id": ..., "type": "function", "function": {"name": ..., "arguments": "<JSON text>"}}
    tool_calls: tuple[Mapping[str, Any], ...] = ()
    raw: Any = field(default=None, repr=False, compare=False)

    @property
    def fallbacks(self) -> int:
        """How many times the call moved on to another target."""
        return sum(
            1
            for a, b in zip(self.attempts, self.attempts[1:], strict=False)
            if (a.provider, a.model) != (b.provider, b.model)
        )
