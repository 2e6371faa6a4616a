"""Shared fixtures: one real loopback upstream for the session, a fresh metrics registry per test, and a
`make_router` that builds a Router on config text whose providers point at the upstream's routes.

In config text given to `make_router`, ``{UP}`` is replaced by the upstream's URL, so a provider reads
``api_base: "{UP}/a/v1"`` (OpenAI wire format, route "a") or ``api_base: "{UP}/an"`` (Anthropic).
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from router import Router, parse_config
from router.sandbox import Upstream

# Keys that look real enough to be worth leaking; tests assert they never show up anywhere.
KEY_A = "sk-test-aaaa-0123456789abcdef"
KEY_B = "sk-test-bbbb-0123456789abcdef"
KEY_C = "sk-test-cccc-0123456789abcdef"

STANDARD = """
version: 1
defaults:
  model: chat
  timeout_s: 5
  deadline_s: 20
  retry: {{attempts: 2, backoff_s: 0.1, max_backoff_s: 2}}
providers:
  a: {{kind: openai, api_base: "{{UP}}/a/v1", api_key: "${{KEY_A}}"}}
  b: {{kind: openai, api_base: "{{UP}}/b/v1", api_key: "${{KEY_B}}"}}
  c: {{kind: openai, api_base: "{{UP}}/c/v1", api_key: "${{KEY_C}}"}}
aliases:
  chat: {{targets: [a/model-a, b/model-b, c/model-c]}}
  single: {{targets: [a/model-a]}}
{aliases}
{extra}
"""


def standard_config(aliases: str = "", extra: str = "") -> str:
    """The STANDARD config text plus more aliases (lines indented under `aliases:`) and top-level YAML."""
    return STANDARD.format(
        aliases=textwrap.indent(textwrap.dedent(aliases).strip("\n"), "  "), extra=textwrap.dedent(extra)
    )


def standard_env() -> dict[str, str]:
    """The env the standard config reads its keys from."""
    return {"KEY_A": KEY_A, "KEY_B": KEY_B, "KEY_C": KEY_C}


class Sleeps(list[float]):
    """Records the router's backoff sleeps instead of waiting; usable as sync and async sleep."""

    def sleep(self, seconds: float) -> None:
        self.append(seconds)

    async def asleep(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture(scope="session")
def upstream() -> Iterator[Upstream]:
    with Upstream() as up:
        yield up


@pytest.fixture
def up(upstream: Upstream) -> Iterator[Upstream]:
    """The session's upstream, with queues, defaults and history cleared around the test."""
    upstream.reset()
    yield upstream
    upstream.reset()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


MakeRouter = Callable[..., Router]


ENGINES = ("litellm", "direct")
BOTH_ENGINES = pytest.mark.parametrize("engine", ENGINES, indirect=True)
"""Runs a test once per engine: `make_router` then sends every OpenAI-protocol provider through that engine."""


def with_engines(argnames: str | tuple[str, ...], values: Iterable[Any], direct: Callable[[Any], bool]) -> Any:
    """Parametrize `argnames` and the engine: every value on litellm, and on direct too where `direct(value)`."""
    names = (argnames,) if isinstance(argnames, str) else tuple(argnames)
    params = []
    for value in values:
        args = value if len(names) > 1 else (value,)
        label = "-".join(str(getattr(a, "__name__", a)) for a in args)
        for engine in ENGINES if direct(value) else ("litellm",):
            params.append(pytest.param(*args, engine, id=f"{label}-{engine}"))
    return pytest.mark.parametrize((*names, "engine"), params, indirect=["engine"])


@pytest.fixture
def engine(request: pytest.FixtureRequest) -> str:
    """The engine `make_router` gives OpenAI-protocol providers (parametrize with BOTH_ENGINES); default litellm."""
    return str(getattr(request, "param", "litellm"))


def with_engine(text: str, engine: str) -> str:
    """Config text with `engine: <engine>` on every provider the direct engine takes (others left as they are)."""
    if engine == "litellm":
        return text
    from router.engines import direct_problem

    data = yaml.safe_load(text)
    for provider in (data.get("providers") or {}).values():
        if "engine" not in provider and direct_problem(provider.get("kind", ""), provider.get("api_base")) is None:
            provider["engine"] = engine
    return yaml.safe_dump(data, sort_keys=False)


@pytest.fixture
def make_router(up: Upstream, registry: CollectorRegistry, sleeps: Sleeps, engine: str) -> MakeRouter:
    """make_router(config_text=None, *, extra="", env=None, real_sleep=False, **router_kwargs) -> Router.

    With no text, the STANDARD config (providers a, b, c; aliases chat = a → b → c, single = a) plus
    `extra` YAML appended at top level. `env` defaults to `standard_env()`. Sleeps are recorded in the
    `sleeps` fixture unless real_sleep=True; jitter is fixed at 0.5. Under BOTH_ENGINES, every provider of a
    kind the direct engine takes is sent by the `engine` of the test.
    """

    def make(
        text: str | None = None,
        *,
        extra: str = "",
        env: Mapping[str, str] | None = None,
        real_sleep: bool = False,
        **kwargs: Any,
    ) -> Router:
        if text is None:
            text = standard_config(extra=extra)
        text = with_engine(textwrap.dedent(text).replace("{UP}", up.url), engine)
        cfg = parse_config(text, "test.yaml", env=standard_env() if env is None else env)
        if not real_sleep:
            kwargs.setdefault("sleep", sleeps.sleep)
            kwargs.setdefault("asleep", sleeps.asleep)
        kwargs.setdefault("jitter", lambda: 0.5)
        return Router(cfg, registry=registry, **kwargs)

    return make
