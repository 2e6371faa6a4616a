"""Every configured secret stays out of what the router shows: API keys, what `${VAR}` put into a header, and
passwords and tokens in `api_base`, `state.url` and `ledger.dsn`. A provider on the loopback upstream echoes
them back in its error body (as real ones do with an auth header), and they must show nowhere: not in the
exception, its causes or its traceback, the log (at DEBUG, the HTTP libraries' records too), stdout and
stderr, the metrics, a repr, `explain()` or the `llm-router` command. `router/secrets.py` collects them.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import subprocess
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import BOTH_ENGINES, KEY_A, KEY_B, MakeRouter
from prometheus_client import CollectorRegistry, generate_latest

from router import ConfigError, ProviderError, Result, Router, parse_config
from router.sandbox import Reply, Upstream
from router.secrets import redact_url, url_secrets

ROOT = Path(__file__).resolve().parents[1]

HELI = "heli-secret-0123456789"  # a header value, from ${HELI}
PW = "pw-secret-987654"  # the password in api_base, from ${PW}
BASIC = base64.b64encode(f"user:{PW}".encode()).decode()  # how the client sends that password
SECRETS = {"KEY_A": KEY_A, "KEY_B": KEY_B, "HELI": HELI, "PW": PW, "BASIC": BASIC}

# a sends a secret header; p has a password in its api_base (sent as Basic auth).
CONFIG = """
version: 1
defaults: {model: chat, timeout_s: 5, deadline_s: 20, retry: {attempts: 1}}
providers:
  a:
    kind: openai
    api_base: "{UP}/a/v1"
    api_key: "${KEY_A}"
    headers: {Helicone-Auth: "Bearer ${HELI}", X-Title: "secrets test"}
  p: {kind: openai, api_base: "http://user:${PW}@{HOSTPORT}/p/v1", api_key: "${KEY_A}"}
  b: {kind: openai, api_base: "{UP}/b/v1", api_key: "${KEY_B}"}
aliases:
  chat: {targets: [a/model-a, b/model-b]}
  single: {targets: [a/model-a]}
  pw: {targets: [p/model-p]}
"""
ENV = {"KEY_A": KEY_A, "KEY_B": KEY_B, "HELI": HELI, "PW": PW}
ECHO = f"your request: Authorization: Bearer {KEY_A}, Helicone-Auth: Bearer {HELI}, Basic {BASIC}, password {PW}"


def config_text(up: Upstream) -> str:
    return CONFIG.replace("{HOSTPORT}", up.url.removeprefix("http://")).replace("{UP}", up.url)


@pytest.fixture
def r(make_router: MakeRouter, up: Upstream) -> Router:
    return make_router(config_text(up), env=ENV)


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Every record at DEBUG: the router's and the HTTP libraries' (openai's SDK logs each request's headers)."""
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="router")
    yield caplog


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and every exception a traceback prints with it (causes and contexts)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]


def shown(
    r: Router, registry: CollectorRegistry, logs: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> dict[str, str]:
    """Everything the process showed or could show: log records, stdout/stderr, metrics, reprs, explain()."""
    places = {f"log record {i} ({rec.name})": rec.getMessage() for i, rec in enumerate(logs.records)}
    places["log text"] = logs.text
    places["stdout"], places["stderr"] = capfd.readouterr()
    places["metrics"] = generate_latest(registry).decode()
    places["repr(router)"] = repr(r)
    places["repr(config)"] = repr(r.config)
    places["repr(targets)"] = repr(r.config.targets("chat"))
    places["explain()"] = r.explain()
    return places


def error_places(err: BaseException) -> dict[str, str]:
    places = {"traceback": "".join(traceback.format_exception(err))}
    for depth, e in enumerate(exception_chain(err)):
        places[f"str(chain[{depth}] {type(e).__name__})"] = str(e)
        places[f"repr(chain[{depth}] {type(e).__name__})"] = repr(e)
        places[f"args(chain[{depth}] {type(e).__name__})"] = repr(e.args)
    for i, a in enumerate(getattr(err, "attempts", ())):
        places[f"attempts[{i}].error"] = a.error or ""
    return places


def leaks(places: dict[str, str]) -> list[str]:
    return [f"{name} in {where}" for where, text in places.items() for name, s in SECRETS.items() if s in text]


# -- a provider echoes them ----------------------------------------------------------------------------------


def call(r: Router, mode: str, model: str = "chat") -> Result:
    """One call, as `mode` says: sync or async, plain or streamed (read to its end)."""
    stream = mode.endswith("stream")
    if mode.startswith("async"):

        async def go() -> Result:
            got = await r.agenerate("hello", model=model, stream=stream)
            if stream:
                async for _ in got:
                    pass
                return got.result  # type: ignore[no-any-return]
            return got  # type: ignore[no-any-return]

        return asyncio.run(go())
    got = r.generate("hello", model=model, stream=stream)
    if stream:
        for _ in got:
            pass
        return got.result  # type: ignore[no-any-return]
    return got  # type: ignore[no-any-return]


MODES = ["sync", "async", "sync-stream", "async-stream"]


@pytest.mark.parametrize("mode", MODES)
def test_an_echoed_header_value_or_password_is_in_no_error_log_or_output(
    mode: str,
    r: Router,
    up: Upstream,
    registry: CollectorRegistry,
    logs: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    up.enqueue("a", Reply(status=400, error=ECHO))  # a 400 is not fallen back from: the call fails with it

    with pytest.raises(ProviderError) as info:
        call(r, mode)

    err = info.value
    assert err.__cause__ is not None  # the provider's exception is kept, scrubbed
    assert "***" in str(err) and "your request" in str(err)  # the echo was there, and redacted
    assert up.requests("a")[0].headers["helicone-auth"] == f"Bearer {HELI}"  # really sent
    assert any(rec.levelno == logging.WARNING and "***" in rec.getMessage() for rec in logs.records)
    assert any(rec.name.startswith("openai") for rec in logs.records)  # the SDK's DEBUG records were seen
    found = leaks({**error_places(err), **shown(r, registry, logs, capfd)})
    assert not found, f"a secret shows: {found}"


@BOTH_ENGINES
@pytest.mark.parametrize("mode", MODES)
def test_an_echo_fallen_back_from_is_in_no_result_or_log(
    mode: str,
    r: Router,
    up: Upstream,
    registry: CollectorRegistry,
    logs: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    up.enqueue("a", Reply(status=401, error=ECHO))

    res = call(r, mode)

    assert res.provider == "b"
    assert res.attempts[0].error and "***" in res.attempts[0].error
    places = {"repr(result)": repr(res), **shown(r, registry, logs, capfd)}
    found = leaks(places)
    assert not found, f"a secret shows: {found}"


@BOTH_ENGINES
def test_an_echoed_api_base_password_is_in_no_error_log_or_output(
    r: Router,
    up: Upstream,
    registry: CollectorRegistry,
    logs: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    up.enqueue("p", Reply(status=400, error=ECHO))

    with pytest.raises(ProviderError) as info:
        r.generate("hello", model="pw")

    assert up.requests("p")[0].headers["authorization"] == f"Basic {BASIC}"  # how the password went out
    assert "***" in str(info.value)
    found = leaks({**error_places(info.value), **shown(r, registry, logs, capfd)})
    assert not found, f"a secret shows: {found}"


@BOTH_ENGINES
def test_an_api_base_with_a_password_works_async_without_showing_it(
    r: Router,
    up: Upstream,
    registry: CollectorRegistry,
    logs: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """LiteLLM's async transport (aiohttp) refuses a URL with credentials next to an Authorization header; the
    engine sends them as the Basic header a blocking request would have, so async calls (and sync ones, which
    now go through the same transport) reach the provider, and an echo of them is still scrubbed."""
    up.enqueue("p", Reply(status=400, error=ECHO))

    with pytest.raises(ProviderError) as info:
        asyncio.run(r.agenerate("hello", model="pw"))

    assert up.requests("p")[0].headers["authorization"] == f"Basic {BASIC}"
    assert "***" in str(info.value)
    found = leaks({**error_places(info.value), **shown(r, registry, logs, capfd)})
    assert not found, f"a secret shows: {found}"


# -- explain and the command ---------------------------------------------------------------------------------

TOKEN = "qtok-secret-24680"
URL_CONFIG = """
version: 1
providers:
  gw:
    kind: openai
    api_base: "https://user:${PW}@gateway.example/v1?api-key=${TOKEN}&api-version=2024-06-01"
    api_key: "${KEY_A}"
    headers: {Helicone-Auth: "Bearer ${HELI}"}
  tok: {kind: openai, api_base: "https://${TOKEN}@git.example/v1"}
aliases:
  chat: {targets: [gw/model-a, tok/model-b]}
"""


def test_explain_shows_urls_with_their_passwords_and_tokens_redacted(registry: CollectorRegistry) -> None:
    r = Router(parse_config(URL_CONFIG, "urls.yaml", env={**ENV, "TOKEN": TOKEN}), registry=registry)

    text = r.explain()

    assert "at https://user:***@gateway.example/v1?api-key=***&api-version=2024-06-01," in text
    assert "at https://***@git.example/v1," in text
    assert PW not in text and TOKEN not in text and HELI not in text


def test_the_command_explains_and_fails_without_showing_a_secret(up: Upstream, tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(config_text(up))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LLM_ROUTER")},
        **ENV,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "router.cli", *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120
        )

    explained = run("explain", str(path))
    up.enqueue("a", Reply(status=400, error=ECHO))
    failed = run("generate", "--config", str(path), "--model", "single", "hello")

    assert explained.returncode == 0, explained.stderr
    assert f"at http://user:***@{up.url.removeprefix('http://')}/p/v1," in explained.stdout
    assert failed.returncode == 1 and "ProviderError" in failed.stderr and "***" in failed.stderr, failed.stderr
    assert "Traceback" not in failed.stderr
    outputs = {
        f"{name} {stream}": getattr(proc, stream)
        for name, proc in (("explain", explained), ("generate", failed))
        for stream in ("stdout", "stderr")
    }
    found = leaks(outputs)
    assert not found, f"a secret shows: {found}"


def test_a_key_pasted_where_a_target_belongs_is_not_echoed() -> None:
    text = CONFIG.replace("[a/model-a]", f"[{KEY_A}]")

    with pytest.raises(ConfigError) as info:
        parse_config(text, "keys.yaml", env=ENV)

    message = str(info.value)
    assert KEY_A not in message and "sk-test" not in message
    line = next(n for n, s in enumerate(text.splitlines(), 1) if KEY_A in s)
    assert f"keys.yaml:{line}: aliases.single.targets[0]" in message and "'<provider>/<model>'" in message


# -- what the secrets of a config are ------------------------------------------------------------------------

ALL_SOURCES = """
version: 1
providers:
  a:
    kind: openai
    api_base: "http://user:${PW}@host:8000/v1?token=${TOKEN}&api-version=2024-06-01"
    api_key: [{name: one, key: "${KEY_A}"}, "${KEY_B}"]
    headers:
      Helicone-Auth: "Bearer ${HELI}"
      X-Org: "${ORG:-org-default-1234}"
      X-Api-Key: "literal-key-in-the-file"
      X-Title: "not a secret at all"
      X-Short: "${SHORT}"
aliases:
  chat: {targets: [a/m]}
state: {backend: redis, url: "redis://:${REDIS_PW}@127.0.0.1:6379/0"}
ledger: {dsn: "host=127.0.0.1 user=llm password='${PG_PW}' dbname=llm"}
"""


def test_a_configs_secrets_are_keys_header_values_from_env_and_url_credentials() -> None:
    env = {**ENV, "TOKEN": TOKEN, "SHORT": "abc", "REDIS_PW": "redis-secret-13579", "PG_PW": "pg-secret-112233"}
    cfg = parse_config(ALL_SOURCES, "all.yaml", env=env)

    secrets = set(cfg.secrets())

    assert {KEY_A, KEY_B, HELI, PW, TOKEN, "org-default-1234", "redis-secret-13579", "pg-secret-112233"} <= secrets
    assert {"literal-key-in-the-file", BASIC} <= secrets  # a credential's header name; Basic auth of api_base
    assert "not a secret at all" not in secrets and "abc" not in secrets  # a literal; too short to scrub
    assert "2024-06-01" not in secrets  # api-version is no credential
    lengths = [len(s) for s in cfg.secrets()]
    assert lengths == sorted(lengths, reverse=True)  # one secret holding another is replaced whole


@pytest.mark.parametrize(
    ("url", "redacted", "secrets"),
    [
        ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1", []),
        ("http://user:pw-1234567@host/v1", "http://user:***@host/v1", ["pw-1234567", "dXNlcjpwdy0xMjM0NTY3"]),
        ("https://tok-1234567@host/v1", "https://***@host/v1", ["tok-1234567"]),
        ("https://h/v1?api-key=k-1234567&api-version=2024", "https://h/v1?api-key=***&api-version=2024", ["k-1234567"]),
        ("https://h/v1?sig=a%2Bb%3D1234#top", "https://h/v1?sig=***#top", ["a%2Bb%3D1234", "a+b=1234"]),
        ("https://u:p%40ss-word@h/", "https://u:***@h/", ["p%40ss-word", "p@ss-word", "dTpwQHNzLXdvcmQ="]),
        ("redis://:redis-pw-1@h:6379/0", "redis://:***@h:6379/0", ["redis-pw-1"]),
        ("postgresql://llm_user@db/llm", "postgresql://llm_user@db/llm", []),  # a role, not a token
        (
            "postgresql://db/llm?sslmode=require&password=pg-pw-1",
            "postgresql://db/llm?sslmode=require&password=***",
            ["pg-pw-1"],
        ),
        ("host=db user=llm password=pg-pw-1 dbname=llm", "host=db user=llm password=*** dbname=llm", ["pg-pw-1"]),
        ("host=db password='it\\'s secret'", "host=db password=***", ["'it\\'s secret'", "it's secret"]),
    ],
)
def test_redact_url_and_url_secrets(url: str, redacted: str, secrets: list[str]) -> None:
    assert redact_url(url) == redacted
    assert set(url_secrets(url)) == set(secrets)  # (with Basic auth's encoding of an http URL's user:password)


def test_api_base_credentials_become_the_basic_header_a_blocking_client_would_send() -> None:
    from router.engines.litellm import split_credentials

    assert split_credentials("https://gw.example/v1?api-key=k") == ("https://gw.example/v1?api-key=k", None)
    url, header = split_credentials("https://us%40er:p%3Aw@gw.example:8443/v1?api-version=1")
    assert url == "https://gw.example:8443/v1?api-version=1"
    assert header == "Basic " + base64.b64encode(b"us@er:p:w").decode()
