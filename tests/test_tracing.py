"""OpenTelemetry traces (`router.plugins.tracing`): real SDK spans, exported in memory, over the loopback upstream."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from conftest import KEY_A, MakeRouter, standard_config
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import CollectorRegistry

from router import AllTargetsFailedError, ConfigError, Result, Router, RouterError, Usage, parse_config
from router.config import Target
from router.hooks import Call, Hook
from router.plugins.tracing import TracingHook
from router.sandbox import Reply, Upstream

TRACED = "tracing: {enabled: true}"
PRICED = """
pricing:
  a/model-a: {input_per_1m: 1.0, output_per_1m: 2.0}
  b/model-b: {input_per_1m: 3.0, output_per_1m: 4.0}
"""

_EXPORTER = InMemorySpanExporter()


def _global_provider() -> None:
    """Export the global provider's spans to `_EXPORTER` (the global provider can be set once per process)."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    if not getattr(provider, "_router_test_exporter", False):
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        provider._router_test_exporter = True  # type: ignore[attr-defined]


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    _global_provider()
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


def call_span(exporter: InMemorySpanExporter) -> ReadableSpan:
    (span,) = [s for s in exporter.get_finished_spans() if "llm_router.call_id" in (s.attributes or {})]
    return span


def attempt_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return sorted(
        (s for s in exporter.get_finished_spans() if s.kind is SpanKind.CLIENT), key=lambda s: s.start_time or 0
    )


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def everything(exporter: InMemorySpanExporter) -> str:
    """All the text of every finished span: names, attributes, events, status."""
    return json.dumps(
        [
            [s.name, attrs(s), [(e.name, dict(e.attributes or {})) for e in s.events], s.status.description]
            for s in exporter.get_finished_spans()
        ],
        default=str,
    )


def check_fallback_trace(spans: InMemorySpanExporter, res: Result) -> None:
    call = call_span(spans)
    tries = attempt_spans(spans)
    assert [s.name for s in tries] == ["chat model-a", "chat model-a", "chat model-b"]
    assert call.name == "chat chat" and call.kind is SpanKind.INTERNAL
    assert call.context is not None
    for s in tries:
        assert s.parent is not None and s.parent.span_id == call.context.span_id
        assert s.context is not None and s.context.trace_id == call.context.trace_id
        assert s.end_time is not None and call.end_time is not None and s.end_time <= call.end_time
    first, retry, fallback = (attrs(s) for s in tries)
    assert first["gen_ai.operation.name"] == "chat"
    assert first["gen_ai.provider.name"] == "openai"
    assert first["gen_ai.request.model"] == "model-a"
    assert first["llm_router.provider"] == "a"
    assert first["server.address"] == "127.0.0.1" and isinstance(first["server.port"], int)
    assert first["error.type"] == "server_error"
    assert first["http.response.status_code"] == 503
    assert tries[0].status.status_code is StatusCode.ERROR
    assert retry["llm_router.retry"] is True and "llm_router.fallback_reason" not in retry
    assert fallback["llm_router.fallback_reason"] == "server_error"
    assert fallback["llm_router.outcome"] == "success" and "error.type" not in fallback
    assert fallback["gen_ai.response.model"] == "model-b"
    assert fallback["gen_ai.response.finish_reasons"] == ("stop",)
    assert (fallback["gen_ai.usage.input_tokens"], fallback["gen_ai.usage.output_tokens"]) == (3, 4)
    assert fallback["llm_router.cost_usd"] == pytest.approx(res.cost_usd)
    assert tries[2].status.status_code is StatusCode.UNSET
    c = attrs(call)
    assert c["gen_ai.request.model"] == "chat" and c["llm_router.alias"] == "chat"
    assert c["gen_ai.provider.name"] == "openai" and c["llm_router.provider"] == "b"
    assert c["gen_ai.response.model"] == "model-b"
    assert (c["gen_ai.usage.input_tokens"], c["gen_ai.usage.output_tokens"]) == (3, 4)
    assert c["llm_router.outcome"] == "success"
    assert c["llm_router.cost_usd"] == pytest.approx(3 * 3e-6 + 4 * 4e-6)
    assert c["llm_router.cost_source"] == "config"
    assert (c["llm_router.attempts"], c["llm_router.fallbacks"]) == (3, 1)
    assert [(e.name, dict(e.attributes or {})) for e in call.events] == [
        ("llm_router.fallback", {"from": "a/model-a", "to": "b/model-b", "reason": "server_error"})
    ]
    assert "gen_ai.input.messages" not in c and "gen_ai.output.messages" not in c


def fallback_script(up: Upstream) -> None:
    up.enqueue("a", Reply(status=503), Reply(status=503))
    up.enqueue("b", Reply(text="hello", usage=(3, 4)))


def test_a_fallback_traces_the_call_and_each_attempt(
    make_router: MakeRouter, up: Upstream, spans: InMemorySpanExporter
) -> None:
    r = make_router(extra=PRICED + TRACED)
    fallback_script(up)
    res = r.generate("hi")
    check_fallback_trace(spans, res)


@pytest.mark.asyncio
async def test_async_fallback_traces_the_same(
    make_router: MakeRouter, up: Upstream, spans: InMemorySpanExporter
) -> None:
    r = make_router(extra=PRICED + TRACED)
    fallback_script(up)
    res = await r.agenerate("hi")
    check_fallback_trace(spans, res)


def check_stream_trace(spans: InMemorySpanExporter, text: str) -> None:
    (attempt,) = attempt_spans(spans)
    a, c = attrs(attempt), attrs(call_span(spans))
    assert attempt.name == "chat model-a" and call_span(spans).name == "chat single"
    assert c["llm_router.stream"] is True and c["llm_router.outcome"] == "success"
    assert a["gen_ai.response.model"] == "model-a"
    assert a["gen_ai.response.finish_reasons"] == ("stop",) == c["gen_ai.response.finish_reasons"]
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (2, 3)
    assert c["gen_ai.usage.output_tokens"] == 3
    assert text == "one two three"


def test_a_stream_is_traced_to_its_end(make_router: MakeRouter, up: Upstream, spans: InMemorySpanExporter) -> None:
    r = make_router(extra=TRACED)
    up.enqueue("a", Reply(text="one two three", usage=(2, 3)))
    stream = r.generate("hi", model="single", stream=True)
    assert spans.get_finished_spans() == ()  # the call and its attempt last as long as the stream
    check_stream_trace(spans, "".join(stream))


@pytest.mark.asyncio
async def test_an_async_stream_is_traced_to_its_end(
    make_router: MakeRouter, up: Upstream, spans: InMemorySpanExporter
) -> None:
    r = make_router(extra=TRACED)
    up.enqueue("a", Reply(text="one two three", usage=(2, 3)))
    stream = await r.agenerate("hi", model="single", stream=True)
    assert spans.get_finished_spans() == ()
    check_stream_trace(spans, "".join([d async for d in stream]))


def check_cancelled(spans: InMemorySpanExporter) -> None:
    (attempt,) = attempt_spans(spans)
    call = call_span(spans)
    assert attrs(attempt)["llm_router.outcome"] == "cancelled" == attrs(call)["llm_router.outcome"]
    assert attrs(attempt)["gen_ai.usage.output_tokens"] > 0  # what was streamed is billed, and shown
    assert attempt.status.status_code is StatusCode.UNSET is call.status.status_code  # the caller left: no error


def test_a_stream_closed_early_still_ends_its_spans(
    make_router: MakeRouter, up: Upstream, spans: InMemorySpanExporter
) -> None:
    r = make_router(extra=TRACED)
    up.enqueue("a", Reply(text="one two three four five six", usage=(2, 6)))
    stream = r.generate("hi", model="single", stream=True)
    next(iter(stream))
    stream.close()
    check_cancelled(spans)


def test_a_dropped_stream_ends_its_spans_when_collected(
    make_router: MakeRouter, up: Upstream, spans: InMemorySpanExporter
) -> None:
    r = make_router(extra=TRACED)
    up.enqueue("a", Reply(text="one two three four five six", usage=(2, 6)))
    stream = r.generate("hi", model="single", stream=True)
    next(iter(stream))
    del stream
    gc.collect()  # the closer thread ends the spans, never the collecting thread
    end = time.monotonic() + 3
    while not attempt_spans(spans) and time.monotonic() < end:
        time.sleep(0.01)
    check_cancelled(spans)


@pytest.mark.asyncio
async def test_an_async_stream_closed_early_still_ends_its_spans(
    make_router: MakeRouter, up: Upstream, spans: InMemorySpanExporter
) -> None:
    r = make_router(extra=TRACED)
    up.enqueue("a", Reply(text="one two three four five six", usage=(2, 6)))
    stream = await r.agenerate("hi", model="single", stream=True)
    await stream.__anext__()
    await stream.aclose()
    check_cancelled(spans)


@pytest.mark.asyncio
async def test_a_call_cancelled_mid_request_ends_its_spans(
    make_router: MakeRouter, up: Upstream, spans: InMemorySpanExporter
) -> None:
    r = make_router(extra=TRACED)
    up.enqueue("a", Reply(text="late", delay_s=2))
    task = asyncio.ensure_future(r.agenerate("hi", model="single"))
    while not up.requests("a"):
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (attempt,) = attempt_spans(spans)
    assert attrs(attempt)["llm_router.outcome"] == "cancelled" == attrs(call_span(spans))["llm_router.outcome"]


def test_a_stream_cut_after_text_is_an_error_with_its_usage(
    make_router: MakeRouter, up: Upstream, spans: InMemorySpanExporter
) -> None:
    r = make_router(extra=TRACED)
    up.enqueue("a", Reply(text="one two three four five six", cut_after=2))
    stream = r.generate("hi", model="single", stream=True)
    with pytest.raises(RouterError):
        list(stream)
    (attempt,) = attempt_spans(spans)
    c = attrs(call_span(spans))
    assert attrs(attempt)["error.type"] == "stream_interrupted"
    assert c["error.type"] == "StreamInterruptedError" and c["llm_router.outcome"] == "stream_interrupted"
    assert c["gen_ai.usage.output_tokens"] > 0


def test_a_failed_call_carries_its_error_and_no_secret(
    make_router: MakeRouter, up: Upstream, spans: InMemorySpanExporter
) -> None:
    r = make_router(extra="tracing: {capture_content: true}")
    for route in "abc":
        up.set_default(route, Reply(status=401, error=f"Incorrect API key provided: {KEY_A}"))
    with pytest.raises(AllTargetsFailedError):
        r.generate("hi")
    call = call_span(spans)
    assert attrs(call)["error.type"] == "AllTargetsFailedError"
    assert call.status.status_code is StatusCode.ERROR and call.status.description
    tries = attempt_spans(spans)
    assert [attrs(s)["error.type"] for s in tries] == ["auth", "auth", "auth"]
    assert [attrs(s)["llm_router.fallback_reason"] for s in tries[1:]] == ["auth", "auth"]
    assert all(s.status.description for s in tries)
    assert KEY_A not in everything(spans)
    assert "sk-test" not in everything(spans)


SECRET_CONFIG = """
version: 1
defaults: {model: chat, timeout_s: 5, deadline_s: 20, retry: {attempts: 1}}
providers:
  a: {kind: openai, api_base: "{UP}/a/v1", api_key: "${KEY_A}", headers: {Helicone-Auth: "Bearer ${HELI}"}}
  p: {kind: openai, api_base: "http://user:${PW}@{HOSTPORT}/p/v1", api_key: "${KEY_A}"}
aliases:
  chat: {targets: [a/model-a, p/model-p]}
tracing: {capture_content: true}
"""


def test_a_header_value_or_password_echoed_by_a_provider_is_in_no_span(
    make_router: MakeRouter, up: Upstream, spans: InMemorySpanExporter
) -> None:
    heli, pw = "heli-secret-0123456789", "pw-secret-987654"
    text = SECRET_CONFIG.replace("{HOSTPORT}", up.url.removeprefix("http://"))
    r = make_router(text, env={"KEY_A": KEY_A, "HELI": heli, "PW": pw})
    echo = f"you sent Helicone-Auth: Bearer {heli} to user:{pw}"
    up.enqueue("a", Reply(status=401, error=echo))
    up.enqueue("p", Reply(status=400, error=echo))

    with pytest.raises(RouterError):
        r.generate("hi")

    tries = attempt_spans(spans)
    assert [attrs(s)["error.type"] for s in tries] == ["auth", "bad_request"]
    assert attrs(tries[1])["server.address"] == "127.0.0.1"  # the host alone, never the userinfo
    assert all("***" in (s.status.description or "") for s in tries)  # the echo was there, redacted
    text_of_spans = everything(spans)
    assert heli not in text_of_spans and pw not in text_of_spans and KEY_A not in text_of_spans


def test_content_is_recorded_only_when_the_config_opts_in(
    make_router: MakeRouter, up: Upstream, spans: InMemorySpanExporter
) -> None:
    up.enqueue("a", Reply(text="a secret answer"), Reply(text="a secret answer"))
    make_router(extra=TRACED).generate("a private prompt", model="single", system="be brief")
    assert "private" not in everything(spans) and "secret answer" not in everything(spans)
    spans.clear()
    make_router(extra="tracing: {capture_content: true}").generate(
        "a private prompt", model="single", system="be brief"
    )
    c = attrs(call_span(spans))
    assert json.loads(c["gen_ai.input.messages"]) == [
        {"role": "system", "parts": [{"type": "text", "content": "be brief"}]},
        {"role": "user", "parts": [{"type": "text", "content": "a private prompt"}]},
    ]
    assert json.loads(c["gen_ai.output.messages"]) == [
        {"role": "assistant", "parts": [{"type": "text", "content": "a secret answer"}], "finish_reason": "stop"}
    ]
    assert all("gen_ai.input.messages" not in attrs(s) for s in attempt_spans(spans))


def test_request_params_are_recorded(make_router: MakeRouter, up: Upstream, spans: InMemorySpanExporter) -> None:
    r = make_router(extra=TRACED)
    up.enqueue("a", Reply(text="x"))
    r.generate("hi", model="single", temperature=0.25, max_tokens=17)
    a = attrs(attempt_spans(spans)[0])
    assert (a["gen_ai.request.temperature"], a["gen_ai.request.max_tokens"]) == (0.25, 17)


def test_the_call_span_is_a_child_of_the_callers(
    make_router: MakeRouter, up: Upstream, spans: InMemorySpanExporter
) -> None:
    r = make_router(extra=TRACED)
    up.enqueue("a", Reply(text="x"))
    with trace.get_tracer("test").start_as_current_span("handle request") as outer:
        r.generate("hi", model="single")
    call = call_span(spans)
    assert call.parent is not None and call.parent.span_id == outer.get_span_context().span_id


@pytest.mark.parametrize("section", ["", "tracing: {enabled: false}"])
def test_no_spans_without_tracing(
    make_router: MakeRouter, up: Upstream, spans: InMemorySpanExporter, section: str
) -> None:
    r = make_router(extra=section)
    up.enqueue("a", Reply(text="x"))
    r.generate("hi", model="single")
    assert spans.get_finished_spans() == ()
    assert not any(isinstance(h, TracingHook) for h in r._hooks.hooks)


def test_the_tracing_section_is_checked() -> None:
    text = standard_config(extra="tracing: {enabled: true, capture_contents: true}").replace("{UP}", "http://x")
    with pytest.raises(ConfigError, match=r"test.yaml:\d+: tracing.capture_contents: unknown key"):
        parse_config(text, "test.yaml", env={})


# -- with other hooks ------------------------------------------------------------------------------------------


def test_a_call_answered_by_an_earlier_hook_still_gets_its_span(make_router: MakeRouter, up: Upstream) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    canned = Result("canned", "chat", "a", "model-a", Usage(1, 2), 0.0, "config", 0.0, attempts=())

    class Answer(Hook):
        def call_started(self, call: Call) -> Result | None:
            return canned

    r = make_router(hooks=[Answer(), TracingHook(tracer_provider=provider)])
    assert r.generate("hi") is canned
    c = attrs(call_span(exporter))
    assert (c["llm_router.outcome"], c["llm_router.attempts"], c["gen_ai.usage.output_tokens"]) == ("success", 0, 2)
    assert attempt_spans(exporter) == []


def test_an_attempt_stopped_by_a_later_hook_is_ended(make_router: MakeRouter, up: Upstream) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    class Refused(RouterError):
        outcome = "over_budget"

    class Refuse(Hook):
        def before_attempt(self, call: Call, target: Target, request: Mapping[str, Any]) -> None:
            raise Refused("over budget")

    r = make_router(hooks=[TracingHook(tracer_provider=provider), Refuse()])
    with pytest.raises(Refused):
        r.generate("hi")
    assert up.requests("a") == []
    (attempt,) = attempt_spans(exporter)
    assert attrs(attempt)["llm_router.outcome"] == "not_sent"
    c = attrs(call_span(exporter))
    assert (c["llm_router.outcome"], c["error.type"]) == ("over_budget", "Refused")


# -- without the extra -----------------------------------------------------------------------------------------

_NO_OTEL = textwrap.dedent(
    """
    import importlib.abc, logging, os, sys

    class NoOtel(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] == "opentelemetry":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    if os.environ["BLOCK"] == "1":
        sys.meta_path.insert(0, NoOtel())
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    import router
    import router.cli
    from router.sandbox import Upstream, Reply

    with open("t.yaml", "w") as f:
        f.write(os.environ["CONFIG"].replace("{UP}", "http://127.0.0.1:9"))
    router.cli.main(["validate", "t.yaml"])

    with Upstream() as up:
        up.enqueue("a", Reply(text="answered"))
        cfg = router.parse_config(os.environ["CONFIG"].replace("{UP}", up.url), "t.yaml", env={})
        print(router.Router(cfg).generate("hi").text)
    print("otel modules:", sorted(m for m in sys.modules if m.startswith("opentelemetry")))
    """
)
_PLAIN = """
version: 1
providers: {a: {kind: openai, api_base: "{UP}/a/v1", api_key: sk-x}}
aliases: {chat: {targets: [a/m]}}
defaults: {model: chat}
"""


def _run(config: str, block: bool, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CONFIG": config, "BLOCK": "1" if block else "0", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    return subprocess.run(
        [sys.executable, "-c", _NO_OTEL], env=env, capture_output=True, text=True, timeout=120, check=True, cwd=cwd
    )


def test_without_a_tracing_section_opentelemetry_is_never_imported(tmp_path: Path) -> None:
    out = _run(_PLAIN, block=False, cwd=tmp_path)
    assert "answered" in out.stdout
    assert "otel modules: []" in out.stdout
    assert "OpenTelemetry" not in out.stderr


def test_tracing_without_the_extra_warns_and_answers(tmp_path: Path) -> None:
    out = _run(_PLAIN + "tracing: {enabled: true}\n", block=True, cwd=tmp_path)
    assert "answered" in out.stdout and "otel modules: []" in out.stdout
    # `llm-router validate` says so, and so does the Router when it starts
    notes = [line for line in out.stderr.splitlines() if "pip install 'llm-router[otel]'" in line]
    assert len(notes) == 2 and notes[0].startswith("t.yaml: note: tracing is on"), out.stderr


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_hedged_race_has_a_span_per_request(
    make_router: MakeRouter, up: Upstream, spans: InMemorySpanExporter, mode: str
) -> None:
    aliases = "hedged: {targets: [a/model-a, b/model-b], hedge: {after_s: 0.2}}"
    r = make_router(standard_config(aliases=aliases, extra=TRACED + PRICED))
    up.enqueue("a", Reply(text="slow a", delay_s=3.0))
    up.enqueue("b", Reply(text="quick b", usage=(3, 4)))
    res = r.generate("hi", model="hedged") if mode == "sync" else asyncio.run(r.agenerate("hi", model="hedged"))
    assert res.provider == "b"
    first, hedge = (attrs(s) for s in attempt_spans(spans))
    assert (first["llm_router.provider"], first["llm_router.outcome"]) == ("a", "cancelled")
    assert "llm_router.hedge" not in first and "error.type" not in first
    assert (hedge["llm_router.provider"], hedge["llm_router.outcome"]) == ("b", "success")
    assert hedge["llm_router.hedge"] is True
    assert hedge["gen_ai.response.finish_reasons"] == ("stop",) and hedge["gen_ai.usage.output_tokens"] == 4
    assert "llm_router.fallback_reason" not in hedge
    call = attrs(call_span(spans))
    assert (call["llm_router.outcome"], call["llm_router.attempts"]) == ("success", 2)


def test_a_reload_turns_tracing_on_off_and_its_content_capture_for_the_next_call(
    up: Upstream, spans: InMemorySpanExporter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEY_A", KEY_A)
    path = tmp_path / "router.yaml"

    def write(extra: str) -> None:
        text = standard_config(extra=extra).replace("{UP}", up.url)
        text = text.replace("${KEY_B}", "${KEY_A}").replace("${KEY_C}", "${KEY_A}")
        path.write_text(text)

    write("")
    r = Router.from_yaml(path, registry=CollectorRegistry())
    up.route("a").set_default(Reply(text="the answer"))
    try:
        r.generate("the prompt", model="single")
        assert not spans.get_finished_spans()
        write(TRACED)
        assert r.reload()
        r.generate("the prompt", model="single")
        assert "the prompt" not in everything(spans) and len(attempt_spans(spans)) == 1
        spans.clear()
        write("tracing: {capture_content: true}")
        assert r.reload()
        r.generate("the prompt", model="single")
        assert "the prompt" in attrs(call_span(spans))["gen_ai.input.messages"]
        spans.clear()
        write("tracing: {enabled: false}")
        assert r.reload()
        r.generate("the prompt", model="single")
        assert not spans.get_finished_spans()
    finally:
        r.close()
