"""`llm-router serve` as a real subprocess on loopback, driven by clients nobody here wrote: the official OpenAI SDK
(sync, async, streams, `parse`, its retries), langchain-openai, and curl. The same SDK tests run against
`router.openai_client()` in process too (`kind`): both forms must answer alike.

The upstream behind the gateway is the session's `router.sandbox.Upstream`; the server reads its config from
a file in a temporary directory, keys from its environment.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import openai
import pydantic
import pytest
from conftest import KEY_A, standard_config
from gateway_server import CLI, GATEWAY_KEYS, GW_BILLING, GW_SEARCH, ROOT, Serve, gateway_env, sse_frames
from langchain_openai import ChatOpenAI
from prometheus_client.parser import text_string_to_metric_families

import router
from router import Router
from router.gateway import BASE_URL, async_http_client, http_client
from router.sandbox import Reply, Upstream

LEDGER = """
ledger: {{path: "{ledger}", flush_interval_s: 0.05}}
pricing:
  a/model-a: {{input_per_1m: 0, output_per_1m: 1000}}
budgets:
  - {{name: metered, alias: metered, period: day, limit_usd: 0}}
"""


def write_config(path: Path, up: Upstream, aliases: str = "") -> Path:
    extra = GATEWAY_KEYS + LEDGER.format(ledger=path.parent / "ledger.sqlite3")
    text = standard_config(aliases="metered: {targets: [a/model-a]}\n" + aliases, extra=extra)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text.replace("{UP}", up.url))
    tmp.replace(path)
    return path


@pytest.fixture(scope="module")
def config(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_config(tmp_path_factory.mktemp("gateway") / "router.yaml", upstream)


@pytest.fixture(scope="module")
def server(config: Path) -> Iterator[Serve]:
    s = Serve(config, config.parent).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def local(config: Path) -> Iterator[Router]:
    """A Router in this process on the server's config file (and its environment)."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in gateway_env().items():
            mp.setenv(name, value)
        from prometheus_client import CollectorRegistry

        r = Router.from_yaml(config, registry=CollectorRegistry())
    yield r
    r.close()


Kind = Literal["http", "inprocess"]


@pytest.fixture(params=["http", "inprocess"])
def kind(request: pytest.FixtureRequest) -> Kind:
    return request.param  # type: ignore[no-any-return]


class Target:
    """The gateway under test as its clients see it: HTTP on loopback, or in process."""

    def __init__(self, kind: Kind, server: Serve, local: Router) -> None:
        self.kind, self.server, self.local = kind, server, local

    def client(self, key: str | None = GW_SEARCH, max_retries: int = 0) -> openai.OpenAI:
        if self.kind == "http":
            return openai.OpenAI(base_url=f"{self.server.url}/v1", api_key=key or "none", max_retries=max_retries)
        return router.openai_client(self.local, api_key=key, max_retries=max_retries)

    def async_client(self, key: str = GW_SEARCH) -> openai.AsyncOpenAI:
        if self.kind == "http":
            return openai.AsyncOpenAI(base_url=f"{self.server.url}/v1", api_key=key, max_retries=0)
        return router.async_openai_client(self.local, api_key=key, max_retries=0)

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        if self.kind == "http":
            text = httpx.get(f"{self.server.url}/metrics").text
        else:
            with http_client(self.local) as c:
                text = c.get("/metrics").text
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
        }

    def count(self, name: str, **labels: str) -> float:
        want = set(labels.items())
        return sum(v for (n, ls), v in self.metrics().items() if n == name and want <= ls)


@pytest.fixture
def gw(kind: Kind, server: Serve, local: Router, up: Upstream) -> Target:
    return Target(kind, server, local)


def ask(text: str = "hello there") -> list[Any]:
    return [{"role": "user", "content": text}]


# -- the OpenAI SDK, over HTTP and in process ----------------------------------------------------------------------


def test_sync_answer_with_headers(gw: Target, up: Upstream) -> None:
    up.enqueue("a", Reply(text="a plain answer", usage=(3, 3)))

    raw = gw.client().chat.completions.with_raw_response.create(model="chat", messages=ask())

    res = raw.parse()
    assert res.choices[0].message.content == "a plain answer" and res.model == "chat"
    assert raw.headers["x-llm-router-provider"] == "a" and raw.headers["x-llm-router-model"] == "model-a"
    assert float(raw.headers["x-llm-router-cost-usd"]) == pytest.approx(3 * 1000 / 1e6)
    assert raw.headers["x-llm-router-cached"] == "false" and raw.headers["x-request-id"]


@pytest.mark.asyncio
async def test_async_answer_and_stream(gw: Target, up: Upstream) -> None:
    up.enqueue("a", Reply(text="async plain"), Reply(text="async streamed answer"))
    client = gw.async_client()
    try:
        res = await client.chat.completions.create(model="chat", messages=ask())
        stream = await client.chat.completions.create(
            model="chat", messages=ask(), stream=True, stream_options={"include_usage": True}
        )
        chunks = [c async for c in stream]
    finally:
        await client.close()

    assert res.choices[0].message.content == "async plain"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "async streamed answer"
    assert chunks[-1].usage is not None and chunks[-1].choices == []


def test_sync_stream(gw: Target, up: Upstream) -> None:
    up.enqueue("a", Reply(raw_stream=sse_frames("one ", "two ", "three"), chunk_delays=0.01))

    chunks = list(gw.client().chat.completions.create(model="chat", messages=ask(), stream=True))

    assert [c.choices[0].delta.content for c in chunks] == ["", "one ", "two ", "three", None]
    assert chunks[-1].choices[0].finish_reason == "stop"


class Verdict(pydantic.BaseModel):
    label: Literal["spam", "ham"]
    confidence: float


def test_parse_with_a_pydantic_model(gw: Target, up: Upstream) -> None:
    up.enqueue("a", Reply(text='{"label": "ham", "confidence": 0.7}'))

    res = gw.client().chat.completions.parse(model="chat", messages=ask(), response_format=Verdict)

    assert res.choices[0].message.parsed == Verdict(label="ham", confidence=0.7)


def test_the_sdk_retries_our_502(gw: Target, up: Upstream) -> None:
    for route in "abc":
        up.set_default(route, Reply(status=503, error="overloaded"))
    before = gw.count("llm_router_gateway_responses_total", route="chat", status="502")

    with pytest.raises(openai.InternalServerError):
        gw.client(max_retries=1).chat.completions.create(model="chat", messages=ask())

    assert gw.count("llm_router_gateway_responses_total", route="chat", status="502") - before == 2


def test_the_sdk_does_not_retry_a_spent_budget(gw: Target, up: Upstream) -> None:
    before = gw.count("llm_router_gateway_responses_total", route="chat", status="429")

    with pytest.raises(openai.RateLimitError) as info:
        gw.client(max_retries=2).chat.completions.create(model="metered", messages=ask(), max_tokens=10)

    assert info.value.code == "insufficient_quota"
    assert gw.count("llm_router_gateway_responses_total", route="chat", status="429") - before == 1
    assert up.history == []


def test_keys_401_and_403(gw: Target, up: Upstream) -> None:
    with pytest.raises(openai.AuthenticationError):
        gw.client(key="gw-wrong-key-000000000000").chat.completions.create(model="chat", messages=ask())
    with pytest.raises(openai.PermissionDeniedError):
        gw.client(key=GW_BILLING).chat.completions.create(model="chat", messages=ask())
    assert up.history == []
    assert [m.id for m in gw.client(key=GW_BILLING).models.list()] == ["single"]
    assert {"chat", "single", "metered"} <= {m.id for m in gw.client().models.list()}


def test_unknown_fields_and_models(gw: Target, up: Upstream) -> None:
    client = gw.client()
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="chat", messages=ask(), extra_body={"top_k": 5})
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=ask())

    assert "top_k" in bad.value.message and bad.value.param == "top_k"
    assert "'gpt-4o' does not exist" in missing.value.message
    assert up.history == []


# -- a framework end to end: langchain-openai ------------------------------------------------------------------


def chat_model(gw: Target, **kw: Any) -> ChatOpenAI:
    if gw.kind == "http":
        return ChatOpenAI(model="chat", base_url=f"{gw.server.url}/v1", api_key=GW_SEARCH, max_retries=0, **kw)
    return ChatOpenAI(
        model="chat",
        base_url=BASE_URL,
        api_key=GW_SEARCH,
        max_retries=0,
        http_client=http_client(gw.local),
        http_async_client=async_http_client(gw.local),
        **kw,
    )


def test_langchain_invoke_stream_and_structured_output(gw: Target, up: Upstream) -> None:
    up.enqueue("a", Reply(text="LangChain got this", usage=(4, 3)))
    up.enqueue("a", Reply(raw_stream=sse_frames("streamed ", "through ", "langchain")))
    up.enqueue("a", Reply(text='{"label": "spam", "confidence": 0.99}'))
    llm = chat_model(gw, temperature=0)

    msg = llm.invoke("Say something")
    pieces = [c.content for c in llm.stream("Stream something")]
    verdict = llm.with_structured_output(Verdict).invoke("WIN A FREE CRUISE")

    assert msg.content == "LangChain got this"
    assert msg.usage_metadata is not None and msg.usage_metadata["input_tokens"] == 4
    assert "".join(str(p) for p in pieces) == "streamed through langchain"
    assert verdict == Verdict(label="spam", confidence=0.99)
    assert up.requests("a")[0].body["temperature"] == 0


@pytest.mark.asyncio
async def test_langchain_async(gw: Target, up: Upstream) -> None:
    up.enqueue("a", Reply(text="async langchain"))

    msg = await chat_model(gw).ainvoke("hi")

    assert msg.content == "async langchain"


# -- HTTP only: curl, a client that disconnects, reloads --------------------------------------------------------


def test_curl_streams_sse(server: Serve, up: Upstream) -> None:
    up.enqueue("a", Reply(raw_stream=sse_frames("curl ", "sees ", "this"), chunk_delays=0.02))
    body = {"model": "chat", "messages": ask(), "stream": True, "stream_options": {"include_usage": True}}

    out = subprocess.run(
        ["curl", "-sSN", "--fail-with-body", f"{server.url}/v1/chat/completions",
         "-H", f"Authorization: Bearer {GW_SEARCH}", "-H", "Content-Type: application/json", "-d", json.dumps(body)],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip

    events = [line.removeprefix("data: ") for line in out.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == "curl sees this"
    assert chunks[-1]["usage"]["completion_tokens"] == 3
    assert chunks[-1]["llm_router"]["provider"] == "a"


def test_curl_without_a_key_gets_a_401(server: Serve) -> None:
    out = subprocess.run(
        ["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", f"{server.url}/v1/models"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    body, status = out.rsplit("\n", 1)
    assert status == "401" and json.loads(body)["error"]["code"] == "invalid_api_key"


def test_a_client_that_disconnects_mid_stream_cancels_the_provider_request(server: Serve, up: Upstream) -> None:
    gw = Target("http", server, None)  # type: ignore[arg-type]
    words = [f"w{i} " for i in range(60)]
    up.enqueue("a", Reply(raw_stream=sse_frames(*words), chunk_delays=[0, *([0.1] * 61)]))
    before = gw.count("llm_router_requests_total", alias="single", outcome="cancelled")
    body = {"model": "single", "messages": ask(), "stream": True}

    with (
        httpx.Client(timeout=30) as c,
        c.stream(
            "POST", f"{server.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {GW_SEARCH}"}
        ) as resp,
    ):
        assert resp.status_code == 200
        lines = resp.iter_lines()
        assert next(lines).startswith("data: ")
    # the connection is closed: the server must cancel the call, well before the 6 s stream would have ended
    deadline = time.monotonic() + 4
    while gw.count("llm_router_requests_total", alias="single", outcome="cancelled") == before:
        assert time.monotonic() < deadline, f"the call was not cancelled:\n{server.output()}"
        time.sleep(0.05)
    assert gw.count("llm_router_attempts_total", alias="single", outcome="cancelled") >= 1
    assert gw.count("llm_router_in_flight", alias="single") == 0


def test_a_client_that_gives_up_waiting_cancels_the_call(server: Serve, up: Upstream) -> None:
    gw = Target("http", server, None)  # type: ignore[arg-type]
    up.enqueue("a", Reply(text="too late", delay_s=4))
    before = gw.count("llm_router_requests_total", alias="single", outcome="cancelled")
    body = {"model": "single", "messages": ask()}

    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{server.url}/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {GW_SEARCH}"},
            timeout=0.5,
        )

    deadline = time.monotonic() + 3
    while gw.count("llm_router_requests_total", alias="single", outcome="cancelled") == before:
        assert time.monotonic() < deadline, f"the call was not cancelled:\n{server.output()}"
        time.sleep(0.05)


def test_an_edited_config_is_in_force_within_a_second(server: Serve, config: Path, up: Upstream) -> None:
    write_config(config, up, aliases="fresh: {targets: [a/model-a]}")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=GW_SEARCH, max_retries=0)
    deadline = time.monotonic() + 10
    while "fresh" not in {m.id for m in client.models.list()}:
        assert time.monotonic() < deadline, server.output()
        time.sleep(0.1)
    up.enqueue("a", Reply(text="fresh answer"))
    assert client.chat.completions.create(model="fresh", messages=ask()).choices[0].message.content == "fresh answer"


def test_sighup_reloads_and_sigterm_lets_a_stream_finish(upstream: Upstream, tmp_path: Path) -> None:
    config = write_config(tmp_path / "router.yaml", upstream)
    s = Serve(config, tmp_path, "--no-watch", "--graceful-timeout", "20").start()
    try:
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key=GW_SEARCH, max_retries=0)
        write_config(config, upstream, aliases="after-hup: {targets: [a/model-a]}")
        time.sleep(1.2)  # not watched: the edit alone changes nothing
        assert "after-hup" not in {m.id for m in client.models.list()}
        s.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "after-hup" not in {m.id for m in client.models.list()}:
            assert time.monotonic() < deadline, s.output()
            time.sleep(0.1)

        # A stream in flight when SIGTERM comes is finished, then the server exits.
        words = [f"w{i} " for i in range(15)]
        upstream.enqueue("a", Reply(raw_stream=sse_frames(*words), chunk_delays=[0, *([0.1] * 16)]))
        got: list[str] = []
        stream = client.chat.completions.create(model="single", messages=ask(), stream=True)
        reader = threading.Thread(target=lambda: got.extend(c.choices[0].delta.content or "" for c in stream))
        reader.start()
        time.sleep(0.4)
        s.signal(signal.SIGTERM)
        reader.join(20)
        assert "".join(got) == "".join(words)
        assert s.stop() in (0, -signal.SIGTERM)  # uvicorn ends by the signal it was sent, once it has shut down
        assert "Finished server process" in s.output()
    finally:
        s.stop()


def test_a_public_address_without_keys_is_refused(upstream: Upstream, tmp_path: Path) -> None:
    config = tmp_path / "open.yaml"
    config.write_text(standard_config().replace("{UP}", upstream.url))
    env = {**os.environ, **gateway_env()}

    refused = subprocess.run(
        [str(CLI), "serve", "-c", str(config), "--host", "0.0.0.0", "--port", "9"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=60,
    )  # fmt: skip

    assert refused.returncode == 2
    assert "refusing to serve on 0.0.0.0 without client keys" in refused.stderr
    assert KEY_A not in refused.stderr + refused.stdout
