"""Tests for router.sandbox: the simulated upstream, driven by litellm's real HTTP clients."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

import litellm
import pytest
from litellm.exceptions import MidStreamFallbackError

from router.sandbox import Received, Reply, Upstream, simulated_providers, simulated_text

litellm.suppress_debug_info = True

# pydantic warns (UserWarning) while litellm builds its response models; it is theirs, not ours, and
# pyproject's filterwarnings=error would turn it into an exception inside litellm.completion().

ROOT = Path(__file__).resolve().parents[1]
MSGS = [{"role": "user", "content": "hello sandbox"}]
ANTHROPIC_MODEL = "anthropic/claude-3-5-sonnet-20241022"


@pytest.fixture
def up():
    """A fresh upstream per test (shadows conftest's shared one, so these tests stand alone)."""
    with Upstream() as u:
        yield u


def kw(up: Upstream, route: str = "a", **extra):
    args = dict(
        model="openai/gpt-x",
        api_base=up.base_url(route),
        api_key="sk-test",
        max_retries=0,
        timeout=5,
        messages=MSGS,
    )
    args.update(extra)
    return args


def raw_post(up: Upstream, path: str, body: dict, conn: http.client.HTTPConnection | None = None):
    c = conn or http.client.HTTPConnection("127.0.0.1", int(up.url.rsplit(":", 1)[1]), timeout=5)
    c.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = c.getresponse()
    return r.status, dict(r.headers), r.read()


def content(data: bytes) -> str:
    return json.loads(data)["choices"][0]["message"]["content"]


# --- server basics (no litellm) ------------------------------------------------


def test_import_is_light():
    code = "import sys, router.sandbox; bad = {'litellm', 'aiohttp', 'httpx'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_url_requires_start_and_base_urls():
    u = Upstream()
    with pytest.raises(RuntimeError):
        _ = u.url
    with u:
        assert u.url.startswith("http://127.0.0.1:")
        assert u.base_url("x") == f"{u.url}/x/v1"
        assert u.base_url("x", "anthropic") == f"{u.url}/x"
        with pytest.raises(ValueError):
            u.base_url("x", "gopher")


def test_queue_fifo_then_default_keepalive_and_reset(up):
    up.enqueue("r", Reply(text="first"), Reply(text="second"))
    conn = http.client.HTTPConnection("127.0.0.1", int(up.url.rsplit(":", 1)[1]), timeout=5)
    body = {"model": "m", "messages": [{"role": "user", "content": "ping pong"}]}
    texts = []
    for path in ("/r/v1/chat/completions", "/r/chat/completions", "/r/v1/chat/completions"):
        status, headers, data = raw_post(up, path, body, conn)  # same keep-alive connection
        assert status == 200 and int(headers["Content-Length"]) == len(data)
        texts.append(content(data))
    assert texts == ["first", "second", "[simulated] ping pong"]

    up.set_default("r", lambda rec: Reply(text=f"model={rec.model}"))
    assert content(raw_post(up, "/r/v1/chat/completions", body, conn)[2]) == "model=m"
    up.set_default("r", Reply(status=418, error="teapot"))
    status, _, data = raw_post(up, "/r/v1/chat/completions", body, conn)
    assert status == 418
    assert json.loads(data) == {"error": {"message": "teapot", "type": "invalid_request_error", "code": 418}}

    assert len(up.history) == 5 and len(up.requests("r")) == 5 and up.requests("other") == []
    up.enqueue("r", Reply(text="stale"))
    up.reset()
    assert up.history == [] and up.route("r").pending == 0
    assert content(raw_post(up, "/r/v1/chat/completions", body, conn)[2]) == "[simulated] ping pong"


def test_unknown_path_is_404_json_and_recorded(up):
    up.enqueue("r", Reply(text="must not be consumed"))
    status, headers, data = raw_post(up, "/r/v1/embeddings", {"input": "x"})
    assert status == 404 and headers["Content-Type"] == "application/json"
    assert json.loads(data)["error"]["code"] == 404
    assert up.history[-1].path == "/r/v1/embeddings" and up.history[-1].body == {"input": "x"}
    assert up.route("r").pending == 1


def test_default_usage_estimate_and_upstream_default(up):
    body = {"model": "m", "messages": [{"role": "system", "content": "x" * 40}, {"role": "user", "content": "y" * 40}]}
    out = json.loads(raw_post(up, "/z/v1/chat/completions", body)[2])
    text = out["choices"][0]["message"]["content"]
    n = len(text) // 4
    assert out["usage"] == {"prompt_tokens": 20, "completion_tokens": n, "total_tokens": 20 + n}
    assert out["model"] == "m" and out["object"] == "chat.completion"

    with Upstream(default=lambda rec: Reply(text=f"global {rec.route}")) as u2:
        out = json.loads(raw_post(u2, "/q/v1/chat/completions", body)[2])
        assert out["choices"][0]["message"]["content"] == "global q"


def test_concurrent_threads_each_get_one_queued_reply(up):
    up.enqueue("t", *[Reply(text=f"r{i}") for i in range(40)])
    seen: list[str] = []
    lock = threading.Lock()

    def worker():
        for _ in range(5):
            _, _, data = raw_post(up, "/t/v1/chat/completions", {"model": "m", "messages": MSGS})
            with lock:
                seen.append(json.loads(data)["choices"][0]["message"]["content"])

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seen) == sorted(f"r{i}" for i in range(40))
    assert len(up.requests("t")) == 40


# --- litellm, OpenAI wire format -----------------------------------------------


def test_completion_returns_scripted_text_usage_and_history(up):
    up.enqueue("a", Reply(text="hi there", usage=(7, 3), headers={"x-sim": "1"}))
    resp = litellm.completion(**kw(up), extra_headers={"X-Trace-Id": "trace-42"})
    assert resp.choices[0].message.content == "hi there"
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == (7, 3, 10)
    (rec,) = up.history
    assert isinstance(rec, Received)
    assert rec.route == "a" and rec.method == "POST" and rec.path == "/a/v1/chat/completions"
    assert rec.headers["authorization"] == "Bearer sk-test"
    assert rec.headers["x-trace-id"] == "trace-42"
    assert rec.model == "gpt-x" and rec.messages == MSGS and rec.stream is False
    assert rec.prompt == "hello sandbox"


@pytest.mark.asyncio
async def test_acompletion_and_50_concurrent_calls(up):
    up.enqueue("a", Reply(text="async hi", usage=(3, 2)))
    resp = await litellm.acompletion(**kw(up))
    assert resp.choices[0].message.content == "async hi"
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (3, 2)

    up.set_default("c", lambda rec: Reply(text=f"echo {rec.prompt}", delay_s=0.01))
    prompts = [f"p{i}" for i in range(50)]
    results = await asyncio.gather(
        *[litellm.acompletion(**kw(up, "c", messages=[{"role": "user", "content": p}])) for p in prompts]
    )
    assert [r.choices[0].message.content for r in results] == [f"echo {p}" for p in prompts]
    assert len(up.requests("c")) == 50


def test_429_retry_after_reachable_via_litellm_response_headers(up):
    up.enqueue("a", Reply(status=429, headers={"Retry-After": "1"}, error="slow down"))
    with pytest.raises(litellm.RateLimitError) as ei:
        litellm.completion(**kw(up))
    exc = ei.value
    assert exc.status_code == 429 and "slow down" in str(exc)
    # litellm 1.106.2: the provider's headers are on exc.litellm_response_headers (httpx.Headers);
    # exc.response is a synthetic httpx.Response with *empty* headers.
    assert exc.litellm_response_headers["retry-after"] == "1"
    assert "retry-after" not in exc.response.headers


@pytest.mark.asyncio
async def test_429_async_same_headers(up):
    up.enqueue("a", Reply(status=429, headers={"Retry-After": "2"}))
    with pytest.raises(litellm.RateLimitError) as ei:
        await litellm.acompletion(**kw(up))
    assert ei.value.litellm_response_headers["Retry-After"] == "2"


@pytest.mark.parametrize(
    "status,exc_cls",
    [
        (503, litellm.ServiceUnavailableError),
        (500, litellm.InternalServerError),
        (401, litellm.AuthenticationError),
        (400, litellm.BadRequestError),
        (404, litellm.NotFoundError),
        (402, litellm.APIError),  # no dedicated class; plain litellm.APIError with status_code 402
    ],
)
def test_status_maps_to_litellm_exception(up, status, exc_cls):
    up.enqueue("a", Reply(status=status))
    with pytest.raises(Exception) as ei:
        litellm.completion(**kw(up))
    assert type(ei.value) is exc_cls
    assert ei.value.status_code == status


def test_raw_non_json_200_becomes_internal_server_error(up):
    up.enqueue("a", Reply(raw="this is not json"))
    with pytest.raises(litellm.InternalServerError) as ei:
        litellm.completion(**kw(up))
    assert ei.value.status_code == 500
    assert "Empty or invalid response from LLM endpoint" in str(ei.value)
    assert "this is not json" in str(ei.value)


def test_json_override_is_sent_verbatim(up):
    up.enqueue("a", Reply(status=200, json={"unexpected": True}, text="ignored"))
    status, _, data = raw_post(up, "/a/v1/chat/completions", {"model": "m", "messages": MSGS})
    assert status == 200 and json.loads(data) == {"unexpected": True}


def test_delay_beyond_timeout_raises_timeout(up):
    up.enqueue("a", Reply(delay_s=1.0))
    t0 = time.monotonic()
    with pytest.raises(litellm.Timeout) as ei:
        litellm.completion(**kw(up, timeout=0.3))
    assert time.monotonic() - t0 < 0.9
    assert ei.value.status_code == 408


def test_drop_is_internal_server_error_connection_error(up):
    up.enqueue("a", Reply(drop=True))
    with pytest.raises(litellm.InternalServerError) as ei:
        litellm.completion(**kw(up))
    assert ei.value.status_code == 500 and "Connection error" in str(ei.value)
    assert not isinstance(ei.value, litellm.APIConnectionError)


@pytest.mark.asyncio
async def test_adrop_is_internal_server_error_connection_error(up):
    up.enqueue("a", Reply(drop=True))
    with pytest.raises(litellm.InternalServerError) as ei:
        await litellm.acompletion(**kw(up))
    assert ei.value.status_code == 500 and "Connection error" in str(ei.value)


def test_stream_with_usage(up):
    text = "one two three four five six"
    up.enqueue("a", Reply(text=text, usage=(11, 6)))
    chunks = list(litellm.completion(**kw(up), stream=True, stream_options={"include_usage": True}))
    contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(contents) == 3 and "".join(contents) == text
    assert any(c.choices and c.choices[0].finish_reason == "stop" for c in chunks)
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (11, 6, 17)
    rec = up.history[-1]
    assert rec.stream is True and rec.body["stream_options"] == {"include_usage": True}


def test_stream_wire_format(up):
    body = {"model": "m", "stream": True, "messages": MSGS}
    up.enqueue("a", Reply(text="alpha beta gamma"))
    status, headers, data = raw_post(up, "/a/v1/chat/completions", body)
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
    assert headers["Transfer-Encoding"] == "chunked"
    events = [line[6:] for line in data.decode().split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    parsed = [json.loads(e) for e in events[:-1]]
    assert all(p["object"] == "chat.completion.chunk" for p in parsed)
    assert "usage" not in parsed[-1] and parsed[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.asyncio
async def test_astream_with_usage(up):
    up.enqueue("a", Reply(text="one two three four five six", usage=(4, 5)))
    stream = await litellm.acompletion(**kw(up), stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two three four five six"
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (4, 5)


def test_cut_stream_raises_midstream_fallback_error(up):
    up.enqueue("a", Reply(text="one two three four five six", cut_after=1))
    got = []
    with pytest.raises(MidStreamFallbackError) as ei:
        for c in litellm.completion(**kw(up), stream=True):
            got.append(c.choices[0].delta.content)
    assert got == ["one two three "]
    exc = ei.value
    assert isinstance(exc, litellm.ServiceUnavailableError) and exc.status_code == 500
    assert isinstance(exc.original_exception, litellm.APIConnectionError)
    assert exc.generated_content == "one two three "
    assert "incomplete chunked read" in str(exc)


@pytest.mark.asyncio
async def test_cut_astream_raises_midstream_fallback_error(up):
    up.enqueue("a", Reply(text="one two three four five six", cut_after=1))
    got = []
    with pytest.raises(MidStreamFallbackError):
        stream = await litellm.acompletion(**kw(up), stream=True)
        async for c in stream:
            got.append(c.choices[0].delta.content)
    assert got == ["one two three "]


def test_openrouter_cost(up):
    up.enqueue("or", Reply(text="routed", usage=(5, 1), cost=0.0123))
    resp = litellm.completion(**kw(up, "or", model="openrouter/openai/gpt-4o"))
    assert resp.choices[0].message.content == "routed"
    assert resp._hidden_params["additional_headers"]["llm_provider-x-litellm-response-cost"] == 0.0123
    assert resp._hidden_params["response_cost"] == 0.0123
    assert resp.usage.cost == 0.0123
    rec = up.requests("or")[-1]
    assert rec.path == "/or/v1/chat/completions"
    assert rec.model == "openai/gpt-4o" and rec.body["usage"] == {"include": True}


# --- litellm, Anthropic wire format --------------------------------------------


def anthropic_kw(up: Upstream, **extra):
    args = dict(
        model=ANTHROPIC_MODEL,
        api_base=up.base_url("an", "anthropic"),
        api_key="sk-ant-test",
        max_retries=0,
        timeout=5,
        messages=[{"role": "system", "content": "be brief"}, *MSGS],
    )
    args.update(extra)
    return args


def test_anthropic_completion_and_history(up):
    up.enqueue("an", Reply(text="anthropic reply", usage=(9, 2)))
    resp = litellm.completion(**anthropic_kw(up))
    assert resp.choices[0].message.content == "anthropic reply"
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (9, 2)
    rec = up.requests("an")[-1]
    assert rec.path == "/an/v1/messages"
    assert rec.headers["x-api-key"] == "sk-ant-test" and "anthropic-version" in rec.headers
    assert rec.model == "claude-3-5-sonnet-20241022" and rec.body["system"]
    assert rec.prompt == "hello sandbox"


def test_anthropic_stream(up):
    up.enqueue("an", Reply(text="streamed anthropic reply", usage=(8, 4)))
    chunks = list(litellm.completion(**anthropic_kw(up), stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "streamed anthropic reply"
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (8, 4)


def test_anthropic_cut_stream(up):
    up.enqueue("an", Reply(text="one two three four five six", cut_after=1))
    got = []
    with pytest.raises(MidStreamFallbackError) as ei:
        for c in litellm.completion(**anthropic_kw(up), stream=True):
            got.append(c.choices[0].delta.content if c.choices else None)
    assert "one two three " in got and "four " not in got
    assert "incomplete chunked read" in str(ei.value)


def test_anthropic_errors(up):
    up.enqueue("an", Reply(status=429, headers={"retry-after": "3"}), Reply(status=529))
    with pytest.raises(litellm.RateLimitError) as ei:
        litellm.completion(**anthropic_kw(up))
    assert ei.value.litellm_response_headers["retry-after"] == "3"
    assert "rate_limit_error" in str(ei.value)
    with pytest.raises(litellm.InternalServerError) as ei:  # anthropic 529 -> InternalServerError(500)
        litellm.completion(**anthropic_kw(up))
    assert ei.value.status_code == 500 and "overloaded_error" in str(ei.value)


# --- demo helpers --------------------------------------------------------------


def test_simulated_providers(up):
    simulated_providers(up, seed=7)
    with pytest.raises(litellm.ServiceUnavailableError) as ei:
        litellm.completion(**kw(up, "sim-flaky"))
    assert ei.value.litellm_response_headers["retry-after"] == "0"
    assert "SIMULATED" in str(ei.value)

    a = litellm.completion(**kw(up, "sim-fast", messages=[{"role": "user", "content": "Explain caching for web apps"}]))
    b = litellm.completion(**kw(up, "sim-fast", messages=[{"role": "user", "content": "What is a vector database?"}]))
    ta, tb = a.choices[0].message.content, b.choices[0].message.content
    assert ta.startswith("[simulated sim-fast]") and "caching for web apps" in ta and ta.count(".") >= 3
    assert ta != tb and "vector database" in tb

    rec = up.requests("sim-fast")[0]
    delays = [up.route("sim-fast").default(rec).delay_s for _ in range(5)]
    assert all(0.04 <= d <= 0.15 for d in delays)
    with Upstream() as other:
        simulated_providers(other, seed=7)
        # same seed -> same latency sequence (first two draws went to the two calls above)
        replay = [other.route("sim-fast").default(rec).delay_s for _ in range(7)]
        assert replay[2:] == delays
    slow = up.route("sim-slow").default(rec).delay_s
    assert 0.3 <= slow <= 0.6


def test_simulated_text_is_deterministic():
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi  there"}]}]}
    rec = Received("r", "/", "POST", {}, body, 0.0)
    assert simulated_text(rec) == simulated_text(rec) == "[simulated] hi there"


def test_main_serves_simulated_routes():
    proc = subprocess.Popen(
        [sys.executable, "-m", "router.sandbox", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        banner = proc.stdout.readline()
        url_line = proc.stdout.readline()
        assert "SIMULATED" in banner
        url = url_line.split("listening on ", 1)[1].strip()
        host, port = url.removeprefix("http://").split(":")
        c = http.client.HTTPConnection(host, int(port), timeout=5)
        c.request("POST", "/sim-flaky/v1/chat/completions", body=json.dumps({"model": "m", "messages": MSGS}))
        r = c.getresponse()
        assert r.status == 503 and r.getheader("Retry-After") == "0"
        r.read()
    finally:
        proc.terminate()
        proc.wait(5)
        proc.stdout.close()
