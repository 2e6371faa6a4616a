"""Real provider traffic: responses OpenAI, Anthropic, OpenRouter and Gemini really sent, replayed byte for byte.

Each file under `tests/replay/<provider>/` is a recorded body (JSON, or an SSE stream) with a sidecar
`<name>.source.json` naming the public repository, path and commit (or issue thread) it was taken from, its
status, content type and, for a stream, the sizes of the HTTP chunks it is sent in. The loopback `Upstream`
sends those bytes verbatim; only the pauses between chunks are scripted on top. Everything runs through real
litellm: the router's classification, stream handling and pricing meet the wire formats as they are, not as
the sandbox's own simulation understands them. The OpenAI-protocol recordings (OpenAI, OpenRouter, the Azure
stream) run on the direct engine too, and must give the same Result and the same errors.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import BOTH_ENGINES, MakeRouter, standard_env, with_engines
from prometheus_client import CollectorRegistry

from router import ConfigError, ProviderError, Result, Router, StreamInterruptedError, parse_config
from router.sandbox import Reply, Upstream

REPLAY = Path(__file__).parent / "replay"
PROVIDERS = ("openai", "anthropic", "openrouter", "gemini")  # each: an answer, a stream, two error shapes


@dataclass(frozen=True)
class Recorded:
    """One recorded response: its body, and what its sidecar says about it."""

    body: bytes
    status: int
    content_type: str
    headers: dict[str, str]
    chunks: list[int] | None
    source: dict[str, str]

    def frames(self) -> list[bytes]:
        """The body cut into the HTTP chunks it was recorded in."""
        assert self.chunks is not None and sum(self.chunks) == len(self.body)
        out, at = [], 0
        for n in self.chunks:
            out.append(self.body[at : at + n])
            at += n
        return out

    def reply(self, delays: float | list[float] = 0.0) -> Reply:
        """A sandbox reply that sends exactly these bytes (a stream chunk by chunk, with `delays` before each)."""
        if self.chunks is not None:
            return Reply(
                status=self.status,
                raw_stream=self.frames(),
                chunk_delays=delays,
                content_type=self.content_type,
                headers=self.headers,
            )
        return Reply(status=self.status, raw=self.body, content_type=self.content_type, headers=self.headers)


def recorded(provider: str, name: str) -> Recorded:
    body = (REPLAY / provider / name).read_bytes()
    meta = json.loads((REPLAY / provider / f"{name.rsplit('.', 1)[0]}.source.json").read_text())
    return Recorded(
        body, meta["status"], meta["content_type"], meta.get("headers", {}), meta.get("chunks"), meta["source"]
    )


# Each alias tries the recorded provider first, then a plain OpenAI-compatible fallback on route "b".
CONFIG = """
version: 1
defaults:
  timeout_s: 5
  deadline_s: 20
  retry: {attempts: 1}
providers:
  oa: {kind: openai, api_base: "{UP}/oa/v1", api_key: "${KEY_A}"}
  an: {kind: anthropic, api_base: "{UP}/an", api_key: "${KEY_A}"}
  orr: {kind: openrouter, api_base: "{UP}/orr/v1", api_key: "${KEY_A}"}
  ge: {kind: gemini, api_base: "{UP}/ge", api_key: "${KEY_A}"}
  az: {kind: azure, api_base: "{UP}/az", api_key: "${KEY_A}"}
  ol: {kind: ollama, api_base: "{UP}/ol"}
  b: {kind: openai, api_base: "{UP}/b/v1", api_key: "${KEY_B}"}
aliases:
  openai: {targets: [oa/gpt-3.5-turbo-0613, b/model-b]}
  anthropic: {targets: [an/claude-3-opus-20240229, b/model-b]}
  openrouter: {targets: [orr/google/gemini-2.5-flash-lite, b/model-b]}
  gemini: {targets: [ge/gemini-2.5-flash, b/model-b]}
  gemini_unpriced: {targets: [ge/gemini-exp-1206]}
  openrouter_free: {targets: [orr/google/gemini-2.5-flash:free]}
  quick_openrouter:
    targets: [{provider: orr, model: x-ai/grok-4, first_token_timeout_s: 1.0}, b/model-b]
  idle_openai:
    targets: [{provider: oa, model: gpt-35-turbo, stream_idle_timeout_s: 0.5}]
  plain_openai: {targets: [oa/gpt-35-turbo]}
  azure: {targets: [{provider: az, model: gpt-35-turbo, params: {api_version: "2023-08-01-preview"}}]}
  ollama: {targets: [ol/gemma3:1b]}
{EXTRA}
"""
ROUTE = {"openai": "oa", "anthropic": "an", "openrouter": "orr", "gemini": "ge"}
FALLBACK_TEXT = "b answers instead"


@pytest.fixture
def r(make_router: MakeRouter) -> Router:
    return make_router(CONFIG.replace("{EXTRA}", ""))


def trail(res_or_err: Any) -> list[tuple[str, str]]:
    return [(a.provider, a.outcome) for a in res_or_err.attempts]


def generate(r: Router, sync: bool, alias: str, **kw: Any) -> Result:
    if sync:
        return r.generate("hello", model=alias, **kw)  # type: ignore[no-any-return]
    return asyncio.run(r.agenerate("hello", model=alias, **kw))  # type: ignore[no-any-return]


def stream_all(r: Router, sync: bool, alias: str, **kw: Any) -> tuple[list[str], Any]:
    """Read a whole stream; returns the deltas and the stream (its .result)."""
    if sync:
        s = r.generate("hello", model=alias, stream=True, **kw)
        return list(s), s

    async def read() -> tuple[list[str], Any]:
        s = await r.agenerate("hello", model=alias, stream=True, **kw)
        return [d async for d in s], s

    return asyncio.run(read())


SYNC = pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
DIRECT_PROVIDERS = ("openai", "openrouter")  # the recordings the direct engine speaks: OpenAI's protocol


# -- the fixtures themselves --------------------------------------------------------------------------------


@pytest.mark.parametrize("sidecar", sorted(REPLAY.glob("*/*.source.json")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_fixture_names_its_source(sidecar: Path) -> None:
    meta = json.loads(sidecar.read_text())
    src = meta["source"]
    assert src["repository"].count("/") == 1
    if "url" in src:  # an issue thread
        assert src["url"].startswith(f"https://github.com/{src['repository']}/")
    else:
        assert src["path"] and re.fullmatch(r"[0-9a-f]{40}", src["commit"])
    stem = sidecar.name.removesuffix(".source.json")
    suffixes = (".json", ".sse", ".ndjson", ".txt")
    bodies = [p for p in sidecar.parent.glob(f"{stem}.*") if p != sidecar and p.suffix in suffixes]
    assert len(bodies) == 1, "one recorded body per sidecar"
    assert meta["shape"] in ("answer", "stream", "error") and isinstance(meta["status"], int)
    if meta.get("chunks") is not None:
        assert sum(meta["chunks"]) == bodies[0].stat().st_size


def test_each_provider_has_an_answer_a_stream_and_two_error_shapes() -> None:
    for provider in PROVIDERS:
        shapes = [json.loads(p.read_text())["shape"] for p in (REPLAY / provider).glob("*.source.json")]
        assert shapes.count("answer") >= 1 and shapes.count("stream") >= 1 and shapes.count("error") >= 2, provider


# -- recorded answers -----------------------------------------------------------------------------------------

ANSWERS = {
    "openai": ("chat.json", "212 degrees Fahrenheit is equal to 100 degrees Celsius.", (26, 82)),
    "anthropic": ("message.json", "The capital of France is Paris.", (20, 10)),
    "openrouter": (
        "chat.json",
        "Why did the scarecrow win an award?\n\nBecause he was outstanding in his field!",
        (8, 18),
    ),
    "gemini": ("generate.json", "Hello! How can I help you today?", (9, 43)),  # output: 9 text + 34 thinking
}


@SYNC
@with_engines("provider", PROVIDERS, lambda p: p in DIRECT_PROVIDERS)
def test_recorded_answer(provider: str, sync: bool, r: Router, up: Upstream) -> None:
    name, text, usage = ANSWERS[provider]
    up.enqueue(ROUTE[provider], recorded(provider, name).reply())

    res = generate(r, sync, provider)

    assert (res.provider, res.text, (res.usage.input_tokens, res.usage.output_tokens)) == (ROUTE[provider], text, usage)
    assert res.finish_reason == "stop" and trail(res) == [(ROUTE[provider], "success")]
    assert up.requests("b") == []


# -- recorded streams, each to its normal end -----------------------------------------------------------------

# kind -> (fixture, alias, route, text, (input, output) tokens or None: none reported, so counted)
STREAMS = {
    "openai": ("openai/stream.sse", "plain_openai", "oa", "A car is a vehicle", None),
    "azure": ("openai/stream.sse", "azure", "az", "A car is a vehicle", None),  # it is an Azure recording
    "anthropic": ("anthropic/stream.sse", "anthropic", "an", "- Captain\n- Scoop", (17, 10)),
    "openrouter": ("openrouter/stream.sse", "quick_openrouter", "orr", "I'm Grok, an AI built by xAI.", (687, 254)),
    "gemini": ("gemini/stream.sse", "gemini", "ge", "The temperature in Paris is 30°C.", (63, 11)),
    "ollama": (
        "ollama/stream.ndjson",
        "ollama",
        "ol",
        "A fluffy rabbit with twitching whiskers and large, expressive eyes, it hops with a playful and gentle energy.",
        (17, 43),
    ),
}


# litellm 1.106's ollama module warns on import (a pydantic TypedDict ReadOnly notice): litellm's, not ours.
OLLAMA_IMPORT_WARNING = "ignore:Items .* are using the `ReadOnly` qualifier:UserWarning"


@SYNC
@pytest.mark.filterwarnings(OLLAMA_IMPORT_WARNING)
@with_engines("kind", STREAMS, lambda k: k in DIRECT_PROVIDERS)
def test_every_listed_provider_kind_streams_to_a_normal_end(
    kind: str, sync: bool, r: Router, up: Upstream, registry: CollectorRegistry
) -> None:
    fixture, alias, route, text, usage = STREAMS[kind]
    assert r.config.targets(alias)[0].kind == kind
    up.enqueue(route, recorded(*fixture.split("/")).reply())

    deltas, stream = stream_all(r, sync, alias)

    res = stream.result
    assert "".join(deltas) == text and len(deltas) > 1
    assert res is not None and res.text == text and res.finish_reason == "stop"
    assert trail(res) == [(route, "success")]
    if usage is None:
        assert res.usage.estimated and res.usage.output_tokens > 0
    else:
        assert (res.usage.input_tokens, res.usage.output_tokens, res.usage.estimated) == (*usage, False)
    assert registry.get_sample_value("llm_router_stream_interrupted_total", _labels(r, alias)) is None


@BOTH_ENGINES
def test_openrouter_stream_is_priced_by_its_reported_cost(r: Router, up: Upstream) -> None:
    up.enqueue("orr", recorded("openrouter", "stream.sse").reply())

    _, stream = stream_all(r, True, "quick_openrouter")

    assert (stream.result.cost_usd, stream.result.cost_source) == (pytest.approx(0.0043275), "provider")


def test_gemini_stream_is_judged_by_what_the_router_saw(r: Router, up: Upstream) -> None:
    # litellm leaves received_finish_reason unset for Gemini; the finish reason came all the same (STOP).
    up.enqueue("ge", recorded("gemini", "stream.sse").reply())

    deltas, stream = stream_all(r, True, "gemini")

    assert stream.result is not None and "".join(deltas).endswith("30°C.")


# -- recorded errors --------------------------------------------------------------------------------------------

FALLEN_BACK = {
    "openai-401": ("openai", "401_invalid_api_key.json", "auth", 401),
    "openai-404": ("openai", "404_model_not_found.json", "not_found", 404),
    "anthropic-529": ("anthropic", "529_overloaded.json", "server_error", 500),  # litellm reports a 529 as 500
    "openrouter-402": ("openrouter", "402_credits.json", "payment_required", 402),
    "openrouter-404": ("openrouter", "404_no_endpoints.json", "not_found", 404),
    "gemini-429": ("gemini", "429_resource_exhausted.json", "rate_limit", 429),
}


@SYNC
@with_engines(("provider", "name", "outcome", "status"), FALLEN_BACK.values(), lambda c: c[0] in DIRECT_PROVIDERS)
def test_recorded_error_is_classified_and_fallen_back_from(
    provider: str,
    name: str,
    outcome: str,
    status: int,
    sync: bool,
    r: Router,
    up: Upstream,
    registry: CollectorRegistry,
) -> None:
    up.enqueue(ROUTE[provider], recorded(provider, name).reply())
    up.enqueue("b", Reply(text=FALLBACK_TEXT))

    res = generate(r, sync, provider)

    assert res.text == FALLBACK_TEXT and trail(res) == [(ROUTE[provider], outcome), ("b", "success")]
    assert res.attempts[0].status_code == status
    assert standard_env()["KEY_A"] not in (res.attempts[0].error or "")
    labels = {"alias": provider, "provider": ROUTE[provider], "model": res.attempts[0].model, "outcome": outcome}
    assert registry.get_sample_value("llm_router_attempts_total", labels) == 1


@SYNC
@BOTH_ENGINES
def test_an_error_object_inside_a_200_stream_is_the_error_it_names(sync: bool, r: Router, up: Upstream) -> None:
    # Keep-alives, reasoning, then {"error": {"code": 400, "message": "Token limit reached"}} in a 200 stream: the
    # provider's own verdict on the request (max_completion_tokens too small), not an empty or broken stream.
    up.enqueue("orr", recorded("openrouter", "stream_error.sse").reply())
    up.enqueue("b", Reply(text=FALLBACK_TEXT))

    with pytest.raises(ProviderError) as info:
        stream_all(r, sync, "quick_openrouter")

    assert info.value.outcome == "bad_request" and info.value.status_code == 400
    assert trail(info.value) == [("orr", "bad_request")]
    assert "Token limit reached" in (info.value.attempts[0].error or "")
    assert up.requests("b") == []


FILTERED = {
    "openai-content_filter": ("openai", "content_filter.json", None),
    "gemini-safety": ("gemini", "safety.json", None),
    "anthropic-refusal": ("anthropic", "refusal.sse", "stream"),
}


@SYNC
@with_engines(("provider", "name", "streamed"), FILTERED.values(), lambda c: c[0] in DIRECT_PROVIDERS)
def test_a_filtered_answer_is_the_content_filter_outcome(
    provider: str, name: str, streamed: str | None, sync: bool, r: Router, up: Upstream
) -> None:
    up.enqueue(ROUTE[provider], recorded(provider, name).reply())

    with pytest.raises(ProviderError) as info:  # not in the default fallback_on: another provider would refuse too
        if streamed:
            stream_all(r, sync, provider)
        else:
            generate(r, sync, provider)

    assert info.value.outcome == "content_filter"
    assert trail(info.value) == [(ROUTE[provider], "content_filter")]
    assert up.requests("b") == []


@BOTH_ENGINES
def test_a_filtered_answer_falls_back_when_fallback_on_says_so(make_router: MakeRouter, up: Upstream) -> None:
    r = make_router(
        CONFIG.replace("{EXTRA}", "").replace(
            "  retry: {attempts: 1}", "  retry: {attempts: 1}\n  fallback_on: [content_filter]"
        )
    )
    up.enqueue("oa", recorded("openai", "content_filter.json").reply())
    up.enqueue("b", Reply(text=FALLBACK_TEXT))

    res = r.generate("hello", model="openai")

    assert res.text == FALLBACK_TEXT and trail(res) == [("oa", "content_filter"), ("b", "success")]


# -- defect: first_token_timeout_s bounds the time to the first text, whatever comes before it ---------------

# stream.sse from OpenRouter: 10 keep-alive comments, a role-only delta, an encrypted-reasoning delta, then text.
KEEPALIVES, EMPTY_DELTAS = 10, 2


@SYNC
@BOTH_ENGINES
def test_keepalive_comments_do_not_hold_off_the_first_token_deadline(sync: bool, r: Router, up: Upstream) -> None:
    rec = recorded("openrouter", "stream.sse")
    assert rec.frames()[0] == b": OPENROUTER PROCESSING\n\n"
    up.enqueue("orr", rec.reply([0.25] * KEEPALIVES + [0.0] * (len(rec.frames()) - KEEPALIVES)))  # text at 2.5 s
    up.enqueue("b", Reply(text=FALLBACK_TEXT))

    t0 = time.monotonic()
    deltas, stream = stream_all(r, sync, "quick_openrouter")
    took = time.monotonic() - t0

    assert "".join(deltas) == FALLBACK_TEXT
    assert trail(stream.result) == [("orr", "timeout"), ("b", "success")]
    assert "no text within 1s" in (stream.result.attempts[0].error or "")
    assert 0.9 < stream.result.attempts[0].latency_s < 2.2 and took < 3.5  # the text came at 2.5 s: not waited for


@SYNC
@BOTH_ENGINES
def test_empty_and_reasoning_deltas_do_not_hold_off_the_first_token_deadline(
    sync: bool, r: Router, up: Upstream
) -> None:
    rec = recorded("openrouter", "stream.sse")
    frames = rec.frames()
    assert b'"content":""' in frames[KEEPALIVES] and b"reasoning.encrypted" in frames[KEEPALIVES + 1]
    delays = [0.0] * len(frames)
    delays[KEEPALIVES] = delays[KEEPALIVES + 1] = delays[KEEPALIVES + 2] = 0.7  # each gap under 1 s; text at 2.1 s
    up.enqueue("orr", rec.reply(delays))
    up.enqueue("b", Reply(text=FALLBACK_TEXT))

    deltas, stream = stream_all(r, sync, "quick_openrouter")

    assert "".join(deltas) == FALLBACK_TEXT
    assert trail(stream.result) == [("orr", "timeout"), ("b", "success")]
    assert 0.9 < stream.result.attempts[0].latency_s < 2.0  # the text came at 2.1 s: not waited for


# -- defect: a zero from litellm's price map is not a price ---------------------------------------------------


def test_a_model_the_price_map_knows_at_zero_is_unknown_not_free(
    r: Router, up: Upstream, registry: CollectorRegistry
) -> None:
    up.enqueue("ge", recorded("gemini", "generate.json").reply())

    res = r.generate("hello", model="gemini_unpriced")

    assert (res.cost_usd, res.cost_source) == (0.0, "unknown")
    labels = {"alias": "gemini_unpriced", "provider": "ge", "model": "gemini-exp-1206"}
    assert registry.get_sample_value("llm_router_cost_unknown_total", labels) == 1


@BOTH_ENGINES
def test_a_free_variant_is_priced_at_zero_by_the_map(r: Router, up: Upstream, registry: CollectorRegistry) -> None:
    up.enqueue("orr", recorded("openrouter", "chat.json").reply())

    res = r.generate("hello", model="openrouter_free")

    assert (res.cost_usd, res.cost_source) == (0.0, "litellm")
    labels = {"alias": "openrouter_free", "provider": "orr", "model": "google/gemini-2.5-flash:free"}
    assert registry.get_sample_value("llm_router_cost_unknown_total", labels) is None


# -- streams keep a deadline after the first text -------------------------------------------------------------


@SYNC
@BOTH_ENGINES
def test_a_stream_that_stalls_after_its_first_text_is_interrupted_within_the_idle_limit(
    sync: bool, r: Router, up: Upstream, registry: CollectorRegistry
) -> None:
    rec = recorded("openai", "stream.sse")  # role, "A", " car", " is", ...
    up.enqueue("oa", rec.reply([0.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0]))

    deltas: list[str] = []
    t0 = time.monotonic()
    with pytest.raises(StreamInterruptedError) as info:
        if sync:
            for d in r.generate("hello", model="idle_openai", stream=True):
                deltas.append(d)
        else:

            async def read() -> None:
                async for d in await r.agenerate("hello", model="idle_openai", stream=True):
                    deltas.append(d)

            asyncio.run(read())
    took = time.monotonic() - t0

    assert "".join(deltas) == "A car" == info.value.text
    assert took < 2.8  # the stall lasts 3 s
    assert "no text for 0.5s" in (info.value.attempts[-1].error or "")
    labels = {"alias": "idle_openai", "provider": "oa", "model": "gpt-35-turbo"}
    assert registry.get_sample_value("llm_router_stream_interrupted_total", labels) == 1
    assert registry.get_sample_value("llm_router_attempts_total", {**labels, "outcome": "stream_interrupted"}) == 1


@SYNC
@BOTH_ENGINES
def test_a_stream_that_trickles_forever_ends_at_the_calls_deadline(
    sync: bool, r: Router, up: Upstream, registry: CollectorRegistry
) -> None:
    rec = recorded("openai", "stream.sse")
    up.enqueue("oa", rec.reply(0.4))  # every gap under the idle limit (timeout_s: 5), 3.2 s in all

    t0 = time.monotonic()
    with pytest.raises(StreamInterruptedError) as info:
        stream_all(r, sync, "plain_openai", timeout=1.5)
    took = time.monotonic() - t0

    assert 1.3 < took < 3.0  # read out, the stream takes 3.2 s
    assert (
        info.value.text and "A car is a vehicle".startswith(info.value.text) and info.value.text != "A car is a vehicle"
    )
    assert "deadline" in (info.value.attempts[-1].error or "")
    labels = {"alias": "plain_openai", "provider": "oa", "model": "gpt-35-turbo"}
    assert registry.get_sample_value("llm_router_stream_interrupted_total", labels) == 1


# -- known quirks ---------------------------------------------------------------------------------------------


@SYNC
@BOTH_ENGINES
@pytest.mark.parametrize("provider", ["openai", "openrouter"])
def test_a_context_window_error_is_recognised_by_its_code(provider: str, sync: bool, r: Router, up: Upstream) -> None:
    # Worded so that litellm's text matching does not see it; the code says what it is.
    body = {"error": {"message": "Please reduce the length of the messages.", "type": "invalid_request_error",
                      "param": "messages", "code": "context_length_exceeded"}}  # fmt: skip
    up.enqueue(ROUTE[provider], Reply(status=400, json=body))
    up.enqueue("b", Reply(text=FALLBACK_TEXT))

    res = generate(r, sync, provider)

    assert trail(res) == [(ROUTE[provider], "context_window"), ("b", "success")]


@SYNC
@BOTH_ENGINES
@pytest.mark.parametrize(("status", "outcome"), [(402, "payment_required"), (403, "auth")])
def test_402_and_403_are_classified_by_status_not_by_message(
    status: int, outcome: str, sync: bool, r: Router, up: Upstream
) -> None:
    message = "You exceeded your current quota, please retry after the rate limit resets"  # reads like a 429
    up.enqueue("orr", Reply(status=status, json={"error": {"message": message, "code": status}}))
    up.enqueue("b", Reply(text=FALLBACK_TEXT))

    res = generate(r, sync, "openrouter")

    assert trail(res) == [("orr", outcome), ("b", "success")] and res.attempts[0].status_code == status


@SYNC
@BOTH_ENGINES  # direct: an alias whose first target is sent by the direct engine, its fallback by litellm
def test_params_a_fallback_target_does_not_take_are_dropped_and_logged(
    sync: bool, engine: str, make_router: MakeRouter, up: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    extra = "  mixed: {targets: [oa/gpt-4o-mini, an/claude-3-5-haiku-20241022]}"
    r = make_router(CONFIG.replace("{EXTRA}", extra))
    up.enqueue("oa", Reply(status=503))
    up.enqueue("an", Reply(text="anthropic answers"))

    # OpenAI takes each, Anthropic none; logged once per set in a process, so each run drops its own
    param = {("litellm", True): "seed", ("litellm", False): "presence_penalty",
             ("direct", True): "frequency_penalty", ("direct", False): "logprobs"}[engine, sync]  # fmt: skip

    with caplog.at_level(logging.WARNING, logger="router"):
        res = generate(r, sync, "mixed", temperature=0.2, **{param: 1})

    assert res.text == "anthropic answers" and trail(res) == [("oa", "server_error"), ("an", "success")]
    assert up.requests("oa")[0].body[param] == 1
    sent = up.requests("an")[0].body
    assert param not in sent and sent["temperature"] == 0.2
    assert any(param in m and "an/claude-3-5-haiku-20241022" in m for m in caplog.messages)


def _labels(r: Router, alias: str) -> dict[str, str]:
    t = r.config.targets(alias)[0]
    return {"alias": alias, "provider": t.provider, "model": t.model}


@BOTH_ENGINES
@pytest.mark.parametrize("how", ["closed", "dropped"])
def test_a_sync_stream_left_unread_stops_its_reader_thread(how: str, r: Router, up: Upstream) -> None:
    up.enqueue("oa", recorded("openai", "stream.sse").reply(0.3))  # 2.4 s to the end if read out

    stream = r.generate("hello", model="plain_openai", stream=True)
    assert next(stream) == "A"
    if how == "closed":
        stream.close()
    else:
        del stream
        gc.collect()

    deadline = time.monotonic() + 1.2
    while _readers() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _readers() == []


def _readers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "llm-router-stream" and t.is_alive()]


@BOTH_ENGINES
def test_a_dropped_sync_stream_is_never_closed_by_the_collecting_thread(
    r: Router, up: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The garbage collector may run inside a request, in a thread holding httpx's pool lock; closing a response
    # takes that lock, so a close from the collector deadlocked the next call (seen in CI).
    from router import streams

    closed_in: list[str] = []
    real = streams.close_quietly

    def spy(source: Any) -> None:
        closed_in.append(threading.current_thread().name)
        real(source)

    monkeypatch.setattr(streams, "close_quietly", spy)
    up.enqueue("oa", recorded("openai", "stream.sse").reply(0.3))
    stream = r.generate("hello", model="plain_openai", stream=True)
    assert next(stream) == "A"
    del stream
    gc.collect()
    deadline = time.monotonic() + 2.0
    while not closed_in and time.monotonic() < deadline:
        time.sleep(0.02)
    assert closed_in, "the dropped stream was never closed"
    assert threading.current_thread().name not in closed_in
    up.enqueue("oa", Reply(text="after"))
    assert r.generate("again", model="plain_openai").text == "after"


def test_stream_idle_timeout_is_configured_per_default_and_per_target() -> None:
    text = """
version: 1
defaults: {timeout_s: 7, stream_idle_timeout_s: 2, first_token_timeout_s: 3}
providers: {p: {kind: openai, api_key: k}}
aliases:
  a: {targets: [p/m1, {provider: p, model: m2, stream_idle_timeout_s: 0.5}]}
"""
    t1, t2 = parse_config(text, "t.yaml").targets("a")
    assert (t1.stream_idle_timeout_s, t2.stream_idle_timeout_s) == (2, 0.5)
    assert (t1.first_token_timeout_s, t2.first_token_timeout_s) == (3, 3)

    with pytest.raises(ConfigError) as info:
        parse_config(text.replace("stream_idle_timeout_s: 2", "stream_idle_timeout_s: -1"), "t.yaml")
    assert "t.yaml:3: defaults.stream_idle_timeout_s" in str(info.value)
