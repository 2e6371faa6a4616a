"""OpenTelemetry traces: a span per call and a child span per attempt, by the GenAI semantic conventions.

The plugin table (`router.plugins`) builds a `TracingHook` when the config has a `tracing:` section; this module
is imported only then, and needs the `otel` extra (``pip install 'llm-router[otel]'``). Spans go to the global
tracer provider (or the one given), so the application decides where they are exported; with none configured they
cost next to nothing. A call's trace::

    chat {alias}        INTERNAL  the generate() call: gen_ai.request.model is the alias; at its end the model
    │                             that answered, usage, llm_router.outcome, .cost_usd, .cost_source, .fallbacks
    ├── chat {model}    CLIENT    one request to a provider (retries and fallbacks each get their own):
    └── chat {model}    CLIENT    gen_ai.provider.name, server.address, usage, error.type (the failure outcome),
                                  llm_router.fallback_reason on the first attempt after a fallback

Prompts and completions are recorded (as gen_ai.input.messages / gen_ai.output.messages on the call span) only
with ``tracing: {capture_content: true}``. Keys never are: the hook sees requests without them, and error texts
are already scrubbed. The spans are not made current, so they parent to the caller's span, not the reverse.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from ..hooks import AttemptReport, Call, Hook

if TYPE_CHECKING:
    from ..config import Target, TracingConfig
    from ..types import Result

OPERATION = "chat"
SCOPE = "llm-router"

# litellm's provider prefixes whose gen_ai.provider.name the conventions spell otherwise; others pass as they are.
PROVIDER_NAMES = {
    "azure": "azure.ai.openai",
    "azure_ai": "azure.ai.inference",
    "bedrock": "aws.bedrock",
    "gemini": "gcp.gemini",
    "vertex_ai": "gcp.vertex_ai",
    "mistral": "mistral_ai",
    "xai": "x_ai",
    "watsonx": "ibm.watsonx.ai",
}
# litellm params recorded on attempt spans as gen_ai.request.*
REQUEST_PARAMS = {
    "temperature": "gen_ai.request.temperature",
    "max_tokens": "gen_ai.request.max_tokens",
    "top_p": "gen_ai.request.top_p",
    "top_k": "gen_ai.request.top_k",
    "frequency_penalty": "gen_ai.request.frequency_penalty",
    "presence_penalty": "gen_ai.request.presence_penalty",
    "seed": "gen_ai.request.seed",
}
_KEY = "router.tracing"  # this hook's key in Call.data


def provider_name(kind: str) -> str:
    """gen_ai.provider.name of a litellm provider prefix."""
    return PROVIDER_NAMES.get(kind, kind)


@dataclass
class _State:
    """One call's spans and what the next attempt needs to know of the last."""

    call_span: Span
    # Attempt spans not yet reported finished, by (target, key name): a hedged race has several at once.
    open: dict[tuple[str, str | None], list[Span]] = field(default_factory=dict)
    target: Target | None = None  # of the attempt under way, then of the last one
    last_outcome: str | None = None
    attempts: int = 0
    answered_by: Target | None = None
    response_model: str | None = None


class TracingHook(Hook):
    """Spans of each call and attempt; see the module docstring."""

    def __init__(self, config: TracingConfig | None = None, tracer_provider: trace.TracerProvider | None = None):
        from .._version import __version__

        self.capture_content = bool(config and config.capture_content)
        self.tracer = trace.get_tracer(SCOPE, __version__, tracer_provider=tracer_provider)

    def call_started(self, call: Call) -> Result | None:
        """Open the call's span."""
        call.data[_KEY] = _State(self._call_span(call, None))
        return None

    def before_attempt(self, call: Call, target: Target, request: Mapping[str, Any]) -> None:
        """Open an attempt's span under the call's."""
        st = self._state(call)
        if not call.hedge:  # no request of the call is in flight: one left open was stopped by a later hook
            self._not_sent(st)
        attrs: dict[str, Any] = {
            "gen_ai.operation.name": OPERATION,
            "gen_ai.provider.name": provider_name(target.kind),
            "gen_ai.request.model": target.model,
            "llm_router.alias": call.alias,
            "llm_router.provider": target.provider,
            "llm_router.attempt": st.attempts + 1,
        }
        attrs.update(_server(target.api_base))
        for param, name in REQUEST_PARAMS.items():
            value = request.get(param)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                attrs[name] = value
        if call.hedge:
            attrs["llm_router.hedge"] = True
        elif st.target is not None and st.last_outcome is not None:
            if st.target.key == target.key:
                attrs["llm_router.retry"] = True
            else:
                attrs["llm_router.fallback_reason"] = st.last_outcome
                st.call_span.add_event(
                    "llm_router.fallback",
                    {"from": st.target.key, "to": target.key, "reason": st.last_outcome},
                )
        st.attempts += 1
        st.target = target
        st.last_outcome = None
        ctx = trace.set_span_in_context(st.call_span)
        name = f"{OPERATION} {target.model}"
        span = self.tracer.start_span(name, context=ctx, kind=SpanKind.CLIENT, attributes=attrs)
        st.open.setdefault((target.key, call.key_name), []).append(span)

    @staticmethod
    def _not_sent(st: _State) -> None:
        """End the attempt spans still open: another hook's before_attempt stopped them, no request went out."""
        for left in st.open.values():
            for span in left:
                span.set_attribute("llm_router.outcome", "not_sent")
                span.end()
        st.open.clear()

    def attempt_finished(self, call: Call, report: AttemptReport) -> None:
        """Close the attempt's span with how it ended."""
        st = call.data.get(_KEY)
        if not isinstance(st, _State):
            return
        spans = st.open.get((report.target.key, report.key_name))
        if not spans:
            return
        span = spans.pop(0)
        a = report.attempt
        st.last_outcome = a.outcome
        span.set_attribute("llm_router.outcome", a.outcome)
        if report.key_name is not None:
            span.set_attribute("llm_router.key", report.key_name)
        if a.status_code is not None:
            span.set_attribute("http.response.status_code", a.status_code)
        if report.response_model:
            span.set_attribute("gen_ai.response.model", report.response_model)
        if report.finish_reason:
            span.set_attribute("gen_ai.response.finish_reasons", [report.finish_reason])
        if report.usage is not None:
            span.set_attribute("gen_ai.usage.input_tokens", report.usage.input_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", report.usage.output_tokens)
        if report.cost_usd is not None:
            span.set_attribute("llm_router.cost_usd", report.cost_usd)
        if report.cost_source is not None:
            span.set_attribute("llm_router.cost_source", report.cost_source)
        if a.outcome == "success":
            st.answered_by, st.response_model = report.target, report.response_model
        elif a.outcome != "cancelled":
            span.set_attribute("error.type", a.outcome)
            span.set_status(Status(StatusCode.ERROR, a.error or a.outcome))
        span.end()

    def call_finished(self, call: Call, result: Result | None, error: BaseException | None) -> None:
        """Close the call's span with its outcome, the answer's model, usage and cost, or the error."""
        st = call.data.pop(_KEY, None)
        if not isinstance(st, _State):  # an earlier hook answered or refused the call before ours saw it start
            st = _State(self._call_span(call, int(call.started_at * 1e9)))
        self._not_sent(st)
        span = st.call_span
        span.set_attribute("llm_router.outcome", call.outcome)
        if result is not None:
            self._answered(span, st, result)
        if error is not None:
            span.set_attribute("error.type", type(error).__name__)
            span.set_status(Status(StatusCode.ERROR, str(error)))
            usage, cost = getattr(error, "usage", None), getattr(error, "cost_usd", None)
            if usage is not None:  # a stream cut after text: billed all the same
                span.set_attribute("gen_ai.usage.input_tokens", usage.input_tokens)
                span.set_attribute("gen_ai.usage.output_tokens", usage.output_tokens)
            if isinstance(cost, float):
                span.set_attribute("llm_router.cost_usd", cost)
            partial = getattr(error, "text", None)
            if self.capture_content and isinstance(partial, str) and partial:
                span.set_attribute("gen_ai.output.messages", _output_messages(partial, None))
        span.end()

    # -- helpers --------------------------------------------------------------------------------------------

    def _call_span(self, call: Call, start_time: int | None) -> Span:
        attrs: dict[str, Any] = {
            "gen_ai.operation.name": OPERATION,
            "gen_ai.request.model": call.alias,
            "llm_router.alias": call.alias,
            "llm_router.call_id": call.id,
            "llm_router.stream": call.stream,
        }
        if self.capture_content:  # what was sent (hooks may have rewritten it), as the first target gets it
            sent = call.requests[0][1].get("messages") if call.requests else None
            attrs["gen_ai.input.messages"] = _input_messages(list(sent) if sent is not None else call.messages)
        return self.tracer.start_span(
            f"{OPERATION} {call.alias}", kind=SpanKind.INTERNAL, attributes=attrs, start_time=start_time
        )

    def _state(self, call: Call) -> _State:
        st = call.data.get(_KEY)
        if not isinstance(st, _State):  # an earlier hook's call_started raised past ours: trace from here on
            st = call.data[_KEY] = _State(self._call_span(call, int(call.started_at * 1e9)))
        return st

    def _answered(self, span: Span, st: _State, result: Result) -> None:
        if st.answered_by is not None:
            span.set_attribute("gen_ai.provider.name", provider_name(st.answered_by.kind))
        span.set_attribute("gen_ai.response.model", st.response_model or result.model)
        span.set_attribute("llm_router.provider", result.provider)
        span.set_attribute("llm_router.model", result.model)
        span.set_attribute("gen_ai.usage.input_tokens", result.usage.input_tokens)
        span.set_attribute("gen_ai.usage.output_tokens", result.usage.output_tokens)
        span.set_attribute("llm_router.cost_usd", result.cost_usd)
        span.set_attribute("llm_router.cost_source", result.cost_source)
        span.set_attribute("llm_router.attempts", len(result.attempts))
        span.set_attribute("llm_router.fallbacks", result.fallbacks)
        if result.finish_reason:
            span.set_attribute("gen_ai.response.finish_reasons", [result.finish_reason])
        for s in result.skipped:
            span.add_event("llm_router.skipped", {"target": f"{s.provider}/{s.model}", "reason": s.reason})
        if self.capture_content:
            span.set_attribute("gen_ai.output.messages", _output_messages(result.text, result.finish_reason))


def _server(api_base: str | None) -> dict[str, Any]:
    """server.address and server.port of an api_base (never its userinfo, path or query)."""
    if not api_base:
        return {}
    try:
        parts = urlsplit(api_base)
        host, port = parts.hostname, parts.port
    except ValueError:
        return {}
    if not host:
        return {}
    return {"server.address": host, "server.port": port or (443 if parts.scheme == "https" else 80)}


def _input_messages(messages: list[dict[str, Any]]) -> str:
    """OpenAI-style messages as gen_ai.input.messages: [{role, parts: [{type: text, content}]}]."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            parts: list[Any] = [{"type": "text", "content": content}]
        elif isinstance(content, list):  # already parts (images, ...): kept as given
            parts = content
        else:
            parts = []
        out.append({"role": m.get("role", "user"), "parts": parts})
    return json.dumps(out, ensure_ascii=False, default=str)


def _output_messages(text: str, finish_reason: str | None) -> str:
    """An answer's text as gen_ai.output.messages."""
    msg: dict[str, Any] = {"role": "assistant", "parts": [{"type": "text", "content": text}]}
    if finish_reason:
        msg["finish_reason"] = finish_reason
    return json.dumps([msg], ensure_ascii=False)
