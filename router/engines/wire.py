"""The OpenAI chat-completions wire format, as the direct engine speaks it: no I/O, only bytes and data.

    request_body / encode      the loop's body as one provider kind takes it (model, OpenRouter's usage
                               accounting, params a model is known to refuse)
    read_answer / read_chunk   a JSON answer or one stream event as an `Answer` / `Chunk`; the error it is, if it is
    SSE                        server-sent events, parsed as the bytes come
    http_error / http_outcome  an error answer as a `ProviderHTTPError`, and its outcome: the one the LiteLLM
                               engine gives for the same status and body (tests/test_direct.py holds them together)
    estimate_usage             tokens by a rule of thumb, for a stream whose provider reported none

Kinds and their default base URLs are `router.config.DIRECT_KINDS`.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..policy import parse_retry_after
from ..types import Usage
from . import DIRECT_KINDS, Answer, Chunk, ContentFiltered, InvalidResponse, Send

if TYPE_CHECKING:
    from ..config import Target

log = logging.getLogger("router")

ERROR_BODY_CHARS = 2000  # of an error body, kept on the exception (scrubbed of the key and header values)

# -- what each kind needs ---------------------------------------------------------------------------------------

# How LiteLLM reads each kind's error answers (see `http_outcome`): "text-coded" reads the body first, as its
# OpenAI mapping does with the OpenAI SDK's message ("Error code: N - <body>"); "text" the same on the bare body
# (its vLLM client); "status" reads the status first, as its OpenRouter mapping does.
_STYLE = {"openai": "text-coded", "lm_studio": "text-coded", "hosted_vllm": "text", "openrouter": "status"}
# Kinds that report a call's cost in `usage.cost` when asked with `usage: {include: true}`.
_REPORTS_COST = frozenset({"openrouter"})
# Kinds that take `stream_options: {include_usage: true}` (every kind here does; listed so one that does not can
# say so, and have its stream usage estimated instead).
_STREAM_USAGE = frozenset(DIRECT_KINDS)

# OpenAI's reasoning models refuse these params (a 400), and take max_completion_tokens for max_tokens.
_REASONING_MODEL = re.compile(r"^(?:openai/)?(?:o1|o3|o4|gpt-5)(?:$|[-.:])")
_REASONING_REFUSED = frozenset({"logprobs", "top_logprobs", "top_p", "presence_penalty", "frequency_penalty"})


def base_url(target: Target) -> str:
    """The target's base URL: its api_base, else its kind's default."""
    base = target.api_base or DIRECT_KINDS.get(target.kind)
    if not base:
        raise ValueError(f"{target.key}: kind {target.kind!r} needs an api_base for the direct engine")
    return base.rstrip("/")


def refused_params(target: Target, body: Mapping[str, Any]) -> tuple[str, ...]:
    """The params of `body` the target's model is known to refuse (left out of its requests, and logged once)."""
    if target.kind != "openai" or not _REASONING_MODEL.match(target.model):
        return ()
    out = [n for n in body if n in _REASONING_REFUSED]
    if "temperature" in body and body["temperature"] != 1:
        out.append("temperature")
    return tuple(sorted(out))


_noted: set[tuple[str, tuple[str, ...]]] = set()


def request_body(send: Send) -> dict[str, Any]:
    """The JSON body of one request: the loop's body, the target's model, and what its kind needs."""
    target = send.target
    body: dict[str, Any] = {"model": target.model, **send.body}
    if target.kind in _REPORTS_COST and "usage" not in body:
        body["usage"] = {"include": True}  # OpenRouter reports usage.cost only when asked
    if "stream_options" in body and (not body.get("stream") or target.kind not in _STREAM_USAGE):
        del body["stream_options"]
    refused = refused_params(target, body)
    if refused:
        for name in refused:
            del body[name]
        if (target.key, refused) not in _noted:
            _noted.add((target.key, refused))
            log.warning("%s: %s not taken by this model, left out of its requests", target.key, ", ".join(refused))
    if "max_tokens" in body and target.kind == "openai" and _REASONING_MODEL.match(target.model):
        body.setdefault("max_completion_tokens", body.pop("max_tokens"))  # they refuse max_tokens by that name
    return body


def _jsonable(value: Any) -> Any:
    dump = getattr(value, "model_dump", None)  # a pydantic model passed as a param (a tool, a schema)
    if callable(dump):
        return dump()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def encode(body: Mapping[str, Any]) -> bytes:
    """A request body as compact UTF-8 JSON."""
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False, default=_jsonable).encode()


# -- errors -----------------------------------------------------------------------------------------------------


class ProviderHTTPError(Exception):
    """A provider's error answer: its HTTP status, its body (scrubbed, cut to ERROR_BODY_CHARS), its Retry-After.

    Also raised for an error object a provider sends inside a 200 answer or stream (`in_stream`), with the status
    its `code` names (see `_error_object`).
    """

    def __init__(
        self,
        status_code: int,
        message: str,
        body: str,
        *,
        kind: str,
        code: str | None = None,
        retry_after: float | None = None,
        in_stream: bool = False,
        outcome: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.body = body
        self.kind = kind
        self.code = code
        self.retry_after = retry_after
        self.in_stream = in_stream
        self.outcome = outcome  # decided where it was raised, on all it said; None: by http_outcome of `body`

    def __str__(self) -> str:
        return self.message


def _scrubbed(text: str, send: Send) -> str:
    """`text` without the key and header values this request carried (a provider may echo them), nor the token
    of a header such as `Authorization: Bearer <token>`."""
    secrets = [send.api_key or ""]
    for value in send.target.headers.values():
        secrets += [value, *value.split()]
    for s in sorted(secrets, key=len, reverse=True):
        if len(s) >= 8 and s in text:
            text = text.replace(s, "***")
    return text


def _error_fields(data: Any) -> tuple[str | None, str | None, Any]:
    """(message, code, raw code) of an OpenAI-shaped error object: `{"error": {"message", "code", "type"}}`."""
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, str):
        return err, None, None
    if not isinstance(err, dict):
        return None, None, None
    message = err.get("message")
    raw = err.get("code")
    return (str(message) if message is not None else None), (str(raw) if raw is not None else None), raw


def http_error(send: Send, status: int, headers: Mapping[str, str], content: bytes) -> ProviderHTTPError:
    """The error of a non-2xx answer: classified on its whole body (up to 64 KiB), kept scrubbed and cut."""
    full = _scrubbed(content[:65536].decode("utf-8", "replace"), send)
    try:
        message, code, _ = _error_fields(json.loads(full))
    except ValueError:
        message, code = None, None
    said = message if message else (full.strip()[:300] or "(empty body)")
    retry = parse_retry_after(headers.get("retry-after"))
    kind = send.target.kind
    text = f"HTTP {status} from {send.target.provider}: {said}"
    outcome = http_outcome(kind, status, full, code)
    return ProviderHTTPError(
        status, text, full[:ERROR_BODY_CHARS], kind=kind, code=code, retry_after=retry, outcome=outcome
    )


def _error_object(send: Send, data: Mapping[str, Any], in_stream: bool) -> ProviderHTTPError:
    """The error of an error object inside a 200 answer (the status its code names, else 400) or inside a stream
    (see `stream_error`)."""
    message, code, raw = _error_fields(data)
    said = _scrubbed(message or "", send)
    body = _scrubbed(json.dumps(data)[:ERROR_BODY_CHARS], send)
    kind = send.target.kind
    outcome = None
    if in_stream:
        status, outcome = stream_error(kind, raw, said)
    else:
        status = raw if isinstance(raw, int) and 400 <= raw <= 599 else 400
    where = "in its stream" if in_stream else "in a 200 answer"
    text = f"error {where} from {send.target.provider} ({status}): {said or body[:300]}"
    return ProviderHTTPError(status, text, body, kind=kind, code=code, in_stream=in_stream, outcome=outcome)


def stream_error(kind: str, code: Any, message: str) -> tuple[int, str]:
    """The status and outcome of an error object inside a 200 stream, as the LiteLLM engine reads it.

    LiteLLM's OpenAI client reads its message only: a rate limit or a context window by their text, else a server
    error. For OpenRouter and vLLM the numeric `code` is the status (none: a server error, 503 and 500, as LiteLLM
    says). OpenRouter's own message is not read, nor a string code (LiteLLM fails on those; README "Engines").
    """
    if _STYLE.get(kind) == "text-coded":
        if _rate_limit_text(message, 0):
            return 429, "rate_limit"
        if _context_text(message):
            return 400, "context_window"
        return 500, "server_error"
    status = code if isinstance(code, int) and 400 <= code <= 599 else (503 if kind == "openrouter" else 500)
    if _STYLE.get(kind) == "text" and _rate_limit_text(message, status):
        return 429, "rate_limit"
    return status, http_outcome("openrouter", status, "")


# What LiteLLM's OpenAI mapping reads in an error's text, in its order (see `_text_class`).
_CONTEXT_TEXT = (
    "exceed context limit",
    "this model's maximum context length is",
    "string too long. expected a string with maximum length",
    "model's maximum context limit",
    "is longer than the model's context length",
    "input tokens exceed the configured limit",
    "`inputs` tokens + `max_new_tokens` must be",
    "exceeds the available context size",
    "exceeds the maximum number of tokens allowed",
)
_UNPARSEABLE_TEXT = (
    "empty or invalid response",
    "invalid response object",
    "returned 'choices'",
    "expecting value",
    "jsondecodeerror",
    "invalid json",
    "unable to parse",
)
_CONTEXT_CODE = "context_length_exceeded"
# The router's outcome of a status, whatever the exception (router.engines.litellm._BY_STATUS).
_BY_STATUS = {400: "bad_request", 401: "auth", 402: "payment_required", 403: "auth", 404: "not_found",
              408: "timeout", 413: "context_window", 422: "bad_request", 429: "rate_limit"}  # fmt: skip
# LiteLLM's exception for a status when no text decided it, as a class name the router reads below.
_CLASS_BY_STATUS = {400: "bad_request", 401: "auth", 403: "auth", 404: "not_found", 408: "timeout", 422: "bad_request",
                    429: "rate_limit", 500: "server", 502: "server", 503: "server", 504: "timeout"}  # fmt: skip
# Classes the router maps straight to an outcome (its exception table), before it looks at the status.
_TABLE_CLASSES = frozenset({"context_window", "content_filter", "rate_limit", "timeout", "auth", "not_found"})
# The status LiteLLM's exception reports when the text chose it: its own, not the provider's.
_OWN_STATUS = {"rate_limit": 429, "timeout": 408, "server": 500}


def _rate_limit_text(text: str, status: int) -> bool:
    if status == 429 and re.search(r"\b429\b", text):
        return True
    low = text.lower()
    return bool(re.search(r"rate[\s_\-]*limit", low)) or "service tier capacity exceeded" in low


def _context_text(text: str) -> bool:
    low = text.lower()
    if "string_above_max_length" in low or ("invalid 'user'" in low and "string too long" in low):
        return False
    if any(s in low for s in _CONTEXT_TEXT):
        return True
    return ("current length is" in low and "while limit is" in low) or (
        "maximum input length is" in low and "tokens" in low
    )


def _text_class(text: str, status: int) -> tuple[str, bool] | None:
    """The class LiteLLM's OpenAI mapping reads in an error text, and whether it keeps the provider's status."""
    if _rate_limit_text(text, status):
        return "rate_limit", False
    if _context_text(text):
        return "context_window", True
    if "invalid_request_error" in text and "model_not_found" in text:
        return "not_found", True
    if "A timeout occurred" in text:
        return "timeout", False
    if (
        ("invalid_request_error" in text and "content_policy_violation" in text)
        or ("Invalid prompt" in text and "violating our usage policy" in text)
        or "request was rejected as a result of the safety system" in text.lower()
    ):
        return "content_filter", True
    if "invalid_encrypted_content" in text or "could not be verified" in text:
        return "bad_request", True
    if "invalid_request_error" in text and "Incorrect API key provided" not in text:
        return "bad_request", True
    if "Web server is returning an unknown error" in text or "The server had an error processing your request." in text:
        return "server", False
    if "Request too large" in text:
        return "rate_limit", False
    return None


def http_outcome(kind: str, status: int, body: str, code: str | None = None) -> str:
    """The outcome of an HTTP error answer: the one the LiteLLM engine gives for the same status and body.

    LiteLLM picks an exception class, for the OpenAI-style kinds from the body's text first (a "rate limit" in a
    400's text makes it a RateLimitError), for OpenRouter from the status; the router then reads 402 and 403 by
    status, OpenAI's `context_length_exceeded` code by itself, then the class, the status and a few texts
    (router.engines.litellm.classify_error). Pure; tests/test_direct.py holds it to LiteLLM case by case.
    """
    style = _STYLE.get(kind, "text-coded")
    said = None
    if style != "status":
        said = _text_class(f"Error code: {status} - {body}" if style == "text-coded" else body, status)
    if said is not None:
        cls, seen = said[0], (status if said[1] else _OWN_STATUS[said[0]])
    else:
        cls, seen = _CLASS_BY_STATUS.get(status, "api"), status
    if seen in (402, 403):
        return _BY_STATUS[seen]
    if (code == _CONTEXT_CODE or _CONTEXT_CODE in body) and not (said is not None and not said[1]):
        return "context_window"
    if cls in _TABLE_CLASSES:
        return cls
    if seen in _BY_STATUS:
        return _BY_STATUS[seen]
    if cls == "bad_request":
        return "bad_request"
    low = body.lower()
    if any(s in low for s in _UNPARSEABLE_TEXT):
        return "invalid_response"
    if "connection error" in low:
        return "connection"
    return "server_error" if cls == "server" or seen >= 500 else "other"


# -- reading answers --------------------------------------------------------------------------------------------


def _usage(data: Mapping[str, Any]) -> tuple[Usage | None, float | None]:
    """The usage a provider reported (None: none, or all zero) and its cost (`usage.cost`), if any."""
    usage = data.get("usage")
    if not isinstance(usage, dict):
        return None, None
    prompt, completion = usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0
    cost = usage.get("cost")
    reported = Usage(int(prompt), int(completion)) if prompt or completion else None
    return reported, (float(cost) if isinstance(cost, (int, float)) and not isinstance(cost, bool) else None)


def _plain(obj: Any) -> dict[str, Any]:
    """A tool call (or its delta) without the null fields some providers send."""
    return {k: v for k, v in obj.items() if v is not None} if isinstance(obj, dict) else {}


def read_answer(send: Send, status: int, headers: Mapping[str, str], content: bytes) -> Answer:
    """The Answer of a complete (non-streamed) response; raises the error it is, if it is one."""
    if status >= 300:
        raise http_error(send, status, headers, content)
    try:
        data = json.loads(content)
    except ValueError:
        shown = _scrubbed(content[:200].decode("utf-8", "replace"), send)
        raise InvalidResponse(f"the provider's answer is not JSON (HTTP {status}): {shown!r}") from None
    if not isinstance(data, dict):
        raise InvalidResponse(f"the provider's answer is JSON but not an object (HTTP {status})")
    choices = data.get("choices")
    if not choices and data.get("error"):
        raise _error_object(send, data, False)
    if not choices or not isinstance(choices, list) or not isinstance(choices[0], dict):
        raise InvalidResponse("the provider answered with no choices")
    choice = choices[0]
    message = choice.get("message")
    if not isinstance(message, dict):
        raise InvalidResponse("the provider answered with no message")
    finish_reason = choice.get("finish_reason") or None
    if finish_reason == "content_filter":
        raise ContentFiltered("the provider's content filter stopped the answer (finish_reason: content_filter)")
    usage, cost = _usage(data)
    text = message.get("content")
    return Answer(
        text=text if isinstance(text, str) else "",
        usage=usage or Usage(0, 0),
        finish_reason=finish_reason,
        provider_cost=cost if send.target.kind in _REPORTS_COST else None,
        model=data.get("model") or None,
        tool_calls=tuple(_plain(c) for c in (message.get("tool_calls") or ())),
        raw=data,
    )


def read_chunk(send: Send, data: Any) -> Chunk:
    """One event of a stream as a neutral Chunk; raises the error an error object in it names."""
    if not isinstance(data, dict):
        raise InvalidResponse("a stream event is JSON but not an object")
    if data.get("error"):
        raise _error_object(send, data, True)
    usage, cost = _usage(data)
    text, finish, reasoning = "", None, ""
    calls: tuple[dict[str, Any], ...] = ()
    choices = data.get("choices")
    if choices and isinstance(choices, list) and isinstance(choices[0], dict):
        choice = choices[0]
        finish = choice.get("finish_reason") or None
        delta = choice.get("delta")
        if isinstance(delta, dict):
            content = delta.get("content")
            text = content if isinstance(content, str) else ""
            thought = delta.get("reasoning_content") or delta.get("reasoning")
            reasoning = thought if isinstance(thought, str) else ""
            if delta.get("tool_calls"):
                calls = tuple(_plain(c) for c in delta["tool_calls"])
    return Chunk(
        text=text,
        finish_reason=finish,
        usage=usage,
        provider_cost=cost if send.target.kind in _REPORTS_COST else None,
        model=data.get("model") or None,
        tool_calls=calls,
        reasoning=reasoning,
    )


class SSE:
    """Server-sent events, parsed as the bytes come: the data of each event. Comments (keep-alives such as
    OpenRouter's `: OPENROUTER PROCESSING`), `event:`, `id:` and `retry:` lines carry nothing the router reads."""

    def __init__(self) -> None:
        self._rest = b""
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[bytes]:
        """The events completed by `chunk`."""
        lines = (self._rest + chunk if self._rest else chunk).split(b"\n")
        self._rest = lines.pop()
        out: list[bytes] = []
        for line in lines:
            self._line(line, out)
        return out

    def end(self) -> list[bytes]:
        """The last event of a body that did not end with a blank line."""
        out: list[bytes] = []
        if self._rest:
            self._line(self._rest, out)
            self._rest = b""
        self._line(b"", out)
        return out

    def _line(self, line: bytes, out: list[bytes]) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            if self._data:
                out.append(b"\n".join(self._data))
                self._data = []
        elif line.startswith(b"data:"):
            value = line[5:]
            self._data.append(value[1:] if value.startswith(b" ") else value)


DONE = b"[DONE]"
# Kinds whose `data: [DONE]` ends an answer that sent no finish reason as "stop" (as LiteLLM reads them).
DONE_FINISHES = frozenset({"openrouter", "hosted_vllm"})


def event_json(send: Send, event: bytes) -> Any:
    """One stream event's JSON (an InvalidResponse if it is not JSON)."""
    try:
        return json.loads(event)
    except ValueError:
        shown = _scrubbed(event[:200].decode("utf-8", "replace"), send)
        raise InvalidResponse(f"a stream event is not JSON: {shown!r}") from None


def answer_chunks(send: Send, response_bytes: bytes) -> list[Chunk]:
    """The chunks of a stream request a server answered with one JSON body: the same answer."""
    answer = read_answer(send, 200, {}, response_bytes)
    chunks = [
        Chunk(
            text=answer.text,
            model=answer.model,
            tool_calls=tuple({"index": i, **c} for i, c in enumerate(answer.tool_calls)),
        )
    ]
    chunks.append(
        Chunk(
            finish_reason=answer.finish_reason,
            usage=answer.usage if answer.usage.total_tokens else None,
            provider_cost=answer.provider_cost,
        )
    )
    return chunks


def estimate_usage(messages: list[dict[str, Any]], text: str) -> Usage:
    """Tokens by a rule of thumb, for a stream whose provider reported none: a token per 4 characters of text
    (rounded up), and 3 more per message plus 3 for the answer's priming, as OpenAI's chat format counts them."""
    prompt = 3
    for m in messages:
        prompt += 3 + _tokens(_content_text(m.get("content"))) + (1 if m.get("name") else 0)
    return Usage(prompt, _tokens(text), estimated=True)


def _tokens(text: str) -> int:
    return math.ceil(len(text) / 4) if text else 0


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""
