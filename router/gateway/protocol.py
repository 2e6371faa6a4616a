"""The OpenAI chat-completions wire format, sans I/O: request bodies in, response bodies, SSE chunks and errors out.

Pure functions of plain data, shared by the HTTP gateway and the in-process clients:

    parse_chat(body)                  a request body -> ChatRequest (generate() arguments), or a 400 GatewayError
    completion(result, ...)           a Result -> the chat.completion JSON
    chunk(...), sse(obj), DONE        the chat.completion.chunk JSON of a stream and its SSE framing
    error_for(exc)                    a RouterError (or a bad argument) -> a GatewayError: status, OpenAI error JSON
    result_headers(result)            which provider and model answered, the cost, cached: response headers
    match_key(keys, token)            the client key a bearer token is, compared in constant time

Errors keep OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, and a status the OpenAI SDK
retries correctly: it retries 408, 409, 429 and 5xx unless the answer says ``x-should-retry: false``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import (
    AllTargetsFailedError,
    BudgetExceededError,
    DeadlineExceededError,
    MissingCredentialsError,
    ProviderError,
    RouterError,
    StreamInterruptedError,
    UnknownModelError,
    UnknownProviderError,
)

if TYPE_CHECKING:
    from ..config import GatewayKeyConfig
    from ..types import Result

_NUMBER = (int, float)


def _num(v: Any) -> bool:
    return isinstance(v, _NUMBER) and not isinstance(v, bool) and math.isfinite(v)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# Body fields passed on to generate() as params, each with the check its value must pass.
_PARAMS: dict[str, tuple[str, Any]] = {
    "temperature": ("a number from 0 to 2", lambda v: _num(v) and 0 <= v <= 2),
    "top_p": ("a number from 0 to 1", lambda v: _num(v) and 0 <= v <= 1),
    "max_tokens": ("a positive integer", lambda v: _int(v) and v > 0),
    "max_completion_tokens": ("a positive integer", lambda v: _int(v) and v > 0),
    "stop": (
        "a string or a list of up to 4 strings",
        lambda v: isinstance(v, str) or (isinstance(v, list) and len(v) <= 4 and all(isinstance(s, str) for s in v)),
    ),
    "seed": ("an integer", lambda v: _int(v)),
    "presence_penalty": ("a number from -2 to 2", lambda v: _num(v) and -2 <= v <= 2),
    "frequency_penalty": ("a number from -2 to 2", lambda v: _num(v) and -2 <= v <= 2),
    "logit_bias": ("an object of token ids to numbers", lambda v: isinstance(v, dict)),
    "tools": ("a list of tools", lambda v: isinstance(v, list) and all(isinstance(t, dict) for t in v)),
    "tool_choice": ('"none", "auto", "required" or an object', lambda v: isinstance(v, (str, dict))),
    "parallel_tool_calls": ("true or false", lambda v: isinstance(v, bool)),
    "reasoning_effort": ("a string", lambda v: isinstance(v, str)),
    "user": ("a string", lambda v: isinstance(v, str)),
}
# Fields read here rather than passed on.
_OWN = ("model", "messages", "stream", "stream_options", "n", "response_format")
KNOWN_FIELDS = frozenset(_OWN) | frozenset(_PARAMS)
# OpenAI fields we know and cannot honour: refused with the reason, not dropped.
_UNSUPPORTED = {
    "logprobs": "llm-router does not return log probabilities",
    "top_logprobs": "llm-router does not return log probabilities",
    "functions": "use tools (functions is OpenAI's deprecated form of it)",
    "function_call": "use tool_choice (function_call is OpenAI's deprecated form of it)",
    "audio": "llm-router answers text only",
    "modalities": "llm-router answers text only",
    "prediction": "predicted outputs are not supported",
    "store": "llm-router does not store completions with the provider",
    "metadata": "use the gateway key's tags (metadata goes with store, which is not supported)",
    "service_tier": "the service tier is a provider setting: set it in the target's params",
    "web_search_options": "web search is a provider feature: use a target whose model searches",
}
ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
MAX_ID_CHARS = 128
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_URL = re.compile(r"https?://[^\s'\"<>]+")
# litellm's wrapping of a provider's message: "BadRequestError: litellm.BadRequestError: OpenAIException - ..."
_WRAPPING = re.compile(r"(?:\b\w+Error: )?litellm\.\w+: (?:\w+Error: )?(?:\w+Exception - )?")


class GatewayError(Exception):
    """An answer other than a completion: its HTTP status and OpenAI's error JSON (and any extra headers)."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """The OpenAI error object."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> GatewayError:
    """A 400 naming the field at fault."""
    return GatewayError(400, message, "invalid_request_error", code, param)


@dataclass(frozen=True)
class ChatRequest:
    """A chat-completions request as the router takes it."""

    alias: str
    messages: list[dict[str, Any]]
    stream: bool = False
    include_usage: bool = False
    response_format: dict[str, Any] | None = None
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def user(self) -> str | None:
        """OpenAI's end-user id, if the client sent one."""
        user = self.params.get("user")
        return user if isinstance(user, str) else None

    def generate_kwargs(self, tags: Mapping[str, str]) -> dict[str, Any]:
        """Keyword arguments of `Router.agenerate` for this request (streamed unless a format must be validated)."""
        return {
            "messages": self.messages,
            "model": self.alias,
            "stream": self.stream and self.response_format is None,
            "response_format": self.response_format,
            "tags": dict(tags),
            **self.params,
        }


def parse_chat(body: bytes) -> ChatRequest:
    """A chat-completions request body, checked: raises a 400 `GatewayError` naming what is wrong."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    unsupported = sorted(set(data) & set(_UNSUPPORTED))
    if unsupported:
        reasons = "; ".join(f"{name}: {_UNSUPPORTED[name]}" for name in unsupported)
        raise bad_request(f"unsupported field(s) {', '.join(unsupported)}: {reasons}", unsupported[0], "unsupported")
    unknown = sorted(set(data) - KNOWN_FIELDS)
    if unknown:
        raise bad_request(
            f"unknown field(s): {', '.join(unknown)}; llm-router takes {', '.join(sorted(KNOWN_FIELDS))}",
            unknown[0],
            "unknown_parameter",
        )
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model is required: the alias to answer with (GET /v1/models lists them)", "model")
    stream = data.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise bad_request("stream must be true or false", "stream")
    include_usage = _stream_options(data.get("stream_options"), bool(stream))
    n = data.get("n", 1)
    if n is not None and n != 1:
        raise bad_request("n must be 1: llm-router answers one choice per request", "n")
    params: dict[str, Any] = {}
    for name, (what, ok) in _PARAMS.items():
        value = data.get(name)
        if value is None:
            continue
        if not ok(value):
            raise bad_request(f"{name} must be {what}, not {json.dumps(value)[:80]}", name)
        params[name] = value
    return ChatRequest(
        alias=model,
        messages=_messages(data.get("messages")),
        stream=bool(stream),
        include_usage=include_usage,
        response_format=_response_format(data.get("response_format")),
        params=params,
    )


def _stream_options(value: Any, stream: bool) -> bool:
    if value is None:
        return False
    if not isinstance(value, dict):
        raise bad_request("stream_options must be an object", "stream_options")
    if not stream:
        raise bad_request("stream_options is only allowed with stream: true", "stream_options")
    unknown = sorted(set(value) - {"include_usage"})
    if unknown:
        raise bad_request(f"unknown field(s) of stream_options: {', '.join(unknown)}", "stream_options")
    include = value.get("include_usage", False)
    if not isinstance(include, bool):
        raise bad_request("stream_options.include_usage must be true or false", "stream_options")
    return include


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise bad_request("messages must be a non-empty list of messages", "messages")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"{where} must be an object", where)
        role = m.get("role")
        if role not in ROLES:
            raise bad_request(f"{where}.role must be one of {', '.join(sorted(ROLES))}, not {role!r}", where)
        content = m.get("content")
        if not (isinstance(content, (str, list)) or (content is None and role == "assistant")):
            raise bad_request(f"{where}.content must be a string or a list of content parts", where)
        if role == "tool" and not isinstance(m.get("tool_call_id"), str):
            raise bad_request(f"{where} is a tool message: it needs tool_call_id", where)
        # "developer" is OpenAI's newer name for the system message; providers behind the router know "system".
        out.append({**m, "role": "system"} if role == "developer" else dict(m))
    return out


def _response_format(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise bad_request("response_format.json_schema must be an object with a schema object", "response_format")
        return {"type": "json_schema", "json_schema": spec}
    raise bad_request('response_format.type must be "text", "json_object" or "json_schema"', "response_format")


# -- answers ----------------------------------------------------------------------------------------------------


def new_id(prefix: str = "chatcmpl-") -> str:
    """A fresh OpenAI-style id."""
    import uuid

    return prefix + uuid.uuid4().hex


def request_id(given: str | None) -> str:
    """The request id to answer with: the client's x-request-id when it is a sane token, else a new one."""
    if given and _REQUEST_ID.match(given):
        return given
    return new_id("req_")


def tool_calls_of(result: Result) -> list[dict[str, Any]]:
    """The tool calls of a Result (OpenAI-shaped), if the router reports any."""
    return [dict(tc) for tc in getattr(result, "tool_calls", None) or ()]


def finish_reason_of(reported: str | None, tool_calls: bool) -> str:
    """The finish reason to send: the provider's, else "tool_calls" or "stop"."""
    return reported or ("tool_calls" if tool_calls else "stop")


def usage_json(result: Result) -> dict[str, int]:
    """OpenAI's usage object of a Result."""
    u = result.usage
    return {"prompt_tokens": u.input_tokens, "completion_tokens": u.output_tokens, "total_tokens": u.total_tokens}


def completion(result: Result, completion_id: str, created: int, model: str) -> dict[str, Any]:
    """The chat.completion JSON of a Result; `model` is the alias the client asked for."""
    calls = tool_calls_of(result)
    message: dict[str, Any] = {
        "role": "assistant",
        "content": result.text if result.text or not calls else None,
        "refusal": None,
    }
    if calls:
        message["tool_calls"] = calls
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": finish_reason_of(result.finish_reason, bool(calls)),
            }
        ],
        "usage": usage_json(result),
        "system_fingerprint": None,
    }


def chunk(
    completion_id: str,
    created: int,
    model: str,
    delta: Mapping[str, Any] | None,
    finish_reason: str | None = None,
    usage: Mapping[str, int] | None = None,
    include_usage: bool = False,
) -> dict[str, Any]:
    """One chat.completion.chunk; `delta` None makes the usage chunk (no choices)."""
    out: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": []
        if delta is None
        else [{"index": 0, "delta": dict(delta), "logprobs": None, "finish_reason": finish_reason}],
    }
    if include_usage:  # as OpenAI does: every chunk has the key, null until the last one
        out["usage"] = dict(usage) if usage is not None else None
    return out


def router_info(result: Result) -> dict[str, Any]:
    """Where an answer came from and what it cost: the `llm_router` object of a stream's last chunk."""
    return {
        "provider": result.provider,
        "model": result.model,
        "cost_usd": result.cost_usd,
        "cost_source": result.cost_source,
        "cached": result.cached,
        "attempts": len(result.attempts),
        "fallbacks": result.fallbacks,
    }


def sse(obj: Mapping[str, Any]) -> bytes:
    """One server-sent event carrying `obj` as JSON."""
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


def pieces(text: str, size: int = 64) -> list[str]:
    """`text` in deltas of about `size` characters that join back to it (a validated answer sent as a stream)."""
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def result_headers(result: Result) -> dict[str, str]:
    """Response headers saying which provider and model answered, what it cost and whether it was cached."""
    return {
        "x-llm-router-provider": result.provider,
        "x-llm-router-model": result.model,
        "x-llm-router-cost-usd": f"{result.cost_usd:.10f}".rstrip("0").rstrip(".") or "0",
        "x-llm-router-cost-source": result.cost_source,
        "x-llm-router-cached": "true" if result.cached else "false",
        "x-llm-router-attempts": str(len(result.attempts)),
        "x-llm-router-fallbacks": str(result.fallbacks),
    }


def models(aliases: Iterable[str], created: int = 0) -> dict[str, Any]:
    """The /v1/models list of `aliases`."""
    return {"object": "list", "data": [model_entry(a, created) for a in aliases]}


def model_entry(alias: str, created: int = 0) -> dict[str, Any]:
    """One /v1/models entry."""
    return {"id": alias, "object": "model", "created": created, "owned_by": "llm-router"}


# -- errors -------------------------------------------------------------------------------------------------------


def scrub_text(text: str) -> str:
    """A provider's message as a client may see it: no URLs (they name internal hosts), no litellm wrapping; keys
    are already gone (the router redacts them)."""
    return _URL.sub("<url>", _WRAPPING.sub("", text))


def error_for(exc: BaseException, now: float | None = None) -> GatewayError:
    """The HTTP answer to an exception of `Router.agenerate` (or of checking its arguments)."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, UnknownModelError):
        hint = f"; did you mean {', '.join(repr(s) for s in exc.suggestions)}?" if exc.suggestions else ""
        return GatewayError(404, f"model {exc.alias!r} does not exist{hint}", code="model_not_found", param="model")
    if isinstance(exc, UnknownProviderError):
        return bad_request(exc.message)
    if isinstance(exc, BudgetExceededError):
        if exc.reason == "unavailable":  # the budget's database is down: worth a retry
            return GatewayError(
                503, str(exc), "service_unavailable", "budget_unavailable", headers={"retry-after": "1"}
            )
        headers = {"x-should-retry": "false"}  # it will not pass before the period resets
        wait = (exc.resets_at.timestamp() - (time.time() if now is None else now)) if exc.reason == "limit" else 0
        if wait > 0:
            headers["retry-after"] = str(math.ceil(wait))
        return GatewayError(429, str(exc), "insufficient_quota", "insufficient_quota", headers=headers)
    if isinstance(exc, DeadlineExceededError):
        return GatewayError(504, scrub_text(str(exc)), "timeout", "deadline_exceeded")
    if isinstance(exc, AllTargetsFailedError) and exc.outcome == "timeout":  # the last try ran out of time
        return GatewayError(504, scrub_text(str(exc)), "timeout", "timeout")
    if isinstance(exc, MissingCredentialsError):
        return GatewayError(
            503,
            f"the gateway has no provider credentials for model {exc.alias!r}; its operators are told which",
            "service_unavailable",
            "no_credentials",
            headers={"x-should-retry": "false"},
        )
    if isinstance(exc, AllTargetsFailedError):
        return GatewayError(502, scrub_text(str(exc)), "api_error", exc.outcome)
    if isinstance(exc, ProviderError):
        return _provider_error(exc)
    if isinstance(exc, StreamInterruptedError):
        return GatewayError(502, scrub_text(str(exc)), "api_error", "stream_interrupted")
    if isinstance(exc, (TypeError, ValueError)) and not isinstance(exc, RouterError):
        return bad_request(str(exc))  # generate() refused its arguments (tags, messages, params)
    return GatewayError(500, "internal error of the gateway (see its log)", "server_error", "internal_error")


def _provider_error(exc: ProviderError) -> GatewayError:
    last = exc.attempts[-1] if exc.attempts else None
    said = scrub_text(last.error) if last is not None and last.error else exc.outcome
    message = f"{exc.provider}/{exc.model} refused the request ({exc.outcome}): {said}"
    if exc.outcome == "content_filter":
        return GatewayError(400, message, "invalid_request_error", "content_filter")
    status = exc.status_code if exc.status_code is not None and 400 <= exc.status_code < 500 else None
    if status is not None and status not in (401, 403, 429):  # those are our keys' trouble, not the client's
        return GatewayError(status, message, "invalid_request_error", exc.outcome)
    return GatewayError(502, message, "api_error", exc.outcome)


def unauthorized(message: str) -> GatewayError:
    """A 401: no key, or a key that is not one of the gateway's."""
    return GatewayError(
        401, message, "invalid_request_error", "invalid_api_key", headers={"www-authenticate": "Bearer"}
    )


def forbidden(key_name: str, alias: str, allowed: Sequence[str]) -> GatewayError:
    """A 403: the key may not use this alias."""
    return GatewayError(
        403,
        f"key {key_name!r} may not use model {alias!r} (it may use: {', '.join(allowed)})",
        "permission_error",
        "model_not_allowed",
        "model",
    )


def not_found(path: str) -> GatewayError:
    """A 404 for a path the gateway does not serve."""
    return GatewayError(
        404, f"no route {path}: the gateway serves POST /v1/chat/completions and GET /v1/models", code="not_found"
    )


# -- client keys ------------------------------------------------------------------------------------------------


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def key_digests(keys: Sequence[GatewayKeyConfig]) -> tuple[tuple[bytes, GatewayKeyConfig], ...]:
    """sha256 of each client key, with the key: what `match_key` compares a token's digest against."""
    return tuple((hashlib.sha256(k.key.get_secret_value().encode()).digest(), k) for k in keys)


def match_key(digests: Sequence[tuple[bytes, GatewayKeyConfig]], token: str | None) -> GatewayKeyConfig | None:
    """The client key `token` is, or None. Every key is compared, each with hmac.compare_digest over digests of
    one length, so the time taken says nothing about how much of a key a guess got right, nor which key matched."""
    if token is None:
        return None
    digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
    found = None
    for known, key in digests:
        if hmac.compare_digest(digest, known) and found is None:
            found = key
    return found


def allowed_aliases(key: GatewayKeyConfig | None, aliases: Iterable[str]) -> list[str]:
    """The aliases of the config in force that `key` may use (all of them without a key, or a key without a list)."""
    names = list(aliases)
    if key is None or key.aliases is None:
        return names
    return [a for a in names if a in key.aliases]


def call_tags(key: GatewayKeyConfig | None, user: str | None) -> dict[str, str]:
    """The tags of a call: the key's tags, its name as `gateway_key`, and the request's `user` (the key's own
    tags win, so a client cannot move its calls to another team's budget)."""
    tags: dict[str, str] = {}
    if user:
        tags["user"] = user[:256]
    if key is not None:
        tags["gateway_key"] = key.name
        tags.update(key.tags)
    return tags
