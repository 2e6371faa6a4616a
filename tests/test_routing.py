"""Routing behaviour end to end: `Router` → real litellm → real HTTP → the loopback `Upstream`.

Nothing here mocks litellm: every outcome is produced by the upstream answering the way a provider would,
and classified from the exception litellm really raises. Expectations are read back from three places:
the `Result` / error the router returns, the requests the upstream received, and the sleeps it asked for.
The tests marked BOTH_ENGINES run on the direct engine too (router/engines/direct.py), which must give the
same Result and the same errors for the same bytes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import logging
import re
import socket
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import litellm
import pytest
from conftest import BOTH_ENGINES, KEY_A, KEY_B, KEY_C, MakeRouter, Sleeps
from prometheus_client import CollectorRegistry, generate_latest

import router
from router import (
    AllTargetsFailedError,
    Attempt,
    DeadlineExceededError,
    MissingCredentialsError,
    ProviderError,
    Result,
    RouterError,
    Skip,
    UnknownModelError,
    UnknownProviderError,
)
from router.engines.wire import ProviderHTTPError
from router.sandbox import Reply, Upstream

KEYS = (KEY_A, KEY_B, KEY_C)


def config(
    *,
    a: str = "",
    a_base: str = "{UP}/a/v1",
    retry: str = "{attempts: 2, backoff_s: 0.1, max_backoff_s: 2}",
    deadline_s: float = 20,
    aliases: str = "",
    providers: str = "",
    pricing: str = "",
) -> str:
    """The standard config (a → b → c), with the knobs these tests turn: `a` adds keys to provider a."""
    return f"""
version: 1
defaults:
  model: chat
  timeout_s: 5
  deadline_s: {deadline_s}
  retry: {retry}
providers:
  a: {{kind: openai, api_base: "{a_base}", api_key: "${{KEY_A}}"{a}}}
  b: {{kind: openai, api_base: "{{UP}}/b/v1", api_key: "${{KEY_B}}"}}
  c: {{kind: openai, api_base: "{{UP}}/c/v1", api_key: "${{KEY_C}}"}}
{providers}
aliases:
  chat: {{targets: [a/model-a, b/model-b, c/model-c]}}
  single: {{targets: [a/model-a]}}
{aliases}
{pricing}
"""


def routes(up: Upstream) -> list[str]:
    """The route of every request the upstream received, in order."""
    return [r.route for r in up.history]


def trail(attempts: Sequence[Attempt]) -> list[tuple[str, str, int | None]]:
    return [(a.provider, a.outcome, a.status_code) for a in attempts]


def closed_port(up: Upstream) -> int:
    """A loopback port nothing listens on (bound, then released; never the upstream's)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if f":{port}" not in up.url:
            return port


def caused_by(err: BaseException, engine: str, litellm_class: str, status: int) -> bool:
    """Whether the error was raised from the provider's answer: LiteLLM's exception of that class, or the direct
    engine's ProviderHTTPError with that status."""
    cause = err.__cause__
    if engine == "direct":
        return isinstance(cause, ProviderHTTPError) and cause.status_code == status
    wanted = getattr(litellm.exceptions, litellm_class)
    return isinstance(cause, wanted) and getattr(cause, "status_code", None) == status


def completion_json(choices: list[dict[str, Any]]) -> dict[str, Any]:
    """An OpenAI chat.completion body with the given choices."""
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 1,
        "model": "model-a",
        "choices": choices,
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }


# -- fallback, one outcome at a time -----------------------------------------------------------------------

CONTEXT_MESSAGE = "This model's maximum context length is 8192 tokens. However, your messages resulted in 9000 tokens."


@dataclasses.dataclass(frozen=True)
class Case:
    """Provider a fails with `reply` on every try; the call must end on b."""

    reply: Reply
    outcome: str
    status: Any  # the HTTP status the attempt reports; ANY where no HTTP status came back
    tries: int  # requests a receives: retry.attempts (2) for transient outcomes, else 1
    a: str = ""  # extra keys for provider a
    a_base: str = "{UP}/a/v1"  # {CLOSED}: a port nothing listens on

    def config(self, up: Upstream) -> str:
        return config(a=self.a, a_base=self.a_base.replace("{CLOSED}", str(closed_port(up))))


FALLBACK_CASES = {
    "rate_limit-429": Case(Reply(status=429), "rate_limit", 429, 2),
    "timeout": Case(Reply(delay_s=1.5), "timeout", ANY, 2, a=", timeout_s: 0.5"),
    "connection-dropped": Case(Reply(drop=True), "connection", ANY, 2),
    "connection-refused": Case(Reply(), "connection", ANY, 2, a_base="http://127.0.0.1:{CLOSED}/v1"),
    "server_error-500": Case(Reply(status=500), "server_error", 500, 2),
    "server_error-503": Case(Reply(status=503), "server_error", 503, 2),
    "auth-401": Case(Reply(status=401), "auth", 401, 1),
    "auth-403": Case(Reply(status=403), "auth", 403, 1),
    "payment_required-402": Case(Reply(status=402), "payment_required", 402, 1),
    "not_found-404": Case(Reply(status=404), "not_found", 404, 1),
    "invalid_response-not-json": Case(Reply(raw="<html>502 from a proxy</html>"), "invalid_response", ANY, 2),
    "invalid_response-empty-object": Case(Reply(json={}), "invalid_response", ANY, 2),
    "invalid_response-no-choices": Case(Reply(json=completion_json([])), "invalid_response", ANY, 2),
    "context_window-message": Case(Reply(status=400, error=CONTEXT_MESSAGE), "context_window", 400, 1),
    "context_window-openai-body": Case(
        Reply(
            status=400,
            json={
                "error": {
                    "message": CONTEXT_MESSAGE,
                    "type": "invalid_request_error",
                    "param": "messages",
                    "code": "context_length_exceeded",
                }
            },
        ),
        "context_window",
        400,
        1,
    ),
}


def script_fallback(case: Case, up: Upstream) -> None:
    up.enqueue("a", *[case.reply] * case.tries)
    up.enqueue("b", Reply(text="from b"))


def check_fallback(case: Case, res: Result, up: Upstream, sleeps: Sleeps, registry: CollectorRegistry) -> None:
    assert (res.text, res.provider, res.model) == ("from b", "b", "model-b")
    assert trail(res.attempts) == [("a", case.outcome, case.status)] * case.tries + [("b", "success", None)]
    assert all(a.error for a in res.attempts[:-1])
    assert res.fallbacks == 1
    # A refused connection never reaches the upstream; every other failure is a request it saw.
    expected_routes = ["a"] * case.tries if case.a_base.startswith("{UP}") else []
    assert routes(up) == [*expected_routes, "b"]
    assert len(sleeps) == case.tries - 1
    labels = {"alias": "chat", "from_provider": "a", "to_provider": "b", "reason": case.outcome}
    assert registry.get_sample_value("llm_router_fallbacks_total", labels) == 1


@BOTH_ENGINES
@pytest.mark.parametrize("case", FALLBACK_CASES.values(), ids=FALLBACK_CASES.keys())
def test_fallback_on_each_fallback_outcome(
    case: Case, make_router: MakeRouter, up: Upstream, sleeps: Sleeps, registry: CollectorRegistry
) -> None:
    r = make_router(case.config(up))
    script_fallback(case, up)

    res = r.generate("hello")

    check_fallback(case, res, up, sleeps, registry)


@BOTH_ENGINES
@pytest.mark.asyncio
@pytest.mark.parametrize("case", FALLBACK_CASES.values(), ids=FALLBACK_CASES.keys())
async def test_async_fallback_on_each_fallback_outcome(
    case: Case, make_router: MakeRouter, up: Upstream, sleeps: Sleeps, registry: CollectorRegistry
) -> None:
    r = make_router(case.config(up))
    script_fallback(case, up)

    res = await r.agenerate("hello")

    check_fallback(case, res, up, sleeps, registry)


# -- failures that are not fallen back from ----------------------------------------------------------------

NO_FALLBACK_CASES = {
    "bad_request": (Reply(status=400, error="'temperature' must be <= 2"), "bad_request", "BadRequestError"),
    "content_filter": (
        Reply(status=400, error="Your request was rejected: content_policy_violation"),
        "content_filter",
        "ContentPolicyViolationError",
    ),
}


@BOTH_ENGINES
@pytest.mark.parametrize(("reply", "outcome", "cause"), NO_FALLBACK_CASES.values(), ids=NO_FALLBACK_CASES.keys())
def test_no_fallback_on_caller_errors(
    reply: Reply, outcome: str, cause: str, engine: str, make_router: MakeRouter, up: Upstream, sleeps: Sleeps
) -> None:
    r = make_router()
    up.enqueue("a", reply)

    with pytest.raises(ProviderError) as info:
        r.generate("hello")

    err = info.value
    assert not isinstance(err, AllTargetsFailedError)
    assert (err.outcome, err.status_code, err.provider, err.alias) == (outcome, 400, "a", "chat")
    assert caused_by(err, engine, cause, 400)
    assert engine == "direct" or isinstance(err.__cause__, litellm.exceptions.BadRequestError)
    assert trail(err.attempts) == [("a", outcome, 400)]
    assert outcome in str(err) and "fallback_on" in str(err)
    assert routes(up) == ["a"]  # not retried, and b never asked
    assert sleeps == []


@BOTH_ENGINES
def test_content_filter_finish_reason_is_the_content_filter_outcome(make_router: MakeRouter, up: Upstream) -> None:
    filtered = {"index": 0, "message": {"role": "assistant", "content": ""}, "finish_reason": "content_filter"}
    up.enqueue("a", Reply(json=completion_json([filtered])))

    with pytest.raises(ProviderError) as info:  # not in the default fallback_on: another provider would refuse too
        make_router().generate("hello")

    assert info.value.outcome == "content_filter"
    assert [(a.provider, a.outcome) for a in info.value.attempts] == [("a", "content_filter")]
    assert routes(up) == ["a"]


@BOTH_ENGINES
def test_every_target_failing_lists_every_attempt_in_order(
    engine: str, make_router: MakeRouter, up: Upstream, sleeps: Sleeps
) -> None:
    up.enqueue("a", Reply(status=503), Reply(status=500))
    up.enqueue("b", Reply(status=401))
    up.enqueue("c", Reply(status=429), Reply(status=429))

    with pytest.raises(AllTargetsFailedError) as info:
        make_router().generate("hello")

    err = info.value
    assert not isinstance(err, DeadlineExceededError)
    assert trail(err.attempts) == [
        ("a", "server_error", 503),
        ("a", "server_error", 500),
        ("b", "auth", 401),
        ("c", "rate_limit", 429),
        ("c", "rate_limit", 429),
    ]
    assert [a.model for a in err.attempts] == ["model-a", "model-a", "model-b", "model-c", "model-c"]
    assert err.alias == "chat" and err.outcome == "rate_limit"
    assert caused_by(err, engine, "RateLimitError", 429)
    assert routes(up) == ["a", "a", "b", "c", "c"]
    assert "5 attempt(s)" in str(err)
    assert len(sleeps) == 2  # one backoff before each retry


# -- retries and backoff -----------------------------------------------------------------------------------


@BOTH_ENGINES
def test_retry_after_seconds_is_honoured_on_the_same_target(
    make_router: MakeRouter, up: Upstream, sleeps: Sleeps
) -> None:
    up.enqueue("a", Reply(status=429, headers={"Retry-After": "1.5"}), Reply(text="second try"))

    res = make_router().generate("hello")

    assert sleeps == [1.5]
    assert (res.text, res.provider) == ("second try", "a")
    assert trail(res.attempts) == [("a", "rate_limit", 429), ("a", "success", None)]
    assert routes(up) == ["a", "a"]


@BOTH_ENGINES
def test_retry_after_beyond_max_backoff_is_capped(make_router: MakeRouter, up: Upstream, sleeps: Sleeps) -> None:
    r = make_router()
    up.enqueue("a", Reply(status=503, headers={"Retry-After": "30"}))

    res = r.generate("hello")

    assert sleeps == [r.config.defaults.retry.max_backoff_s]
    assert res.provider == "a" and routes(up) == ["a", "a"]


@BOTH_ENGINES
def test_retry_after_as_http_date(make_router: MakeRouter, up: Upstream, sleeps: Sleeps) -> None:
    r = make_router(config(retry="{attempts: 2, backoff_s: 0.1, max_backoff_s: 60}", deadline_s=120))
    when = email.utils.formatdate(time.time() + 10, usegmt=True)  # whole seconds: up to 1 s earlier
    up.enqueue("a", Reply(status=429, headers={"Retry-After": when}))

    res = r.generate("hello")

    assert len(sleeps) == 1 and 8 < sleeps[0] <= 10
    assert res.provider == "a" and routes(up) == ["a", "a"]


@BOTH_ENGINES
def test_backoff_without_retry_after_is_exponential_capped_and_jittered(
    make_router: MakeRouter, up: Upstream, sleeps: Sleeps
) -> None:
    r = make_router(config(retry="{attempts: 4, backoff_s: 1, max_backoff_s: 1.5}"))
    up.enqueue("a", Reply(status=503), Reply(status=500), Reply(status=503))

    res = r.generate("hello")

    retry, jitter = r.config.defaults.retry, 0.5  # make_router fixes the jitter draw at 0.5
    expected = [min(retry.max_backoff_s, retry.backoff_s * 2 ** (n - 1)) * jitter for n in (1, 2, 3)]
    assert sleeps == expected
    assert expected[1] == expected[2] < 2 * expected[1]  # the cap bit
    assert trail(res.attempts)[-1] == ("a", "success", None) and routes(up) == ["a"] * 4


@BOTH_ENGINES
def test_retry_after_is_ignored_when_honor_retry_after_is_off(
    make_router: MakeRouter, up: Upstream, sleeps: Sleeps
) -> None:
    r = make_router(config(retry="{attempts: 2, backoff_s: 0.2, max_backoff_s: 2, honor_retry_after: false}"))
    up.enqueue("a", Reply(status=429, headers={"Retry-After": "1.5"}))

    r.generate("hello")

    assert sleeps == [r.config.defaults.retry.backoff_s * 0.5]


# -- deadline ----------------------------------------------------------------------------------------------

SLACK_S = 2.0  # generous bound on how far past its deadline a call may return: behaviour, not speed


@BOTH_ENGINES
def test_deadline_exceeded_returns_within_the_deadline(make_router: MakeRouter, up: Upstream) -> None:
    r = make_router(config(deadline_s=1), real_sleep=True)
    up.enqueue("a", Reply(delay_s=3))

    t0 = time.monotonic()
    with pytest.raises(DeadlineExceededError) as info:
        r.generate("hello")
    took = time.monotonic() - t0

    err = info.value
    assert isinstance(err, AllTargetsFailedError)
    assert err.deadline_s == 1 and "deadline" in str(err)
    assert trail(err.attempts) == [("a", "timeout", ANY)]
    assert took < 1 + SLACK_S
    assert routes(up) == ["a"]  # the deadline ran out before b could be asked


@BOTH_ENGINES
@pytest.mark.asyncio
async def test_async_deadline_exceeded_returns_within_the_deadline(make_router: MakeRouter, up: Upstream) -> None:
    r = make_router(config(deadline_s=1), real_sleep=True)
    up.enqueue("a", Reply(delay_s=3))

    t0 = time.monotonic()
    with pytest.raises(DeadlineExceededError) as info:
        await r.agenerate("hello")
    took = time.monotonic() - t0

    assert info.value.deadline_s == 1
    assert trail(info.value.attempts) == [("a", "timeout", ANY)]
    assert took < 1 + SLACK_S
    assert routes(up) == ["a"]


@BOTH_ENGINES
def test_call_timeout_overrides_deadline(make_router: MakeRouter, up: Upstream) -> None:
    r = make_router(real_sleep=True)
    assert r.config.defaults.deadline_s > 10
    up.enqueue("a", Reply(delay_s=2))

    t0 = time.monotonic()
    with pytest.raises(DeadlineExceededError) as info:
        r.generate("hello", timeout=0.5)
    took = time.monotonic() - t0

    assert info.value.deadline_s == 0.5
    assert took < 0.5 + SLACK_S


@BOTH_ENGINES
def test_retry_after_longer_than_the_deadline_falls_back_at_once(
    make_router: MakeRouter, up: Upstream, sleeps: Sleeps
) -> None:
    r = make_router(config(retry="{attempts: 2, backoff_s: 0.1, max_backoff_s: 60}", deadline_s=5))
    up.enqueue("a", Reply(status=429, headers={"Retry-After": "30"}))

    res = r.generate("hello")

    assert sleeps == []
    assert res.provider == "b"
    assert trail(res.attempts) == [("a", "rate_limit", 429), ("b", "success", None)]
    assert routes(up) == ["a", "b"]


# -- credentials -------------------------------------------------------------------------------------------


def test_provider_without_key_is_skipped_without_a_request(make_router: MakeRouter, up: Upstream) -> None:
    r = make_router(env={"KEY_B": KEY_B, "KEY_C": KEY_C})

    res = r.generate("hello")

    assert res.provider == "b"
    assert res.skipped == (Skip("a", "model-a", "no_credentials", ("KEY_A",)),)
    assert up.requests("a") == []
    assert routes(up) == ["b"]
    assert trail(res.attempts) == [("b", "success", None)]


def test_no_target_with_a_key_raises_missing_credentials(make_router: MakeRouter, up: Upstream) -> None:
    r = make_router(env={})

    with pytest.raises(MissingCredentialsError) as info:
        r.generate("hello")

    err = info.value
    assert err.env_vars == ["KEY_A", "KEY_B", "KEY_C"]
    for var, provider in (("KEY_A", "a"), ("KEY_B", "b"), ("KEY_C", "c")):
        assert f"{var} is not set (needed by provider '{provider}')" in str(err)
    assert up.history == []


def test_missing_credentials_names_only_the_variables_the_alias_needs(make_router: MakeRouter, up: Upstream) -> None:
    with pytest.raises(MissingCredentialsError) as info:
        make_router(env={"KEY_B": KEY_B}).generate("hello", model="single")

    assert info.value.env_vars == ["KEY_A"]
    assert "KEY_A" in str(info.value) and "KEY_B" not in str(info.value)
    assert up.history == []


# -- aliases and providers ---------------------------------------------------------------------------------


def test_unknown_alias_names_it_and_suggests_close_matches(make_router: MakeRouter, up: Upstream) -> None:
    with pytest.raises(UnknownModelError) as info:
        make_router().generate("hello", model="chta")

    err = info.value
    assert isinstance(err, KeyError) and isinstance(err, RouterError)
    assert err.alias == "chta" and "chat" in err.suggestions
    text = str(err)
    assert "'chta'" in text and "did you mean 'chat'" in text
    assert not text.startswith(("'", '"'))
    assert up.history == []


def test_provider_restricts_the_call_to_that_providers_targets(make_router: MakeRouter, up: Upstream) -> None:
    res = make_router().generate("hello", provider="b")

    assert res.provider == "b"
    assert routes(up) == ["b"]


def test_provider_restriction_does_not_fall_back_to_other_providers(make_router: MakeRouter, up: Upstream) -> None:
    up.enqueue("b", Reply(status=401))

    with pytest.raises(AllTargetsFailedError) as info:
        make_router().generate("hello", provider="b")

    assert trail(info.value.attempts) == [("b", "auth", 401)]
    assert routes(up) == ["b"]


def test_unknown_provider_is_reported_with_the_configured_ones(make_router: MakeRouter, up: Upstream) -> None:
    with pytest.raises(UnknownProviderError) as info:
        make_router().generate("hello", provider="zzz")

    err = info.value
    assert isinstance(err, KeyError)
    assert (err.provider, err.alias) == ("zzz", "chat")
    assert "'zzz'" in str(err) and re.search(r"\ba, b, c\b", str(err))
    assert not str(err).startswith(("'", '"'))
    assert up.history == []


def test_provider_the_alias_has_no_target_on(make_router: MakeRouter, up: Upstream) -> None:
    with pytest.raises(UnknownProviderError) as info:
        make_router().generate("hello", model="single", provider="b")

    err = info.value
    assert (err.provider, err.alias) == ("b", "single")
    # names the alias, the provider asked for, and the provider the alias does use
    assert "'single'" in str(err) and "'b'" in str(err) and re.search(r"\ba\)?$", str(err))
    assert up.history == []


# -- params and messages -----------------------------------------------------------------------------------

TUNED = """
  tuned:
    targets:
      - {provider: a, model: model-a, params: {max_tokens: 50}}
      - b/model-b
    params: {temperature: 0.1, max_tokens: 10, top_p: 0.5}
    system: "alias system prompt"
"""


@BOTH_ENGINES
def test_params_call_over_target_over_alias(make_router: MakeRouter, up: Upstream) -> None:
    up.enqueue("a", Reply(status=503), Reply(status=503))

    make_router(config(aliases=TUNED)).generate("hello", model="tuned", temperature=0.9)

    first_a, _, on_b = (r.body for r in up.history)
    assert (first_a["temperature"], first_a["max_tokens"], first_a["top_p"]) == (0.9, 50, 0.5)
    assert (on_b["temperature"], on_b["max_tokens"], on_b["top_p"]) == (0.9, 10, 0.5)


def test_alias_system_prompt_is_prepended(make_router: MakeRouter, up: Upstream) -> None:
    make_router(config(aliases=TUNED)).generate("hello", model="tuned")

    assert up.history[0].messages == [
        {"role": "system", "content": "alias system prompt"},
        {"role": "user", "content": "hello"},
    ]


def test_call_system_overrides_alias_system(make_router: MakeRouter, up: Upstream) -> None:
    make_router(config(aliases=TUNED)).generate("hello", model="tuned", system="call system prompt")

    assert up.history[0].messages[0] == {"role": "system", "content": "call system prompt"}
    assert len(up.history[0].messages) == 2


def test_messages_with_their_own_system_are_sent_as_given(make_router: MakeRouter, up: Upstream) -> None:
    messages = [
        {"role": "system", "content": "my own system"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "again"},
    ]

    make_router(config(aliases=TUNED)).generate(messages=messages, model="tuned")

    assert up.history[0].messages == messages


@pytest.mark.parametrize("name", ["api_key", "api_base", "base_url", "stream_options", "max_retries", "extra_headers"])
def test_reserved_params_are_refused(name: str, make_router: MakeRouter, up: Upstream) -> None:
    with pytest.raises(TypeError, match=name):
        make_router().generate("hello", **{name: "x"})

    assert up.history == []


@BOTH_ENGINES
def test_the_key_is_sent_to_its_own_provider_only(make_router: MakeRouter, up: Upstream) -> None:
    up.enqueue("a", Reply(status=401))

    make_router().generate("hello")

    on_a, on_b = up.history
    assert on_a.headers["authorization"] == f"Bearer {KEY_A}"
    assert on_b.headers["authorization"] == f"Bearer {KEY_B}"


# -- pricing -----------------------------------------------------------------------------------------------


@BOTH_ENGINES
def test_config_price(make_router: MakeRouter, up: Upstream) -> None:
    r = make_router(config(pricing="pricing:\n  a/model-a: {input_per_1m: 2.5, output_per_1m: 10}"))
    up.enqueue("a", Reply(usage=(1200, 345)))

    res = r.generate("hello")

    assert (res.usage.input_tokens, res.usage.output_tokens) == (1200, 345)
    assert res.cost_source == "config"
    assert res.cost_usd == pytest.approx(1200 * 2.5 / 1e6 + 345 * 10 / 1e6)


def test_config_price_per_1k(make_router: MakeRouter, up: Upstream) -> None:
    r = make_router(config(pricing="pricing:\n  b/model-b: {input_per_1k: 0.5, output_per_1k: 1.5}"))
    up.enqueue("a", Reply(status=404))
    up.enqueue("b", Reply(usage=(40, 60)))

    res = r.generate("hello")

    assert (res.provider, res.cost_source) == ("b", "config")
    assert res.cost_usd == pytest.approx(40 * 0.5 / 1e3 + 60 * 1.5 / 1e3)


@BOTH_ENGINES
def test_provider_reported_cost_from_openrouter(make_router: MakeRouter, up: Upstream) -> None:
    r = make_router(
        config(
            providers='  orr: {kind: openrouter, api_base: "{UP}/or/v1", api_key: "${KEY_A}"}',
            aliases="  routed: {targets: [orr/gpt-4o-mini]}",
        )
    )
    up.enqueue("or", Reply(cost=0.0123, usage=(10, 20)))

    res = r.generate("hello", model="routed")

    assert (res.cost_usd, res.cost_source) == (0.0123, "provider")
    assert up.requests("or")[0].path == "/or/v1/chat/completions"
    assert up.requests("or")[0].model == "openai/gpt-4o-mini"  # bare name given its vendor prefix


@BOTH_ENGINES
def test_litellm_price_map(make_router: MakeRouter, up: Upstream) -> None:
    r = make_router(config(aliases="  mini: {targets: [a/gpt-4o-mini]}"))
    up.enqueue("a", Reply(usage=(1000, 500)))

    res = r.generate("hello", model="mini")

    prompt, completion = litellm.cost_per_token(
        model="gpt-4o-mini", custom_llm_provider="openai", prompt_tokens=1000, completion_tokens=500
    )
    assert res.cost_source == "litellm"
    assert res.cost_usd == pytest.approx(prompt + completion)
    assert res.cost_usd > 0


@BOTH_ENGINES
def test_unknown_price_is_zero_and_says_so(make_router: MakeRouter, up: Upstream, registry: CollectorRegistry) -> None:
    res = make_router().generate("hello")

    assert (res.cost_usd, res.cost_source) == (0.0, "unknown")
    labels = {"alias": "chat", "provider": "a", "model": "model-a"}
    assert registry.get_sample_value("llm_router_cost_unknown_total", labels) == 1


# -- anthropic wire format ---------------------------------------------------------------------------------


@BOTH_ENGINES
def test_fallback_from_openai_kind_to_anthropic_kind(make_router: MakeRouter, up: Upstream) -> None:
    r = make_router(
        config(
            providers='  an: {kind: anthropic, api_base: "{UP}/an", api_key: "${KEY_B}"}',
            aliases="  mixed: {targets: [a/model-a, an/claude-3-5-haiku-20241022]}",
        )
    )
    up.enqueue("a", Reply(status=503), Reply(status=503))
    up.enqueue("an", Reply(text="from anthropic", usage=(11, 7)))

    res = r.generate("hello", model="mixed", system="be brief")

    assert (res.text, res.provider, res.model) == ("from anthropic", "an", "claude-3-5-haiku-20241022")
    assert (res.usage.input_tokens, res.usage.output_tokens) == (11, 7)
    assert trail(res.attempts) == [("a", "server_error", 503)] * 2 + [("an", "success", None)]
    sent = up.requests("an")[0]
    assert sent.path == "/an/v1/messages"
    assert sent.headers["x-api-key"] == KEY_B
    assert sent.model == "claude-3-5-haiku-20241022"
    assert "be brief" in str(sent.body["system"])
    assert all(m["role"] != "system" for m in sent.messages)


# -- secrets -----------------------------------------------------------------------------------------------


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and every exception traceback would print with it (causes and contexts)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]


def leaks(places: dict[str, str]) -> list[str]:
    """The names of the places whose text contains an API key."""
    return [where for where, text in places.items() if any(key in text for key in KEYS)]


def output_texts(caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> dict[str, str]:
    """Every log record, and whatever litellm printed to stdout/stderr."""
    out = {f"log record {i} ({rec.name})": rec.getMessage() for i, rec in enumerate(caplog.records)}
    out["captured log text"] = caplog.text
    out["stdout"], out["stderr"] = capfd.readouterr()
    return out


LEAKY = {
    "auth-only-target": ("single", [("a", Reply(status=401, error=f"invalid key {KEY_A}"))], AllTargetsFailedError),
    "auth-then-bad-request": (
        "chat",
        [("a", Reply(status=401, error=f"invalid key {KEY_A}")), ("b", Reply(status=400, error=f"bad key {KEY_B}"))],
        ProviderError,
    ),
}


@BOTH_ENGINES
@pytest.mark.parametrize(("alias", "script", "raised"), LEAKY.values(), ids=LEAKY.keys())
def test_echoed_key_never_leaks(
    alias: str,
    script: list[tuple[str, Reply]],
    raised: type[Exception],
    make_router: MakeRouter,
    up: Upstream,
    registry: CollectorRegistry,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="router")
    for route, reply in script:
        up.enqueue(route, reply)
    r = make_router()

    with pytest.raises(raised) as info:
        r.generate("hello", model=alias)

    err = info.value
    assert err.__cause__ is not None
    assert any("***" in (a.error or "") for a in err.attempts)  # the echo was there, and redacted
    places = {
        "traceback.format_exception": "".join(traceback.format_exception(err)),
        "repr(router)": repr(r),
        "repr(router.config)": repr(r.config),
        "metrics exposition": generate_latest(registry).decode(),
        **{f"attempts[{i}].error": a.error or "" for i, a in enumerate(err.attempts)},
        **output_texts(caplog, capfd),
    }
    for depth, e in enumerate(exception_chain(err)):
        places[f"str(chain[{depth}] {type(e).__name__})"] = str(e)
        places[f"repr(chain[{depth}] {type(e).__name__})"] = repr(e)
    found = leaks(places)
    assert not found, f"an API key shows in: {found}"


@BOTH_ENGINES
def test_echoed_key_never_leaks_from_a_result(
    make_router: MakeRouter,
    up: Upstream,
    registry: CollectorRegistry,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="router")
    up.enqueue("a", Reply(status=401, error=f"invalid key {KEY_A}"))
    r = make_router()

    res = r.generate("hello")

    assert res.provider == "b"
    assert res.attempts[0].error and "***" in res.attempts[0].error
    places = {
        "repr(result)": repr(res),
        "attempts[0].error": res.attempts[0].error,
        "metrics exposition": generate_latest(registry).decode(),
        **output_texts(caplog, capfd),
    }
    found = leaks(places)
    assert not found, f"an API key shows in: {found}"


# -- sync / async parity -----------------------------------------------------------------------------------


def script_mixed_failures(up: Upstream) -> None:
    up.enqueue("a", Reply(status=503), Reply(status=429, headers={"Retry-After": "0.25"}))
    up.enqueue("b", Reply(status=401, error="nope"))
    up.enqueue("c", Reply(json={}), Reply(text="finally", usage=(12, 3)))


def without_latency(res: Result) -> Result:
    return dataclasses.replace(
        res, latency_s=0.0, attempts=tuple(dataclasses.replace(a, latency_s=0.0) for a in res.attempts)
    )


@BOTH_ENGINES
@pytest.mark.asyncio
async def test_sync_and_async_give_equal_results(make_router: MakeRouter, up: Upstream, sleeps: Sleeps) -> None:
    r = make_router(config(pricing="pricing:\n  c/model-c: {input_per_1m: 1, output_per_1m: 2}"))

    script_mixed_failures(up)
    sync = await asyncio.to_thread(r.generate, "hello")
    sync_sleeps, sync_routes = list(sleeps), routes(up)
    sleeps.clear()
    up.reset()
    script_mixed_failures(up)
    asyn = await r.agenerate("hello")

    assert without_latency(sync) == without_latency(asyn)
    assert sync.text == "finally" and len(sync.attempts) == 5
    assert (sync_sleeps, sync_routes) == (list(sleeps), routes(up))


# -- the default router ------------------------------------------------------------------------------------


@pytest.fixture
def default_router_reset() -> Iterator[None]:
    router.set_default_router(None)
    yield
    router.set_default_router(None)


@pytest.mark.asyncio
@pytest.mark.usefixtures("default_router_reset")
async def test_module_level_generate_uses_the_default_router(make_router: MakeRouter, up: Upstream) -> None:
    r = make_router()
    router.set_default_router(r)
    up.enqueue("a", Reply(text="sync"), Reply(text="async"))

    res = await asyncio.to_thread(router.generate, "hello", provider="a")
    ares = await router.agenerate("hello", provider="a")

    assert router.default_router() is r
    assert (res.text, ares.text) == ("sync", "async")
    assert routes(up) == ["a", "a"]


@pytest.mark.usefixtures("default_router_reset")
def test_default_router_is_loaded_from_llm_router_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, up: Upstream
) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(
        f"""
version: 1
defaults: {{model: fromfile}}
providers:
  dflt: {{kind: openai, api_base: "{up.url}/dflt/v1", api_key: "${{ROUTER_TEST_DEFAULT_KEY}}"}}
aliases:
  fromfile: {{targets: [dflt/model-d]}}
metrics: {{namespace: llm_router_test_default_router}}
"""
    )
    monkeypatch.setenv("LLM_ROUTER_CONFIG", str(path))
    monkeypatch.setenv("ROUTER_TEST_DEFAULT_KEY", "sk-default-0123456789")
    up.enqueue("dflt", Reply(text="from the file"))

    r = router.default_router()
    res = router.generate("hello")

    assert r.config.source == str(path)
    assert router.default_router() is r  # built once
    assert (res.text, res.alias, res.provider) == ("from the file", "fromfile", "dflt")
    assert routes(up) == ["dflt"]
    assert up.history[0].headers["authorization"] == "Bearer sk-default-0123456789"
