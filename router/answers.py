"""What an engine hands back, whatever the engine: an `Answer`, a stream's `Chunk`s and its `StreamLimits`, and the
ways an answer can be unusable (`InvalidResponse`, `ContentFiltered`, `EmptyStream`) or late (`FirstTextTimeout`,
`StreamStalled`). Plain data, imported by the engines (`router.engines`) and by `router.streams` alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .types import Usage


class InvalidResponse(Exception):
    """A 2xx answer the router cannot use (not JSON, no choices, no message, a structured answer that does not
    validate): retried, then fallen back from, as `invalid_response`."""


class ContentFiltered(InvalidResponse):
    """A 2xx answer the provider's content filter stopped (`finish_reason: content_filter`)."""


class EmptyStream(InvalidResponse):
    """A stream that ended before any content: as unusable as an empty answer."""


class FirstTextTimeout(TimeoutError):
    """No content came within the first-text limit of the request, whatever else did (keep-alives, reasoning)."""


class StreamStalled(TimeoutError):
    """After its first content, a stream sent no more within the idle limit, or outlasted the call's deadline."""


@dataclass(frozen=True)
class StreamLimits:
    """How long a stream may take, in seconds from its request: to its first content, between contents, in all."""

    first_text_s: float
    idle_s: float
    total_s: float


@dataclass(frozen=True)
class Answer:
    """What the router takes from a successful, complete answer."""

    text: str
    usage: Usage
    finish_reason: str | None
    provider_cost: float | None  # the cost the provider reported (OpenRouter's usage.cost)
    model: str | None = None  # the model the provider says answered
    tool_calls: tuple[Mapping[str, Any], ...] = ()  # OpenAI-shaped: {id, type: function, function: {name, arguments}}
    raw: Any = None  # the engine's own response object


@dataclass(frozen=True)
class Chunk:
    """One event of a stream, as every engine reports it."""

    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None  # only usage the provider itself reported
    provider_cost: float | None = None
    model: str | None = None
    tool_calls: tuple[Mapping[str, Any], ...] = ()  # OpenAI tool-call deltas: {index, id?, function: {...}}
    reasoning: str = ""  # reasoning text some models stream before the answer (not answer text)
