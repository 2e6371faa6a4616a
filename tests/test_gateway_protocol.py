"""The gateway's pure parts as tables: request parsing, errors to statuses, client keys, the bind rule, the
`gateway:` config section."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from conftest import MakeRouter, standard_config
from gateway_server import GATEWAY_KEYS, GW_BILLING, GW_SEARCH, gateway_env

from router import (
    AllTargetsFailedError,
    Attempt,
    BudgetExceededError,
    ConfigError,
    DeadlineExceededError,
    MissingCredentialsError,
    ProviderError,
    Skip,
    StreamInterruptedError,
    UnknownModelError,
    Usage,
    parse_config,
)
from router.gateway import protocol
from router.gateway.app import Gateway, _route
from router.gateway.inprocess import InProcessTransport
from router.gateway.protocol import GatewayError, parse_chat
from router.gateway.server import bind_problem, is_loopback, workers_note


def config_text(extra: str = "") -> str:
    return standard_config(extra=extra).replace("{UP}", "http://127.0.0.1:9")


def body(**fields: Any) -> bytes:
    return json.dumps({"model": "chat", "messages": [{"role": "user", "content": "hi"}], **fields}).encode()


def test_a_request_becomes_generate_arguments() -> None:
    req = parse_chat(
        body(
            temperature=0.3, max_completion_tokens=9, stop="END", seed=1, n=1, user="u-1",
            stream=True, stream_options={"include_usage": True}, tools=[{"type": "function"}], tool_choice="auto",
        )
    )  # fmt: skip

    assert (req.alias, req.stream, req.include_usage, req.user) == ("chat", True, True, "u-1")
    kw = req.generate_kwargs({"team": "x"})
    assert kw["model"] == "chat" and kw["stream"] is True and kw["tags"] == {"team": "x"}
    assert kw["messages"] == [{"role": "user", "content": "hi"}] and kw["response_format"] is None
    for name, value in {"temperature": 0.3, "max_completion_tokens": 9, "stop": "END", "seed": 1}.items():
        assert kw[name] == value
    assert "n" not in kw and "stream_options" not in kw  # the router sets those itself


def test_a_stream_with_a_response_format_is_asked_plainly() -> None:
    req = parse_chat(body(stream=True, response_format={"type": "json_schema", "json_schema": {"name": "x"}}))
    assert req.stream and req.generate_kwargs({})["stream"] is False  # validated whole, then streamed
    assert parse_chat(body(response_format={"type": "text"})).response_format is None


@pytest.mark.parametrize(
    ("fields", "param", "says"),
    [
        ({"top_k": 1, "zeta": 2}, "top_k", "unknown field(s): top_k, zeta"),
        ({"logprobs": True}, "logprobs", "log probabilities"),
        ({"functions": []}, "functions", "use tools"),
        ({"n": 3}, "n", "n must be 1"),
        ({"temperature": 3}, "temperature", "from 0 to 2"),
        ({"temperature": True}, "temperature", "from 0 to 2"),
        ({"max_tokens": 0}, "max_tokens", "positive integer"),
        ({"max_tokens": 1.5}, "max_tokens", "positive integer"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "up to 4"),
        ({"stream": "yes"}, "stream", "true or false"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed with stream"),
        ({"stream": True, "stream_options": {"x": 1}}, "stream_options", "unknown field(s) of stream_options"),
        ({"response_format": {"type": "yaml"}}, "response_format", "json_object"),
        ({"model": ""}, "model", "model is required"),
        ({"messages": "hi"}, "messages", "non-empty list"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0]", "tool_call_id"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0]", "content must be"),
    ],
)
def test_bad_requests_name_what_is_wrong(fields: dict[str, Any], param: str, says: str) -> None:
    with pytest.raises(GatewayError) as info:
        parse_chat(body(**fields))
    assert info.value.status == 400 and info.value.param == param and says in info.value.message


def test_a_body_that_is_not_an_object() -> None:
    for raw in (b"[]", b"nope", b"\xff\xfe"):
        with pytest.raises(GatewayError) as info:
            parse_chat(raw)
        assert info.value.status == 400


A = Attempt("a", "model-a", "server_error", 0.1, "overloaded at http://10.1.2.3:8080/v1", 503)
RESETS = datetime.now(timezone.utc) + timedelta(hours=2)


@pytest.mark.parametrize(
    ("exc", "status", "code", "retry"),
    [
        (UnknownModelError("chta", ["chat"], ["chat"]), 404, "model_not_found", None),
        (BudgetExceededError("team", 1.0, 1.0, RESETS), 429, "insufficient_quota", "false"),
        (BudgetExceededError("team", 0, 1.0, RESETS, reason="unpriced"), 429, "insufficient_quota", "false"),
        (BudgetExceededError("team", 0, 1.0, RESETS, reason="unavailable"), 503, "budget_unavailable", None),
        (AllTargetsFailedError("chat", [A]), 502, "server_error", None),
        (AllTargetsFailedError("chat", [A, Attempt("b", "m", "timeout", 5.0, "timed out")]), 504, "timeout", None),
        (DeadlineExceededError("chat", [A], 10), 504, "deadline_exceeded", None),
        (MissingCredentialsError("chat", [Skip("a", "m", "no_credentials", ("K",))]), 503, "no_credentials", "false"),
        (ProviderError("chat", [Attempt("a", "m", "bad_request", 0.1, "too big", 400)]), 400, "bad_request", None),
        (ProviderError("chat", [Attempt("a", "m", "bad_request", 0.1, "too long", 422)]), 422, "bad_request", None),
        (ProviderError("chat", [Attempt("a", "m", "content_filter", 0.1, "filtered")]), 400, "content_filter", None),
        (ProviderError("chat", [Attempt("a", "m", "other", 0.1, "odd")]), 502, "other", None),
        (StreamInterruptedError("chat", [A], "half", Usage(), 0.0), 502, "stream_interrupted", None),
        (TypeError("tags must be a dict"), 400, None, None),
        (RuntimeError("a bug"), 500, "internal_error", None),
    ],
)  # fmt: skip
def test_errors_map_to_statuses_the_sdk_retries_correctly(
    exc: BaseException, status: int, code: str | None, retry: str | None
) -> None:
    err = protocol.error_for(exc)

    assert (err.status, err.code) == (status, code)
    assert err.headers.get("x-should-retry") == retry
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}
    assert "10.1.2.3" not in err.message and "a bug" not in err.message  # no internal hosts, no internals


def test_a_spent_budget_says_when_to_come_back() -> None:
    err = protocol.error_for(BudgetExceededError("team", 1.0, 1.0, RESETS), now=RESETS.timestamp() - 90)
    assert err.headers["retry-after"] == "90"


def test_provider_messages_lose_urls_and_litellms_wrapping() -> None:
    text = "BadRequestError: litellm.BadRequestError: OpenAIException - max_tokens too large, see https://x.io/d?a=1"
    assert protocol.scrub_text(text) == "max_tokens too large, see <url>"


def test_a_key_matches_only_itself() -> None:
    cfg = parse_config(config_text(GATEWAY_KEYS), "t.yaml", env=gateway_env())
    assert cfg.gateway is not None
    digests = protocol.key_digests(cfg.gateway.keys)

    assert protocol.match_key(digests, GW_SEARCH) is cfg.gateway.keys[0]
    assert protocol.match_key(digests, GW_BILLING) is cfg.gateway.keys[1]
    for wrong in (None, "", GW_SEARCH[:-1], GW_SEARCH + "x", GW_SEARCH.upper(), "\udcff"):
        assert protocol.match_key(digests, wrong) is None
    assert protocol.bearer_token(f"Bearer {GW_SEARCH}") == GW_SEARCH
    assert protocol.bearer_token(f"bearer   {GW_SEARCH} ") == GW_SEARCH
    assert protocol.bearer_token(f"Basic {GW_SEARCH}") is None and protocol.bearer_token("Bearer ") is None


def test_a_calls_tags_are_the_keys_own_first() -> None:
    cfg = parse_config(config_text(GATEWAY_KEYS), "t.yaml", env=gateway_env())
    assert cfg.gateway is not None
    search = cfg.gateway.keys[0]

    assert protocol.call_tags(search, "u-9") == {"user": "u-9", "gateway_key": "search", "team": "search"}
    assert protocol.call_tags(None, None) == {}
    assert protocol.allowed_aliases(cfg.gateway.keys[1], cfg.aliases) == ["single"]
    assert protocol.allowed_aliases(search, cfg.aliases) == list(cfg.aliases)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.0.1.9", True), ("::1", True), ("[::1]", True), ("localhost", True),
     ("0.0.0.0", False), ("::", False), ("10.0.0.5", False), ("gateway.internal", False), ("", False)],
)  # fmt: skip
def test_only_loopback_binds_without_keys(host: str, loopback: bool) -> None:
    open_cfg = parse_config(config_text(), "t.yaml", env=gateway_env())
    keyed = parse_config(config_text(GATEWAY_KEYS), "t.yaml", env=gateway_env())

    assert is_loopback(host) is loopback
    assert (bind_problem(host, open_cfg, False) is None) is loopback
    assert bind_problem(host, open_cfg, True) is None
    assert bind_problem(host, keyed, False) is None


@pytest.mark.parametrize(
    ("section", "says"),
    [
        ('{keys: [{name: a, key: "short"}]}', "at least 16 characters"),
        ('{keys: [{name: a, key: "${GW_UNSET}"}]}', "GW_UNSET is not set"),
        ("{keys: []}", "at least 1 item"),
        ('{keys: [{name: a, key: "${GW_SEARCH}"}, {name: a, key: "${GW_BILLING}"}]}', "names must be unique: a"),
        ('{keys: [{name: a, key: "${GW_SEARCH}"}, {name: b, key: "${GW_SEARCH}"}]}', "'a' and 'b' have the same"),
        ('{keys: [{name: a, key: "${GW_SEARCH}", aliases: [chta]}]}', "did you mean 'chat'"),
        ('{keys: [{name: a, key: "${GW_SEARCH}", tagz: {}}]}', "unknown key (did you mean 'tags'?)"),
        ('{keys: [{name: a, key: "${GW_SEARCH}", tags: {"no space": x}}]}', "should match pattern"),
    ],
)
def test_the_gateway_section_is_checked_at_load(section: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(config_text(f"gateway: {section}"), "t.yaml", env=gateway_env())
    assert says in str(info.value)
    assert GW_SEARCH not in str(info.value)


def test_a_public_gateway_whose_keys_were_reloaded_away_refuses_everyone(make_router: MakeRouter) -> None:
    r = make_router()  # no gateway: section
    public = httpx.Client(transport=InProcessTransport(Gateway(r, require_keys=True)), base_url="http://gw")
    local = httpx.Client(transport=InProcessTransport(Gateway(r)), base_url="http://gw")
    msg = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}

    assert public.post("/v1/chat/completions", json=msg).status_code == 401
    assert public.get("/v1/models").status_code == 401
    assert public.get("/healthz").status_code == 200  # probes and scrapes stay open
    assert local.get("/v1/models").status_code == 200


@pytest.mark.parametrize(
    ("path", "route"),
    [("/v1/chat/completions", "chat"), ("/chat/completions/", "chat"), ("/v1/models", "models"),
     ("/models/chat", "model"), ("/healthz", "healthz"), ("/metrics", "metrics"), ("/v1/models/a/b", "other"),
     ("/admin", "other"), ("/", "other")],
)  # fmt: skip
def test_routes_are_a_fixed_set(path: str, route: str) -> None:
    assert _route(path) == route


def test_workers_without_a_shared_state_are_told_so() -> None:
    memory = parse_config(config_text(), "t.yaml", env=gateway_env())
    shared = parse_config(config_text("state: {backend: sqlite, path: /tmp/s.db}"), "t.yaml", env=gateway_env())

    assert "state: {backend: sqlite" in (workers_note(memory, 4) or "")
    assert workers_note(memory, 1) is None and workers_note(shared, 4) is None
