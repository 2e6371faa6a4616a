"""Engines: everything that talks to a provider, behind one interface with a sync and an async half.

The attempt loop names no engine. It hands an engine a `Send` (a target, the OpenAI-shaped request body, the
attempt's timeout and key) and gets back an `Answer`, or an opened `StreamState`, or an exception that the same
engine turns into a `Failure` (one of `router.outcomes`, a status code, a Retry-After). Prices from a model
map, token counts and a model's capabilities come from the engine too.

    Engine.complete(send) / acomplete(send)         one request: an Answer, or raises
    Engine.open_stream(send) / aopen_stream(send)   a stream, read up to its first content: a StreamState
    Engine.classify(exc)                            a Failure: outcome, status, Retry-After, message
    Engine.count_tokens(target, messages, text)     an estimate, for a stream whose provider reported none
    Engine.price_map_cost(target, usage)            the cost by the engine's price map; None: not priced there
    Engine.supports_schema(target)                  whether the model takes a JSON Schema in response_format
    Engine.max_output_tokens(target)                the model's largest answer, if known

The request body is what the OpenAI chat-completions API takes, less `model`: `messages`, the call's params
(`temperature`, `max_tokens`, `tools`, ...), and the router's own `stream`, `stream_options`,
`response_format`. Hooks see (and may rewrite) exactly this body; an engine adds the target's model, base URL,
headers, key and timeout when it sends it.

Engines are looked up by name (`engine_for(target)`), imported on first use: `litellm` (the default: every
provider LiteLLM knows) and, where a provider says `engine: direct`, the router's own OpenAI-protocol client
(`router.engines.direct`), for the provider kinds in `DIRECT_KINDS`.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..answers import (
    Answer,
    Chunk,
    ContentFiltered,
    EmptyStream,
    FirstTextTimeout,
    InvalidResponse,
    StreamLimits,
    StreamStalled,
)
from ..config import DIRECT_KINDS, direct_problem

if TYPE_CHECKING:
    from ..config import Target
    from ..streams import StreamState
    from ..types import Usage

__all__ = [
    "DEFAULT_ENGINE",
    "DIRECT_KINDS",
    "ENGINES",
    "Answer",
    "Chunk",
    "ContentFiltered",
    "EmptyStream",
    "Engine",
    "Failure",
    "FirstTextTimeout",
    "InvalidResponse",
    "Send",
    "StreamLimits",
    "StreamSource",
    "StreamStalled",
    "classify_common",
    "direct_problem",
    "engine_for",
    "get_engine",
]


@dataclass(frozen=True)
class Send:
    """One request as the loop asks for it: where, what, how long, with which key (never shown to hooks)."""

    target: Target
    body: Mapping[str, Any]  # the OpenAI chat-completions body, less model (see the module docstring)
    timeout_s: float  # this attempt's bound: the target's timeout or what is left of the call's deadline
    api_key: str | None = None
    limits: StreamLimits | None = None  # a stream's wall-clock bounds (None: not a stream, or unbounded)

    @property
    def stream(self) -> bool:
        """Whether the body asks for a stream."""
        return bool(self.body.get("stream"))


class StreamSource(Protocol):
    """An opened stream of an engine: its chunks, sync or async, and what only the engine can tell at its end."""

    def __next__(self) -> Chunk:
        """The next chunk (StopIteration at the end). Sync sources only."""
        ...

    async def __anext__(self) -> Chunk:
        """The next chunk (StopAsyncIteration at the end). Async sources only."""
        ...

    def close(self) -> None:
        """Release the HTTP response (best effort; from any thread)."""
        ...

    async def aclose(self) -> None:
        """Async twin of `close`."""
        ...

    def provider_finished(self) -> bool:
        """Whether the provider itself ended the answer (sent a finish reason), as opposed to a cut stream."""
        ...


@dataclass(frozen=True)
class Failure:
    """A failed request, reduced to what the routing policy needs."""

    outcome: str  # a name of router.outcomes
    status_code: int | None
    retry_after: float | None
    message: str


class Engine(Protocol):
    """What talks to providers (see the module docstring)."""

    name: str

    def load(self) -> None:
        """Import what the engine needs (seconds for LiteLLM): called before a call's clock starts."""
        ...

    def complete(self, send: Send) -> Answer:
        """One blocking request; raises on any failure (classify() tells what it was)."""
        ...

    async def acomplete(self, send: Send) -> Answer:
        """One request on the running event loop."""
        ...

    def open_stream(self, send: Send) -> StreamState:
        """Start a streamed request and read it up to its first content, held to `send.limits`."""
        ...

    async def aopen_stream(self, send: Send) -> StreamState:
        """Async twin of `open_stream`."""
        ...

    def classify(self, exc: BaseException) -> Failure:
        """Map an exception of this engine (or of the transport) to one routing outcome."""
        ...

    def count_tokens(self, target: Target, messages: list[dict[str, Any]], text: str) -> Usage:
        """Input and output tokens, estimated (`Usage.estimated`), for a stream whose provider reported none."""
        ...

    def price_map_cost(self, target: Target, usage: Usage) -> float | None:
        """The cost of `usage` by the engine's price map; None when the model is not priced there."""
        ...

    def supports_schema(self, target: Target) -> bool:
        """Whether the target's model takes a JSON Schema in response_format."""
        ...

    def max_output_tokens(self, target: Target) -> int | None:
        """The model's largest answer in tokens; None when unknown."""
        ...


# name -> "module:attribute" of its engine instance, imported on first use
ENGINES: dict[str, str] = {
    "litellm": "router.engines.litellm:ENGINE",
    "direct": "router.engines.direct:ENGINE",
}
DEFAULT_ENGINE = "litellm"

_loaded: dict[str, Engine] = {}
_lock = threading.Lock()


def get_engine(name: str) -> Engine:
    """The engine called `name` (see ENGINES), imported once."""
    engine = _loaded.get(name)
    if engine is None:
        with _lock:
            engine = _loaded.get(name)
            if engine is None:
                module, _, attr = ENGINES[name].partition(":")
                engine = _loaded[name] = getattr(importlib.import_module(module), attr)
    return engine


def engine_for(target: Target) -> Engine:
    """The engine that sends `target`'s requests."""
    return get_engine(getattr(target, "engine", DEFAULT_ENGINE))


def classify_common(exc: BaseException) -> str | None:
    """The outcome of a failure any engine may see (the router's own checks, a timeout); None for the rest."""
    if isinstance(exc, ContentFiltered):
        return "content_filter"
    if isinstance(exc, InvalidResponse):
        return "invalid_response"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return None
