"""The only module that imports litellm, and only on the first call.

`import litellm` costs seconds and ~170 MB, and without LITELLM_LOCAL_MODEL_COST_MAP it tries to download
a price map (retrying for seconds when offline). So the variable is set before the import, and the import
waits until a request is actually made: `import router` and `llm-router validate` stay fast.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from .config import Target
from .policy import parse_retry_after
from .types import Usage

_lock = threading.Lock()
_litellm: ModuleType | None = None
# litellm's marker for its own nested calls, which skip its success/failure logging (see `_quiet`).
_internal_call: ContextVar[bool] | None = None
# While every one of these is empty, nothing consumes litellm's own success/failure logging.
_CALLBACK_LISTS = (
    "callbacks",
    "input_callback",
    "success_callback",
    "failure_callback",
    "_async_input_callback",
    "_async_success_callback",
    "_async_failure_callback",
)

# The hidden-params key where litellm puts the cost a provider reported (OpenRouter's usage.cost).
_PROVIDER_COST_KEY = "llm_provider-x-litellm-response-cost"


def litellm() -> ModuleType:
    """The litellm module, imported once, offline-safe and quiet."""
    global _litellm
    if _litellm is None:
        with _lock:
            if _litellm is None:
                os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
                import litellm as mod

                mod.suppress_debug_info = True  # no "Give Feedback / Get Help" banners on stdout
                mod.telemetry = False
                global _internal_call
                try:  # private in litellm 1.106: without it, calls just take litellm's full logging path
                    from litellm._internal_context import is_internal_call

                    _internal_call = is_internal_call
                except ImportError:
                    _internal_call = None
                _litellm = mod
    return _litellm


def request_kwargs(
    target: Target, messages: list[dict[str, Any]], params: dict[str, Any], timeout: float
) -> dict[str, Any]:
    """The keyword arguments of one litellm.completion call, less the key. max_retries=0: the router owns retries."""
    kw: dict[str, Any] = {
        **params,
        "model": target.litellm_model,
        "messages": messages,
        "timeout": timeout,
        "max_retries": 0,
    }
    if target.api_base:
        kw["api_base"] = target.api_base
    if target.headers:
        kw["extra_headers"] = dict(target.headers)
    return kw


@contextlib.contextmanager
def _quiet(lm: ModuleType) -> Iterator[None]:
    """Let litellm skip its own success/failure logging for this request.

    The router records metrics and prices calls itself, so litellm's logging payloads, cost diagnostics and,
    on a failure, two formatted and redacted tracebacks are work nobody reads: skipping them saves ~9% CPU
    per call and ~40% on a failed attempt (bench/README.md). Only while no litellm callback is registered,
    so an application's own litellm callbacks (Langfuse and the like) still see every call.
    """
    if _internal_call is None or any(getattr(lm, n, None) for n in _CALLBACK_LISTS):
        yield
        return
    token = _internal_call.set(True)
    try:
        yield
    finally:
        _internal_call.reset(token)


def complete(kwargs: dict[str, Any]) -> Any:
    """One blocking request."""
    lm = litellm()
    with _quiet(lm):
        return lm.completion(**kwargs)


async def acomplete(kwargs: dict[str, Any]) -> Any:
    """One request on the running event loop."""
    lm = litellm()
    with _quiet(lm):
        return await lm.acompletion(**kwargs)


@dataclass(frozen=True)
class Failure:
    """A failed request, reduced to what the routing policy needs."""

    outcome: str
    status_code: int | None
    retry_after: float | None
    message: str


class InvalidResponse(Exception):
    """A 2xx answer the router cannot use (no choices, no message)."""


_BY_STATUS = {
    400: "bad_request",
    401: "auth",
    402: "payment_required",
    403: "auth",
    404: "not_found",
    408: "timeout",
    413: "context_window",
    422: "bad_request",
    429: "rate_limit",
}


def classify_error(exc: BaseException) -> Failure:
    """Map a litellm (or transport) exception to one routing outcome."""
    status = getattr(exc, "status_code", None)
    status = status if isinstance(status, int) else None
    message = str(getattr(exc, "message", None) or exc) or exc.__class__.__name__
    outcome = _outcome(exc, status, message)
    return Failure(outcome, status, _retry_after(exc), f"{exc.__class__.__name__}: {message}")


def _outcome(exc: BaseException, status: int | None, message: str) -> str:
    if isinstance(exc, InvalidResponse):
        return "invalid_response"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if not exc.__class__.__module__.startswith(("litellm", "openai", "httpx", "aiohttp")):
        return "other"
    e = litellm().exceptions
    # Subclasses before their bases: ContextWindowExceeded and ContentPolicyViolation are BadRequestErrors,
    # Timeout is an APIConnectionError.
    table: list[tuple[type[BaseException] | tuple[type[BaseException], ...], str]] = [
        (e.ContextWindowExceededError, "context_window"),
        (e.ContentPolicyViolationError, "content_filter"),
        (e.PaymentRequiredError, "payment_required"),
        (e.RateLimitError, "rate_limit"),
        (e.Timeout, "timeout"),
        (e.APIConnectionError, "connection"),
        ((e.AuthenticationError, e.PermissionDeniedError), "auth"),
        (e.NotFoundError, "not_found"),
        (e.APIResponseValidationError, "invalid_response"),
    ]
    for cls, outcome in table:
        if isinstance(exc, cls):
            return outcome
    if status is not None and status in _BY_STATUS:
        return _BY_STATUS[status]
    if isinstance(exc, (e.BadRequestError, e.UnprocessableEntityError)):
        return "bad_request"
    if _looks_unparseable(message):
        return "invalid_response"
    if "connection error" in message.lower():
        # litellm reports a dropped connection on the OpenAI route as an InternalServerError.
        return "connection"
    if isinstance(exc, (e.ServiceUnavailableError, e.InternalServerError, e.BadGatewayError)):
        return "server_error"
    if status is not None and status >= 500:
        return "server_error"
    return "other"


def _looks_unparseable(message: str) -> bool:
    # litellm reports a 2xx body that is not JSON as an InternalServerError; only its text tells it apart.
    m = message.lower()
    return any(
        s in m
        for s in (
            "empty or invalid response",
            "invalid response object",
            "returned 'choices'",
            "expecting value",
            "jsondecodeerror",
            "invalid json",
            "unable to parse",
        )
    )


def _retry_after(exc: BaseException) -> float | None:
    # litellm keeps the provider's headers in litellm_response_headers; exc.response is often a stand-in.
    for headers in (
        getattr(exc, "litellm_response_headers", None),
        getattr(getattr(exc, "response", None), "headers", None),
    ):
        if headers:
            try:
                value = headers.get("retry-after") or headers.get("Retry-After")
            except Exception:  # a header object we do not know: no hint rather than a crash
                value = None
            seconds = parse_retry_after(value)
            if seconds is not None:
                return seconds
    return None


@dataclass(frozen=True)
class Answer:
    """What the router takes from a successful litellm response."""

    text: str
    usage: Usage
    finish_reason: str | None
    provider_cost: float | None


def read_response(response: Any) -> Answer:
    """Text, usage, finish reason and any provider-reported cost of a litellm ModelResponse."""
    choices = getattr(response, "choices", None)
    if not choices:
        raise InvalidResponse("the provider answered with no choices")
    message = getattr(choices[0], "message", None)
    if message is None:
        raise InvalidResponse("the provider answered with no message")
    usage = getattr(response, "usage", None)
    hidden = getattr(response, "_hidden_params", None) or {}
    extra = hidden.get("additional_headers") or {}
    cost = extra.get(_PROVIDER_COST_KEY)
    return Answer(
        text=message.content or "",
        usage=Usage(int(getattr(usage, "prompt_tokens", 0) or 0), int(getattr(usage, "completion_tokens", 0) or 0)),
        finish_reason=getattr(choices[0], "finish_reason", None),
        provider_cost=float(cost) if cost is not None else None,
    )


def price_map_cost(target: Target, usage: Usage) -> float | None:
    """The cost of `usage` by litellm's built-in price map; None when the model is not in it."""
    try:
        prompt, completion = litellm().cost_per_token(
            model=target.model,
            custom_llm_provider=target.kind,
            prompt_tokens=usage.input_tokens,
            completion_tokens=usage.output_tokens,
        )
    except Exception:  # litellm raises a bare Exception for a model it has no price for
        return None
    return float(prompt + completion)


# -- streaming ------------------------------------------------------------------------------------------------


class EmptyStream(InvalidResponse):
    """A stream that ended before any text: as unusable as an empty answer, so it is retried or fallen back from."""


class StreamState:
    """What a stream has delivered so far: text, finish reason, usage. Fed one chunk at a time (sync or async)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.parts: list[str] = []
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.provider_cost: float | None = None
        self.error: BaseException | None = None

    @property
    def text(self) -> str:
        """The text received so far."""
        return "".join(self.parts)

    @property
    def finished(self) -> bool:
        """Whether the provider itself ended the answer (litellm adds a finish reason to a cut-off stream)."""
        return getattr(self.stream, "received_finish_reason", self.finish_reason) is not None

    @property
    def reported_usage(self) -> Usage | None:
        """The usage the provider reported; None when the only usage is litellm's own count."""
        chunks = getattr(self.stream, "chunks", None)
        if chunks is None or any(getattr(getattr(c, "usage", None), "completion_tokens", None) for c in chunks):
            return self.usage
        return None

    def close(self) -> None:
        """Release the HTTP response of an abandoned stream (best effort)."""
        inner = getattr(self.stream, "completion_stream", None)
        close = getattr(inner, "close", None)
        if callable(close):
            try:
                close()
            except Exception:  # already closed, or a stream type that cannot: nothing more to free
                pass

    async def aclose(self) -> None:
        """Async twin of `close`."""
        aclose = getattr(self.stream, "aclose", None)
        if callable(aclose):
            try:
                await aclose()
            except Exception:  # already closed: nothing more to free
                pass
        else:
            self.close()

    def feed(self, chunk: Any) -> str:
        """Take one chunk; return its text delta ("" for none)."""
        usage = getattr(chunk, "usage", None)
        if usage is not None and (getattr(usage, "prompt_tokens", None) or getattr(usage, "completion_tokens", None)):
            self.usage = Usage(int(usage.prompt_tokens or 0), int(usage.completion_tokens or 0))
        hidden = getattr(chunk, "_hidden_params", None) or {}
        cost = (hidden.get("additional_headers") or {}).get(_PROVIDER_COST_KEY)
        if cost is not None:
            self.provider_cost = float(cost)
        choices = getattr(chunk, "choices", None) or ()
        if not choices:
            return ""
        choice = choices[0]
        if getattr(choice, "finish_reason", None):
            self.finish_reason = choice.finish_reason
        delta = getattr(choice, "delta", None)
        text = getattr(delta, "content", None) or ""
        if text:
            self.parts.append(text)
        return text


def open_stream(kwargs: dict[str, Any]) -> StreamState:
    """Start a streamed request and read up to its first text, so a failure before it can still fall back."""
    state = StreamState(litellm().completion(**kwargs))
    for chunk in state.stream:
        if state.feed(chunk):
            return state
    raise EmptyStream("the stream ended before any text")


async def aopen_stream(kwargs: dict[str, Any]) -> StreamState:
    """Async twin of `open_stream`."""
    state = StreamState(await litellm().acompletion(**kwargs))
    async for chunk in state.stream:
        if state.feed(chunk):
            return state
    raise EmptyStream("the stream ended before any text")


def count_tokens(target: Target, messages: list[dict[str, Any]], text: str) -> Usage:
    """Input and output tokens by litellm's counter, for a stream whose provider reported none."""
    lm = litellm()
    try:
        prompt = int(lm.token_counter(model=target.litellm_model, messages=messages))
        completion = int(lm.token_counter(model=target.litellm_model, text=text)) if text else 0
    except Exception:  # an unknown tokenizer: a rough count beats none
        prompt = sum(len(str(m.get("content", ""))) for m in messages) // 4
        completion = len(text) // 4
    return Usage(prompt, completion, estimated=True)


def supports_schema(target: Target) -> bool:
    """Whether litellm knows the target's model to take a JSON Schema in response_format."""
    try:
        return bool(litellm().supports_response_schema(model=target.model, custom_llm_provider=target.kind))
    except Exception:  # a model litellm does not know
        return False


def max_output_tokens(target: Target) -> int | None:
    """The model's largest answer in tokens by litellm's model map; None when the model is not in it."""
    try:
        info = litellm().get_model_info(model=target.model, custom_llm_provider=target.kind)
    except Exception:  # a model litellm does not know
        return None
    value = info.get("max_output_tokens") or info.get("max_tokens")
    return int(value) if value else None
