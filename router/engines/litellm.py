"""The LiteLLM engine: the only module that imports litellm, and only on the first request.

`import litellm` costs seconds and ~170 MB, and without LITELLM_LOCAL_MODEL_COST_MAP it tries to download
a price map (retrying for seconds when offline). So the variable is set before the import, and the import
waits until a request is actually made: `import router` and `llm-router validate` stay fast.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import logging
import os
import threading
import urllib.parse
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from types import ModuleType
from typing import TYPE_CHECKING, Any

from .. import background, streams
from ..policy import parse_retry_after
from ..types import Usage
from . import Answer, Chunk, ContentFiltered, Failure, FirstTextTimeout, InvalidResponse, Send, classify_common

if TYPE_CHECKING:
    from ..config import Target
    from ..streams import StreamState

log = logging.getLogger("router")

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


# The attempt's bound is the router's own wall-clock timer (`_bounded`, `background.run`, the stream limits).
# litellm's `timeout`, a bound on each socket read, stays behind it as a backstop, set later so that the two never
# race: when litellm's fires first, it builds its exception on the event loop (a MidStreamFallbackError after a
# read timeout took 0.06-1.4 s on these 2 cores), holding up every other request on the loop meanwhile.
SOCKET_TIMEOUT_LAG_S = 1.0


def request_kwargs(send: Send) -> dict[str, Any]:
    """The keyword arguments of one litellm.completion call. max_retries=0: the router owns retries.

    drop_params: a param this target does not support (say `logit_bias` on a fallback to Anthropic) is left out
    of its request, and logged once, rather than failing the call with a bad_request.
    """
    target = send.target
    kw: dict[str, Any] = {
        **send.body,
        "model": target.litellm_model,
        "timeout": send.timeout_s + SOCKET_TIMEOUT_LAG_S,
        "max_retries": 0,
        "drop_params": True,
    }
    _note_dropped(target, send.body)
    headers = dict(target.headers) if target.headers else {}
    if target.api_base:
        kw["api_base"], basic = split_credentials(target.api_base)
        if basic is not None:
            headers["Authorization"] = basic
    if headers:
        kw["extra_headers"] = headers
    if send.api_key is not None:
        kw["api_key"] = send.api_key
    if send.body.get("tools"):
        # litellm 1.106 sends any tools= through its MCP-gateway check first, which imports the optional `mcp`
        # package (only in litellm[proxy]) and so fails every call with tools; ours are plain functions.
        kw["_skip_mcp_handler"] = True
    return kw


@functools.lru_cache(maxsize=256)
def split_credentials(url: str) -> tuple[str, str | None]:
    """An api_base without its `user:password@`, and those as the Basic Authorization header they stand for.

    A blocking httpx request turns them into that header itself; LiteLLM's async transport (aiohttp) refuses a
    URL with credentials next to the Authorization header the provider's SDK sets, so the request never went
    out. Sent as the header, both send the same bytes.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None
    user = urllib.parse.unquote(parts.username or "")
    password = urllib.parse.unquote(parts.password or "")
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=host)), f"Basic {token}"


# Params the router itself sets on a request: never reported as the caller's dropped ones.
_ROUTER_PARAMS = frozenset(
    {"messages", "stream", "stream_options", "response_format", "timeout", "max_retries", "extra_headers"}
)
# (target, param names) -> the params litellm will drop for it; worked out once, logged once.
_dropped: dict[tuple[str, str, frozenset[str]], tuple[str, ...]] = {}


def _note_dropped(target: Target, body: Mapping[str, Any]) -> None:
    names = frozenset(body)
    key = (target.kind, target.model, names)
    if key in _dropped:
        return
    dropped = unsupported_params(target, names)
    _dropped[key] = dropped
    if dropped:
        log.warning(
            "%s: %s not supported by provider kind %r, left out of its requests",
            target.key,
            ", ".join(dropped),
            target.kind,
        )


def unsupported_params(target: Target, names: frozenset[str]) -> tuple[str, ...]:
    """The OpenAI params among `names` that litellm knows this target does not take (it drops them)."""
    lm = litellm()
    known = set(getattr(lm, "OPENAI_CHAT_COMPLETION_PARAMS", ()))
    try:
        supported = set(lm.get_supported_openai_params(model=target.model, custom_llm_provider=target.kind) or ())
    except Exception:  # a provider litellm has no list for: it passes every param through
        return ()
    if not supported:
        return ()
    return tuple(sorted(n for n in names if n in known and n not in supported and n not in _ROUTER_PARAMS))


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
    """One blocking litellm request: its raw response."""
    lm = litellm()
    with _quiet(lm):
        return lm.completion(**kwargs)


async def acomplete(kwargs: dict[str, Any]) -> Any:
    """One litellm request on the running event loop: its raw response."""
    lm = litellm()
    with _quiet(lm):
        return await lm.acompletion(**kwargs)


# -- reading answers ----------------------------------------------------------------------------------------


def read_response(response: Any) -> Answer:
    """Text, usage, finish reason, tool calls and any provider-reported cost of a litellm ModelResponse."""
    choices = getattr(response, "choices", None)
    if not choices:
        raise InvalidResponse("the provider answered with no choices")
    message = getattr(choices[0], "message", None)
    if message is None:
        raise InvalidResponse("the provider answered with no message")
    finish_reason = getattr(choices[0], "finish_reason", None)
    if finish_reason == "content_filter":
        raise ContentFiltered("the provider's content filter stopped the answer (finish_reason: content_filter)")
    usage = getattr(response, "usage", None)
    return Answer(
        text=message.content or "",
        usage=Usage(int(getattr(usage, "prompt_tokens", 0) or 0), int(getattr(usage, "completion_tokens", 0) or 0)),
        finish_reason=finish_reason,
        provider_cost=_provider_cost(response),
        model=getattr(response, "model", None) or None,
        tool_calls=tuple(_plain(c) for c in (getattr(message, "tool_calls", None) or ())),
        raw=response,
    )


def _provider_cost(obj: Any) -> float | None:
    hidden = getattr(obj, "_hidden_params", None) or {}
    cost = (hidden.get("additional_headers") or {}).get(_PROVIDER_COST_KEY)
    return float(cost) if cost is not None else None


def _plain(obj: Any) -> dict[str, Any]:
    """A litellm (pydantic) object as a plain dict, without the None fields litellm adds."""
    dump = getattr(obj, "model_dump", None)
    value = dump() if callable(dump) else dict(obj)
    return {k: v for k, v in value.items() if v is not None}


def _chunk(chunk: Any) -> Chunk:
    """A litellm stream chunk as a neutral Chunk."""
    usage = getattr(chunk, "usage", None)
    reported = None
    if usage is not None and (getattr(usage, "prompt_tokens", None) or getattr(usage, "completion_tokens", None)):
        reported = Usage(int(usage.prompt_tokens or 0), int(usage.completion_tokens or 0))
    choices = getattr(chunk, "choices", None) or ()
    text, finish, reasoning = "", None, ""
    calls: tuple[dict[str, Any], ...] = ()
    if choices:
        choice = choices[0]
        finish = getattr(choice, "finish_reason", None) or None
        delta = getattr(choice, "delta", None)
        text = getattr(delta, "content", None) or ""
        reasoning = getattr(delta, "reasoning_content", None) or ""
        raw_calls = getattr(delta, "tool_calls", None)
        if raw_calls:
            calls = tuple(_plain(c) for c in raw_calls)
    return Chunk(
        text=text,
        finish_reason=finish,
        usage=reported,
        provider_cost=_provider_cost(chunk),
        model=getattr(chunk, "model", None) or None,
        tool_calls=calls,
        reasoning=reasoning,
    )


class _Source:
    """A litellm stream (CustomStreamWrapper) as a StreamSource of neutral chunks."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def __iter__(self) -> _Source:
        return self

    def __next__(self) -> Chunk:
        return _chunk(next(self.stream))

    def __aiter__(self) -> _Source:
        return self

    async def __anext__(self) -> Chunk:
        return _chunk(await self.stream.__anext__())

    def close(self) -> None:
        """Close the HTTP response under litellm's wrapper."""
        close = getattr(getattr(self.stream, "completion_stream", None), "close", None)
        if callable(close):
            close()

    async def aclose(self) -> None:
        """Close the async stream (litellm's wrapper closes its response)."""
        aclose = getattr(self.stream, "aclose", None)
        if callable(aclose):
            await aclose()
        else:
            self.close()

    def provider_finished(self) -> bool:
        """litellm makes up finish_reason "stop" for any stream that just stops; the provider's own is kept in
        received_finish_reason (for some providers, Gemini's among them, intermittent_finish_reason)."""
        s = self.stream
        if not hasattr(s, "received_finish_reason"):
            return True
        return (s.received_finish_reason or getattr(s, "intermittent_finish_reason", None)) is not None

    def provider_usage(self, seen: Usage | None) -> Usage | None:
        """The usage to bill: None when the only usage is litellm's own count, not the provider's."""
        chunks = getattr(self.stream, "chunks", None)
        if chunks is None or any(getattr(getattr(c, "usage", None), "completion_tokens", None) for c in chunks):
            return seen
        return None


# -- failures -------------------------------------------------------------------------------------------------

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
_CONTEXT_CODE = "context_length_exceeded"


def classify_error(exc: BaseException) -> Failure:
    """Map a litellm (or transport) exception to one routing outcome."""
    status = getattr(exc, "status_code", None)
    status = status if isinstance(status, int) else None
    message = str(getattr(exc, "message", None) or exc) or exc.__class__.__name__
    outcome = classify_common(exc) or _outcome(exc, status, message)
    return Failure(outcome, status, _retry_after(exc), f"{exc.__class__.__name__}: {message}")


def _outcome(exc: BaseException, status: int | None, message: str) -> str:
    if not exc.__class__.__module__.startswith(("litellm", "openai", "httpx", "aiohttp")):
        return "other"
    # The status says what a 402 or 403 is; litellm picks their exception class from the message text.
    if status in (402, 403):
        return _BY_STATUS[status]
    if getattr(exc, "code", None) == _CONTEXT_CODE or _CONTEXT_CODE in message:
        return "context_window"  # OpenAI's code, also when the message is worded in a way litellm does not match
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


async def _bounded(aw: Any, seconds: float) -> Any:
    """Await a litellm request for at most `seconds` of wall-clock time (litellm's own `timeout` bounds each
    socket read, which a provider trickling bytes resets forever): past it, AttemptTimeout, the request
    cancelled and its connection closed."""
    try:
        return await streams.within(aw, seconds)
    except TimeoutError as exc:  # asyncio.TimeoutError is TimeoutError from 3.11
        if type(exc) not in (TimeoutError, asyncio.TimeoutError):
            raise  # litellm's own, or aiohttp's: the provider's timeout, with its message
        raise background.AttemptTimeout(f"no complete answer within {seconds:.3g}s") from None
    except asyncio.TimeoutError:  # Python 3.10, where it is not a TimeoutError
        raise background.AttemptTimeout(f"no complete answer within {seconds:.3g}s") from None


# -- the engine -----------------------------------------------------------------------------------------------


class LiteLLMEngine:
    """Every provider LiteLLM knows, through `litellm.completion` / `acompletion`."""

    name = "litellm"

    def load(self) -> None:
        """Import litellm (once; seconds and ~170 MB)."""
        litellm()

    def complete(self, send: Send) -> Answer:
        """One blocking request, sent as the async one on the background loop: a blocking litellm call cannot be
        held to a wall-clock bound (a trickled body resets every socket timeout), nor cancelled."""
        return background.run(self.acomplete(send), send.timeout_s)  # type: ignore[no-any-return]

    async def acomplete(self, send: Send) -> Answer:
        """One request on the running event loop, cancelled (AttemptTimeout) past `send.timeout_s`."""
        return read_response(await _bounded(acomplete(request_kwargs(send)), send.timeout_s))

    def open_stream(self, send: Send) -> StreamState:
        """Start a streamed request and read it up to its first content: the async stream, opened on the
        background loop and read through it (see `streams.read_on_loop`), so that a stream closed or dropped
        unread closes its connection at once, whatever the provider is doing."""
        limits = send.limits
        try:
            state = background.run(self.aopen_stream(send), send.timeout_s if limits is None else limits.first_text_s)
        except background.AttemptTimeout:  # the caller's clock ran out first: the same limit as the loop's
            if limits is None:
                raise
            raise FirstTextTimeout(f"no text within {limits.first_text_s:g}s of the request") from None
        return streams.read_on_loop(state)

    async def aopen_stream(self, send: Send) -> StreamState:
        """Async twin of `open_stream`."""
        kwargs = request_kwargs(send)

        async def open_source() -> _Source:
            return _Source(await litellm().acompletion(**kwargs))

        return await streams.open_async(open_source, send.limits)

    def classify(self, exc: BaseException) -> Failure:
        """See `classify_error`."""
        return classify_error(exc)

    def count_tokens(self, target: Target, messages: list[dict[str, Any]], text: str) -> Usage:
        """Input and output tokens by litellm's counter, for a stream whose provider reported none."""
        lm = litellm()
        try:
            prompt = int(lm.token_counter(model=target.litellm_model, messages=messages))
            completion = int(lm.token_counter(model=target.litellm_model, text=text)) if text else 0
        except Exception:  # an unknown tokenizer: a rough count beats none
            prompt = sum(len(str(m.get("content", ""))) for m in messages) // 4
            completion = len(text) // 4
        return Usage(prompt, completion, estimated=True)

    def price_map_cost(self, target: Target, usage: Usage) -> float | None:
        """The cost of `usage` by litellm's built-in price map; None when the model is not in it, or is in it
        without a price: the map lists some paid models with no (or zero) prices, and "never guessed" means a
        zero counts only for a model marked free (OpenRouter's `:free` variants)."""
        try:
            prompt, completion = litellm().cost_per_token(
                model=target.model,
                custom_llm_provider=target.kind,
                prompt_tokens=usage.input_tokens,
                completion_tokens=usage.output_tokens,
            )
        except Exception:  # litellm raises a bare Exception for a model it has no price for
            return None
        cost = float(prompt + completion)
        if cost == 0 and (usage.input_tokens or usage.output_tokens) and not target.model.endswith(":free"):
            return None
        return cost

    def supports_schema(self, target: Target) -> bool:
        """Whether litellm knows the target's model to take a JSON Schema in response_format."""
        try:
            return bool(litellm().supports_response_schema(model=target.model, custom_llm_provider=target.kind))
        except Exception:  # a model litellm does not know
            return False

    def max_output_tokens(self, target: Target) -> int | None:
        """The model's largest answer in tokens by litellm's model map; None when the model is not in it."""
        try:
            info = litellm().get_model_info(model=target.model, custom_llm_provider=target.kind)
        except Exception:  # a model litellm does not know
            return None
        value = info.get("max_output_tokens") or info.get("max_tokens")
        return int(value) if value else None


ENGINE = LiteLLMEngine()
