"""The gateway in process: the official OpenAI SDK on `router.openai_client()` / `async_openai_client()` against
the loopback upstream, and the same `Gateway` app under a plain httpx client for what the SDK cannot send.

What only a Router in the test's own process shows is checked here: metrics on the test's registry, ledger rows
and budgets, a client that leaves mid-stream. tests/test_gateway_serve.py runs the SDK against `llm-router
serve` over HTTP too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import openai
import pydantic
import pytest
from conftest import KEY_A, MakeRouter, standard_config
from gateway_server import GATEWAY_KEYS, GW_BILLING, GW_SEARCH, gateway_env, sse_frames
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

import router
from router import Router
from router.gateway.app import Gateway
from router.gateway.inprocess import BASE_URL, InProcessTransport
from router.sandbox import Reply, Upstream
from router.usage import read_calls


def ask(text: str = "hello there") -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
def r(make_router: MakeRouter) -> Iterator[Router]:
    r = make_router(real_sleep=True)
    yield r
    r.close()


@pytest.fixture
def client(r: Router) -> Iterator[openai.OpenAI]:
    c = router.openai_client(r, max_retries=0)
    yield c
    c.close()


@pytest.fixture
def http(r: Router) -> Iterator[httpx.Client]:
    """A plain httpx client on the same in-process transport, for requests the SDK would not send."""
    c = httpx.Client(transport=InProcessTransport(Gateway(r)), base_url=BASE_URL.removesuffix("/v1"))
    yield c
    c.close()


# -- answers ------------------------------------------------------------------------------------------------------


def test_a_plain_answer_in_openais_shape_with_where_it_came_from(client: openai.OpenAI, up: Upstream) -> None:
    up.enqueue("a", Reply(text="Queues hold work.", usage=(7, 4)))

    raw = client.chat.completions.with_raw_response.create(
        model="chat", messages=ask("What is a queue?"), temperature=0.2, max_tokens=50, seed=7, stop=["\n\n"],
        extra_headers={"x-request-id": "trace-123"},
    )  # fmt: skip
    res = raw.parse()

    assert res.object == "chat.completion" and res.id.startswith("chatcmpl-")
    assert res.model == "chat"  # the alias asked for; which provider and model answered is in the headers
    assert res.choices[0].message.content == "Queues hold work."
    assert res.choices[0].message.role == "assistant" and res.choices[0].finish_reason == "stop"
    assert (res.usage.prompt_tokens, res.usage.completion_tokens, res.usage.total_tokens) == (7, 4, 11)
    h = raw.headers
    assert (h["x-llm-router-provider"], h["x-llm-router-model"], h["x-llm-router-cached"]) == ("a", "model-a", "false")
    assert h["x-llm-router-attempts"] == "1" and h["x-llm-router-fallbacks"] == "0"
    assert float(h["x-llm-router-cost-usd"]) == 0.0 and h["x-llm-router-cost-source"] == "unknown"
    assert h["x-request-id"] == "trace-123"
    sent = up.requests("a")[-1].body
    assert (sent["temperature"], sent["max_tokens"], sent["seed"], sent["stop"]) == (0.2, 50, 7, ["\n\n"])


def test_a_fallback_shows_in_the_headers(client: openai.OpenAI, up: Upstream) -> None:
    up.enqueue("a", Reply(status=503, error="overloaded"), Reply(status=503, error="overloaded"))
    up.enqueue("b", Reply(text="from b"))

    raw = client.chat.completions.with_raw_response.create(model="chat", messages=ask())

    assert raw.parse().choices[0].message.content == "from b"
    assert raw.headers["x-llm-router-provider"] == "b" and raw.headers["x-llm-router-fallbacks"] == "1"
    assert raw.headers["x-request-id"].startswith("req_")


def test_messages_of_every_role_reach_the_provider(client: openai.OpenAI, up: Upstream) -> None:
    up.enqueue("a", Reply(text="done"))
    messages: list[Any] = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Paris"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18C, sunny"},
        {"role": "user", "content": [{"type": "text", "text": "And so?"}]},
    ]

    client.chat.completions.create(model="chat", messages=messages, user="u-17")

    got = up.requests("a")[-1].body["messages"]
    assert [m["role"] for m in got] == ["system", "user", "assistant", "tool", "user"]  # developer is a system message
    assert got[2]["tool_calls"][0]["function"]["name"] == "weather" and got[3]["tool_call_id"] == "call_1"


def test_a_stream_in_openais_chunks_with_the_usage_chunk(client: openai.OpenAI, up: Upstream) -> None:
    up.enqueue("a", Reply(text="Streams arrive in pieces.", usage=(5, 6)))

    chunks = list(
        client.chat.completions.create(
            model="chat", messages=ask(), stream=True, stream_options={"include_usage": True}
        )
    )

    assert all(c.object == "chat.completion.chunk" and c.model == "chat" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Streams arrive in pieces."
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (5, 6)
    assert all(c.usage is None for c in chunks[:-1])
    assert last.model_extra is not None and last.model_extra["llm_router"]["provider"] == "a"


def test_a_stream_without_include_usage_has_no_usage_chunk(client: openai.OpenAI, up: Upstream) -> None:
    up.enqueue("a", Reply(text="no usage here"))

    chunks = list(client.chat.completions.create(model="chat", messages=ask(), stream=True))

    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "no usage here"


class Verdict(pydantic.BaseModel):
    label: Literal["spam", "ham"]
    confidence: float


def test_parse_with_a_pydantic_model(client: openai.OpenAI, up: Upstream) -> None:
    up.enqueue("a", Reply(text='{"label": "spam", "confidence": 0.93}'))

    res = client.chat.completions.parse(model="chat", messages=ask("WIN A FREE CRUISE"), response_format=Verdict)

    assert res.choices[0].message.parsed == Verdict(label="spam", confidence=0.93)


def test_a_reply_that_does_not_validate_is_retried_by_the_router(client: openai.OpenAI, up: Upstream) -> None:
    up.enqueue("a", Reply(text="not json"), Reply(text='{"label": "ham", "confidence": 0.5}'))

    res = client.chat.completions.parse(model="chat", messages=ask(), response_format=Verdict)

    assert res.choices[0].message.parsed == Verdict(label="ham", confidence=0.5)
    assert len(up.requests("a")) == 2


def test_json_object_and_a_validated_answer_streamed(client: openai.OpenAI, up: Upstream) -> None:
    up.enqueue("a", Reply(text='{"ok": true, "items": [1, 2, 3]}'))

    chunks = list(
        client.chat.completions.create(
            model="chat", messages=ask(), stream=True, response_format={"type": "json_object"}
        )
    )

    assert json.loads("".join(c.choices[0].delta.content or "" for c in chunks if c.choices)) == {
        "ok": True,
        "items": [1, 2, 3],
    }
    assert not up.requests("a")[-1].stream  # validated whole first, then sent as a stream


@pytest.mark.asyncio
async def test_the_async_client_answers_and_streams(r: Router, up: Upstream) -> None:
    up.enqueue("a", Reply(text="async answer"), Reply(text="async stream of text"))
    client = router.async_openai_client(r, max_retries=0)
    try:
        res = await client.chat.completions.create(model="chat", messages=ask())
        stream = await client.chat.completions.create(model="chat", messages=ask(), stream=True)
        deltas = [c.choices[0].delta.content or "" async for c in stream]
    finally:
        await client.close()

    assert res.choices[0].message.content == "async answer"
    assert "".join(deltas) == "async stream of text"


# -- requests refused ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"model": "chat", "messages": [{"role": "user", "content": "x"}], "foo": 1, "bar": 2}, 400, "bar, foo"),
        ({"model": "chat", "messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n must be 1"),
        ({"model": "chat", "messages": [{"role": "user", "content": "x"}], "logprobs": True}, 400, "log probabilities"),
        ({"model": "chat", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "temperature"),
        ({"model": "chat", "messages": []}, 400, "messages must be a non-empty list"),
        ({"model": "chat", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "x"}]}, 400, "model is required"),
        ({"model": "chta", "messages": [{"role": "user", "content": "x"}]}, 404, "did you mean 'chat'"),
    ],
)
def test_bad_requests_are_refused_naming_what_is_wrong(
    http: httpx.Client, up: Upstream, body: dict[str, Any], status: int, says: str
) -> None:
    resp = http.post("/v1/chat/completions", json=body)

    assert resp.status_code == status
    err = resp.json()["error"]
    assert says in err["message"] and set(err) == {"message", "type", "param", "code"}
    assert up.history == []  # nothing reached a provider


def test_a_body_that_is_not_json_is_a_400(http: httpx.Client) -> None:
    resp = http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert resp.status_code == 400 and "not valid JSON" in resp.json()["error"]["message"]


def test_unknown_paths_and_methods(http: httpx.Client) -> None:
    assert http.get("/v1/chat/completions").status_code == 405
    assert http.post("/v1/embeddings", json={}).status_code == 404
    assert http.post("/healthz").status_code == 405


def test_a_providers_400_is_a_400_with_its_message_scrubbed(client: openai.OpenAI, up: Upstream) -> None:
    up.enqueue("a", Reply(status=400, error=f"bad max_tokens for key {KEY_A} at http://10.0.0.7:8000/v1"))

    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="chat", messages=ask())

    err = info.value.body
    assert isinstance(err, dict) and "bad max_tokens" in err["message"]
    assert KEY_A not in str(err) and "10.0.0.7" not in str(err) and "litellm" not in str(err)
    assert len(up.requests("b")) == 0  # not fallen back from


def test_every_target_failing_is_a_502_the_sdk_retries(r: Router, up: Upstream, registry: CollectorRegistry) -> None:
    for route in "abc":
        up.set_default(route, Reply(status=503, error="overloaded"))
    client = router.openai_client(r, max_retries=1)

    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="chat", messages=ask())

    assert info.value.status_code == 502
    assert "every target failed" in info.value.message
    assert sample(registry, "llm_router_gateway_responses_total", route="chat", status="502") == 2  # retried once
    assert sample(registry, "llm_router_requests_total", alias="chat", outcome="server_error") == 2


def test_the_deadline_is_a_504(make_router: MakeRouter, up: Upstream) -> None:
    text = standard_config().replace("deadline_s: 20", "deadline_s: 0.3")
    r = make_router(text, real_sleep=True)
    up.set_default("a", Reply(text="late", delay_s=1.0))
    client = router.openai_client(r, max_retries=0)

    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="single", messages=ask())

    assert info.value.status_code == 504
    assert isinstance(info.value.body, dict) and info.value.body["code"] in ("deadline_exceeded", "timeout")


def test_a_stream_that_breaks_after_text_ends_with_an_error_event(client: openai.OpenAI, up: Upstream) -> None:
    up.enqueue("a", Reply(text="one two three four five six", cut_after=1))

    got: list[str] = []
    with pytest.raises(openai.APIError) as info:
        for c in client.chat.completions.create(model="chat", messages=ask(), stream=True):
            got.append(c.choices[0].delta.content or "")

    assert "".join(got).startswith("one")  # what came before the break was sent
    assert "broke off" in info.value.message


# -- keys and tenants ---------------------------------------------------------------------------------------------


@pytest.fixture
def keyed(make_router: MakeRouter, tmp_path: Path) -> Iterator[Router]:
    db = tmp_path / "ledger.sqlite3"
    extra = GATEWAY_KEYS + f'ledger: {{path: "{db}", flush_interval_s: 0.05}}\n'
    r = make_router(extra=extra, env=gateway_env(), real_sleep=True)
    yield r
    r.close()


def test_with_keys_every_request_needs_one(keyed: Router, up: Upstream, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for key in (None, "gw-nobody-0000000000000000", GW_SEARCH[:-1]):
        client = router.openai_client(keyed, api_key=key, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as info:
            client.chat.completions.create(model="chat", messages=ask())
        assert info.value.status_code == 401 and (key is None or key not in info.value.message)
    assert up.history == []
    assert GW_SEARCH not in caplog.text and GW_BILLING not in caplog.text
    assert GW_SEARCH not in repr(keyed.config) and GW_SEARCH not in str(keyed.config.gateway)

    answer = router.openai_client(keyed, api_key=GW_SEARCH).chat.completions.create(model="chat", messages=ask())
    assert answer.choices[0].message.content


def test_a_key_may_use_only_its_aliases(keyed: Router, up: Upstream) -> None:
    billing = router.openai_client(keyed, api_key=GW_BILLING, max_retries=0)
    search = router.openai_client(keyed, api_key=GW_SEARCH, max_retries=0)

    with pytest.raises(openai.PermissionDeniedError) as info:
        billing.chat.completions.create(model="chat", messages=ask())
    assert info.value.status_code == 403 and "may use: single" in info.value.message
    assert up.history == []
    assert billing.chat.completions.create(model="single", messages=ask()).choices[0].message.content

    assert [m.id for m in billing.models.list()] == ["single"]
    assert [m.id for m in search.models.list()] == ["chat", "single"]
    assert billing.models.retrieve("single").id == "single"
    with pytest.raises(openai.NotFoundError):
        billing.models.retrieve("chat")


def test_a_keys_tags_reach_the_ledger(keyed: Router, up: Upstream) -> None:
    router.openai_client(keyed, api_key=GW_SEARCH).chat.completions.create(model="chat", messages=ask(), user="u-17")
    router.openai_client(keyed, api_key=GW_BILLING).chat.completions.create(model="single", messages=ask())
    keyed.close()  # flushes the ledger

    rows = read_calls(keyed.config, since=0)
    assert [r["tags"] for r in rows] == [
        {"team": "search", "gateway_key": "search", "user": "u-17"},
        {"team": "billing", "gateway_key": "billing"},
    ]


def test_a_budget_per_team_is_a_429_the_sdk_does_not_retry(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry, tmp_path: Path
) -> None:
    extra = GATEWAY_KEYS + (
        f'ledger: {{path: "{tmp_path / "l.sqlite3"}", flush_interval_s: 0.05}}\n'
        "pricing:\n  a/model-a: {input_per_1m: 0, output_per_1m: 1000}\n"
        "budgets:\n  - {name: per-team, per_tag: team, period: day, limit_usd: 0.15}\n"
    )
    r = make_router(extra=extra, env=gateway_env(), real_sleep=True)
    up.set_default("a", Reply(text="ok", usage=(5, 100)))
    search = router.openai_client(r, api_key=GW_SEARCH, max_retries=2)

    search.chat.completions.create(model="single", messages=ask(), max_tokens=100)  # $0.10 of $0.15
    with pytest.raises(openai.RateLimitError) as info:
        search.chat.completions.create(model="single", messages=ask(), max_tokens=100)

    assert info.value.status_code == 429 and info.value.code == "insufficient_quota"
    assert info.value.response.headers["x-should-retry"] == "false"
    assert "per-team" in info.value.message and "(search)" in info.value.message
    assert sample(registry, "llm_router_gateway_responses_total", route="chat", status="429") == 1  # not retried
    assert len(up.requests("a")) == 1
    # the other team's budget is its own
    billing = router.openai_client(r, api_key=GW_BILLING, max_retries=0)
    assert billing.chat.completions.create(model="single", messages=ask(), max_tokens=100).choices
    r.close()


# -- a client that leaves -----------------------------------------------------------------------------------------


def slow_stream(up: Upstream, route: str = "a", n: int = 40, pause: float = 0.1) -> None:
    words = [f"w{i} " for i in range(n)]
    up.enqueue(route, Reply(raw_stream=sse_frames(*words), chunk_delays=[0, *([pause] * (len(words) + 2))]))


def test_a_client_that_leaves_mid_stream_cancels_the_call_and_frees_its_budget(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry, tmp_path: Path
) -> None:
    extra = (
        f'ledger: {{path: "{tmp_path / "l.sqlite3"}", flush_interval_s: 0.05}}\n'
        "pricing:\n  a/model-a: {input_per_1m: 0, output_per_1m: 1000}\n"
        "budgets:\n  - {name: all, period: day, limit_usd: 0.15}\n"  # room for one hold of $0.10 at a time
    )
    r = make_router(extra=extra, real_sleep=True)
    client = router.openai_client(r, max_retries=0)
    slow_stream(up)

    t0 = time.monotonic()
    with client.chat.completions.create(model="single", messages=ask(), stream=True, max_tokens=100) as stream:
        got = [next(stream).choices[0].delta.content, next(stream).choices[0].delta.content]
    assert got == ["", "w0 "] and time.monotonic() - t0 < 2  # left long before the 4 s stream's end

    deadline = time.monotonic() + 5
    while sample(registry, "llm_router_requests_total", alias="single", outcome="cancelled") == 0:
        assert time.monotonic() < deadline, "the call was not cancelled"
        time.sleep(0.02)
    labels = {"alias": "single", "provider": "a", "model": "model-a"}
    assert sample(registry, "llm_router_attempts_total", **labels, outcome="cancelled") == 1
    assert sample(registry, "llm_router_in_flight", alias="single") == 0
    assert sample(registry, "llm_router_gateway_responses_total", route="chat", status="499") == 1
    # Its hold is released: the budget has room for the next call's worst case again.
    up.enqueue("a", Reply(text="again", usage=(5, 100)))
    assert client.chat.completions.create(model="single", messages=ask(), max_tokens=100).choices
    r.close()


@pytest.mark.asyncio
async def test_an_async_client_that_leaves_cancels_the_call(
    r: Router, up: Upstream, registry: CollectorRegistry
) -> None:
    slow_stream(up)
    client = router.async_openai_client(r, max_retries=0)
    stream = await client.chat.completions.create(model="single", messages=ask(), stream=True)
    async for _ in stream:
        break
    await stream.close()

    for _ in range(250):
        if sample(registry, "llm_router_requests_total", alias="single", outcome="cancelled"):
            break
        await asyncio.sleep(0.02)
    assert sample(registry, "llm_router_requests_total", alias="single", outcome="cancelled") == 1
    assert sample(registry, "llm_router_in_flight", alias="single") == 0
    await client.close()


def test_a_client_that_times_out_waiting_cancels_the_call(r: Router, up: Upstream, registry: CollectorRegistry) -> None:
    router.preload()  # the first call imports LiteLLM, on the event loop: not inside the timeout
    up.enqueue("a", Reply(text="too late", delay_s=3))
    client = router.openai_client(r, max_retries=0, timeout=0.3)

    t0 = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(model="single", messages=ask())

    assert time.monotonic() - t0 < 2
    assert sample(registry, "llm_router_requests_total", alias="single", outcome="cancelled") == 1
    assert (
        sample(
            registry, "llm_router_attempts_total", alias="single", provider="a", model="model-a", outcome="cancelled"
        )
        == 1
    )
    assert sample(registry, "llm_router_in_flight", alias="single") == 0


# -- health, readiness, metrics -----------------------------------------------------------------------------------


def test_health_readiness_and_metrics(http: httpx.Client, r: Router, client: openai.OpenAI) -> None:
    client.chat.completions.create(model="chat", messages=ask())

    assert http.get("/healthz").json() == {"status": "ok"}
    ready = http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert ready.json()["config"]["sha256"] == r.config.sha256
    metrics = http.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    names = {f.name for f in text_string_to_metric_families(metrics.text)}
    assert {"llm_router_requests", "llm_router_gateway_responses"} <= names


def test_an_alias_with_no_usable_target_is_not_ready(make_router: MakeRouter) -> None:
    r = make_router(env={"KEY_A": KEY_A})  # b and c have no key: chat still has a, but "bonly" has nothing
    text = standard_config(aliases="bonly: {targets: [b/model-b]}")
    r = make_router(text, env={"KEY_A": KEY_A})
    http = httpx.Client(transport=InProcessTransport(Gateway(r)), base_url="http://gw")

    ready = http.get("/readyz")

    assert ready.status_code == 503
    assert ready.json()["problems"] == ["alias 'bonly' has no usable target (all disabled or without keys)"]
    assert ready.json()["usable_targets"] == {"chat": 1, "single": 1, "bonly": 0}


# -- tool calls ---------------------------------------------------------------------------------------------------

WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def tool_call_answer() -> dict[str, Any]:
    call = {"id": "call_7", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
    return {
        "id": "c1",
        "object": "chat.completion",
        "created": 0,
        "model": "model-a",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": None, "tool_calls": [call]},
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {"prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29},
    }


def tool_call_frames() -> list[bytes]:
    def event(delta: dict[str, Any] | None, finish: str | None = None, **more: Any) -> bytes:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
        body = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "model-a", "choices": choices}
        return f"data: {json.dumps({**body, **more})}\n\n".encode()

    first = {"index": 0, "id": "call_7", "type": "function", "function": {"name": "weather", "arguments": ""}}
    return [
        event({"role": "assistant", "content": None, "tool_calls": [first]}),
        event({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
        event({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
        event({}, "tool_calls"),
        event(None, usage={"prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29}),
        b"data: [DONE]\n\n",
    ]


def test_tools_go_to_the_provider_and_its_tool_calls_come_back(client: openai.OpenAI, up: Upstream) -> None:
    up.enqueue("a", Reply(json=tool_call_answer()))

    res = client.chat.completions.create(
        model="chat", messages=ask("Weather in Paris?"), tools=[WEATHER_TOOL], tool_choice="auto",
        parallel_tool_calls=False,
    )  # fmt: skip

    choice = res.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert (call.id, call.type, call.function.name) == ("call_7", "function", "weather")
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    sent = up.requests("a")[-1].body
    assert sent["tools"] == [WEATHER_TOOL] and sent["tool_choice"] == "auto" and sent["parallel_tool_calls"] is False


def test_streamed_tool_calls_reach_the_sdks_stream_helper(client: openai.OpenAI, up: Upstream) -> None:
    up.enqueue("a", Reply(raw_stream=tool_call_frames()))

    with client.chat.completions.stream(model="chat", messages=ask("Weather?"), tools=[WEATHER_TOOL]) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()

    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert (call.id, call.function.name, json.loads(call.function.arguments)) == (
        "call_7",
        "weather",
        {"city": "Paris"},
    )
