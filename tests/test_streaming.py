"""Streaming end to end: `generate(stream=True)` → real litellm → SSE from the loopback `Upstream`.

The upstream streams each reply as about three content chunks, and can cut the connection after N of them
(`cut_after`), send an SSE error event instead of the rest (`error_event`), end without a finish reason
(`no_finish`) or leave out the usage chunk (`stream_usage=False`). Expectations come from the scripted
replies, the requests the upstream received, and the metrics registry. Every test runs on both engines (the
providers here are all OpenAI-protocol): the direct engine must stream the same Result and the same errors.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import time
from collections.abc import Callable, Sequence
from typing import Any
from unittest.mock import ANY

import litellm
import pytest
from conftest import BOTH_ENGINES, MakeRouter, Sleeps, standard_config
from prometheus_client import CollectorRegistry

from router import AsyncStream, Attempt, Result, Router, Stream, StreamInterruptedError, Usage
from router.engines.wire import estimate_usage
from router.sandbox import Reply, Upstream

pytestmark = BOTH_ENGINES

TEXT = "one two three four five six seven eight"
B_TEXT = "bravo answers the whole question"
PRICE_A = (2.0, 8.0)  # USD per 1M input, output tokens
PRICE_B = (1.0, 4.0)
FIRST_TOKEN_TIMEOUT_S = 0.3

CONFIG = standard_config(
    aliases=f"hasty: {{targets: [{{target: a/model-a, first_token_timeout_s: {FIRST_TOKEN_TIMEOUT_S}}}, b/model-b]}}",
    extra=f"""
    pricing:
      a/model-a: {{input_per_1m: {PRICE_A[0]}, output_per_1m: {PRICE_A[1]}}}
      b/model-b: {{input_per_1m: {PRICE_B[0]}, output_per_1m: {PRICE_B[1]}}}
    """,
)

PROMPT = "hello"
SENT = [{"role": "user", "content": PROMPT}]  # the messages a prompt-only call sends


@pytest.fixture
def r(make_router: MakeRouter) -> Router:
    return make_router(CONFIG)


def routes(up: Upstream) -> list[str]:
    """The route of every request the upstream received, in order."""
    return [rec.route for rec in up.history]


def trail(attempts: Sequence[Attempt]) -> list[tuple[str, str, Any]]:
    return [(a.provider, a.outcome, a.status_code) for a in attempts]


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def target_labels(alias: str, provider: str) -> dict[str, str]:
    return {"alias": alias, "provider": provider, "model": f"model-{provider}"}


def counted(text: str, engine: str, model: str = "openai/model-a") -> Usage:
    """The usage an engine estimates for a prompt-only call that got `text` back: litellm's own counter, or the
    direct engine's documented rule of thumb."""
    if engine == "direct":
        return estimate_usage(SENT, text)
    return Usage(
        litellm.token_counter(model=model, messages=SENT), litellm.token_counter(model=model, text=text), estimated=True
    )


def priced(usage: Usage, per_1m: tuple[float, float]) -> float:
    return usage.input_tokens * per_1m[0] / 1e6 + usage.output_tokens * per_1m[1] / 1e6


def same_answer(streamed: Result, plain: Result) -> None:
    fields = ("text", "alias", "provider", "model", "usage", "cost_usd", "cost_source", "finish_reason")
    assert {f: getattr(streamed, f) for f in fields} == {f: getattr(plain, f) for f in fields}
    assert trail(streamed.attempts) == trail(plain.attempts)


# -- a whole stream is the same answer as no stream ---------------------------------------------------------


def test_streamed_text_and_result_equal_the_plain_answer(r: Router, up: Upstream) -> None:
    up.enqueue("a", Reply(text=TEXT, usage=(11, 7)), Reply(text=TEXT, usage=(11, 7)))

    plain = r.generate(PROMPT)
    stream = r.generate(PROMPT, stream=True)
    assert isinstance(stream, Stream) and stream.result is None
    deltas = list(stream)

    assert len(deltas) > 1 and all(deltas)  # it came in pieces, none of them empty
    assert "".join(deltas) == plain.text == TEXT == stream.text
    assert stream.result is not None
    same_answer(stream.result, plain)
    assert stream.result.usage == Usage(11, 7)  # the provider's final usage chunk, not an estimate
    assert stream.result.cost_usd == pytest.approx(priced(Usage(11, 7), PRICE_A))
    assert trail(stream.result.attempts) == [("a", "success", None)]
    plain_req, streamed_req = up.requests("a")
    assert not plain_req.stream and "stream_options" not in plain_req.body
    assert streamed_req.stream and streamed_req.body["stream_options"] == {"include_usage": True}


@pytest.mark.asyncio
async def test_async_streamed_text_and_result_equal_the_plain_answer(r: Router, up: Upstream) -> None:
    up.enqueue("a", Reply(text=TEXT, usage=(11, 7)), Reply(text=TEXT, usage=(11, 7)))

    plain = await r.agenerate(PROMPT)
    stream = await r.agenerate(PROMPT, stream=True)
    assert isinstance(stream, AsyncStream) and stream.result is None
    deltas = [d async for d in stream]

    assert len(deltas) > 1 and all(deltas)
    assert "".join(deltas) == plain.text == TEXT == stream.text
    assert stream.result is not None
    same_answer(stream.result, plain)
    assert stream.result.usage == Usage(11, 7)
    streamed_req = up.requests("a")[1]
    assert streamed_req.stream and streamed_req.body["stream_options"] == {"include_usage": True}


def test_sync_and_async_streams_agree(r: Router, up: Upstream) -> None:
    up.enqueue("a", Reply(text=TEXT, usage=(5, 9)), Reply(text=TEXT, usage=(5, 9)))

    sync_stream = r.generate(PROMPT, stream=True)
    sync_deltas = list(sync_stream)

    async def read() -> tuple[list[str], Result | None]:
        s = await r.agenerate(PROMPT, stream=True)
        return [d async for d in s], s.result

    async_deltas, async_result = asyncio.run(read())

    assert sync_deltas == async_deltas
    assert sync_stream.result is not None and async_result is not None
    same_answer(sync_stream.result, async_result)


def test_without_a_usage_chunk_usage_is_counted_and_marked_estimated(r: Router, up: Upstream, engine: str) -> None:
    up.enqueue("a", Reply(text=TEXT, usage=(11, 7), stream_usage=False))

    stream = r.generate(PROMPT, stream=True)
    deltas = list(stream)

    assert "".join(deltas) == TEXT
    res = stream.result
    assert res is not None and res.provider == "a"
    assert res.usage == counted(TEXT, engine)  # the engine's count, flagged as such: (11, 7) never reached us
    assert res.usage.estimated is True
    assert res.cost_usd == pytest.approx(priced(counted(TEXT, engine), PRICE_A))


@pytest.mark.asyncio
async def test_async_without_a_usage_chunk_usage_is_counted_and_marked_estimated(
    r: Router, up: Upstream, engine: str
) -> None:
    up.enqueue("a", Reply(text=TEXT, usage=(11, 7), stream_usage=False))

    stream = await r.agenerate(PROMPT, stream=True)
    deltas = [d async for d in stream]

    assert "".join(deltas) == TEXT
    assert stream.result is not None
    assert stream.result.usage == counted(TEXT, engine)
    assert stream.result.usage.estimated is True


def test_stream_as_a_context_manager(r: Router, up: Upstream, registry: CollectorRegistry) -> None:
    up.enqueue("a", Reply(text=TEXT, usage=(3, 4)))

    with r.generate(PROMPT, stream=True, model="single") as s:
        deltas = list(s)

    assert "".join(deltas) == TEXT
    assert s.result is not None and (s.result.text, s.result.usage) == (TEXT, Usage(3, 4))
    assert sample(registry, "llm_router_requests_total", alias="single", outcome="success") == 1
    assert sample(registry, "llm_router_requests_total", alias="single", outcome="cancelled") is None
    assert sample(registry, "llm_router_in_flight", alias="single") == 0


@pytest.mark.asyncio
async def test_async_stream_as_a_context_manager(r: Router, up: Upstream, registry: CollectorRegistry) -> None:
    up.enqueue("a", Reply(text=TEXT, usage=(3, 4)))

    async with await r.agenerate(PROMPT, stream=True, model="single") as s:
        deltas = [d async for d in s]

    assert "".join(deltas) == TEXT
    assert s.result is not None and s.result.usage == Usage(3, 4)
    assert sample(registry, "llm_router_requests_total", alias="single", outcome="success") == 1
    assert sample(registry, "llm_router_in_flight", alias="single") == 0


# -- fallback before the first text leaks nothing ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Early:
    """Provider a fails with `reply` before any text, on every try; the stream must be b's alone."""

    reply: Reply
    outcome: str
    status: Any
    alias: str = "chat"


EARLY_FAILURES = {
    "server_error-503": Early(Reply(status=503), "server_error", 503),
    "first_token_timeout": Early(Reply(text="too late from a", delay_s=1.0), "timeout", ANY, alias="hasty"),
    "empty-stream": Early(Reply(text=""), "invalid_response", ANY),
    "error-event-before-text": Early(
        Reply(text="never sent from a", cut_after=0, error_event=True), "server_error", ANY
    ),
}


def check_early_fallback(
    case: Early, deltas: list[str], res: Result | None, up: Upstream, sleeps: Sleeps, registry: CollectorRegistry
) -> None:
    assert "".join(deltas) == B_TEXT  # b's text, and not one byte of a's
    assert res is not None and (res.text, res.provider, res.model) == (B_TEXT, "b", "model-b")
    tries = 2  # retry.attempts: every one of these is retried on a before moving on
    assert trail(res.attempts) == [("a", case.outcome, case.status)] * tries + [("b", "success", None)]
    assert all(a.error for a in res.attempts[:-1])
    assert routes(up) == ["a"] * tries + ["b"]
    assert len(sleeps) == tries - 1
    fallback = {"alias": case.alias, "from_provider": "a", "to_provider": "b", "reason": case.outcome}
    assert registry.get_sample_value("llm_router_fallbacks_total", fallback) == 1
    ttft = "llm_router_time_to_first_token_seconds_count"
    assert registry.get_sample_value(ttft, target_labels(case.alias, "a")) is None  # a never sent text
    assert registry.get_sample_value(ttft, target_labels(case.alias, "b")) == 1
    assert sample(registry, "llm_router_requests_total", alias=case.alias, outcome="success") == 1


@pytest.mark.parametrize("case", EARLY_FAILURES.values(), ids=EARLY_FAILURES.keys())
def test_failure_before_the_first_text_falls_back_without_leaking(
    case: Early, r: Router, up: Upstream, sleeps: Sleeps, registry: CollectorRegistry
) -> None:
    up.enqueue("a", case.reply, case.reply)
    up.enqueue("b", Reply(text=B_TEXT))

    stream = r.generate(PROMPT, model=case.alias, stream=True)
    deltas = list(stream)

    check_early_fallback(case, deltas, stream.result, up, sleeps, registry)


@pytest.mark.asyncio
@pytest.mark.parametrize("case", EARLY_FAILURES.values(), ids=EARLY_FAILURES.keys())
async def test_async_failure_before_the_first_text_falls_back_without_leaking(
    case: Early, r: Router, up: Upstream, sleeps: Sleeps, registry: CollectorRegistry
) -> None:
    up.enqueue("a", case.reply, case.reply)
    up.enqueue("b", Reply(text=B_TEXT))

    stream = await r.agenerate(PROMPT, model=case.alias, stream=True)
    deltas = [d async for d in stream]

    check_early_fallback(case, deltas, stream.result, up, sleeps, registry)


# -- a break after text is an error, never a fallback -------------------------------------------------------

STREAM_ERROR = "upstream overloaded mid-answer"

INTERRUPTIONS = {
    # each engine names the cut its own way: LiteLLM's wrapper, httpx's protocol error
    "connection-cut": (
        Reply(text=TEXT, cut_after=1),
        {"litellm": "MidStreamFallbackError", "direct": "incomplete chunked read"},
    ),
    "sse-error-event": (Reply(text=TEXT, cut_after=1, error_event=True, error=STREAM_ERROR), STREAM_ERROR),
    "no-finish-reason": (Reply(text=TEXT, cut_after=1, no_finish=True), "without a finish reason"),
}


def check_interrupted(
    err: StreamInterruptedError,
    deltas: list[str],
    said: str | dict[str, str],
    up: Upstream,
    registry: CollectorRegistry,
    engine: str,
) -> None:
    said = said[engine] if isinstance(said, dict) else said
    assert deltas and "".join(deltas) != TEXT and TEXT.startswith("".join(deltas))  # one chunk of three
    assert err.text == "".join(deltas)
    assert (err.alias, err.provider, err.model, err.outcome) == ("chat", "a", "model-a", "stream_interrupted")
    assert err.usage == counted(err.text, engine) and err.usage.estimated is True
    assert err.cost_usd > 0 and err.cost_usd == pytest.approx(priced(err.usage, PRICE_A))
    assert trail(err.attempts) == [("a", "stream_interrupted", None)]
    assert said in (err.attempts[-1].error or "")
    assert routes(up) == ["a"]  # not retried on a, and b never asked: the caller already has a's text
    assert up.requests("b") == []
    a = target_labels("chat", "a")
    assert registry.get_sample_value("llm_router_stream_interrupted_total", a) == 1
    assert registry.get_sample_value("llm_router_attempts_total", {**a, "outcome": "stream_interrupted"}) == 1
    assert sample(registry, "llm_router_requests_total", alias="chat", outcome="stream_interrupted") == 1
    assert sample(registry, "llm_router_requests_total", alias="chat", outcome="success") is None
    assert sample(registry, "llm_router_in_flight", alias="chat") == 0


@pytest.mark.parametrize(("reply", "said"), INTERRUPTIONS.values(), ids=INTERRUPTIONS.keys())
def test_break_after_text_raises_stream_interrupted(
    reply: Reply, said: str | dict[str, str], r: Router, up: Upstream, registry: CollectorRegistry, engine: str
) -> None:
    up.enqueue("a", reply, Reply(text="a retry would say this"))
    up.enqueue("b", Reply(text=B_TEXT))

    stream = r.generate(PROMPT, stream=True)
    deltas: list[str] = []
    with pytest.raises(StreamInterruptedError) as info:
        for d in stream:
            deltas.append(d)

    check_interrupted(info.value, deltas, said, up, registry, engine)
    assert stream.result is None


@pytest.mark.asyncio
@pytest.mark.parametrize(("reply", "said"), INTERRUPTIONS.values(), ids=INTERRUPTIONS.keys())
async def test_async_break_after_text_raises_stream_interrupted(
    reply: Reply, said: str | dict[str, str], r: Router, up: Upstream, registry: CollectorRegistry, engine: str
) -> None:
    up.enqueue("a", reply, Reply(text="a retry would say this"))
    up.enqueue("b", Reply(text=B_TEXT))

    stream = await r.agenerate(PROMPT, stream=True)
    deltas: list[str] = []
    with pytest.raises(StreamInterruptedError) as info:
        async for d in stream:
            deltas.append(d)

    check_interrupted(info.value, deltas, said, up, registry, engine)
    assert stream.result is None


# -- time to first token ------------------------------------------------------------------------------------


def test_time_to_first_token_is_recorded_per_streamed_call(
    r: Router, up: Upstream, registry: CollectorRegistry
) -> None:
    delay = 0.3
    up.enqueue("a", Reply(text=TEXT, delay_s=delay), Reply(text=TEXT), Reply(text=TEXT), Reply(text=TEXT))

    for _ in range(2):
        assert "".join(r.generate(PROMPT, model="single", stream=True)) == TEXT

    async def one() -> str:
        return "".join([d async for d in await r.agenerate(PROMPT, model="single", stream=True)])

    assert asyncio.run(one()) == TEXT
    assert r.generate(PROMPT, model="single").text == TEXT  # a plain call has no first token to time

    a = target_labels("single", "a")
    assert registry.get_sample_value("llm_router_time_to_first_token_seconds_count", a) == 3
    assert registry.get_sample_value("llm_router_time_to_first_token_seconds_sum", a) >= delay


# -- an abandoned stream ends the call ----------------------------------------------------------------------


def check_cancelled(registry: CollectorRegistry) -> None:
    a = target_labels("single", "a")
    assert sample(registry, "llm_router_in_flight", alias="single") == 0
    assert sample(registry, "llm_router_requests_total", alias="single", outcome="cancelled") == 1
    assert sample(registry, "llm_router_requests_total", alias="single", outcome="success") is None
    assert registry.get_sample_value("llm_router_attempts_total", {**a, "outcome": "cancelled"}) == 1
    assert registry.get_sample_value("llm_router_attempts_total", {**a, "outcome": "success"}) is None


@pytest.mark.parametrize("how", ["close", "drop"])
def test_abandoned_stream_is_counted_as_cancelled(
    how: str, r: Router, up: Upstream, registry: CollectorRegistry
) -> None:
    up.enqueue("a", Reply(text=TEXT))

    stream = r.generate(PROMPT, model="single", stream=True)
    first = next(stream)
    assert first and TEXT.startswith(first) and first != TEXT
    assert sample(registry, "llm_router_in_flight", alias="single") == 1  # the call lasts as long as the stream

    if how == "close":
        stream.close()
        assert stream.result is None
        assert list(stream) == []  # a closed stream yields nothing more
    else:
        del stream
        gc.collect()  # the closer thread then counts it
        settled(lambda: sample(registry, "llm_router_in_flight", alias="single") == 0)

    check_cancelled(registry)


def settled(cond: Callable[[], bool], timeout_s: float = 3.0) -> None:
    """Wait for a dropped stream's accounting, which the closer thread does (never the collecting thread)."""
    end = time.monotonic() + timeout_s
    while not cond() and time.monotonic() < end:
        time.sleep(0.01)


def test_leaving_a_with_block_early_cancels(r: Router, up: Upstream, registry: CollectorRegistry) -> None:
    up.enqueue("a", Reply(text=TEXT))

    with r.generate(PROMPT, model="single", stream=True) as stream:
        next(stream)

    check_cancelled(registry)


@pytest.mark.asyncio
@pytest.mark.parametrize("how", ["aclose", "drop"])
async def test_async_abandoned_stream_is_counted_as_cancelled(
    how: str, r: Router, up: Upstream, registry: CollectorRegistry
) -> None:
    up.enqueue("a", Reply(text=TEXT))

    stream = await r.agenerate(PROMPT, model="single", stream=True)
    first = await stream.__anext__()
    assert first and TEXT.startswith(first) and first != TEXT
    assert sample(registry, "llm_router_in_flight", alias="single") == 1

    if how == "aclose":
        await stream.aclose()
        assert stream.result is None
    else:
        del stream
        gc.collect()
        settled(lambda: sample(registry, "llm_router_in_flight", alias="single") == 0)

    check_cancelled(registry)
