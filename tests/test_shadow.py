"""Shadow traffic on real parts: the loopback upstream as primary (route sh-p, fallback sh-q) and as candidate
(routes sh-s, sh-t), a real SQLite ledger and budget, real metrics, the `shadow-report` command."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import KEY_A, KEY_B, MakeRouter, standard_env
from gunicorn_server import APPS, GUNICORN, WORKERS, Gunicorn, spread
from prometheus_client import CollectorRegistry, generate_latest
from pydantic import BaseModel

from router import ConfigError, Router, StreamInterruptedError, parse_config
from router.cli import main
from router.config import LedgerConfig
from router.hooks import Call
from router.plugins.ledger import call_row, ledger_of
from router.plugins.shadow import (
    CLOSE_WAIT_S,
    Primary,
    ShadowHook,
    agreement,
    opted_out,
    plain_request,
    sampled,
    shadow_hook,
    text_similarity,
    tool_signature,
)
from router.plugins.store import CALL_COLUMNS
from router.sandbox import Reply, Upstream
from router.shadow_report import build_report, percentile, query_shadow_report, render_report
from router.usage import query_usage, read_calls

PRIMARY_TEXT = "the cat sat on the mat"
SHADOW_TEXT = "a cat sat on a mat"  # words {a, cat, sat, on, mat} vs {the, cat, sat, on, mat}: 4 of 6 shared


def config(
    percent: float = 100,
    max_in_flight: int = 8,
    more: str = "",
    extra: str = "",
    shadow_targets: str = "s/model-s",
    s_timeout: float = 5,
) -> str:
    """Alias chat: p, then q (params of its own), shadowed on s; `more`: more keys of the shadow section."""
    return f"""
version: 1
defaults:
  model: chat
  timeout_s: 5
  deadline_s: 10
  retry: {{attempts: 2, backoff_s: 0.01, max_backoff_s: 0.05}}
providers:
  p: {{kind: openai, api_base: "{{UP}}/sh-p/v1", api_key: "${{KEY_A}}"}}
  q: {{kind: openai, api_base: "{{UP}}/sh-q/v1", api_key: "${{KEY_A}}"}}
  s: {{kind: openai, api_base: "{{UP}}/sh-s/v1", api_key: "${{KEY_B}}", timeout_s: {s_timeout}}}
  t: {{kind: openai, api_base: "{{UP}}/sh-t/v1", api_key: "${{KEY_C}}"}}
  nokey: {{kind: openai, api_base: "{{UP}}/sh-t/v1", api_key: "${{SHADOW_TEST_UNSET_KEY}}"}}
aliases:
  chat:
    targets: [p/model-p, {{provider: q, model: model-q, params: {{temperature: 0.3}}}}]
    system: You are terse.
    params: {{max_tokens: 50}}
    shadow: {{targets: [{shadow_targets}], percent: {percent}, max_in_flight: {max_in_flight}{more}}}
  plain: {{targets: [p/model-p]}}
pricing:
  p/model-p: {{input_per_1m: 1.0, output_per_1m: 2.0}}
  q/model-q: {{input_per_1m: 1.0, output_per_1m: 2.0}}
  s/model-s: {{input_per_1m: 0.5, output_per_1m: 1.0}}
{extra}
"""


def ledger_at(path: Path) -> str:
    return f'ledger: {{path: "{path}", flush_interval_s: 0.05}}'


def answer(up: Upstream, shadow_delay: float = 0.0, shadow: Reply | None = None) -> None:
    up.set_default("sh-p", Reply(text=PRIMARY_TEXT, usage=(10, 6)))
    up.set_default("sh-q", Reply(text=PRIMARY_TEXT, usage=(10, 6)))
    up.set_default("sh-s", shadow or Reply(text=SHADOW_TEXT, usage=(10, 5), delay_s=shadow_delay))
    up.set_default("sh-t", Reply(text=PRIMARY_TEXT, usage=(10, 6)))


def hook_of(r: Router) -> ShadowHook:
    hook = shadow_hook(r._hooks.hooks)
    assert hook is not None
    return hook


def settle(r: Router) -> None:
    """Wait for the shadows under way, then for the ledger to write their rows."""
    assert hook_of(r).wait(15)
    led = ledger_of(r._hooks.hooks)
    if led is not None:
        assert led.flush(10)


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def shadow_count(registry: CollectorRegistry, outcome: str, model: str = "model-s", provider: str = "s") -> float:
    return sample(
        registry, "llm_router_shadow_requests_total", alias="chat", provider=provider, model=model, outcome=outcome
    )


def skipped(registry: CollectorRegistry, reason: str, provider: str = "s", model: str = "model-s") -> float:
    return sample(
        registry, "llm_router_shadow_skipped_total", alias="chat", provider=provider, model=model, reason=reason
    )


def rows(db: Path) -> list[dict[str, Any]]:
    return read_calls(LedgerConfig(path=str(db)), since=0)


# -- pure decisions -----------------------------------------------------------------------------------------------


def test_sampling_follows_the_pin_then_the_percent() -> None:
    never = lambda: pytest.fail("no draw when pinned or at 0% / 100%")  # noqa: E731
    assert sampled(5, True, never) and not sampled(100, False, never)
    assert sampled(100, None, never) and not sampled(0, None, never)
    assert sampled(0, True, never)  # percent 0 still lets a call pin its shadow
    assert sampled(5, None, lambda: 0.0499) and not sampled(5, None, lambda: 0.05)


def test_opt_out_by_tag_values() -> None:
    skip = {"tenant": ["acme", "globex"]}
    assert opted_out(skip, {"tenant": "acme", "user": "u-1"})
    assert not opted_out(skip, {"tenant": "initech"})
    assert not opted_out(skip, {"user": "acme"}) and not opted_out({}, {"tenant": "acme"})


def test_agreement_is_parsed_equality_for_structure_and_word_overlap_for_text() -> None:
    assert text_similarity(PRIMARY_TEXT, SHADOW_TEXT) == pytest.approx(4 / 6)
    assert text_similarity("Yes.", "yes") == 1.0 and text_similarity("", "") == 1.0
    assert text_similarity("alpha beta", "gamma") == 0.0
    assert agreement(Primary("id", PRIMARY_TEXT), SHADOW_TEXT, None, ()) == (pytest.approx(4 / 6), "text")
    assert agreement(Primary("id", "{}", {"a": 1}, (), True), "{ }", {"a": 1}, ()) == (1.0, "parsed")
    assert agreement(Primary("id", "{}", {"a": 1}, (), True), "{}", {"a": 2}, ()) == (0.0, "parsed")
    f = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1, "y": 2}'}}
    g = {"id": "call_9", "type": "function", "function": {"name": "f", "arguments": '{"y": 2, "x": 1}'}}
    h = {"id": "call_2", "type": "function", "function": {"name": "h", "arguments": "{}"}}
    assert tool_signature([f, h]) == tool_signature([h, g])  # ids, order of calls and of arguments aside
    assert agreement(Primary("id", "", None, (f,)), "", None, [g]) == (1.0, "tools")
    assert agreement(Primary("id", "", None, (f,)), "", None, [h]) == (0.0, "tools")
    assert agreement(Primary("id", "sure"), "sure", None, [f]) == (0.0, "tools")


def test_a_streamed_request_is_shadowed_as_a_plain_one() -> None:
    body = {"messages": [], "stream": True, "stream_options": {"include_usage": True}, "temperature": 0}
    assert plain_request(body) == {"messages": [], "temperature": 0}


# -- config ---------------------------------------------------------------------------------------------------------


def test_shadow_targets_are_resolved_and_checked_at_load() -> None:
    cfg = parse_config(config(percent=5).replace("{UP}", "http://127.0.0.1:9"), "s.yaml", env=standard_env())
    (s,) = cfg.shadow_targets("chat")
    assert (s.provider, s.model, s.timeout_s, s.pricing is not None) == ("s", "model-s", 5.0, True)
    assert cfg.aliases["chat"].shadow is not None and cfg.aliases["chat"].shadow.max_in_flight == 8
    assert cfg.shadow_targets("plain") == ()
    bad = {
        "shadow_targets": ("s/model-s, zz/x", "aliases.chat.shadow.targets[1]: provider 'zz' is not defined"),
        "percent": ("150", "aliases.chat.shadow.percent: Input should be less than or equal to 100"),
        "max_in_flight": ("0", "aliases.chat.shadow.max_in_flight: Input should be greater than 0"),
        "dup": ("s/model-s, s/model-s", "shadow targets must be unique: s/model-s"),
        "tags": (", skip_tags: {'ten ant': [acme]}", "tag name 'ten ant' must be 1-64 characters"),
        "typo": (", percnt: 5", "aliases.chat.shadow.percnt: unknown key"),
    }
    for case, (value, message) in bad.items():
        kw: dict[str, Any] = {
            "shadow_targets": {"shadow_targets": value},
            "dup": {"shadow_targets": value},
            "percent": {"percent": value},
            "max_in_flight": {"max_in_flight": value},
        }.get(case, {"more": value})
        with pytest.raises(ConfigError) as exc:
            parse_config(config(**kw).replace("{UP}", "http://127.0.0.1:9"), "s.yaml", env=standard_env())
        assert message in str(exc.value), case
        assert "s.yaml:" in str(exc.value).splitlines()[0], case  # with the file and line


# -- what the shadow is sent, and what the caller gets -------------------------------------------------------


def test_the_shadow_gets_the_request_the_answering_target_was_sent(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry
) -> None:
    answer(up)
    up.enqueue("sh-p", Reply(status=503), Reply(status=503))  # p fails twice: q answers, with its own params
    r = make_router(config())
    res = r.generate("What is a cat?", top_p=0.9, tags={"tenant": "acme"})
    assert (res.text, res.provider, res.attempts[-1].outcome) == (PRIMARY_TEXT, "q", "success")
    assert [a.provider for a in res.attempts] == ["p", "p", "q"]  # the shadow is none of the caller's attempts
    assert res.cost_usd == pytest.approx((10 * 1.0 + 6 * 2.0) / 1e6)  # nor of its cost
    settle(r)
    (primary,) = up.requests("sh-q")
    (shadow,) = up.requests("sh-s")
    assert shadow.body == {**primary.body, "model": "model-s"}  # system prompt, params, everything but the model
    assert shadow.messages[0] == {"role": "system", "content": "You are terse."}
    assert (shadow.body["temperature"], shadow.body["max_tokens"], shadow.body["top_p"]) == (0.3, 50, 0.9)
    assert shadow.headers["authorization"] == f"Bearer {KEY_B}"  # the shadow target's own key
    assert shadow_count(registry, "success") == 1
    assert (
        sample(registry, "llm_router_shadow_tokens_total", alias="chat", provider="s", model="model-s", kind="output")
        == 5
    )
    cost = sample(registry, "llm_router_shadow_cost_usd_total", alias="chat", provider="s", model="model-s")
    assert cost == pytest.approx((10 * 0.5 + 5 * 1.0) / 1e6)
    assert sample(registry, "llm_router_shadow_agreement_sum", alias="chat", provider="s", model="model-s") == (
        pytest.approx(4 / 6)
    )
    # the primary's series know nothing of it
    assert (
        sample(registry, "llm_router_attempts_total", alias="chat", provider="s", model="model-s", outcome="success")
        == 0
    )
    assert registry.get_sample_value("llm_router_requests_total", {"alias": "chat", "outcome": "success"}) == 1
    assert sample(registry, "llm_router_shadow_in_flight", alias="chat") == 0
    r.close()


def test_each_shadow_target_gets_one_request(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry
) -> None:
    answer(up)
    r = make_router(config(shadow_targets="s/model-s, t/model-t, nokey/model-n"))
    r.generate("hi")
    settle(r)
    assert len(up.requests("sh-s")) == 1 and [x.model for x in up.requests("sh-t")] == ["model-t"]
    assert shadow_count(registry, "success", "model-t", "t") == 1
    assert skipped(registry, "no_credentials", "nokey", "model-n") == 1
    assert sample(registry, "llm_router_shadow_agreement_sum", alias="chat", provider="t", model="model-t") == 1.0
    r.close()


def test_a_slow_shadow_never_delays_the_caller(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry
) -> None:
    answer(up, shadow_delay=2.0)
    r = make_router(config())
    r.generate("warm up", shadow=False)
    t0 = time.monotonic()
    results = [r.generate(f"question {i}") for i in range(5)]
    took = time.monotonic() - t0
    assert [x.text for x in results] == [PRIMARY_TEXT] * 5
    assert took < 2.0, f"5 calls took {took:.2f}s: the caller waited for a shadow that takes 2 s"
    assert hook_of(r).in_flight("chat") == 5  # all five still under way, in the background
    settle(r)
    assert len(up.requests("sh-s")) == 5 and shadow_count(registry, "success") == 5
    r.close()


def test_async_callers_do_not_wait_and_shadows_outlive_their_event_loop(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry
) -> None:
    answer(up, shadow_delay=1.0)
    r = make_router(config())

    async def calls() -> list[str]:
        return [(await r.agenerate(f"question {i}")).text for i in range(3)]

    t0 = time.monotonic()
    texts = asyncio.run(calls())  # the caller's loop is closed at once: shadows do not run on it
    assert time.monotonic() - t0 < 1.0 and texts == [PRIMARY_TEXT] * 3
    settle(r)
    assert shadow_count(registry, "success") == 3
    r.close()


def test_a_failing_shadow_is_sent_once_and_never_seen(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    answer(up, shadow=Reply(status=503, error="SIMULATED overload"))
    r = make_router(config())
    with caplog.at_level(logging.WARNING, logger="router"):
        for i in range(3):
            assert r.generate(f"q{i}").text == PRIMARY_TEXT
        settle(r)
    assert len(up.requests("sh-s")) == 3  # no retry, no fallback
    assert shadow_count(registry, "server_error") == 3
    assert [m for m in caplog.messages if "shadow request to s/model-s failed" in m] != []  # once
    assert len([m for m in caplog.messages if "shadow request" in m]) == 1
    # no breaker or key bookkeeping of the candidate: its failures never touch the primary's health state
    text = generate_latest(registry).decode()
    health = [line for line in text.splitlines() if "circuit" in line or "key_requests" in line]
    assert not [line for line in health if 'provider="s"' in line]
    assert KEY_B not in caplog.text and KEY_B not in text
    r.close()


def test_a_shadow_timing_out_is_a_timeout(make_router: MakeRouter, up: Upstream, registry: CollectorRegistry) -> None:
    answer(up, shadow_delay=1.5)
    r = make_router(config(s_timeout=0.3))
    t0 = time.monotonic()
    r.generate("hi")
    assert time.monotonic() - t0 < 1.0
    settle(r)
    assert shadow_count(registry, "timeout") == 1
    r.close()


class City(BaseModel):
    name: str
    population: int


def test_structured_answers_agree_by_their_parsed_values(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry, tmp_path: Path
) -> None:
    db = tmp_path / "ledger.sqlite3"
    answer(up)
    up.set_default("sh-p", Reply(text='{"name": "Paris", "population": 2}', usage=(10, 6)))
    up.enqueue(
        "sh-s",
        Reply(text='{"population": 2,\n "name": "Paris"}', usage=(10, 6)),  # the same value, written otherwise
        Reply(text='{"name": "Paris", "population": 3}', usage=(10, 6)),
        Reply(text="Paris, about 2 million", usage=(10, 6)),
    )
    r = make_router(config(extra=ledger_at(db)))
    for _ in range(3):
        assert r.generate("Capital of France?", response_format=City).parsed == City(name="Paris", population=2)
        settle(r)
    primary = up.requests("sh-p")[0].body
    assert [x.body for x in up.requests("sh-s")] == [{**primary, "model": "model-s"}] * 3  # response format too
    shadows = [g for g in rows(db) if g["shadow_of"]]
    assert [(g["outcome"], g["agreement"], g["agreement_kind"]) for g in shadows] == [
        ("success", 1.0, "parsed"),
        ("success", 0.0, "parsed"),
        ("invalid_response", None, None),
    ]
    assert shadows[2]["failed_cost_nusd"] == shadows[2]["cost_nusd"] > 0  # not usable, but billed
    r.close()


def test_tool_calls_are_compared_as_calls(make_router: MakeRouter, up: Upstream, tmp_path: Path) -> None:
    def tool_answer(args: str) -> Reply:
        call = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": args}}
        message = {"role": "assistant", "content": None, "tool_calls": [call]}
        return Reply(
            json={
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 1,
                "model": "m",
                "choices": [{"index": 0, "finish_reason": "tool_calls", "message": message}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10},
            }
        )

    db = tmp_path / "ledger.sqlite3"
    answer(up)
    up.set_default("sh-p", tool_answer('{"city": "Paris"}'))
    up.enqueue("sh-s", tool_answer('{ "city": "Paris" }'), tool_answer('{"city": "Lyon"}'))
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    r = make_router(config(extra=ledger_at(db)))
    for _ in range(2):
        assert r.generate("Weather in Paris?", tools=tools).tool_calls[0]["function"]["name"] == "weather"
        settle(r)
    assert up.requests("sh-s")[0].body["tools"] == tools
    assert [(g["agreement"], g["agreement_kind"]) for g in rows(db) if g["shadow_of"]] == [
        (1.0, "tools"),
        (0.0, "tools"),
    ]
    r.close()


def test_a_stream_is_shadowed_after_it_ended_well_as_a_plain_request(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry
) -> None:
    answer(up)
    r = make_router(config())
    assert "".join(r.generate("tell me", stream=True)) == PRIMARY_TEXT
    settle(r)
    (primary,) = up.requests("sh-p")
    (shadow,) = up.requests("sh-s")
    assert primary.stream and not shadow.stream and "stream_options" not in shadow.body
    assert shadow.body == {k: v for k, v in primary.body.items() if k not in ("stream", "stream_options")} | {
        "model": "model-s"
    }
    # a stream cut after text, and one the caller closed early, are not shadowed
    up.enqueue("sh-p", Reply(text="one two three four", cut_after=1), Reply(text="one two three four", cut_after=1))
    with pytest.raises(StreamInterruptedError):
        "".join(r.generate("tell me", model="chat", stream=True))
    up.enqueue("sh-p", Reply(text="one two three four"))
    s = r.generate("tell me", stream=True)
    next(iter(s))
    s.close()
    settle(r)
    assert len(up.requests("sh-s")) == 1
    r.close()


def test_calls_that_raise_or_hit_the_cache_are_not_shadowed_and_nothing_is_cached_from_one(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry
) -> None:
    answer(up)
    cached = config().replace("params: {max_tokens: 50}", "params: {max_tokens: 50}\n    cache: {ttl_s: 60}")
    r = make_router(cached)
    first = r.generate("same question")
    settle(r)
    again = r.generate("same question")  # a hit: the primary's answer, never the shadow's; and not shadowed
    assert (again.cached, again.text, first.text) == (True, PRIMARY_TEXT, PRIMARY_TEXT)
    up.set_default("sh-p", Reply(status=400, error="bad"))
    with pytest.raises(Exception):  # noqa: B017 - whatever the primary raised, no shadow follows
        r.generate("a bad question")
    settle(r)
    assert len(up.requests("sh-s")) == 1
    r.close()


# -- who is shadowed: the sample, the pin, the opt-out -------------------------------------------------------------


def test_sampling_is_within_tolerance_over_a_thousand_calls(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry
) -> None:
    up.set_default("sh-p", Reply(text="ok", usage=(1, 1)))
    up.set_default("sh-s", Reply(text="ok", usage=(1, 1)))
    r = make_router(config(percent=10, max_in_flight=1000))
    hook_of(r).rng = random.Random(20261203)
    draws = random.Random(20261203)
    expected = sum(draws.random() * 100 < 10 for _ in range(1000))

    async def calls() -> None:
        gate = asyncio.Semaphore(8)

        async def one(i: int) -> None:
            async with gate:
                await r.agenerate(f"q{i}")

        await asyncio.gather(*(one(i) for i in range(1000)))

    asyncio.run(calls())
    settle(r)
    sent = len(up.requests("sh-s"))
    assert sent == shadow_count(registry, "success") == expected  # one draw per answered call, nothing else
    assert abs(sent - 100) <= 30  # 10% of 1,000 within 3 standard deviations (9.5)
    r.close()


def test_a_call_pins_its_shadow_and_an_opted_out_tenant_is_never_shadowed(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry
) -> None:
    answer(up)
    r = make_router(config(percent=0, more=", skip_tags: {tenant: [acme]}"))
    r.generate("hi")  # 0%: not sampled
    r.generate("hi", shadow=True)
    r.generate("hi", shadow=True, tags={"tenant": "globex"})
    r.generate("hi", shadow=True, tags={"tenant": "acme"})  # opted out wins over the pin
    settle(r)
    assert len(up.requests("sh-s")) == 2
    assert skipped(registry, "opted_out") == 1
    r.close()
    r2 = make_router(config(percent=100))
    r2.generate("hi", shadow=False)
    settle(r2)
    assert len(up.requests("sh-s")) == 2
    with pytest.raises(TypeError, match="shadow must be True, False or None"):
        r2.generate("hi", shadow="yes")  # type: ignore[arg-type]
    r2.close()


# -- bounds ---------------------------------------------------------------------------------------------------------


def test_at_most_max_in_flight_shadows_the_rest_skipped_and_counted(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry
) -> None:
    answer(up, shadow_delay=1.0)
    r = make_router(config(max_in_flight=2))
    for i in range(5):
        r.generate(f"q{i}")
    assert hook_of(r).in_flight("chat") == 2
    settle(r)
    assert len(up.requests("sh-s")) == 2 and shadow_count(registry, "success") == 2
    assert skipped(registry, "in_flight") == 3
    r.generate("after")  # a slot is free again
    settle(r)
    assert len(up.requests("sh-s")) == 3
    r.close()


BUDGET = """
budgets:
  - {name: shadow-cap, provider: s, period: day, limit_usd: 0.12}
"""


def test_a_budget_refuses_shadows_only_and_counts_their_spend(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry, tmp_path: Path
) -> None:
    db = tmp_path / "ledger.sqlite3"
    # s costs $1000 per 1M output tokens: a shadow's worst case is its max_tokens, 50 tokens, $0.05, and it uses them
    text = config(extra=ledger_at(db) + BUDGET).replace(
        "s/model-s: {input_per_1m: 0.5, output_per_1m: 1.0}", "s/model-s: {input_per_1m: 0, output_per_1m: 1000}"
    )
    answer(up, shadow=Reply(text=SHADOW_TEXT, usage=(10, 50)))
    r = make_router(text)
    results = []
    for i in range(5):
        results.append(r.generate(f"q{i}"))
        settle(r)
    assert [x.text for x in results] == [PRIMARY_TEXT] * 5  # the primary is never refused
    assert len(up.requests("sh-s")) == 2  # $0.10 spent: a third $0.05 would pass $0.12
    assert skipped(registry, "budget") == 3
    assert (
        registry.get_sample_value("llm_router_budget_rejections_total", {"budget": "shadow-cap", "reason": "limit"})
        == 3
    )
    r.close()
    got = rows(db)
    assert len([g for g in got if g["shadow_of"] is None]) == 5
    assert [g["cost_nusd"] for g in got if g["shadow_of"]] == [50_000_000, 50_000_000]
    with sqlite3.connect(db) as conn:
        spent = conn.execute("SELECT spent_nusd FROM llm_budget_spend WHERE budget = 'shadow-cap'").fetchone()[0]
        held = conn.execute("SELECT COUNT(*) FROM llm_budget_holds").fetchone()[0]
    assert (spent, held) == (100_000_000, 0)


def test_close_waits_for_shadows_at_most_the_grace_then_counts_them_cancelled(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry, tmp_path: Path
) -> None:
    db = tmp_path / "ledger.sqlite3"
    up.set_default("sh-p", Reply(text=PRIMARY_TEXT))
    up.enqueue("sh-s", Reply(text="quick", delay_s=0.3), Reply(text="too slow", delay_s=8.0))
    r = make_router(config(s_timeout=20, extra=ledger_at(db)))
    r.generate("one")
    r.generate("two")
    t0 = time.monotonic()
    r.close()
    took = time.monotonic() - t0
    assert CLOSE_WAIT_S <= took < CLOSE_WAIT_S + 1.0, took
    outcomes = sorted(g["outcome"] for g in rows(db) if g["shadow_of"])
    assert outcomes == ["cancelled", "success"]  # each shadow has its row, the cut one too
    assert shadow_count(registry, "success") == 1 and shadow_count(registry, "cancelled") == 1
    assert sample(registry, "llm_router_shadow_in_flight", alias="chat") == 0


def test_a_reload_takes_the_new_shadow_settings_and_never_waits_for_shadows(
    up: Upstream, registry: CollectorRegistry, tmp_path: Path
) -> None:
    db = tmp_path / "ledger.sqlite3"
    path = tmp_path / "router.yaml"
    answer(up, shadow_delay=1.0)

    def write(text: str) -> None:
        path.write_text(text.replace("{UP}", up.url).replace("${KEY_A}", KEY_A).replace("${KEY_B}", KEY_B))

    write(config(percent=0, extra=ledger_at(db)))
    r = Router.from_yaml(path, registry=registry)
    hook = hook_of(r)
    r.generate("not sampled")
    write(config(percent=100, extra=ledger_at(db)))
    assert r.reload()
    assert hook_of(r) is hook  # the same hook: its in-flight counts carry over
    r.generate("sampled")
    assert hook.in_flight("chat") == 1
    no_shadow = [
        line for line in config(extra=ledger_at(db)).splitlines() if not ("shadow:" in line or "s/model-s" in line)
    ]
    write("\n".join(no_shadow))
    t0 = time.monotonic()
    assert r.reload()
    assert time.monotonic() - t0 < 0.5  # the shadow under way is not waited for
    assert shadow_hook(r._hooks.hooks) is None
    assert hook.wait(10)  # it finished on what it started with, and wrote its row
    r.close()
    assert [g["outcome"] for g in rows(db) if g["shadow_of"]] == ["success"]
    assert shadow_count(registry, "success") == 1


# -- the ledger: rows, an older database, the report ------------------------------------------------------------


def test_shadow_rows_are_marked_and_joined_to_their_primary(
    make_router: MakeRouter, up: Upstream, registry: CollectorRegistry, tmp_path: Path
) -> None:
    db = tmp_path / "ledger.sqlite3"
    answer(up)
    r = make_router(config(extra=ledger_at(db)))
    res = r.generate("hi", tags={"tenant": "acme"})
    settle(r)
    r.close()
    primary, shadow = rows(db)
    assert primary["shadow_of"] is None and primary["agreement"] is None
    assert shadow["shadow_of"] == primary["id"] and shadow["id"] == f"{primary['id']}~s/model-s"
    assert (shadow["alias"], shadow["provider"], shadow["model"], shadow["outcome"]) == (
        "chat",
        "s",
        "model-s",
        "success",
    )
    assert shadow["tags"] == {"tenant": "acme"} and shadow["agreement_kind"] == "text"
    assert shadow["agreement"] == pytest.approx(4 / 6)
    assert shadow["cost_nusd"] == round((10 * 0.5 + 5 * 1.0) * 1000) and primary["cost_nusd"] == round(
        res.cost_usd * 1e9
    )
    by = {u.group["shadow"]: u.calls for u in query_usage(LedgerConfig(path=str(db)), since=0, by=["shadow"])}
    assert by == {"no": 1, "yes": 1}


OLD_SCHEMA = """
CREATE TABLE llm_calls (
    id TEXT PRIMARY KEY, ts DOUBLE PRECISION NOT NULL, alias TEXT NOT NULL, provider TEXT, model TEXT,
    key_name TEXT, tags TEXT NOT NULL, input_tokens BIGINT NOT NULL, output_tokens BIGINT NOT NULL,
    cost_nusd BIGINT NOT NULL, failed_cost_nusd BIGINT NOT NULL, cost_source TEXT, latency_s DOUBLE PRECISION NOT NULL,
    outcome TEXT NOT NULL, attempts INTEGER NOT NULL, rerouted_to TEXT
);
INSERT INTO llm_calls VALUES
    ('old-1', 1.0, 'chat', 'p', 'model-p', NULL, '{}', 1, 2, 3, 0, 'config', 0.5, 'success', 1, NULL);
"""


def test_an_older_ledger_is_migrated_and_its_spooled_rows_still_go_in(
    make_router: MakeRouter, up: Upstream, tmp_path: Path
) -> None:
    db = tmp_path / "ledger.sqlite3"
    with sqlite3.connect(db) as conn:
        conn.executescript(OLD_SCHEMA)
    # a row an older version spooled while the database was down: its 16 columns
    old_row = list(call_row(Call.new("chat", [], {}, {}, False), None, time.time()))[:16]
    spool = Path(str(db) + ".spool")
    database = "sqlite:" + str(db.resolve())
    spool.write_text(json.dumps({"llm_router_spool": 1, "database": database}) + "\n" + json.dumps(old_row) + "\n")
    assert len(CALL_COLUMNS) == 19
    answer(up)
    r = make_router(config(extra=ledger_at(db)))
    r.generate("hi")
    settle(r)
    r.close()
    got = {g["id"]: g for g in rows(db)}
    assert got["old-1"]["shadow_of"] is None and got["old-1"]["cost_nusd"] == 3
    assert got[old_row[0]]["shadow_of"] is None  # replayed, padded
    assert len([g for g in got.values() if g["shadow_of"]]) == 1
    assert not spool.exists() or spool.read_text() == ""


def test_the_report_pairs_each_shadow_with_its_primary(
    make_router: MakeRouter, up: Upstream, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "ledger.sqlite3"
    answer(up)
    up.enqueue("sh-s", *[Reply(text=SHADOW_TEXT, usage=(10, 3)) for _ in range(3)], Reply(status=503))
    up.enqueue("sh-p", Reply(status=400, error="bad"))  # one call of the alias raises: the primary's error rate
    r = make_router(config(extra=ledger_at(db)))
    with pytest.raises(Exception):  # noqa: B017
        r.generate("refused")
    for i in range(4):
        r.generate(f"q{i}")
        settle(r)
    r.close()
    path = tmp_path / "router.yaml"
    path.write_text(config(extra=ledger_at(db)).replace("{UP}", up.url))

    report = query_shadow_report(path, since="1h")
    (c,) = report.comparisons
    d = c.as_dict()
    assert (d["alias"], d["primary"], d["shadow"], d["calls_compared"]) == ("chat", "p/model-p", "s/model-s", 4)
    assert d["shadow_side"]["errors"] == {"rate": 0.25, "by_outcome": {"server_error": 0.25}}
    assert d["primary_side"]["errors"] == {"calls_of_the_alias": 5, "rate": 0.2, "by_outcome": {"bad_request": 0.2}}
    assert d["output_length_ratio"] == pytest.approx(9 / 18)  # 3 answered: 3 tokens each against 6
    assert d["agreement"] == {"text": {"calls": 3, "mean": pytest.approx(4 / 6)}}
    assert d["primary_side"]["cost_per_call_usd"] == pytest.approx((10 * 1.0 + 6 * 2.0) / 1e6)
    assert d["shadow_side"]["cost_per_call_usd"] == pytest.approx(3 * (10 * 0.5 + 3 * 1.0) / 1e6 / 4)
    assert d["shadow_side"]["cost_per_1k_output_tokens_usd"] == pytest.approx(3 * (10 * 0.5 + 3 * 1.0) / 1e6 / 9 * 1000)
    assert d["shadow_side"]["p50_latency_s"] > 0 and d["primary_side"]["p95_latency_s"] > 0

    assert main(["shadow-report", "-c", str(path), "--since", "1h", "--format", "json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["comparisons"][0]["calls_compared"] == 4 and "rough signal" in printed["note"]
    assert main(["shadow-report", "-c", str(path), "--since", "1h", "--alias", "chat"]) == 0
    table = capsys.readouterr().out
    assert "chat: s/model-s (shadow) beside p/model-p (primary), 4 call(s) compared" in table
    assert "server_error 25.0%" in table and "0.67 mean similarity over 3" in table and "rough signal" in table
    assert main(["shadow-report", "-c", str(path), "--since", "1h", "--alias", "plain"]) == 0
    assert "no shadow request in this window" in capsys.readouterr().out
    assert main(["shadow-report", "-c", str(path), "--since", "yesterday-ish"]) == 1


def test_the_report_does_not_import_litellm(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(config(extra=ledger_at(tmp_path / "ledger.sqlite3")).replace("{UP}", "http://127.0.0.1:9"))
    code = (
        "import sys, router.cli; "
        f"rc = router.cli.main(['shadow-report', '-c', {str(path)!r}]); "
        "assert 'litellm' not in sys.modules, 'litellm imported'; "
        "sys.exit(rc)"
    )
    env = {**os.environ, **standard_env()}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "no shadow request in this window" in proc.stdout


def test_report_arithmetic_on_plain_rows() -> None:
    assert percentile([], 50) is None and percentile([3.0, 1.0, 2.0], 50) == 2.0 and percentile([1.0, 9.0], 95) == 9.0
    #   alias   s prov s model  outcome  lat  out  cost  agree kind   p id  p prov p model outcome lat out cost
    pairs = [
        ("chat", "s", "m-s", "success", 0.2, 10, 100, 1.0, "parsed", "c1", "p", "m-p", "success", 1.0, 20, 400),
        ("chat", "s", "m-s", "success", 0.4, 10, 100, 0.0, "parsed", "c2", "p", "m-p", "success", 3.0, 20, 400),
        ("chat", "s", "m-s", "timeout", 5.0, 0, 0, None, None, "c3", "p", "m-p", "success", 2.0, 20, 400),
        ("chat", "s", "m-s", "success", 0.3, 10, 100, 1.0, "parsed", "c4", "q", "m-q", "success", 1.0, 20, 400),
        ("chat", "s", "m-s", "success", 0.3, 10, 100, 1.0, "parsed", None, None, None, None, None, None, None),
    ]
    report = build_report(pairs, [("chat", "success", 9), ("chat", "timeout", 1)], 0.0, 1.0)
    assert report.unpaired == 1
    by_primary = {c.primary: c.as_dict() for c in report.comparisons}
    p = by_primary["p/m-p"]
    assert p["calls_compared"] == 3 and p["agreement"] == {"parsed": {"calls": 2, "mean": 0.5}}
    assert p["shadow_side"]["p95_latency_s"] == 0.4  # answered ones only
    assert p["primary_side"]["p50_latency_s"] == 2.0
    assert p["shadow_side"]["errors"]["by_outcome"] == {"timeout": pytest.approx(1 / 3)}
    assert p["primary_side"]["errors"]["rate"] == 0.1
    assert p["output_length_ratio"] == 0.5
    assert p["shadow_side"]["cost_per_1k_output_tokens_usd"] == pytest.approx(200 / 1e9 / 20 * 1000)
    assert by_primary["q/m-q"]["calls_compared"] == 1
    assert "equal" in render_report(report)


# -- several workers: one report ------------------------------------------------------------------------------------

MP_CONFIG = """
version: 1
defaults: {{model: chat, timeout_s: 30, deadline_s: 60, retry: {{attempts: 1}}}}
providers:
  a: {{kind: openai, api_base: "{up}/mp-sh-p/v1", api_key: "${{KEY_A}}"}}
  s: {{kind: openai, api_base: "{up}/mp-sh-s/v1", api_key: "${{KEY_A}}"}}
aliases:
  chat:
    targets: [a/model-a]
    shadow: {{targets: [s/model-s], percent: 100}}
pricing:
  a/model-a: {{input_per_1m: 1.0, output_per_1m: 2.0}}
  s/model-s: {{input_per_1m: 0.5, output_per_1m: 1.0}}
ledger: {{path: "LEDGER", flush_interval_s: 0.2}}
{more}
"""


def test_four_gunicorn_workers_write_one_report(
    up: Upstream, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if not GUNICORN.exists():
        pytest.fail(f"{GUNICORN} is missing: `make install` installs gunicorn with the dev extra")
    db = tmp_path / "ledger.sqlite3"
    up.set_default("mp-sh-p", Reply(text=PRIMARY_TEXT, usage=(10, 6)))
    up.set_default("mp-sh-s", Reply(text=SHADOW_TEXT, usage=(10, 5), delay_s=0.2))
    g = Gunicorn(APPS["wsgi"][0], "sync", tmp_path, up, MP_CONFIG.replace("LEDGER", str(db)), workers=WORKERS)
    try:
        g.start()
        answers = spread(g, "question", "chat", per_worker=3)
        assert len({a["worker"] for a in answers}) == WORKERS
        assert g.proc is not None
        g.proc.send_signal(signal.SIGTERM)  # each worker, on its way out, lets its shadows finish and flushes
        assert g.proc.wait(30) == 0, g.output()
    finally:
        g.stop()
    assert len(up.requests("mp-sh-s")) == len(answers)
    assert main(["shadow-report", "-c", str(g.config), "--since", "1h", "--format", "json"]) == 0
    (c,) = json.loads(capsys.readouterr().out)["comparisons"]
    assert (c["primary"], c["shadow"], c["calls_compared"]) == ("a/model-a", "s/model-s", len(answers))
    assert c["shadow_side"]["errors"]["rate"] == 0 and c["agreement"]["text"]["calls"] == len(answers)
    assert c["shadow_side"]["p50_latency_s"] >= 0.2
    assert c["primary_side"]["errors"]["calls_of_the_alias"] == len(answers)
