"""The direct engine (router/engines/direct.py, wire.py, price_map.py): the router's own OpenAI-protocol client.

What it must do exactly as the LiteLLM engine does is proved by the suites that run on both engines
(`BOTH_ENGINES` in test_replay, test_routing, test_streaming, test_structured, test_hedge). Here: the error
answers and stream events of every kind, classified by both engines from the same bytes and compared case by
case; and what only this engine has: its config, its pools, its wall-clock deadline, closing a stream from any
thread, and never importing LiteLLM.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import litellm
import pytest
from conftest import KEY_A, KEY_B, KEY_C, MakeRouter

from router import ConfigError, ProviderError, Router, RouterError, StreamInterruptedError, parse_config
from router.engines import direct as direct_engine
from router.engines.wire import SSE, ProviderHTTPError, estimate_usage, http_outcome
from router.sandbox import Reply, Upstream
from router.types import Usage

ROOT = Path(__file__).resolve().parents[1]
MSGS = [{"role": "user", "content": "hello"}]

# -- config ---------------------------------------------------------------------------------------------------

KINDS_CONFIG = """
version: 1
defaults: {engine: %(default)s}
providers:
  oa: {kind: openai, api_key: k}
  orr: {kind: openrouter, api_key: k}
  vl: {kind: hosted_vllm, api_base: "http://127.0.0.1:8000/v1"}
  lm: {kind: lm_studio, api_base: "http://127.0.0.1:1234/v1", engine: direct}
  an: {kind: anthropic, api_key: k, engine: litellm}
aliases:
  all: {targets: [oa/gpt-4o, orr/gpt-4o, vl/m, lm/m, an/claude-3-5-haiku-20241022]}
"""


def engines_of(text: str, alias: str = "all") -> dict[str, str]:
    return {t.provider: t.engine for t in parse_config(text, "t.yaml", env={}).targets(alias)}


def test_engine_is_litellm_unless_a_provider_or_the_defaults_say_direct() -> None:
    assert engines_of(KINDS_CONFIG % {"default": "litellm"}) == {
        "oa": "litellm", "orr": "litellm", "vl": "litellm", "lm": "direct", "an": "litellm",
    }  # fmt: skip
    assert engines_of(KINDS_CONFIG % {"default": "direct"}) == {
        "oa": "direct", "orr": "direct", "vl": "direct", "lm": "direct", "an": "litellm",
    }  # fmt: skip
    no_engine = KINDS_CONFIG.replace("defaults: {engine: %(default)s}\n", "")
    assert engines_of(no_engine)["oa"] == "litellm"


def test_engine_direct_on_another_kind_names_the_kinds_that_take_it() -> None:
    text = "version: 1\nproviders:\n  an: {kind: anthropic, engine: direct}\naliases: {a: {targets: [an/c]}}"

    with pytest.raises(ConfigError) as info:
        parse_config(text, "t.yaml", env={})

    (problem,) = info.value.problems
    assert str(problem).startswith("t.yaml:3: providers.an.engine: engine direct speaks the OpenAI protocol of kinds")
    assert "openai, openrouter, hosted_vllm, lm_studio" in str(problem) and "needs engine: litellm" in str(problem)


def test_defaults_engine_direct_names_each_provider_that_cannot_take_it() -> None:
    text = textwrap.dedent("""\
        version: 1
        defaults: {engine: direct}
        providers:
          oa: {kind: openai, api_key: k}
          an: {kind: anthropic, api_key: k}
          ge: {kind: gemini, api_key: k}
        aliases:
          a: {targets: [oa/m, an/c, ge/g]}
        """)

    with pytest.raises(ConfigError) as info:
        parse_config(text, "t.yaml", env={})

    got = [str(p) for p in info.value.problems]
    assert [g.split(": ")[:3] for g in got] == [
        ["t.yaml:2", "defaults.engine", "provider 'an'"],
        ["t.yaml:2", "defaults.engine", "provider 'ge'"],
    ]


@pytest.mark.parametrize("kind", ["hosted_vllm", "lm_studio"])
def test_a_server_kind_needs_its_api_base(kind: str) -> None:
    text = f"version: 1\nproviders:\n  s: {{kind: {kind}, engine: direct}}\naliases:\n  a: {{targets: [s/m]}}\n"

    with pytest.raises(ConfigError) as info:
        parse_config(text, "t.yaml", env={})

    assert "providers.s.engine: engine direct needs the api_base of this" in str(info.value)


def test_an_unknown_engine_is_a_config_error() -> None:
    text = "version: 1\nproviders:\n  o: {kind: openai, api_key: k, engine: drect}\naliases:\n  a: {targets: [o/m]}\n"

    with pytest.raises(ConfigError) as info:
        parse_config(text, "t.yaml", env={})

    assert "providers.o.engine" in str(info.value) and "'litellm' or 'direct'" in str(info.value)


# -- what goes on the wire ------------------------------------------------------------------------------------

DIRECT = """
version: 1
defaults: {engine: direct, timeout_s: 5, deadline_s: 20, retry: {attempts: 1}}
providers:
  a:
    kind: openai
    api_base: "{UP}/a/v1"
    api_key: "${KEY_A}"
    headers: {X-Team: blue, Helicone-Auth: "Bearer ${KEY_C}"}
  orr: {kind: openrouter, api_base: "{UP}/orr/v1", api_key: "${KEY_B}"}
  vl: {kind: hosted_vllm, api_base: "{UP}/vl/v1"}
aliases:
  chat: {targets: [a/model-a]}
  reasoning: {targets: [a/o3-mini]}
  routed: {targets: [orr/gpt-4o-mini]}
  vllm: {targets: [vl/Qwen/Qwen2.5-7B]}
"""


@pytest.fixture
def r(make_router: MakeRouter) -> Router:
    return make_router(DIRECT)


def test_a_request_carries_the_model_the_key_the_headers_and_the_callers_params(r: Router, up: Upstream) -> None:
    r.generate("hello", model="chat", temperature=0.25, seed=7, top_k=3, logit_bias={"42": -5})

    (sent,) = up.history
    assert (sent.method, sent.path) == ("POST", "/a/v1/chat/completions")
    assert sent.headers["authorization"] == f"Bearer {KEY_A}" and sent.headers["x-team"] == "blue"
    assert sent.headers["helicone-auth"] == f"Bearer {KEY_C}"
    assert sent.headers["content-type"] == "application/json" and sent.headers["user-agent"].startswith("llm-router/")
    assert sent.body == {
        "model": "model-a", "messages": MSGS, "temperature": 0.25, "seed": 7, "top_k": 3, "logit_bias": {"42": -5},
    }  # fmt: skip


def test_openrouter_is_asked_for_its_cost_and_a_stream_for_its_usage(r: Router, up: Upstream) -> None:
    up.enqueue("orr", Reply(cost=0.0125, usage=(10, 4)), Reply(text="one two three", cost=0.5, usage=(3, 3)))

    res = r.generate("hello", model="routed")
    stream = r.generate("hello", model="routed", stream=True)
    "".join(stream)

    plain, streamed = up.requests("orr")
    assert plain.model == "openai/gpt-4o-mini" and plain.body["usage"] == {"include": True}
    assert "stream_options" not in plain.body
    assert streamed.body["stream"] is True and streamed.body["stream_options"] == {"include_usage": True}
    assert (res.cost_usd, res.cost_source) == (0.0125, "provider")
    assert stream.result is not None and (stream.result.cost_usd, stream.result.cost_source) == (0.5, "provider")
    assert stream.result.usage.estimated is False


def test_params_an_openai_reasoning_model_refuses_are_left_out_and_logged_once(
    r: Router, up: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="router"):
        for _ in range(2):
            r.generate("hello", model="reasoning", temperature=0.2, top_p=0.9, max_tokens=50, seed=1)
        r.generate("hello", model="reasoning", temperature=1)

    first, second, third = up.history
    assert first.body == second.body == {"model": "o3-mini", "messages": MSGS, "max_completion_tokens": 50, "seed": 1}
    assert third.body["temperature"] == 1  # the one value these models take
    warned = [m for m in caplog.messages if "not taken by this model" in m]
    assert warned == ["a/o3-mini: temperature, top_p not taken by this model, left out of its requests"]


def test_a_server_kind_without_a_key_sends_no_authorization(r: Router, up: Upstream) -> None:
    r.generate("hello", model="vllm", repetition_penalty=1.1)

    (sent,) = up.history
    assert "authorization" not in sent.headers
    assert sent.model == "Qwen/Qwen2.5-7B" and sent.body["repetition_penalty"] == 1.1


def test_a_provider_error_is_the_cause_with_its_status_and_its_body_scrubbed(r: Router, up: Upstream) -> None:
    up.enqueue("a", Reply(status=400, error=f"bad request for key {KEY_A} with Helicone-Auth {KEY_C}"))

    with pytest.raises(ProviderError) as info:
        r.generate("hello", model="chat")

    cause = info.value.__cause__
    assert isinstance(cause, ProviderHTTPError) and cause.status_code == 400
    assert "bad request for key *** with Helicone-Auth ***" in cause.body  # the key and the header value it was sent
    assert not [k for k in (KEY_A, KEY_C) for t in (str(cause), repr(cause.args), cause.body) if k in t]
    said = "bad request for key *** with Helicone-Auth ***"
    assert info.value.attempts[0].error == f"ProviderHTTPError: HTTP 400 from a: {said}"


def test_a_json_answer_to_a_stream_request_is_streamed(r: Router, up: Upstream) -> None:
    # Some OpenAI-compatible servers ignore "stream": true and answer in one JSON body.
    answer = {"id": "x", "object": "chat.completion", "model": "model-a", "usage": {"prompt_tokens": 3,
              "completion_tokens": 2}, "choices": [{"index": 0, "message": {"role": "assistant", "content":
              "whole answer"}, "finish_reason": "stop"}]}  # fmt: skip
    up.enqueue("a", Reply(json=answer))

    stream = r.generate("hello", model="chat", stream=True)

    assert list(stream) == ["whole answer"]
    assert stream.result is not None and stream.result.usage.total_tokens == 5


# -- error answers and stream events: classified from the same bytes as LiteLLM classifies them -----------------

PARITY = """
version: 1
defaults:
  timeout_s: 5
  deadline_s: 20
  retry: {attempts: 1}
  fallback_on: []
  circuit: {failure_threshold: 1000000000, failure_ratio: null}
providers:
  oa: {kind: openai, api_base: "{UP}/oa/v1", api_key: "${KEY_A}"}
  orr: {kind: openrouter, api_base: "{UP}/orr/v1", api_key: "${KEY_A}"}
  vl: {kind: hosted_vllm, api_base: "{UP}/vl/v1", api_key: "${KEY_A}"}
  lm: {kind: lm_studio, api_base: "{UP}/lm/v1", api_key: "${KEY_A}"}
aliases:
  oa: {targets: [oa/model-a]}
  orr: {targets: [orr/vendor/model-a]}
  vl: {targets: [vl/model-a]}
  lm: {targets: [lm/model-a]}
"""
PARITY_KINDS = ("oa", "orr", "vl", "lm")


def _err(message: str, typ: str = "invalid_request_error", code: Any = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": typ, "param": None, "code": code}}


# Bodies of error answers, each sent with every status below: what a provider says, as LiteLLM reads it.
BODIES: dict[str, Callable[[int], Reply]] = {
    "sandbox": lambda s: Reply(status=s),
    "text": lambda s: Reply(status=s, raw="oops, plain text"),
    "empty": lambda s: Reply(status=s, raw=""),
    "rate-limit-text": lambda s: Reply(status=s, json={"error": {"message": "rate limit hit", "code": s}}),
    "context-text": lambda s: Reply(status=s, json=_err("This model's maximum context length is 8192 tokens.")),
    "context-code": lambda s: Reply(status=s, json=_err("please shorten", code="context_length_exceeded")),
    "policy": lambda s: Reply(status=s, json=_err("Your request was rejected: content_policy_violation")),
    "model-not-found": lambda s: Reply(status=s, json=_err("The model x does not exist", code="model_not_found")),
    "incorrect-key": lambda s: Reply(status=s, json=_err("Incorrect API key provided: sk-xx")),
    "timeout-text": lambda s: Reply(status=s, json=_err("A timeout occurred", typ="server_error")),
    "server-text": lambda s: Reply(
        status=s, json={"error": {"message": "The server had an error processing your request."}}
    ),
    "too-large": lambda s: Reply(status=s, json={"error": {"message": "Request too large for model"}}),
    "not-json": lambda s: Reply(status=s, raw="Expecting value: line 1 column 1"),
    "connection-text": lambda s: Reply(status=s, json={"error": {"message": "Connection error."}}),
    "html": lambda s: Reply(status=s, raw="<html><body>Bad gateway</body></html>", content_type="text/html"),
}
STATUSES = (400, 401, 402, 403, 404, 408, 409, 413, 422, 429, 500, 503, 504)
# OpenAI's and OpenRouter's readings are the two LiteLLM has; vLLM's is OpenAI's on the bare body, LM Studio's
# OpenAI's: a few statuses show each, the rest would repeat "oa".
KIND_STATUSES = {"oa": STATUSES, "orr": STATUSES, "vl": (400, 402, 404, 429, 500, 504), "lm": (400, 402, 429, 500)}


def _chunk(content: str | None = None, finish: str | None = None, **delta: Any) -> dict[str, Any]:
    d = ({"content": content} if content is not None else {}) | delta
    return {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": d, "finish_reason": finish}]}  # fmt: skip


def sse(*events: Any) -> list[bytes]:
    return [("data: " + (e if isinstance(e, str) else json.dumps(e)) + "\n\n").encode() for e in events]


ANSWER = {"id": "x", "object": "chat.completion", "model": "m", "choices": [{"index": 0, "message": {"role":
          "assistant", "content": "hi"}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 3,
          "completion_tokens": 1}}  # fmt: skip
USAGE = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [],
         "usage": {"prompt_tokens": 5, "completion_tokens": 7, "cost": 0.5}}  # fmt: skip

# 2xx answers, and failures with no HTTP status at all.
ANSWERS: dict[str, Reply] = {
    "200-not-json": Reply(raw="<html>hi</html>"),
    "200-empty": Reply(raw="", content_type="application/json"),
    "200-empty-object": Reply(json={}),
    "200-list": Reply(json=[1, 2]),
    "200-no-choices": Reply(json={**ANSWER, "choices": []}),
    "200-no-message": Reply(json={**ANSWER, "choices": [{"index": 0, "finish_reason": "stop"}]}),
    "200-error-400": Reply(json={"error": {"message": "bad thing", "code": 400}}),
    "200-error-429": Reply(json={"error": {"message": "slow", "code": 429}}),
    "200-error-500": Reply(json={"error": {"message": "boom", "code": 500}}),
    "200-error-no-code": Reply(json={"error": {"message": "boom"}}),
    "200-content-filter": Reply(
        json={
            **ANSWER,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": None}, "finish_reason": "content_filter"}
            ],
        }
    ),
    "200-null-content": Reply(
        json={
            **ANSWER,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": None}, "finish_reason": "stop"}],
        }
    ),
    "200-no-usage": Reply(json={k: v for k, v in ANSWER.items() if k != "usage"}),
    "201": Reply(status=201, text="created"),
    "204": Reply(status=204, raw=""),
    "dropped": Reply(drop=True),
}

# Streams: events as providers send them, errors inside a 200 stream, and the ways a stream ends.
STREAMS: dict[str, Reply] = {
    "error-no-code": Reply(raw_stream=sse({"error": {"message": "boom", "type": "server_error", "code": None}})),
    "error-400": Reply(raw_stream=sse({"error": {"message": "Token limit reached", "code": 400}})),
    "error-429": Reply(raw_stream=sse({"error": {"message": "slow", "code": 429}})),
    "error-503": Reply(raw_stream=sse({"error": {"message": "busy", "code": 503}})),
    "error-string-code": Reply(raw_stream=sse({"error": {"message": "too long", "code": "context_length_exceeded"}})),
    "error-context-text": Reply(raw_stream=sse({"error": {"message": "This model's maximum context length is 10"}})),
    "error-rate-limit-text": Reply(raw_stream=sse({"error": {"message": "rate limit exceeded"}})),
    "error-after-text": Reply(raw_stream=sse(_chunk("hello "), {"error": {"message": "boom", "code": 500}})),
    "ok": Reply(raw_stream=sse(_chunk("hel"), _chunk("lo"), _chunk(finish="stop"), "[DONE]")),
    "ok-without-done": Reply(raw_stream=sse(_chunk("hel"), _chunk("lo"), _chunk(finish="stop"))),
    "no-finish-then-done": Reply(raw_stream=sse(_chunk("hel"), _chunk("lo"), "[DONE]")),
    "no-finish-no-done": Reply(raw_stream=sse(_chunk("hel"), _chunk("lo"))),
    "only-a-finish": Reply(raw_stream=sse(_chunk(finish="stop"), "[DONE]")),
    "filtered": Reply(raw_stream=sse(_chunk(finish="content_filter"), "[DONE]")),
    "filtered-after-text": Reply(raw_stream=sse(_chunk("x"), _chunk(finish="content_filter"), "[DONE]")),
    "not-json": Reply(raw_stream=[b"data: {not json\n\n"]),
    "keep-alive": Reply(raw_stream=[b": ping\n\n", *sse(_chunk("hi"), _chunk(finish="stop"), "[DONE]")]),
    "crlf": Reply(raw_stream=[b"data: " + json.dumps(_chunk("hi")).encode() + b"\r\n\r\n", b"data: "
                              + json.dumps(_chunk(finish="stop")).encode() + b"\r\n\r\ndata: [DONE]\r\n\r\n"]),
    "usage-and-cost": Reply(raw_stream=sse(_chunk("hi"), _chunk(finish="stop"), USAGE, "[DONE]")),
    "reasoning-first": Reply(raw_stream=sse(_chunk("", reasoning_content="think"), _chunk("ans"), _chunk(finish="stop"),
                                            "[DONE]")),
    "status-503": Reply(status=503),
    "status-429-text": Reply(status=429, json={"error": {"message": "rate limit hit", "code": 429}}),
    "status-400-context": Reply(status=400, json=_err("This model's maximum context length is 8192 tokens.")),
    "dropped": Reply(drop=True),
}  # fmt: skip

# Where the engines knowingly part, and why (README "Engines"); each side is checked to be what is written here.
# Same routing either way: server_error, connection and invalid_response are all transient and fallen back from.
DIFFERENT = {
    # A JSON body that is not a completion: LiteLLM's OpenRouter/vLLM client fails reading it, in its own words.
    ("orr", "200-empty-object"): ("server_error", "invalid_response"),
    ("vl", "200-empty-object"): ("server_error", "invalid_response"),
    ("orr", "200-list"): ("connection", "invalid_response"),
    ("vl", "200-list"): ("connection", "invalid_response"),
    ("orr", "200-no-message"): ("connection", "invalid_response"),
    ("vl", "200-no-message"): ("connection", "invalid_response"),
    # A dropped connection: LiteLLM's vLLM client reports it as a server error.
    ("vl", "dropped"): ("server_error", "connection"),
}
STREAM_DIFFERENT = {
    ("vl", "dropped"): ("server_error", "connection"),
    # A malformed event: LiteLLM's OpenAI client calls the stream broken; the direct engine, the answer unusable.
    ("oa", "not-json"): ("server_error", "invalid_response"),
    ("lm", "not-json"): ("server_error", "invalid_response"),
    # LiteLLM fails parsing an OpenRouter error object without a numeric code; the direct engine reads it as a
    # server error.
    ("orr", "error-string-code"): ("other", "server_error"),
    ("orr", "error-context-text"): ("bad_request", "server_error"),
    ("orr", "error-rate-limit-text"): ("bad_request", "server_error"),
    # A server that answers a stream request with one JSON body: LiteLLM finds no stream in it.
    ("oa", "json-answer"): ("invalid_response", "success"),
}


def _outcomes(
    engine: str, make_router: MakeRouter, up: Upstream, kind: str, cases: dict[str, Reply], stream: bool
) -> dict[str, tuple[str, int | None, Any]]:
    """(outcome, status, what came) of one call per case, on `kind`'s provider, sent by `engine`."""
    r = make_router(PARITY.replace("retry: {attempts: 1}", f"retry: {{attempts: 1}}\n  engine: {engine}"))
    out: dict[str, tuple[str, int | None, Any]] = {}
    # LiteLLM leaves the stream of a call that failed in a reference cycle; collected by whichever thread the
    # collector next runs in, it closes its response there, and a thread inside httpcore's pool lock then waits
    # for that lock forever (seen: a stream's reader thread, hung). So the collector runs only here, between
    # cases, where no request holds a lock; frozen once the first call has loaded everything, the heap LiteLLM
    # came with costs these collections nothing.
    gc.disable()
    try:
        return _each_case(r, up, kind, cases, stream, out)
    finally:
        gc.enable()
        gc.unfreeze()


def _each_case(
    r: Router, up: Upstream, kind: str, cases: dict[str, Reply], stream: bool, out: dict[str, Any]
) -> dict[str, tuple[str, int | None, Any]]:
    for i, (name, reply) in enumerate(cases.items()):
        gc.collect()
        if i == 1:
            gc.freeze()
        up.reset()
        up.enqueue(kind, reply)
        try:
            if stream:
                s = r.generate("hi", model=kind, stream=True)
                text = "".join(s)
                res = s.result
            else:
                res = r.generate("hi", model=kind)
                text = res.text
            assert res is not None
            # An estimate is each engine's own count (README "Engines"); a reported usage must be the same.
            usage = "estimated" if res.usage.estimated else res.usage
            cost = "estimated" if res.usage.estimated else res.cost_usd
            out[name] = ("success", None, (text, res.finish_reason, usage, cost, res.cost_source))
        except RouterError as exc:
            attempt = exc.attempts[-1]  # type: ignore[attr-defined]
            out[name] = (attempt.outcome, attempt.status_code, None)
    return out


def _check(
    kind: str, lit: dict[str, Any], direct: dict[str, Any], wire: dict[str, int | None], different: dict[Any, Any]
) -> None:
    wrong = []
    for name in lit:
        (lo, ls, lgot), (do, ds, dgot) = lit[name], direct[name]
        expected = different.get((kind, name))
        if expected is not None:
            if (lo, do) != expected:
                wrong.append(f"{name}: expected the documented difference {expected}, got litellm {lo}, direct {do}")
            continue
        if lo != do or lgot != dgot:
            wrong.append(f"{name}: litellm {lo} {lgot}, direct {do} {dgot}")
        # The status: the provider's, where LiteLLM reports the provider's; LiteLLM's own (429 for a "rate
        # limit" text, 500 for a body it could not read) is not copied.
        elif ds != (ls if ls == wire.get(name) else wire.get(name)):
            wrong.append(f"{name}: status litellm {ls}, direct {ds}, wire {wire.get(name)}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("kind", PARITY_KINDS)
def test_error_answers_are_classified_as_the_litellm_engine_classifies_them(
    kind: str, make_router: MakeRouter, up: Upstream
) -> None:
    cases = {f"{s}-{b}": make(s) for s in KIND_STATUSES[kind] for b, make in BODIES.items()} | ANSWERS
    wire = {name: reply.status if reply.status >= 300 and not reply.drop else None for name, reply in cases.items()}
    wire |= {"200-error-400": 400, "200-error-429": 429, "200-error-500": 500, "200-error-no-code": 400}

    lit = _outcomes("litellm", make_router, up, kind, cases, stream=False)
    direct = _outcomes("direct", make_router, up, kind, cases, stream=False)

    _check(kind, lit, direct, wire, DIFFERENT)


@pytest.mark.parametrize("kind", PARITY_KINDS)
def test_streams_are_read_and_classified_as_the_litellm_engine_reads_them(
    kind: str, make_router: MakeRouter, up: Upstream
) -> None:
    cases = dict(STREAMS)
    if kind == "oa":
        cases["json-answer"] = Reply(raw=json.dumps(ANSWER), content_type="application/json")
    lit = _outcomes("litellm", make_router, up, kind, cases, stream=True)
    direct = _outcomes("direct", make_router, up, kind, cases, stream=True)
    # Inside a 200 stream there is no HTTP status: each engine reports the one the error names (LiteLLM's own for
    # the OpenAI kinds). Statuses of error answers before the stream are the provider's.
    wire: dict[str, int | None] = {n: lit[n][1] for n in cases if n.startswith("error-")}
    wire |= {"status-503": 503, "status-429-text": 429, "status-400-context": 400}

    _check(kind, lit, direct, wire, STREAM_DIFFERENT)


def test_the_outcome_table_reads_status_and_text_as_litellm_does() -> None:
    # A few rows of http_outcome, the pure function both tests above hold to LiteLLM.
    assert http_outcome("openai", 400, '{"error": {"message": "rate limit hit"}}') == "rate_limit"
    assert http_outcome("openrouter", 400, '{"error": {"message": "rate limit hit"}}') == "bad_request"
    assert http_outcome("openai", 402, '{"error": {"message": "This model\'s maximum context length is 5"}}') == (
        "payment_required"
    )
    assert http_outcome("openai", 401, "This model's maximum context length is 5") == "context_window"
    assert http_outcome("openrouter", 429, '{"error": {"code": "context_length_exceeded"}}') == "context_window"
    assert http_outcome("openai", 504, "") == "timeout"
    assert http_outcome("openai", 418, "Expecting value: line 1") == "invalid_response"
    assert http_outcome("openai", 418, "teapot") == "other"
    assert http_outcome("hosted_vllm", 529, "") == "server_error"


def test_sse_events_are_parsed_across_any_cut_of_the_bytes() -> None:
    body = b': keep-alive\n\ndata: {"a": 1}\r\n\r\nevent: x\ndata: line one\ndata: line two\n\nid: 7\ndata:[DONE]\n\n'
    want = [b'{"a": 1}', b"line one\nline two", b"[DONE]"]
    for size in (1, 2, 3, 7, len(body)):
        sse_ = SSE()
        got = [e for i in range(0, len(body), size) for e in sse_.feed(body[i : i + size])]
        assert got + sse_.end() == want, size
    tail = SSE()
    assert tail.feed(b"data: last") == [] and tail.end() == [b"last"]  # a body that ends without a blank line


def test_usage_of_a_stream_without_one_is_estimated_by_a_documented_rule() -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
    ]

    usage = estimate_usage(messages, "one two three")

    # 3 for the answer's priming; per message 3 + ceil(chars / 4): 3 + 2 and 3 + 1; out: ceil(13 / 4)
    assert (usage.input_tokens, usage.output_tokens, usage.estimated) == (3 + 5 + 4, 4, True)


# -- the wall-clock deadline ----------------------------------------------------------------------------------

DEADLINE = """
version: 1
defaults: {engine: direct, timeout_s: 30, deadline_s: 60, retry: {attempts: 1}}
providers:
  a: {kind: openai, api_base: "{UP}/a/v1", api_key: "${KEY_A}"}
aliases:
  chat: {targets: [a/model-a]}
"""
BODY = json.dumps(ANSWER).encode()
HOSTILE = {
    "a body trickled a byte at a time": lambda: Reply(
        raw_stream=[BODY[i : i + 1] for i in range(len(BODY))], chunk_delays=0.3, content_type="application/json"
    ),
    "headers, then nothing": lambda: Reply(raw_stream=[BODY], chunk_delays=[6.0], content_type="application/json"),
    "accepted, never answered": lambda: Reply(delay_s=6.0),
}
SLACK_S = 0.5  # what a call may take past its timeout here: the loop's own work, a loaded machine


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
@pytest.mark.parametrize("hostile", HOSTILE, ids=list(HOSTILE))
def test_every_call_ends_by_its_timeout_whatever_the_upstream_does(
    hostile: str, sync: bool, make_router: MakeRouter, up: Upstream
) -> None:
    r = make_router(DEADLINE)
    up.enqueue("a", HOSTILE[hostile]())

    t0 = time.monotonic()
    with pytest.raises(RouterError) as info:
        if sync:
            r.generate("hi", timeout=1.0, model="chat")
        else:
            asyncio.run(r.agenerate("hi", timeout=1.0, model="chat"))
    took = time.monotonic() - t0

    assert took < 1.0 + SLACK_S, f"{took:.2f}s"
    (attempt,) = info.value.attempts  # type: ignore[attr-defined]
    assert attempt.outcome == "timeout" and "within 1s of the request" in (attempt.error or "")


# -- streams closed or dropped, from any thread ---------------------------------------------------------------


def _established(port: int) -> int:
    """TCP connections of this process to `port` that are still established (from /proc: no psutil)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if int(f[2].rsplit(":", 1)[1], 16) == port and f[3] == "01" and f[9] in inodes:
                n += 1
    return n


def _readers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "llm-router-stream" and t.is_alive()]


@pytest.mark.parametrize("how", ["closed", "dropped"])
def test_a_sync_stream_closed_or_dropped_frees_its_thread_and_socket_within_a_second(
    how: str, make_router: MakeRouter, up: Upstream
) -> None:
    r = make_router(DEADLINE)
    port = int(up.url.rsplit(":", 1)[1])
    idle = _established(port)  # kept-alive connections of other tests' pools
    up.set_default("a", Reply(raw_stream=sse(_chunk("first "), _chunk("late", "stop")), chunk_delays=[0.0, 20.0]))
    streams = [r.generate("hi", model="chat", stream=True) for _ in range(40)]
    assert all(next(s) == "first " for s in streams)
    assert len(_readers()) == 40 and _established(port) >= 40

    t0 = time.monotonic()
    if how == "closed":
        for stream in streams:
            stream.close()
        del stream
    streams.clear()
    gc.collect()
    while (_readers() or _established(port) > idle) and time.monotonic() - t0 < 3:
        time.sleep(0.02)
    took = time.monotonic() - t0

    left = (len(_readers()), _established(port))
    assert all(n == 0 for sh in direct_engine.ENGINE.pools._sync.values() for n in sh.load)  # clients given back
    assert left[0] == 0 and left[1] <= idle and took < 1.0, f"{took:.2f}s; threads, connections: {left}; idle {idle}"
    up.set_default("a", None)
    assert r.generate("again", model="chat").text == "[simulated] again"  # the pool is fine


# -- pools --------------------------------------------------------------------------------------------------


def test_calls_share_one_kept_alive_connection_per_pool(make_router: MakeRouter, up: Upstream) -> None:
    r = make_router(DIRECT.replace("{UP}/a/v1", "{UP}/keepalive/v1"))  # a provider no other test has a pool for
    port = int(up.url.rsplit(":", 1)[1])
    before = _established(port)
    for _ in range(5):
        r.generate("hello", model="chat")
        assert "".join(r.generate("hello", model="chat", stream=True)) == "[simulated] hello"
    assert _established(port) - before == 1  # streams read to their [DONE] give their connection back too

    async def calls() -> None:
        for _ in range(5):
            await r.agenerate("hello", model="chat")
            assert "".join([d async for d in await r.agenerate("hello", model="chat", stream=True)])
        assert _established(port) - before == 2  # the async pool's own connection, on this loop

    asyncio.run(calls())
    assert len(up.requests("keepalive")) == 20


def test_fifty_concurrent_calls_share_one_async_pool(make_router: MakeRouter, up: Upstream) -> None:
    r = make_router(DIRECT)
    up.set_default("a", lambda rec: Reply(text=f"echo {rec.prompt}", delay_s=0.01))

    async def calls() -> list[str]:
        results = await asyncio.gather(*(r.agenerate(f"p{i}", model="chat") for i in range(50)))
        return [res.text for res in results]

    assert asyncio.run(calls()) == [f"echo p{i}" for i in range(50)]
    assert len(up.requests("a")) == 50
    # httpcore's pool costs the square of its connections per request: no client holds more than SHARD of them
    (shards,) = [sh for loop in direct_engine.ENGINE.pools._async.values() for k, sh in loop.items() if k[0] == "a"]
    pools = [client._transport._pool for client in shards.clients]
    assert len(pools) >= 50 // direct_engine.SHARD and all(len(p.connections) <= direct_engine.SHARD for p in pools)
    assert shards.load == [0] * len(pools)  # every request gave its client back


def test_each_key_of_a_pool_has_its_own_client(make_router: MakeRouter, up: Upstream) -> None:
    r = make_router(
        DIRECT.replace(
            'api_key: "${KEY_A}"\n    headers',
            'api_key: [{name: one, key: "${KEY_A}"}, {name: two, key: "${KEY_B}"}]\n    headers',
        )
    )
    for key in ("one", "two", "one"):
        r.generate("hello", model="chat", key=key)

    assert [rec.headers["authorization"] for rec in up.history] == [f"Bearer {k}" for k in (KEY_A, KEY_B, KEY_A)]
    pools = [k for k in direct_engine.ENGINE.pools._sync if k[0] == "a" and k[1] == f"{up.url}/a/v1"]
    assert sorted(k[2] or "" for k in pools) == sorted([KEY_A, KEY_B])


def test_a_provider_whose_headers_change_gets_a_new_client(make_router: MakeRouter, up: Upstream) -> None:
    make_router(DIRECT).generate("hello", model="chat")
    make_router(DIRECT.replace("X-Team: blue", "X-Team: green")).generate("hello", model="chat")

    assert [rec.headers["x-team"] for rec in up.history] == ["blue", "green"]


def test_a_call_per_asyncio_run_works_and_leaves_no_client_behind(r: Router, up: Upstream) -> None:
    texts = [asyncio.run(r.agenerate(f"call {i}", model="chat")).text for i in range(3)]

    assert texts == [f"[simulated] call {i}" for i in range(3)]
    loops = direct_engine.ENGINE.pools._async
    assert sum(1 for loop in loops if loop.is_closed()) <= 1  # each new loop drops the closed ones' clients


def test_a_forked_worker_opens_its_own_connections(r: Router, up: Upstream) -> None:
    r.generate("hello", model="chat")
    assert direct_engine.ENGINE.pools._sync
    read, write = os.pipe()
    with warnings.catch_warnings():  # Python 3.12+ warns about forking a process with threads: that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: no client of the parent's, and its own connection works
        try:
            pools = direct_engine.ENGINE.pools
            fresh = not pools._sync and not pools._async
            ok = fresh and r.generate("from the child", model="chat").text == "[simulated] from the child"
            os.write(write, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(write)
    got = os.read(read, 1)
    os.waitpid(pid, 0)
    os.close(read)

    assert got == b"1"
    assert r.generate("hello again", model="chat").text == "[simulated] hello again"


# -- prices and capabilities, without LiteLLM ------------------------------------------------------------------

PRICED = [
    ("openai", "gpt-4o-mini"),
    ("openai", "o3-mini"),
    ("openai", "gpt-3.5-turbo"),  # priced, no JSON Schema
    ("openai", "no-such-model"),
    ("openai", "claude-opus-9"),  # unknown, but LiteLLM's generalization rules say what a Claude takes
    ("openrouter", "openai/gpt-4o-mini"),  # OpenRouter ids the map does not list
    ("openrouter", "anthropic/claude-sonnet-4"),
    ("openrouter", "google/gemini-2.5-flash:free"),  # a free variant: $0
    ("openrouter", "google/gemini-2.5-flash"),  # known to the rules, unpriced: not $0
    ("hosted_vllm", "Qwen/Qwen2.5-7B"),
    ("lm_studio", "qwen2.5-7b"),  # LiteLLM takes every LM Studio model to take a JSON Schema
]


@pytest.mark.parametrize(("kind", "model"), PRICED)
def test_prices_and_capabilities_are_litellms_read_from_its_file(kind: str, model: str) -> None:
    from router.engines.litellm import ENGINE as LITELLM

    text = f"version: 1\nproviders:\n  p: {{kind: {kind}, api_key: k, api_base: 'http://x/v1'}}\naliases:\n  a: {{targets: [p/{model}]}}\n"  # noqa: E501
    (target,) = parse_config(text, "t.yaml", env={}).targets("a")
    u = Usage(1000, 500)
    direct = direct_engine.ENGINE
    cost = LITELLM.price_map_cost(target, u)
    assert direct.price_map_cost(target, u) == (None if cost is None else pytest.approx(cost))
    assert direct.supports_schema(target) == LITELLM.supports_schema(target)
    assert direct.max_output_tokens(target) == LITELLM.max_output_tokens(target)


NO_LITELLM = """
import asyncio, json, sys
from prometheus_client import CollectorRegistry
import router
from router import Router, parse_config
from router.sandbox import Reply, Upstream

with Upstream() as up:
    cfg = parse_config('''
version: 1
defaults: {engine: direct, timeout_s: 5}
providers:
  a: {kind: openai, api_base: "URL/a/v1", api_key: sk-a}
  o: {kind: openrouter, api_base: "URL/o/v1", api_key: sk-o}
aliases:
  mini: {targets: [a/gpt-4o-mini]}
  routed: {targets: [o/openai/gpt-4o-mini]}
'''.replace("URL", up.url), "t.yaml")
    router.preload(cfg)  # a gunicorn master's: the engines this config uses, and no other
    r = Router(cfg, registry=CollectorRegistry())
    up.enqueue("a", Reply(usage=(1000, 500)), Reply(text='{"city": "Paris"}'))
    up.enqueue("a", Reply(text="one two", stream_usage=False))
    priced = r.generate("hello", model="mini")
    parsed = r.generate("city?", model="mini", response_format={"type": "object"})
    stream = r.generate("hello", model="mini", stream=True)
    "".join(stream)
    up.enqueue("o", Reply(cost=0.25))
    routed = asyncio.run(r.agenerate("hello", model="routed"))
    print(json.dumps({
        "priced": [priced.cost_usd, priced.cost_source], "parsed": parsed.parsed,
        "schema_sent": "response_format" in up.requests("a")[1].body,
        "streamed": [stream.result.usage.estimated, stream.result.cost_source],
        "routed": [routed.cost_usd, routed.cost_source],
        "imported": sorted(m for m in ("litellm", "openai", "tiktoken") if m in sys.modules),
    }))
"""


def test_a_process_whose_targets_are_all_direct_never_imports_litellm() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", NO_LITELLM], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr

    got = json.loads(out.stdout)

    prompt, completion = litellm.cost_per_token(
        model="gpt-4o-mini", custom_llm_provider="openai", prompt_tokens=1000, completion_tokens=500
    )
    assert got["priced"] == [pytest.approx(prompt + completion), "litellm"]  # LiteLLM's price, from its file
    assert got["parsed"] == {"city": "Paris"} and got["schema_sent"] is True
    assert got["streamed"] == [True, "litellm"]
    assert got["routed"] == [0.25, "provider"]
    assert got["imported"] == []


# -- a stream broken after text --------------------------------------------------------------------------------


def test_a_stream_cut_after_text_says_how_it_broke(r: Router, up: Upstream) -> None:
    up.enqueue("a", Reply(text="one two three four five six", cut_after=1))

    stream = r.generate("hello", model="chat", stream=True)
    deltas = []
    with pytest.raises(StreamInterruptedError) as info:
        for d in stream:
            deltas.append(d)

    assert deltas == ["one two three "] and info.value.text == "one two three "
    assert "incomplete chunked read" in (info.value.attempts[-1].error or "")
    assert isinstance(info.value.__cause__, Exception) and "RemoteProtocolError" in type(info.value.__cause__).__name__
