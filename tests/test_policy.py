"""Table tests of router.policy: pure routing decisions, no I/O, no clock, no litellm."""

from __future__ import annotations

import email.utils
from collections.abc import Sequence
from typing import Any

import pytest

from router import ConfigError
from router.config import DEFAULT_FALLBACK_ON, RetryConfig, RouterConfig, Target, parse_config
from router.outcomes import FAILURE_OUTCOMES, OUTCOMES
from router.policy import (
    Step,
    backoff_delay,
    build_messages,
    merge_params,
    next_step,
    parse_retry_after,
    plan_targets,
    price,
)
from router.types import Skip, Usage

TRANSIENT = {name for name, o in OUTCOMES.items() if o.transient}

CONFIG = """\
version: 1
providers:
  a: {kind: openai, api_key: "${KEY_A}"}
  b: {kind: openai, api_key: "${KEY_B}"}
  c: {kind: openai, api_key: "${KEY_C:-}"}
  free: {kind: ollama}
aliases:
  chat:
    targets:
      - a/model-a
      - {provider: b, model: model-b, params: {temperature: 0.1, top_p: 0.9}}
      - c/model-c
      - a/model-a2
      - free/llama3
    params: {temperature: 0.7, max_tokens: 100}
pricing:
  a/model-a: {input_per_1m: 3.0, output_per_1m: 15.0}
  b/model-b: {input_per_1k: 0.002, output_per_1k: 0.004}
"""
ALL_KEYS = {"KEY_A": "ka", "KEY_B": "kb", "KEY_C": "kc"}


def config(env: dict[str, str] | None = None) -> RouterConfig:
    return parse_config(CONFIG, "t.yaml", env=ALL_KEYS if env is None else env)


def target(key: str, env: dict[str, str] | None = None) -> Target:
    (t,) = [t for t in config(env).targets("chat") if t.key == key]
    return t


# --- next_step --------------------------------------------------------------------------------------------

NO_FALLBACK: list[str] = []


@pytest.mark.parametrize(
    ("outcome", "tries", "attempts", "fallback_on", "has_next", "expected"),
    [
        # transient: retried while tries remain, whatever fallback_on says
        ("rate_limit", 1, 2, DEFAULT_FALLBACK_ON, True, Step.RETRY),
        ("timeout", 1, 3, DEFAULT_FALLBACK_ON, False, Step.RETRY),
        ("server_error", 2, 3, NO_FALLBACK, True, Step.RETRY),
        ("connection", 1, 2, DEFAULT_FALLBACK_ON, True, Step.RETRY),
        ("invalid_response", 1, 2, DEFAULT_FALLBACK_ON, True, Step.RETRY),
        # transient, tries used up: fall back if allowed and possible, else fail
        ("rate_limit", 2, 2, DEFAULT_FALLBACK_ON, True, Step.FALLBACK),
        ("rate_limit", 2, 2, DEFAULT_FALLBACK_ON, False, Step.FAIL),
        ("server_error", 3, 3, NO_FALLBACK, True, Step.FAIL),
        ("timeout", 1, 1, DEFAULT_FALLBACK_ON, True, Step.FALLBACK),
        # not transient: never retried, even with tries left
        ("auth", 1, 5, DEFAULT_FALLBACK_ON, True, Step.FALLBACK),
        ("auth", 1, 5, DEFAULT_FALLBACK_ON, False, Step.FAIL),
        ("payment_required", 1, 2, DEFAULT_FALLBACK_ON, True, Step.FALLBACK),
        ("not_found", 1, 2, DEFAULT_FALLBACK_ON, True, Step.FALLBACK),
        ("context_window", 1, 2, DEFAULT_FALLBACK_ON, True, Step.FALLBACK),
        ("auth", 1, 2, ["rate_limit"], True, Step.FAIL),
        ("other", 1, 2, DEFAULT_FALLBACK_ON, True, Step.FAIL),
        # the caller's mistakes: failed at once by default, fallen back from only when opted in
        ("bad_request", 1, 5, DEFAULT_FALLBACK_ON, True, Step.FAIL),
        ("content_filter", 1, 5, DEFAULT_FALLBACK_ON, True, Step.FAIL),
        ("bad_request", 1, 5, [*DEFAULT_FALLBACK_ON, "bad_request"], True, Step.FALLBACK),
        ("content_filter", 1, 5, ["content_filter"], False, Step.FAIL),
    ],
)
def test_next_step(
    outcome: str, tries: int, attempts: int, fallback_on: Sequence[str], has_next: bool, expected: Step
) -> None:
    assert next_step(outcome, tries, RetryConfig(attempts=attempts), fallback_on, has_next) == expected


@pytest.mark.parametrize("outcome", FAILURE_OUTCOMES)
@pytest.mark.parametrize("tries", [1, 2])
def test_only_transient_outcomes_are_retried(outcome: str, tries: int) -> None:
    step = next_step(outcome, tries, RetryConfig(attempts=3), DEFAULT_FALLBACK_ON, has_next_target=True)
    assert (step == Step.RETRY) == (outcome in TRANSIENT)


@pytest.mark.parametrize("outcome", ["bad_request", "content_filter"])
@pytest.mark.parametrize(("tries", "has_next"), [(1, True), (1, False), (3, True)])
def test_caller_errors_are_never_retried_nor_fallen_back_from_by_default(
    outcome: str, tries: int, has_next: bool
) -> None:
    assert next_step(outcome, tries, RetryConfig(attempts=3), DEFAULT_FALLBACK_ON, has_next) == Step.FAIL


def test_default_fallback_on_is_the_config_default() -> None:
    assert list(config().defaults.fallback_on) == DEFAULT_FALLBACK_ON
    assert not {"bad_request", "content_filter"} & set(DEFAULT_FALLBACK_ON)


def test_the_outcome_table_keeps_its_routing_rules() -> None:
    assert {"rate_limit", "timeout", "connection", "server_error", "invalid_response"} == TRANSIENT
    against = {n for n, o in OUTCOMES.items() if o.against_target}
    assert against == TRANSIENT | {"auth", "payment_required"}
    assert {n for n, o in OUTCOMES.items() if o.key_fault} == {"auth", "payment_required"}
    assert {n for n, o in OUTCOMES.items() if o.rotate_key} == {"auth", "payment_required", "rate_limit"}


def test_fallback_on_names_only_known_outcomes() -> None:
    bad = CONFIG.replace("version: 1", "version: 1\ndefaults: {fallback_on: [rate_limt]}")
    with pytest.raises(ConfigError, match="'rate_limt' is not a failure outcome; did you mean 'rate_limit'"):
        parse_config(bad, env={"KEY_A": "a", "KEY_B": "b"})


# --- backoff_delay ----------------------------------------------------------------------------------------

RETRY = {"backoff_s": 0.5, "max_backoff_s": 8.0}


@pytest.mark.parametrize(
    ("retry_number", "jitter", "expected"),
    [
        (1, 0.0, 0.0),
        (5, 0.0, 0.0),
        (1, 0.5, 0.5 * 0.5),
        (2, 0.5, 0.5 * 1.0),
        (3, 0.5, 0.5 * 2.0),
        (4, 0.5, 0.5 * 4.0),
        (5, 0.5, 0.5 * 8.0),  # the ceiling reaches max_backoff_s
        (6, 0.5, 0.5 * 8.0),  # and stays there
        (40, 0.5, 0.5 * 8.0),
        (3, 0.999, 0.999 * 2.0),
    ],
)
def test_backoff_is_exponential_with_full_jitter_and_capped(retry_number: int, jitter: float, expected: float) -> None:
    assert backoff_delay(retry_number, RetryConfig(**RETRY), None, jitter) == pytest.approx(expected)


@pytest.mark.parametrize("retry_number", range(1, 20))
@pytest.mark.parametrize("jitter", [0.0, 0.3, 0.9999])
def test_backoff_never_exceeds_max_backoff(retry_number: int, jitter: float) -> None:
    delay = backoff_delay(retry_number, RetryConfig(**RETRY), None, jitter)
    assert 0.0 <= delay <= RETRY["max_backoff_s"]


def test_zero_backoff_never_waits() -> None:
    assert backoff_delay(3, RetryConfig(backoff_s=0, max_backoff_s=8), None, 0.9) == 0.0


@pytest.mark.parametrize(
    ("retry_after", "honor", "jitter", "expected"),
    [
        (3.0, True, 0.5, 3.0),  # honoured exactly, jitter ignored
        (0.0, True, 0.9, 0.0),
        (100.0, True, 0.5, RETRY["max_backoff_s"]),  # capped
        (float("inf"), True, 0.5, RETRY["max_backoff_s"]),
        (3.0, False, 0.5, 0.5 * 0.5 * 2),  # ignored: exponential backoff of retry 2 instead
        (100.0, False, 0.0, 0.0),
    ],
)
def test_retry_after(retry_after: float, honor: bool, jitter: float, expected: float) -> None:
    retry = RetryConfig(**RETRY, honor_retry_after=honor)
    assert backoff_delay(2, retry, retry_after, jitter) == pytest.approx(expected)


# --- parse_retry_after ------------------------------------------------------------------------------------

NOW = 1_700_000_000.0


def http_date(ts: float) -> str:
    return email.utils.formatdate(ts, usegmt=True)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("5", 5.0),
        (" 7 ", 7.0),
        ("1.5", 1.5),
        ("0", 0.0),
        ("-3", 0.0),
        (http_date(NOW + 30), 30.0),
        (http_date(NOW + 3600), 3600.0),
        (http_date(NOW - 60), 0.0),  # a date in the past: retry now
        (None, None),
        ("", None),
        ("soon", None),
        ("Wed, 99 Foo 2015 99:99:99 GMT", None),
        ("1 2 3", None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    got = parse_retry_after(value, now=NOW)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected)


# --- price ------------------------------------------------------------------------------------------------

USAGE = Usage(input_tokens=1200, output_tokens=340)


def config_cost(t: Target, usage: Usage) -> float:
    assert t.pricing is not None
    return usage.input_tokens * t.pricing.input_per_token + usage.output_tokens * t.pricing.output_per_token


@pytest.mark.parametrize(
    ("key", "provider_cost", "litellm_cost", "source"),
    [
        ("a/model-a", 0.5, 0.7, "config"),
        ("a/model-a", None, None, "config"),
        ("b/model-b", None, 0.7, "config"),
        ("c/model-c", 0.5, 0.7, "provider"),
        ("c/model-c", 0.0, 0.7, "provider"),  # a free model is free, not unknown
        ("c/model-c", None, 0.7, "litellm"),
        ("c/model-c", None, 0.0, "litellm"),
        ("c/model-c", None, None, "unknown"),
    ],
)
def test_price_source_precedence(
    key: str, provider_cost: float | None, litellm_cost: float | None, source: str
) -> None:
    t = target(key)
    expected = {
        "config": config_cost(t, USAGE) if t.pricing else None,
        "provider": provider_cost,
        "litellm": litellm_cost,
        "unknown": 0.0,
    }[source]
    cost, got_source = price(USAGE, t, provider_cost, litellm_cost)
    assert got_source == source
    assert cost == pytest.approx(expected)


def test_config_price_uses_per_token_rates() -> None:
    t = target("a/model-a")  # 3.0 in / 15.0 out per 1M tokens
    cost, _ = price(Usage(input_tokens=1_000_000, output_tokens=0), t, None, None)
    assert cost == pytest.approx(3.0)
    cost, _ = price(Usage(input_tokens=0, output_tokens=2_000_000), t, None, None)
    assert cost == pytest.approx(30.0)


def test_per_1k_price_is_per_thousand_tokens() -> None:
    t = target("b/model-b")  # 0.002 in / 0.004 out per 1K tokens
    cost, source = price(Usage(input_tokens=1000, output_tokens=1000), t, None, None)
    assert source == "config"
    assert cost == pytest.approx(0.002 + 0.004)


# --- merge_params -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "call", "expected"),
    [
        ("a/model-a", {}, {"temperature": 0.7, "max_tokens": 100}),
        ("b/model-b", {}, {"temperature": 0.1, "max_tokens": 100, "top_p": 0.9}),
        ("b/model-b", {"temperature": 0.0}, {"temperature": 0.0, "max_tokens": 100, "top_p": 0.9}),
        ("a/model-a", {"max_tokens": 5, "seed": 1}, {"temperature": 0.7, "max_tokens": 5, "seed": 1}),
    ],
)
def test_merge_params_call_over_target_over_alias(key: str, call: dict[str, Any], expected: dict[str, Any]) -> None:
    cfg = config()
    assert merge_params(cfg.aliases["chat"], target(key), call) == expected


def test_merge_params_does_not_mutate_its_inputs() -> None:
    cfg = config()
    alias, t = cfg.aliases["chat"], target("b/model-b")
    call = {"temperature": 0.0}
    merged = merge_params(alias, t, call)
    merged["extra"] = 1
    assert alias.params == {"temperature": 0.7, "max_tokens": 100}
    assert dict(t.params) == {"temperature": 0.1, "top_p": 0.9}
    assert call == {"temperature": 0.0}


# --- build_messages ---------------------------------------------------------------------------------------

USER = {"role": "user", "content": "hi"}
SYSTEM = {"role": "system", "content": "be brief"}


@pytest.mark.parametrize(
    ("prompt", "messages", "system", "expected"),
    [
        ("hi", None, None, [USER]),
        ("hi", None, "be nice", [{"role": "system", "content": "be nice"}, USER]),
        ("", None, None, [{"role": "user", "content": ""}]),
        (None, [USER], None, [USER]),
        (None, [USER], "be nice", [{"role": "system", "content": "be nice"}, USER]),
        (None, [SYSTEM, USER], "be nice", [SYSTEM, USER]),  # the caller's system wins
        (None, [USER, SYSTEM], "be nice", [{"role": "system", "content": "be nice"}, USER, SYSTEM]),
        ("hi", None, "", [USER]),
    ],
)
def test_build_messages(
    prompt: str | None, messages: list[dict[str, Any]] | None, system: str | None, expected: list[dict[str, Any]]
) -> None:
    assert build_messages(prompt, messages, system) == expected


@pytest.mark.parametrize(
    ("prompt", "messages"),
    [
        ("hi", [USER]),  # both
        (None, None),  # neither
        (None, []),  # empty
        (None, [{"content": "no role"}]),
        (42, None),  # not a str
    ],
    ids=["both", "neither", "empty", "no-role", "not-a-str"],
)
def test_build_messages_rejects(prompt: Any, messages: Any) -> None:
    with pytest.raises(TypeError):
        build_messages(prompt, messages, "sys")


def test_build_messages_does_not_mutate_the_callers_list() -> None:
    messages = [dict(USER)]
    out = build_messages(None, messages, "be nice")
    out[1]["content"] = "changed"
    assert messages == [USER]


# --- plan_targets -----------------------------------------------------------------------------------------


def test_plan_uses_all_targets_in_order_when_every_key_is_set() -> None:
    targets = config().targets("chat")
    usable, skipped = plan_targets(targets)
    assert usable == list(targets)
    assert skipped == []


def test_plan_skips_targets_without_credentials_and_names_the_env_var() -> None:
    targets = config({"KEY_A": "ka"}).targets("chat")
    usable, skipped = plan_targets(targets)
    assert [t.key for t in usable] == ["a/model-a", "a/model-a2", "free/llama3"]
    assert skipped == [
        Skip("b", "model-b", "no_credentials", ("KEY_B",)),
        Skip("c", "model-c", "no_credentials", ("KEY_C",)),
    ]


@pytest.mark.parametrize(
    ("provider", "env", "usable_keys", "skipped_keys"),
    [
        ("a", ALL_KEYS, ["a/model-a", "a/model-a2"], []),
        ("b", ALL_KEYS, ["b/model-b"], []),
        ("b", {"KEY_A": "ka"}, [], ["b/model-b"]),
        ("a", {"KEY_B": "kb"}, [], ["a/model-a", "a/model-a2"]),
        ("free", {}, ["free/llama3"], []),
        ("nobody", ALL_KEYS, [], []),
    ],
)
def test_plan_provider_filter(
    provider: str, env: dict[str, str], usable_keys: list[str], skipped_keys: list[str]
) -> None:
    usable, skipped = plan_targets(config(env).targets("chat"), provider=provider)
    assert [t.key for t in usable] == usable_keys
    assert [f"{s.provider}/{s.model}" for s in skipped] == skipped_keys
    assert all(s.reason == "no_credentials" for s in skipped)
