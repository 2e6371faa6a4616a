"""The response cache (`router.plugins.cache`) over the real loopback upstream: what is served, what never is.

The upstream's history says whether a request went out; the registry says what was counted.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from conftest import KEY_A, KEY_B, MakeRouter, standard_config, standard_env
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, field_validator
from redis_server import RedisServer, require

from router import (
    AllTargetsFailedError,
    BudgetExceededError,
    ConfigError,
    ProviderError,
    Result,
    Router,
    RouterError,
    StreamInterruptedError,
    Target,
    parse_config,
)
from router.config import LedgerConfig
from router.hooks import AttemptReport, Call, Hook, Reroute
from router.plugins.cache import CacheHook, FileStore, MemoryStore, RedisStore, request_key
from router.sandbox import Reply, Upstream
from router.usage import read_calls

PRICE_A = (2.0, 8.0)
PRICE_B = (1.0, 4.0)
CONFIG = standard_config(
    aliases="""
    cached: {targets: [a/model-a, b/model-b], cache: {ttl_s: 60}}
    brief: {targets: [a/model-a], cache: {ttl_s: 0.3}}
    """,
    extra=f"""
    pricing:
      a/model-a: {{input_per_1m: {PRICE_A[0]}, output_per_1m: {PRICE_A[1]}}}
      b/model-b: {{input_per_1m: {PRICE_B[0]}, output_per_1m: {PRICE_B[1]}}}
    """,
)
COST_A = (10 * PRICE_A[0] + 20 * PRICE_A[1]) / 1e6  # usage (10, 20) on a


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def sent(up: Upstream) -> int:
    return len(up.history)


def test_a_repeated_request_is_answered_from_the_cache(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry
) -> None:
    r = make_router(CONFIG)
    up.enqueue("a", Reply(text="the answer", usage=(10, 20)))
    first = r.generate("hi", model="cached", temperature=0)
    second = r.generate("hi", model="cached", temperature=0)
    assert sent(up) == 1
    assert (first.cached, first.cost_usd, first.cost_source) == (False, pytest.approx(COST_A), "config")
    assert (second.text, second.provider, second.model, second.finish_reason) == ("the answer", "a", "model-a", "stop")
    assert (second.cached, second.cost_usd, second.cost_source, second.attempts) == (True, 0.0, "cache", ())
    assert (second.usage.input_tokens, second.usage.output_tokens) == (10, 20)  # the answer's, not billed again
    assert sample(registry, "llm_router_cache_misses_total", alias="cached") == 1
    assert sample(registry, "llm_router_cache_hits_total", alias="cached") == 1
    saved = sample(registry, "llm_router_cost_saved_usd_total", alias="cached", provider="a", model="model-a")
    assert saved == pytest.approx(COST_A)
    # the hit is a successful call that sent nothing and cost nothing
    assert sample(registry, "llm_router_requests_total", alias="cached", outcome="success") == 2
    assert sample(
        registry, "llm_router_cost_usd_total", alias="cached", provider="a", model="model-a"
    ) == pytest.approx(COST_A)
    assert sample(registry, "llm_router_in_flight", alias="cached") == 0


@pytest.mark.asyncio
async def test_async_a_repeated_request_is_answered_from_the_cache(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry
) -> None:
    r = make_router(CONFIG)
    up.enqueue("a", Reply(text="the answer", usage=(10, 20)))
    first = await r.agenerate("hi", model="cached")
    second = await r.agenerate("hi", model="cached")
    assert sent(up) == 1
    assert (first.cached, second.cached, second.text, second.cost_usd) == (False, True, "the answer", 0.0)
    assert sample(registry, "llm_router_cache_hits_total", alias="cached") == 1


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ({"prompt": "hi"}, {"prompt": "hello"}),
        ({"prompt": "hi"}, {"prompt": "hi", "system": "be brief"}),
        ({"prompt": "hi", "temperature": 0}, {"prompt": "hi", "temperature": 0.7}),
        ({"prompt": "hi"}, {"prompt": "hi", "max_tokens": 5}),
        ({"prompt": "hi"}, {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "more"}]}),
    ],
)
def test_any_difference_in_the_request_is_a_miss(
    make_router: MakeRouter, up: Upstream, first: dict[str, Any], second: dict[str, Any]
) -> None:
    r = make_router(CONFIG)
    up.enqueue("a", Reply(text="one"), Reply(text="two"))
    assert r.generate(model="cached", **first).text == "one"
    again = r.generate(model="cached", **second)
    assert (again.text, again.cached, sent(up)) == ("two", False, 2)


def test_aliases_without_cache_and_other_aliases_do_not_share(make_router: MakeRouter, up: Upstream) -> None:
    r = make_router(CONFIG)
    up.enqueue("a", Reply(text="one"), Reply(text="two"), Reply(text="three"), Reply(text="four"))
    assert r.generate("hi", model="single").text == "one"
    assert r.generate("hi", model="single").text == "two"  # no cache on this alias
    assert r.generate("hi", model="cached").text == "three"
    assert r.generate("hi", model="brief").text == "four"  # same request, another alias
    assert sent(up) == 4


def test_cache_false_neither_reads_nor_writes(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry
) -> None:
    r = make_router(CONFIG)
    up.enqueue("a", Reply(text="one"), Reply(text="two"), Reply(text="three"))
    assert r.generate("hi", model="cached", cache=False).text == "one"
    assert r.generate("hi", model="cached").text == "two"  # "one" was not stored
    assert r.generate("hi", model="cached", cache=False).text == "three"  # "two" was, but is not read
    assert r.generate("hi", model="cached").text == "two"
    assert sent(up) == 3
    assert sample(registry, "llm_router_cache_misses_total", alias="cached") == 1
    assert sample(registry, "llm_router_cache_hits_total", alias="cached") == 1


def test_an_answer_is_found_under_the_target_that_gave_it(make_router: MakeRouter, up: Upstream) -> None:
    r = make_router(CONFIG)
    up.enqueue("a", Reply(status=503), Reply(status=503))
    up.enqueue("b", Reply(text="from b", usage=(3, 4)))
    assert r.generate("hi", model="cached").provider == "b"
    hit = r.generate("hi", model="cached")  # a is healthy again, but b's answer to the same request is stored
    assert (hit.cached, hit.provider, hit.text) == (True, "b", "from b")
    assert len(up.requests("a")) == 2


def test_errors_are_never_cached(make_router: MakeRouter, up: Upstream) -> None:
    r = make_router(CONFIG)
    up.enqueue("a", Reply(status=400, error="bad request"))
    with pytest.raises(ProviderError):
        r.generate("hi", model="cached")
    for route in "ab":
        up.enqueue(route, Reply(status=503), Reply(status=503))
    with pytest.raises(AllTargetsFailedError):
        r.generate("hi", model="cached")
    up.enqueue("a", Reply(text="at last"))
    res = r.generate("hi", model="cached")
    assert (res.text, res.cached) == ("at last", False)


def test_an_interrupted_stream_is_never_cached(make_router: MakeRouter, up: Upstream) -> None:
    r = make_router(CONFIG)
    up.enqueue("a", Reply(text="one two three four five six", cut_after=1))
    stream = r.generate("hi", model="cached", stream=True)
    with pytest.raises(StreamInterruptedError):
        "".join(stream)
    up.enqueue("a", Reply(text="one two three four five six"))
    stream = r.generate("hi", model="cached", stream=True)
    next(iter(stream))
    stream.close()  # abandoned: not an answer either
    up.enqueue("a", Reply(text="whole"))
    res = r.generate("hi", model="cached")
    assert (res.text, res.cached, sent(up)) == ("whole", False, 3)


def test_a_streamed_call_served_from_the_cache_still_streams(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry
) -> None:
    text = "a cached answer long enough to come back in several pieces"
    r = make_router(CONFIG)
    up.enqueue("a", Reply(text=text, usage=(10, 20)))
    assert r.generate("hi", model="cached").text == text
    stream = r.generate("hi", model="cached", stream=True)
    deltas = list(stream)
    assert len(deltas) > 1 and "".join(deltas) == text
    assert stream.result is not None and (stream.result.cached, stream.result.cost_usd) == (True, 0.0)
    assert sent(up) == 1
    assert sample(registry, "llm_router_in_flight", alias="cached") == 0


@pytest.mark.asyncio
async def test_async_a_streamed_answer_is_cached_and_served_as_a_stream(make_router: MakeRouter, up: Upstream) -> None:
    text = "streamed once and then replayed from the cache"
    r = make_router(CONFIG)
    up.enqueue("a", Reply(text=text, usage=(10, 20)))
    first = await r.agenerate("hi", model="cached", stream=True)
    assert "".join([d async for d in first]) == text
    again = await r.agenerate("hi", model="cached", stream=True)
    deltas = [d async for d in again]
    assert "".join(deltas) == text and len(deltas) > 1
    assert again.result is not None and again.result.cached
    plain = await r.agenerate("hi", model="cached")  # a stream and a plain call send the same request
    assert (plain.text, plain.cached, sent(up)) == (text, True, 1)


class Verdict(BaseModel):
    label: str


def strict_verdict() -> type[BaseModel]:
    class Verdict(BaseModel):  # the same name and JSON Schema, so the same request: only validation differs
        label: str

        @field_validator("label")
        @classmethod
        def _ham_only(cls, v: str) -> str:
            if v != "ham":
                raise ValueError("only ham")
            return v

    return Verdict


def test_a_cached_structured_answer_is_validated_again(make_router: MakeRouter, up: Upstream) -> None:
    r = make_router(CONFIG)
    up.enqueue("a", Reply(text='{"label": "spam"}'))
    assert r.generate("hi", model="cached", response_format=Verdict).parsed == Verdict(label="spam")
    hit = r.generate("hi", model="cached", response_format=Verdict)
    assert hit.cached and isinstance(hit.parsed, Verdict) and hit.parsed.label == "spam"
    assert sent(up) == 1
    strict = strict_verdict()
    up.enqueue("a", Reply(text='{"label": "ham"}'))
    res = r.generate("hi", model="cached", response_format=strict)
    assert (res.cached, res.parsed.label, sent(up)) == (False, "ham", 2)  # the cached "spam" does not validate
    assert r.generate("hi", model="cached", response_format=strict).cached  # and "ham" replaced it


def test_an_answer_expires_after_its_ttl(make_router: MakeRouter, up: Upstream) -> None:
    r = make_router(CONFIG)
    up.enqueue("a", Reply(text="one"), Reply(text="two"))
    assert r.generate("hi", model="brief").text == "one"
    assert r.generate("hi", model="brief").cached
    time.sleep(0.35)
    res = r.generate("hi", model="brief")
    assert (res.text, res.cached) == ("two", False)


def test_tool_calls_are_not_cached(make_router: MakeRouter, up: Upstream) -> None:
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "model-a",
        "choices": [
            {
                "index": 0,
                "finish_reason": "tool_calls",
                "message": {
                    "role": "assistant",
                    "content": "calling",
                    "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
                },
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
    r = make_router(CONFIG)
    up.enqueue("a", Reply(json=body), Reply(text="plain"))
    assert r.generate("hi", model="cached").finish_reason == "tool_calls"
    assert r.generate("hi", model="cached").text == "plain"
    assert sent(up) == 2


def test_the_key_is_not_part_of_the_cache_key(make_router: MakeRouter, up: Upstream) -> None:
    pooled = """
    version: 1
    providers:
      a: {kind: openai, api_base: "{UP}/a/v1", api_key: [{name: one, key: "${KEY_A}"}, {name: two, key: "${KEY_B}"}]}
    aliases:
      cached: {targets: [a/model-a], cache: {ttl_s: 60}}
    """
    r = make_router(pooled)
    up.enqueue("a", Reply(text="for everyone"))
    assert r.generate("hi", model="cached", key="one").text == "for everyone"
    hit = r.generate("hi", model="cached", key="two")
    assert hit.cached and sent(up) == 1
    request = {"model": "openai/model-a", "messages": [{"role": "user", "content": "hi"}], "timeout": 5}
    assert request_key("x", {**request, "api_key": KEY_A}) == request_key("x", {**request, "api_key": KEY_B})
    assert request_key("x", request) != request_key("y", request)


class Seen(Hook):
    def __init__(self) -> None:
        self.finished: list[Result | None] = []
        self.attempts: list[AttemptReport] = []

    def attempt_finished(self, call: Call, report: AttemptReport) -> None:
        self.attempts.append(report)

    def call_finished(self, call: Call, result: Result | None, error: BaseException | None) -> None:
        self.finished.append(result)


def test_hooks_see_a_hit_at_no_cost_and_no_attempt(make_router: MakeRouter, up: Upstream) -> None:
    seen = Seen()
    r = make_router(CONFIG, hooks=[seen])
    up.enqueue("a", Reply(text="one", usage=(10, 20)))
    r.generate("hi", model="cached")
    r.generate("hi", model="cached")
    hit = seen.finished[-1]
    assert hit is not None and (hit.cached, hit.cost_usd, hit.cost_source) == (True, 0.0, "cache")
    assert len(seen.attempts) == 1  # the first call's request only


class RerouteToSingle(Hook):
    """A budget's fallback, as the seam sees it: the first request of a call on `cached` moves it to `single`."""

    def before_attempt(self, call: Call, target: Target, request: Mapping[str, Any]) -> None:
        if call.alias == "cached" and call.rerouted_to is None:
            raise Reroute("single", RouterError("cached is over budget"))


def test_an_answer_from_a_rerouted_call_is_not_stored(make_router: MakeRouter, up: Upstream) -> None:
    r = make_router(CONFIG, hooks=[RerouteToSingle()])
    up.route("a").set_default(Reply(text="from single"))
    for _ in range(2):  # single's request, not cached's: storing it under cached's would serve it wrongly
        res = r.generate("hi", model="cached", max_tokens=5)
        assert (res.text, res.cached) == ("from single", False)
    assert sent(up) == 2


def test_a_file_store_is_shared_by_routers_on_one_host(make_router: MakeRouter, up: Upstream, tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    text = CONFIG + f"\ncache: {{store: file, path: {json.dumps(str(path))}}}\n"
    first = make_router(text)
    up.enqueue("a", Reply(text="shared", usage=(10, 20)))
    assert first.generate("hi", model="cached").text == "shared"
    first.close()  # finishes the queued write
    other = make_router(text)  # another worker: its own store object and connections on the same file
    hit = other.generate("hi", model="cached")
    assert (hit.cached, hit.text, sent(up)) == (True, "shared", 1)
    other.close()
    assert KEY_A.encode() not in path.read_bytes() and b"sk-test" not in path.read_bytes()


@pytest.mark.asyncio
async def test_async_a_file_store_lookup_runs_off_the_event_loop(
    make_router: MakeRouter, up: Upstream, tmp_path: Path
) -> None:
    text = CONFIG + f"\ncache: {{store: file, path: {json.dumps(str(tmp_path / 'c.sqlite'))}}}\n"
    r = make_router(text)
    assert r._hooks.blocking  # agenerate() runs call_started in a thread
    up.enqueue("a", Reply(text="async shared"))
    assert (await r.agenerate("hi", model="cached")).text == "async shared"
    r._hooks.hooks[0].store.flush()  # type: ignore[attr-defined]
    assert (await r.agenerate("hi", model="cached")).cached
    r.close()


def test_the_memory_store_is_bounded_in_entries_and_bytes() -> None:
    store = MemoryStore(max_entries=3, max_bytes=1000)
    for i in range(5):
        store.put(f"k{i}", b"x" * 10, expires_at=time.time() + 60)
    assert len(store) == 3 and store.get("k0", time.time()) is None and store.get("k4", time.time()) == b"x" * 10
    store.get("k2", time.time())  # now the most recently used: k3 goes first
    store.put("big", b"y" * 900, expires_at=time.time() + 60)
    assert store.size <= 1000
    assert store.get("k2", time.time()) is not None and store.get("k3", time.time()) is None
    store.put("huge", b"z" * 2000, expires_at=time.time() + 60)  # bigger than the whole store: not kept
    assert store.get("huge", time.time()) is None and store.size <= 1000
    store.put("old", b"o", expires_at=time.time() - 1)
    assert store.get("old", time.time()) is None


def test_the_file_store_is_bounded_in_entries_and_bytes(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "c.sqlite", max_entries=3, max_bytes=2000)
    for i in range(5):
        store.put(f"k{i}", b"x" * 10, expires_at=time.time() + 60)
        store.flush()
    now = time.time()
    assert [store.get(f"k{i}", now) is not None for i in range(5)] == [False, False, True, True, True]
    store.put("big", b"y" * 1990, expires_at=time.time() + 60)
    store.flush()
    assert store.get("big", time.time()) is not None
    assert all(store.get(f"k{i}", time.time()) is None for i in range(5))  # evicted for bytes
    store.put("huge", b"z" * 5000, expires_at=time.time() + 60)
    store.flush()
    assert store.get("huge", time.time()) is None
    store.close()


@pytest.mark.parametrize(
    ("section", "problem"),
    [
        ("cache: {store: file}", "test.yaml:16: cache: store: file needs a path"),
        ("cache: {store: memory, path: /tmp/x}", "path is only for store: file"),
        ("cache: {store: redis}", "cache.store: store: redis uses the Redis of the state: section"),
        ("cache: {store: redis, path: /tmp/x}", "path is only for store: file"),
        ("cache: {max_entries: 0}", "cache.max_entries"),
        ("cache: {ttl: 3}", "cache.ttl: unknown key"),
    ],
)
def test_bad_cache_sections_are_config_errors(section: str, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(standard_config(extra=section).replace("{UP}", "http://127.0.0.1:9"), "test.yaml", env={})
    assert str(err.value).count("\n") == 0 and problem in str(err.value)


def test_an_alias_cache_needs_a_positive_ttl() -> None:
    text = standard_config(aliases="x: {targets: [a/model-a], cache: {ttl_s: 0}}").replace("{UP}", "http://h")
    with pytest.raises(ConfigError) as err:
        parse_config(text, "test.yaml", env={})
    assert str(err.value).startswith("test.yaml:15: aliases.x.cache.ttl_s:")
    ok = parse_config(text.replace("ttl_s: 0", "ttl_s: 5"), "t.yaml", env={"KEY_B": KEY_B})
    assert ok.aliases["x"].cache is not None and ok.aliases["x"].cache.ttl_s == 5
    assert KEY_B not in repr(ok)


def test_a_reload_that_drops_an_alias_cache_stops_serving_it(up: Upstream, tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    env_text = CONFIG.replace("{UP}", up.url)
    for name, value in standard_env().items():
        env_text = env_text.replace("${" + name + "}", value)
    path.write_text(env_text)
    r = Router.from_yaml(path, registry=CollectorRegistry())
    up.enqueue("a", Reply(text="one"), Reply(text="two"))
    r.generate("hi", model="cached")
    assert r.generate("hi", model="cached").cached
    path.write_text(env_text.replace("cache: {ttl_s: 60}", "params: {}"))
    assert r.reload()
    res = r.generate("hi", model="cached")
    assert (res.text, res.cached) == ("two", False)


# -- the ledger and budgets: a hit is a call that cost nothing ------------------------------------------------


def with_ledger(db: Path, budgets: str = "") -> str:
    return CONFIG + f'ledger: {{path: "{db}", flush_interval_s: 0.05}}\n' + budgets


def test_a_hit_is_one_ledger_row_at_no_cost_from_the_cache(
    make_router: MakeRouter, up: Upstream, tmp_path: Path
) -> None:
    db = tmp_path / "ledger.sqlite3"
    r = make_router(with_ledger(db))
    up.enqueue("a", Reply(text="the answer", usage=(10, 20)))
    r.generate("hi", model="cached", tags={"tenant": "acme"})
    hit = r.generate("hi", model="cached", tags={"tenant": "acme"})
    r.close()
    assert hit.cached and sent(up) == 1
    bought, served = read_calls(LedgerConfig(path=str(db)), since=0)
    assert (bought["cost_source"], bought["cost_nusd"], bought["attempts"]) == ("config", round(COST_A * 1e9), 1)
    assert (served["alias"], served["outcome"], served["provider"], served["model"]) == (
        "cached",
        "success",
        "a",
        "model-a",
    )
    assert (served["cost_nusd"], served["failed_cost_nusd"], served["cost_source"]) == (0, 0, "cache")
    assert (served["attempts"], served["input_tokens"], served["output_tokens"]) == (0, 0, 0)  # nothing billed
    assert served["tags"] == {"tenant": "acme"} and served["key_name"] is None
    assert served["id"] != bought["id"]


@pytest.mark.asyncio
async def test_async_a_streamed_hit_is_one_ledger_row_at_no_cost(
    make_router: MakeRouter, up: Upstream, tmp_path: Path
) -> None:
    db = tmp_path / "ledger.sqlite3"
    r = make_router(with_ledger(db))
    up.enqueue("a", Reply(text="one two three", usage=(4, 5)))
    first = await r.agenerate("hi", model="cached", stream=True)
    text = "".join([d async for d in first])
    again = await r.agenerate("hi", model="cached", stream=True)
    assert "".join([d async for d in again]) == text and again.result.cached
    await asyncio.to_thread(r.close)
    rows = read_calls(LedgerConfig(path=str(db)), since=0)
    assert [(g["outcome"], g["cost_source"], g["attempts"]) for g in rows] == [
        ("success", "config", 1),
        ("success", "cache", 0),
    ]
    assert rows[1]["cost_nusd"] == 0


def test_a_budget_reserves_nothing_for_a_hit(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry, tmp_path: Path
) -> None:
    db = tmp_path / "ledger.sqlite3"
    # One call's worst case (max_tokens 100 at $8/1M output, plus the prompt) fits; after one that used all
    # 100 tokens ($0.00082 spent), another does not.
    budget = "budgets:\n  - {name: cached-day, alias: cached, period: day, limit_usd: 0.0012}\n"
    r = make_router(with_ledger(db, budget))
    up.route("a").set_default(Reply(text="the answer", usage=(10, 100)))
    r.generate("hi", model="cached", max_tokens=100)
    for _ in range(3):  # the budget cannot take another request, but a hit sends none
        assert r.generate("hi", model="cached", max_tokens=100).cached
    with pytest.raises(BudgetExceededError):  # a miss still asks the budget: now over it
        r.generate("something else", model="cached", max_tokens=100)
    r.close()
    assert sent(up) == 1
    assert sample(registry, "llm_router_budget_rejections_total", budget="cached-day", reason="limit") == 1
    outcomes = [(g["outcome"], g["cost_source"]) for g in read_calls(LedgerConfig(path=str(db)), since=0)]
    assert outcomes == [("success", "config")] + [("success", "cache")] * 3 + [("budget_exceeded", None)]


# -- store: redis, the Redis of state: (a real redis-server) --------------------------------------------------

REDIS_PASSWORD = "s3cret-cache-passw0rd"


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer(require()) as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    import redis

    redis_server.start()  # a test may have stopped it
    redis.Redis.from_url(redis_server.url).flushall()
    return redis_server.url


def redis_config(url: str) -> str:
    return CONFIG + f'state: {{backend: redis, url: "{url}", prefix: fleet-1}}\ncache: {{store: redis}}\n'


def cache_store(r: Router) -> Any:
    (hook,) = [h for h in r._hooks.hooks if isinstance(h, CacheHook)]
    return hook.store


def test_a_redis_store_is_shared_by_a_fleet(make_router: MakeRouter, up: Upstream, redis_url: str) -> None:
    import redis

    first = make_router(redis_config(redis_url))
    assert isinstance(cache_store(first), RedisStore)
    up.enqueue("a", Reply(text="shared", usage=(10, 20)))
    up.enqueue("a", Reply(text="brief"))
    assert first.generate("hi", model="cached").text == "shared"
    assert first.generate("hi", model="brief").text == "brief"  # ttl_s 0.3
    cache_store(first).flush()
    other = make_router(redis_config(redis_url))  # another replica: its own connections to the same Redis
    hit = other.generate("hi", model="cached")
    assert (hit.cached, hit.text, hit.cost_usd, hit.cost_source, sent(up)) == (True, "shared", 0.0, "cache", 2)
    client = redis.Redis.from_url(redis_url)
    names = sorted(k.decode() for k in client.keys("*"))
    assert all(n.startswith("fleet-1:cache:") for n in names if ":cache:" in n) and len(names) >= 2
    values = b"".join(client.get(n) or b"" for n in names if ":cache:" in n)
    assert b"shared" in values and KEY_A.encode() not in values and b"sk-test" not in values
    assert 0 < max(client.pttl(n) for n in names if ":cache:" in n) <= 60_000  # Redis expires them itself
    time.sleep(0.5)
    up.enqueue("a", Reply(text="brief again"))
    assert other.generate("hi", model="brief").text == "brief again"  # the 0.3 s answer expired in Redis
    first.close()
    other.close()


@pytest.mark.asyncio
async def test_async_a_redis_hit_is_read_off_the_event_loop(
    make_router: MakeRouter, up: Upstream, redis_url: str
) -> None:
    r = make_router(redis_config(redis_url))
    assert r._hooks.blocking  # a lookup is network I/O: agenerate() runs it in a thread
    up.enqueue("a", Reply(text="async shared"))
    assert (await r.agenerate("hi", model="cached")).text == "async shared"
    await asyncio.to_thread(cache_store(r).flush)
    hit = await r.agenerate("hi", model="cached")
    assert (hit.cached, hit.text, sent(up)) == (True, "async shared", 1)
    await asyncio.to_thread(r.close)


def test_redis_down_means_misses_never_failed_calls(
    make_router: MakeRouter, up: Upstream, redis_server: RedisServer, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = redis_url.replace("redis://", f"redis://:{REDIS_PASSWORD}@")  # a password the logs must not show
    import redis

    redis.Redis.from_url(redis_url).config_set("requirepass", REDIS_PASSWORD)
    r = make_router(redis_config(url))
    redis_server.stop()
    up.route("a").set_default(Reply(text="from a"))
    for _ in range(3):
        res = r.generate("hi", model="cached")
        assert (res.text, res.cached) == ("from a", False)
    cache_store(r).flush()
    assert sent(up) == 3
    r.close()
    logged = [m for m in caplog.messages if "response cache: redis" in m]
    assert len(logged) == 1 and "127.0.0.1" in logged[0]  # once per outage, where it is, not how to log in
    assert REDIS_PASSWORD not in caplog.text
