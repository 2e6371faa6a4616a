"""The only module that imports litellm, and only on the first call.

`import litellm` costs seconds and ~170 MB, and without LITELLM_LOCAL_MODEL_COST_MAP it tries to download
a price map (retrying for seconds when offline). So the variable is set before the import, and the import
waits until a request is actually made: `import router` and `llm-router validate` stay fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Awaitable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from .config import Target
from .policy import parse_retry_after
from .types import Usage

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


def request_kwargs(
    target: Target, messages: list[dict[str, Any]], params: dict[str, Any], timeout: float
) -> dict[str, Any]:
    """The keyword arguments of one litellm.completion call, less the key. max_retries=0: the router owns retries.

    drop_params: a param this target does not support (say `logit_bias` on a fallback to Anthropic) is left out
    of its request, and logged once, rather than failing the call with a bad_request.
    """
    kw: dict[str, Any] = {
        **params,
        "model": target.litellm_model,
        "messages": messages,
        "timeout": timeout,
        "max_retries": 0,
        "drop_params": True,
    }
    _note_dropped(target, params)
    if target.api_base:
        kw["api_base"] = target.api_base
    if target.headers:
        kw["extra_headers"] = dict(target.headers)
    return kw


# Params the router itself sets on a request: never reported as the caller's dropped ones.
_ROUTER_PARAMS = frozenset({"stream", "stream_options", "response_format", "timeout", "max_retries", "extra_headers"})
# (target, param names) -> the params litellm will drop for it; worked out once, logged once.
_dropped: dict[tuple[str, str, frozenset[str]], tuple[str, ...]] = {}


def _note_dropped(target: Target, params: dict[str, Any]) -> None:
    names = frozenset(params)
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


class ContentFiltered(InvalidResponse):
    """A 2xx answer the provider's content filter stopped (`finish_reason: content_filter`)."""


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
    outcome = _outcome(exc, status, message)
    return Failure(outcome, status, _retry_after(exc), f"{exc.__class__.__name__}: {message}")


def _outcome(exc: BaseException, status: int | None, message: str) -> str:
    if isinstance(exc, ContentFiltered):
        return "content_filter"
    if isinstance(exc, InvalidResponse):
        return "invalid_response"
    if isinstance(exc, TimeoutError):
        return "timeout"
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


@dataclass(frozen=True)
class Answer:
    """What the router takes from a successful litellm response."""

    text: str
    usage: Usage
    finish_reason: str | None
    provider_cost: float | None
    model: str | None = None  # the model the provider says answered


def read_response(response: Any) -> Answer:
    """Text, usage, finish reason and any provider-reported cost of a litellm ModelResponse."""
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
    hidden = getattr(response, "_hidden_params", None) or {}
    extra = hidden.get("additional_headers") or {}
    cost = extra.get(_PROVIDER_COST_KEY)
    return Answer(
        text=message.content or "",
        usage=Usage(int(getattr(usage, "prompt_tokens", 0) or 0), int(getattr(usage, "completion_tokens", 0) or 0)),
        finish_reason=finish_reason,
        provider_cost=float(cost) if cost is not None else None,
        model=getattr(response, "model", None) or None,
    )


def price_map_cost(target: Target, usage: Usage) -> float | None:
    """The cost of `usage` by litellm's built-in price map; None when the model is not in it, or is in it without
    a price: the map lists some paid models with no (or zero) prices, and "never guessed" means a zero counts only
    for a model marked free (OpenRouter's `:free` variants)."""
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


# -- streaming ------------------------------------------------------------------------------------------------


class EmptyStream(InvalidResponse):
    """A stream that ended before any text: as unusable as an empty answer, so it is retried or fallen back from."""


class FirstTextTimeout(TimeoutError):
    """No text came within the first-text limit of the request, whatever else did (keep-alives, reasoning)."""


class StreamStalled(TimeoutError):
    """After its first text, a stream sent no more within the idle limit, or outlasted the call's deadline."""


@dataclass(frozen=True)
class StreamLimits:
    """How long a stream may take, in seconds from its request: to its first text, between texts, in all."""

    first_text_s: float
    idle_s: float
    total_s: float


_CHUNK, _END, _FAILED = 0, 1, 2


class _Pump:
    """Reads a blocking litellm stream on a daemon thread, so that its reader can wait with a timeout.

    The blocking read itself cannot be bounded: a provider that sends keep-alive comments, or trickles bytes,
    resets every socket timeout. The thread ends with the stream; an abandoned one is closed at its next chunk.
    """

    def __init__(self, kwargs: dict[str, Any]) -> None:
        self.items: queue.SimpleQueue[tuple[int, Any]] = queue.SimpleQueue()
        self.stream: Any = None
        self.stopped = False
        self.opened = threading.Event()
        threading.Thread(target=self._run, args=(kwargs,), name="llm-router-stream", daemon=True).start()

    def _run(self, kwargs: dict[str, Any]) -> None:
        try:
            self.stream = litellm().completion(**kwargs)
            self.opened.set()
            if self.stopped:  # abandoned while the request was being answered
                return
            for chunk in self.stream:
                if self.stopped:
                    break
                self.items.put((_CHUNK, chunk))
            self.items.put((_END, None))
        except Exception as exc:  # handed to the reader, who classifies it
            self.items.put((_FAILED, exc))
        finally:
            self.opened.set()
            if self.stopped:
                _close_sync(self.stream)

    def get(self, timeout: float) -> tuple[int, Any] | None:
        """The next item, or None when none came within `timeout` seconds."""
        try:
            return self.items.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            return None

    def stop(self) -> None:
        """Abandon the stream: the thread closes it and ends."""
        self.stopped = True
        _close_sync(self.stream)


# A stream dropped unread is closed by this thread, never by the garbage collector's: the collector may run in
# a thread that holds httpx's connection-pool lock (mid-request), and closing a response takes that same lock,
# so closing it there deadlocks the thread. SimpleQueue.put is safe to call from a finalizer.
_closing: queue.SimpleQueue[Any] = queue.SimpleQueue()
_closer_lock = threading.Lock()
_closer_pid: int | None = None


def _start_closer() -> None:
    """Start (once per process: a fork leaves the thread behind) the thread that closes abandoned streams."""
    global _closer_pid
    if _closer_pid == os.getpid():
        return
    with _closer_lock:
        if _closer_pid != os.getpid():
            threading.Thread(target=_close_forever, name="llm-router-stream-closer", daemon=True).start()
            _closer_pid = os.getpid()


def _close_forever() -> None:
    while True:
        _close_sync(_closing.get())


def _abandoned(pump: _Pump) -> None:
    """Finalizer of a dropped stream: tell its pump to stop and leave the closing to the closer thread."""
    pump.stopped = True
    if pump.stream is not None:
        _closing.put(pump.stream)


def _close_sync(stream: Any) -> None:
    inner = getattr(stream, "completion_stream", None)
    close = getattr(inner, "close", None)
    if callable(close):
        try:
            close()
        except Exception:  # already closed, or a stream type that cannot: nothing more to free
            pass


class StreamState:
    """What a stream has delivered so far: text, finish reason, usage. Fed one chunk at a time (sync or async).

    Its clock: text must come within `limits.first_text_s` of the request, then at most `limits.idle_s` apart,
    and the whole stream within `limits.total_s` (what was left of the call's deadline).
    """

    def __init__(self, stream: Any, limits: StreamLimits | None = None, started: float | None = None) -> None:
        self.stream = stream
        self.parts: list[str] = []
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.provider_cost: float | None = None
        self.error: BaseException | None = None
        self.model: str | None = None  # the model the provider says answered
        self.limits = limits
        self.started = time.monotonic() if started is None else started
        self.last_text = self.started
        self._pump: _Pump | None = None

    @property
    def text(self) -> str:
        """The text received so far."""
        return "".join(self.parts)

    @property
    def finished(self) -> bool:
        """Whether the provider itself ended the answer, as the router saw it: a finish reason came in a chunk,
        and it was not the "stop" litellm makes up for any stream that just stops (litellm keeps the provider's
        own in received_finish_reason, or for some providers, Gemini's among them, intermittent_finish_reason)."""
        if self.finish_reason is None or self.finish_reason == "content_filter":
            return False
        s = self.stream
        if not hasattr(s, "received_finish_reason"):
            return True
        return (s.received_finish_reason or getattr(s, "intermittent_finish_reason", None)) is not None

    @property
    def unfinished_reason(self) -> str:
        """Why a stream that ended without an error did not end normally."""
        if self.finish_reason == "content_filter":
            return "the provider's content filter stopped the stream"
        return "the stream ended without a finish reason"

    @property
    def reported_usage(self) -> Usage | None:
        """The usage the provider reported; None when the only usage is litellm's own count."""
        chunks = getattr(self.stream, "chunks", None)
        if chunks is None or any(getattr(getattr(c, "usage", None), "completion_tokens", None) for c in chunks):
            return self.usage
        return None

    def _wait(self) -> float:
        """Seconds the next text may take: to the first-text, idle or total limit, whichever comes first."""
        if self.limits is None:
            return 365 * 86400.0
        lim, now = self.limits, time.monotonic()
        until = self.started + (lim.first_text_s if not self.parts else lim.total_s)
        if self.parts:
            until = min(until, self.last_text + lim.idle_s)
        return until - now

    def _timed_out(self) -> TimeoutError:
        lim = self.limits
        assert lim is not None
        if not self.parts:
            return FirstTextTimeout(f"no text within {lim.first_text_s:g}s of the request")
        if time.monotonic() - self.started >= lim.total_s - 1e-3:
            return StreamStalled(f"the stream outlasted the call's deadline ({lim.total_s:.3g}s left at its request)")
        return StreamStalled(f"the stream sent no text for {lim.idle_s:g}s")

    def next_chunk(self) -> Any:
        """The next chunk of a blocking stream. Raises StopIteration at its end, TimeoutError past a limit."""
        pump = self._pump
        if pump is None:
            return next(self.stream)
        got = pump.get(self._wait())
        if got is None:
            pump.stop()
            raise self._timed_out()
        kind, item = got
        if kind == _END:
            raise StopIteration
        if kind == _FAILED:
            raise item
        return item

    async def anext_chunk(self, stream: Any = None) -> Any:
        """The next chunk of an async stream. Raises StopAsyncIteration at its end, TimeoutError past a limit.
        `stream`: read this one instead of `self.stream` (the async source of a sync bridge, see hedge.py)."""
        source = self.stream if stream is None else stream
        if self.limits is None:
            return await source.__anext__()
        try:
            return await _within(source.__anext__(), self._wait())
        except asyncio.TimeoutError:
            raise self._timed_out() from None

    def close(self) -> None:
        """Release the HTTP response of an abandoned stream (best effort)."""
        if self._pump is not None:
            self._pump.stop()
        else:
            _close_sync(self.stream)

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
        if self.model is None:
            self.model = getattr(chunk, "model", None) or None
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
            self.last_text = time.monotonic()
        return text


async def _within(aw: Awaitable[Any], seconds: float) -> Any:
    """Await `aw` for at most `seconds` (asyncio.TimeoutError after). Not wait_for on 3.11+: it runs `aw` in a
    task of its own, and an aiohttp stream opened in one task and read in another loses its first chunk."""
    timeout = getattr(asyncio, "timeout", None)
    if timeout is not None:
        async with timeout(max(seconds, 0.0)):
            return await aw
    # Python 3.10: the same, by hand: cancel this task when the time is up, and say so as a TimeoutError.
    task, fired = asyncio.current_task(), threading.Event()
    assert task is not None

    def fire() -> None:
        fired.set()
        task.cancel()

    handle = asyncio.get_running_loop().call_later(max(seconds, 0.0), fire)
    try:
        return await aw
    except asyncio.CancelledError:
        if fired.is_set():
            raise asyncio.TimeoutError from None
        raise
    finally:
        handle.cancel()


def _no_text(state: StreamState) -> InvalidResponse:
    if state.finish_reason == "content_filter":
        return ContentFiltered("the provider's content filter stopped the stream before any text")
    return EmptyStream("the stream ended before any text")


def open_stream(kwargs: dict[str, Any], limits: StreamLimits | None = None) -> StreamState:
    """Start a streamed request and read up to its first text, so a failure before it can still fall back.

    With `limits`, the stream is read on a thread (see `_Pump`) and abandoned with FirstTextTimeout when no text
    came within `limits.first_text_s` of the request, however busy the connection was.
    """
    if limits is None:
        state = StreamState(litellm().completion(**kwargs))
        for chunk in state.stream:
            if state.feed(chunk):
                return state
        raise _no_text(state)
    started = time.monotonic()
    _start_closer()
    pump = _Pump(kwargs)
    state = StreamState(None, limits, started)
    state._pump = pump
    weakref.finalize(state, _abandoned, pump)  # a stream dropped unread is closed, off the collecting thread
    if not pump.opened.wait(max(state._wait(), 0.0)):
        pump.stop()
        raise state._timed_out()
    state.stream = pump.stream
    while True:
        try:
            chunk = state.next_chunk()
        except StopIteration:
            raise _no_text(state) from None
        if state.feed(chunk):
            return state


async def aopen_stream(kwargs: dict[str, Any], limits: StreamLimits | None = None) -> StreamState:
    """Async twin of `open_stream`."""
    started = time.monotonic()
    if limits is None:
        state = StreamState(await litellm().acompletion(**kwargs))
    else:
        try:
            stream = await _within(litellm().acompletion(**kwargs), limits.first_text_s)
        except asyncio.TimeoutError:
            raise FirstTextTimeout(f"no text within {limits.first_text_s:g}s of the request") from None
        state = StreamState(stream, limits, started)
    try:
        while True:
            try:
                chunk = await state.anext_chunk()
            except StopAsyncIteration:
                raise _no_text(state) from None
            if state.feed(chunk):
                return state
    except BaseException:
        await state.aclose()
        raise


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
