"""The YAML config: pydantic models, `${VAR}` interpolation, line-numbered errors, cross-reference checks.

Every model forbids unknown keys, so a typo is an error, not silence. Every problem is reported as
``FILE:LINE: key.path: what is wrong``, all of them at once, and cross-references (targets → providers,
pricing → targets, the default alias) are checked here, at load time.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import os
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
import yaml.composer
import yaml.constructor
import yaml.resolver
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from . import outcomes
from .engines import direct_problem
from .errors import ConfigError, ConfigProblem
from .secrets import MASK, redact_url

DEFAULT_FALLBACK_ON = list(outcomes.DEFAULT_FALLBACK_ON)
# Latency of LLM calls runs from tens of milliseconds (a cached or tiny answer) to minutes (long generations).
DEFAULT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class RetryConfig(_Model):
    """How often a transient failure is tried again on the same target, and how long to wait in between."""

    attempts: PositiveInt = Field(2, description="Tries per target, the first included (1 = no retry).")
    backoff_s: NonNegativeFloat = Field(0.5, description="Base of the exponential backoff (full jitter).")
    max_backoff_s: NonNegativeFloat = Field(8.0, description="Cap of any one wait, Retry-After included.")
    honor_retry_after: bool = Field(True, description="Wait as long as the provider's Retry-After says (capped).")


class CircuitConfig(_Model):
    """When a target (provider + model) is taken out of rotation, and for how long."""

    failure_threshold: PositiveInt = Field(5, description="Consecutive transient or auth failures that open it.")
    failure_ratio: float | None = Field(
        0.5, gt=0, le=1, description="Failure ratio over window_s that opens it (null: off)."
    )
    min_requests: PositiveInt = Field(10, description="Requests in the window before the ratio counts.")
    window_s: PositiveFloat = Field(60.0, description="Window of the failure ratio, in seconds.")
    cooldown_s: PositiveFloat = Field(30.0, description="How long it stays open before one probe is let through.")
    when_all_open: Literal["try_soonest", "fail"] = Field(
        "try_soonest", description="All targets open: try the one whose cooldown ends first, or fail at once."
    )


class CircuitOverride(_Model):
    """Per-provider changes to defaults.circuit."""

    failure_threshold: PositiveInt | None = None
    failure_ratio: float | None = Field(None, gt=0, le=1)
    min_requests: PositiveInt | None = None
    window_s: PositiveFloat | None = None
    cooldown_s: PositiveFloat | None = None


def _known_outcome(name: str) -> str:
    if name not in outcomes.OUTCOMES:
        close = difflib.get_close_matches(name, outcomes.FAILURE_OUTCOMES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{name!r} is not a failure outcome{hint} (outcomes: {', '.join(outcomes.FAILURE_OUTCOMES)})")
    return name


class DefaultsConfig(_Model):
    """Settings that apply to every alias unless a provider overrides them."""

    model: str | None = Field(None, description="Alias used when generate() is given none.")
    timeout_s: PositiveFloat = Field(30.0, description="Timeout of one attempt, in seconds.")
    deadline_s: PositiveFloat = Field(90.0, description="Bound on a whole generate() call, retries included.")
    first_token_timeout_s: PositiveFloat | None = Field(
        None,
        description="Streaming: abandon a target whose first text has not come this long after the request, "
        "whatever else came (keep-alives, reasoning, empty deltas); default timeout_s.",
    )
    stream_idle_timeout_s: PositiveFloat | None = Field(
        None,
        description="Streaming: end a stream with StreamInterruptedError when no text comes for this long after "
        "its first (default timeout_s); deadline_s still bounds the whole stream.",
    )
    engine: Literal["litellm", "direct"] = Field(
        "litellm", description="What sends requests: litellm, or direct (the router's own OpenAI-protocol client)."
    )
    retry: RetryConfig = RetryConfig()
    circuit: CircuitConfig = CircuitConfig()
    fallback_on: list[Annotated[str, AfterValidator(_known_outcome)]] = Field(
        default_factory=lambda: list(DEFAULT_FALLBACK_ON),
        description="Failure outcomes that move the call on to the next target.",
        json_schema_extra={"items": {"enum": list(outcomes.FAILURE_OUTCOMES)}},
    )


class KeyConfig(_Model):
    """A named key of a key pool: `{name: team-a, key: ${TEAM_A_KEY}}`."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    key: SecretStr


class ProviderConfig(_Model):
    """One provider account: a litellm provider prefix plus where and how to reach it."""

    kind: str = Field(description="litellm provider prefix: openai, anthropic, openrouter, gemini, azure, ollama ...")
    api_key: SecretStr | list[SecretStr | KeyConfig] | None = Field(
        None, description="Key, usually ${ENV_VAR}, or a pool of keys used in turn; omit for servers that need none."
    )
    api_base: str | None = Field(None, description="Base URL, e.g. http://127.0.0.1:8000/v1 for a local server.")
    headers: dict[str, str] = Field(default_factory=dict, description="Extra HTTP headers sent with every request.")
    timeout_s: PositiveFloat | None = Field(None, description="Per-attempt timeout for this provider.")
    enabled: bool = Field(True, description="false: skip this provider's targets (an emergency switch).")
    circuit: CircuitOverride | None = Field(None, description="Changes to defaults.circuit for this provider.")
    engine: Literal["litellm", "direct"] | None = Field(
        None, description="Overrides defaults.engine: direct for kinds openai, openrouter, hosted_vllm, lm_studio."
    )

    # The environment variables each key was read from, for "set OPENAI_API_KEY" messages.
    _key_env_vars: tuple[tuple[str, ...], ...] = PrivateAttr(default=())
    # What `${VAR}` references put into the headers: secrets (router/secrets.py).
    _header_env_values: tuple[str, ...] = PrivateAttr(default=())

    def __repr_args__(self) -> Any:
        # A repr lands in logs and tracebacks: no header value (it may be a token), no password of api_base.
        for name, value in super().__repr_args__():
            if name == "api_base" and isinstance(value, str):
                value = redact_url(value)
            elif name == "headers" and isinstance(value, dict):
                value = dict.fromkeys(value, MASK)
            yield name, value

    @field_validator("kind")
    @classmethod
    def _kind_is_a_prefix(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z0-9][a-z0-9_\-]*", v):
            raise ValueError("must be a litellm provider prefix such as openai, anthropic or openrouter")
        return v

    @field_validator("api_base")
    @classmethod
    def _api_base_is_url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"https?://", v):
            raise ValueError("must start with http:// or https://")
        return v

    @field_validator("api_key")
    @classmethod
    def _pool(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("a key pool needs at least one key")
            names = [k.name for k in v if isinstance(k, KeyConfig)]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"key names must be unique: {', '.join(dup)}")
        return v

    def header_env_values(self) -> tuple[str, ...]:
        """The values `${VAR}` references (or their defaults) put into the headers."""
        return self._header_env_values

    def api_keys(self) -> tuple[ApiKey, ...]:
        """The provider's keys as the router uses them (empty: no key configured)."""
        raw = self.api_key
        if raw is None:
            return ()
        items = raw if isinstance(raw, list) else [raw]
        env = self._key_env_vars or tuple(() for _ in items)
        out = []
        for item, env_vars in zip(items, env, strict=True):
            secret = item.key if isinstance(item, KeyConfig) else item
            name = item.name if isinstance(item, KeyConfig) else None
            out.append(ApiKey.make(secret, name, env_vars))
        return tuple(out)


@dataclass(frozen=True)
class ApiKey:
    """One API key: its name (given, or a short hash of the key), the secret, and the env vars it came from."""

    name: str
    secret: SecretStr
    env_vars: tuple[str, ...] = ()
    named: bool = False

    @classmethod
    def make(cls, secret: SecretStr, name: str | None, env_vars: tuple[str, ...]) -> ApiKey:
        """A key named `name`, or `key-<8 hex of sha256>` when unnamed: a label that never reveals the secret."""
        value = secret.get_secret_value()
        label = name or ("key-" + hashlib.sha256(value.encode()).hexdigest()[:8] if value else "key-unset")
        return cls(label, secret, tuple(env_vars), name is not None)

    @property
    def usable(self) -> bool:
        """False when the key resolved to nothing (env var unset or empty)."""
        return bool(self.secret.get_secret_value())


class TargetConfig(_Model):
    """One target of an alias, long form: `{provider, model, params}`, in a tier also `weight`."""

    provider: str
    model: str = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)
    weight: NonNegativeFloat = Field(1.0, le=1e6, description="Share of a tier's traffic (only in a tier).")
    first_token_timeout_s: PositiveFloat | None = Field(None, description="Overrides defaults.first_token_timeout_s.")
    stream_idle_timeout_s: PositiveFloat | None = Field(None, description="Overrides defaults.stream_idle_timeout_s.")

    @model_validator(mode="before")
    @classmethod
    def _target_shorthand(cls, v: Any) -> Any:
        if isinstance(v, str):
            return _split_target(v)
        if isinstance(v, dict) and "target" in v:
            v = dict(v)
            target = v.pop("target")
            if not isinstance(target, str):
                raise ValueError("target must be a '<provider>/<model>' string")
            v = {**_split_target(target), **v}
        return v


def _split_target(text: str) -> dict[str, str]:
    provider, sep, model = text.partition("/")
    if not sep and (len(text) > 24 or text.lower().startswith(("sk-", "sk_"))):
        # Not echoed: no '/' and as long as a key (or shaped like one) may be a key pasted on the wrong line.
        raise ValueError(f"a target must be written '<provider>/<model>'; this one has no '/' ({len(text)} characters)")
    if not sep or not provider or not model:
        raise ValueError(f"target {text!r} must be written '<provider>/<model>'")
    return {"provider": provider, "model": model}


class AliasConfig(_Model):
    """A model alias: the targets tried in order, and params and system prompt shared by them."""

    targets: list[list[TargetConfig]] = Field(
        min_length=1,
        description='Fallback order. Each entry: "<provider>/<model>", {provider, model, params}, or a tier: '
        "a list of {target, weight} sharing traffic by weight.",
    )
    params: dict[str, Any] = Field(default_factory=dict, description="litellm params, e.g. temperature, max_tokens.")
    system: str | None = Field(None, description="System prompt prepended when the messages carry none.")
    cache: AliasCacheConfig | None = Field(None, description="Answer repeated requests from the response cache.")
    hedge: HedgeConfig | None = Field(None, description="Send the next target the same request when one is slow.")

    @field_validator("targets", mode="before")
    @classmethod
    def _tiers(cls, v: Any) -> Any:
        # A plain entry is a tier of one; the YAML keeps its shape for error locations (see _yaml_loc).
        if not isinstance(v, list):
            return v
        return [item if isinstance(item, list) else [item] for item in v]

    @field_validator("targets")
    @classmethod
    def _tier_weights(cls, v: list[list[TargetConfig]]) -> list[list[TargetConfig]]:
        for i, tier in enumerate(v):
            if not tier:
                raise ValueError(f"tier {i} is empty")
            if not any(t.weight > 0 for t in tier):
                raise ValueError(f"tier {i}: at least one member needs a weight above 0")
        return v


class PricingConfig(_Model):
    """Price of a target in USD, per million tokens or per thousand tokens."""

    # Bounded so that no usage can make a cost overflow to inf (the dearest models cost hundreds per 1M).
    input_per_1m: NonNegativeFloat | None = Field(None, le=1e6)
    output_per_1m: NonNegativeFloat | None = Field(None, le=1e6)
    input_per_1k: NonNegativeFloat | None = Field(None, le=1e3)
    output_per_1k: NonNegativeFloat | None = Field(None, le=1e3)

    @model_validator(mode="after")
    def _one_unit(self) -> PricingConfig:
        per_1m = (self.input_per_1m, self.output_per_1m)
        per_1k = (self.input_per_1k, self.output_per_1k)
        if any(v is not None for v in per_1m) and any(v is not None for v in per_1k):
            raise ValueError("give prices per 1M or per 1K tokens, not both")
        given = per_1m if any(v is not None for v in per_1m) else per_1k
        if any(v is None for v in given):
            raise ValueError("give input_per_1m and output_per_1m (or input_per_1k and output_per_1k), both")
        return self

    @property
    def input_per_token(self) -> float:
        """USD per input token."""
        return self.input_per_1m / 1e6 if self.input_per_1m is not None else (self.input_per_1k or 0.0) / 1e3

    @property
    def output_per_token(self) -> float:
        """USD per output token."""
        return self.output_per_1m / 1e6 if self.output_per_1m is not None else (self.output_per_1k or 0.0) / 1e3


class MetricsConfig(_Model):
    """Prometheus settings."""

    namespace: str = Field("llm_router", pattern=r"^[a-zA-Z_][a-zA-Z0-9_]*$")
    buckets: list[PositiveFloat] = Field(default_factory=lambda: list(DEFAULT_BUCKETS))

    @field_validator("buckets")
    @classmethod
    def _sorted(cls, v: list[float]) -> list[float]:
        if not v or v != sorted(set(v)):
            raise ValueError("must be a non-empty list of increasing numbers")
        return v


# -- response cache and hedged requests --


class AliasCacheConfig(_Model):
    """An alias's answers are cached: `cache: {ttl_s: 3600}`."""

    ttl_s: PositiveFloat = Field(description="How long a cached answer is served, in seconds.")


class CacheConfig(_Model):
    """Where cached answers live: in this process (`memory`), in a SQLite file shared by a host's workers
    (`file`), or in the Redis of `state:` (`redis`), shared by a fleet."""

    store: Literal["memory", "file", "redis"] = Field(
        "memory", description="memory: this process; file: a SQLite file; redis: state.url (state.backend redis)."
    )
    path: str | None = Field(None, description="store: file: the SQLite file (created if missing).")
    max_entries: PositiveInt = Field(
        10_000, description="Most answers kept; the least recently used go first (redis: its maxmemory-policy)."
    )
    max_bytes: PositiveInt = Field(
        64 * 1024 * 1024, description="Most bytes of answers kept (redis: a bigger answer is not stored)."
    )

    @model_validator(mode="after")
    def _file_has_path(self) -> CacheConfig:
        if self.store == "file" and not self.path:
            raise ValueError("store: file needs a path (e.g. /var/cache/llm-router/cache.sqlite)")
        if self.store != "file" and self.path is not None:
            raise ValueError("path is only for store: file")
        return self


class HedgeConfig(_Model):
    """Hedged requests: when the first request has not answered after a delay, the next target gets it too."""

    after_s: PositiveFloat | None = Field(
        None, description="Delay before a hedge; with after_percentile, the delay until enough latencies are known."
    )
    after_percentile: float | None = Field(
        None, ge=50, lt=100, description="Hedge after this percentile of the target's recent latencies (e.g. 95)."
    )
    max_extra: PositiveInt = Field(1, description="Most extra requests per call.")

    @model_validator(mode="after")
    def _one_delay(self) -> HedgeConfig:
        if self.after_s is None and self.after_percentile is None:
            raise ValueError("give after_s or after_percentile (or both: after_s until enough latencies are known)")
        return self

# -- tracing --


class TracingConfig(_Model):
    """OpenTelemetry spans (needs the `otel` extra): one per call, a child per attempt, GenAI conventions."""

    enabled: bool = Field(True, description="false: no spans (the section may stay, switched off).")
    capture_content: bool = Field(
        False, description="Record prompts and completions on the call span (gen_ai.input/output.messages)."
    )


# -- shared health state --


class StateConfig(_Model):
    """Where breaker and key-pool state lives: this process, a SQLite file for a host's workers, or Redis."""

    backend: Literal["memory", "sqlite", "redis"] = Field(
        "memory", description="memory: each process its own; sqlite: every worker of a host; redis: a fleet."
    )
    path: str | None = Field(None, description="sqlite: the database file, on a local disk every worker sees.")
    url: SecretStr | None = Field(None, description='redis: its URL, e.g. "${REDIS_URL}" (redis://host:6379/0).')
    prefix: str = Field(
        "llm-router", pattern=r"^[A-Za-z0-9_.:\-]+$", description="Name of this router's state in the store."
    )
    sync_s: float = Field(0.25, gt=0, le=5, description="How often each process refreshes its view of the store.")
    timeout_s: PositiveFloat = Field(0.5, description="Bound on one exchange with the store.")

    @model_validator(mode="after")
    def _backend_needs(self) -> StateConfig:
        if self.backend == "sqlite" and not self.path:
            raise ValueError("backend sqlite needs path: the database file")
        if self.backend == "redis" and not (self.url and self.url.get_secret_value()):
            raise ValueError('backend redis needs url, e.g. url: "${REDIS_URL}" (is the variable set?)')
        if self.backend != "sqlite" and self.path is not None:
            raise ValueError(f"path is for backend sqlite, not {self.backend}")
        if self.backend != "redis" and self.url is not None:
            raise ValueError(f"url is for backend redis, not {self.backend}")
        return self

# -- ledger and budgets --


class LedgerConfig(_Model):
    """Where every call is recorded: a SQLite file (`path`, the default) or PostgreSQL (`dsn`), written in batches."""

    path: str | None = Field(None, description="SQLite file (default llm-router-ledger.sqlite3 when no dsn).")
    dsn: SecretStr | None = Field(
        None, description='PostgreSQL DSN, e.g. "${DATABASE_URL}" (needs llm-router[postgres]).'
    )
    flush_interval_s: PositiveFloat = Field(
        1.0, description="Rows are written at least this often (a crash loses less)."
    )
    batch_size: PositiveInt = Field(500, description="At most this many rows per write.")
    spool_path: str | None = Field(
        None,
        description="Local file rows wait in while the database is down (default: next to the SQLite file, or "
        "for PostgreSQL a file named by the database in $XDG_STATE_HOME/llm-router).",
    )

    @model_validator(mode="after")
    def _one_database(self) -> LedgerConfig:
        if self.path is not None and self.dsn is not None:
            raise ValueError("give path (SQLite) or dsn (PostgreSQL), not both")
        if self.dsn is not None and not self.dsn.get_secret_value():
            raise ValueError("dsn is empty")
        return self

    @property
    def backend(self) -> Literal["sqlite", "postgres"]:
        """Which database the ledger is in."""
        return "postgres" if self.dsn is not None else "sqlite"

    @property
    def sqlite_path(self) -> str:
        """The SQLite file (SQLite backend)."""
        return self.path or "llm-router-ledger.sqlite3"


class BudgetConfig(_Model):
    """A spend limit per calendar period (UTC) over the calls in its scope; every scope field given must match."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    period: Literal["hour", "day", "month"] = Field(description="Calendar-aligned in UTC: it resets on the hour, ...")
    limit_usd: NonNegativeFloat
    alias: str | None = Field(None, description="Scope: calls to this alias.")
    provider: str | None = Field(None, description="Scope: requests to this provider.")
    key: str | None = Field(None, description="Scope: requests with this named key.")
    tags: dict[str, str] = Field(default_factory=dict, description="Scope: calls with these tag values.")
    per_tag: str | None = Field(
        None, description="One limit for each value of this tag (calls without it: out of scope)."
    )
    fallback: str | None = Field(None, description="When reached: reroute the call to this alias instead of raising.")
    unpriced: Literal["refuse", "allow"] = Field("refuse", description="A target with no known price: refuse or pass.")
    if_unavailable: Literal["refuse", "allow"] = Field(
        "refuse", description="The database is unreachable: refuse calls in scope, or let them through unchecked."
    )


def _check_budgets(cfg: RouterConfig, src: _Source) -> None:
    seen: set[str] = set()
    for i, b in enumerate(cfg.budgets):
        loc: tuple[Any, ...] = ("budgets", i)
        if b.name in seen:
            src.problem(loc + ("name",), f"budget name {b.name!r} is used twice")
        seen.add(b.name)
        for name in filter(None, (b.alias, b.fallback)):
            if name not in cfg.aliases:
                field_name = "alias" if name == b.alias else "fallback"
                src.problem(
                    loc + (field_name,), f"alias {name!r} is not defined under aliases{_suggest(name, cfg.aliases)}"
                )
        if b.fallback is not None and b.fallback == b.alias:
            src.problem(loc + ("fallback",), "falls back to the alias it limits")
        if b.provider is not None and b.provider not in cfg.providers:
            src.problem(
                loc + ("provider",), f"provider {b.provider!r} is not defined{_suggest(b.provider, cfg.providers)}"
            )
        if b.key is not None:
            names = {k.name for p in cfg.providers.values() for k in p.api_keys() if k.named}
            if b.key not in names:
                src.problem(loc + ("key",), f"no provider has a key named {b.key!r}{_suggest(b.key, names)}")
    if cfg.budgets and cfg.ledger is None:
        src.problem(("budgets",), "budgets keep their spend in the ledger's database: add a ledger: section")


def _check_cache(cfg: RouterConfig, src: _Source) -> None:
    if cfg.cache is not None and cfg.cache.store == "redis" and cfg.state.backend != "redis":
        src.problem(
            ("cache", "store"),
            'store: redis uses the Redis of the state: section: add state: {backend: redis, url: "${REDIS_URL}"}',
        )


# -- the gateway (llm-router serve) --

# What a gateway key's tags may be: the names and values generate(tags=...) takes. Two names are the gateway's
# own (the key's name, the request's `user`), so a key has at most 30.
_GATEWAY_TAG_NAME = r"^[A-Za-z0-9_.\-]{1,64}$"
MIN_GATEWAY_KEY_CHARS = 16


class GatewayKeyConfig(_Model):
    """A client key of the gateway: who holds it (`name`), the secret, the tags its calls carry, its aliases."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    key: SecretStr = Field(description='The secret clients send as "Authorization: Bearer ...": "${VAR}".')
    tags: dict[Annotated[str, Field(pattern=_GATEWAY_TAG_NAME)], Annotated[str, Field(max_length=256)]] = Field(
        default_factory=dict, max_length=30, description="Tags of every call made with this key (ledger, budgets)."
    )
    aliases: list[str] | None = Field(None, min_length=1, description="The aliases this key may use (absent: all).")

    @field_validator("key")
    @classmethod
    def _long_enough(cls, v: SecretStr) -> SecretStr:
        if len(v.get_secret_value()) < MIN_GATEWAY_KEY_CHARS:
            raise ValueError(
                f"a client key must be at least {MIN_GATEWAY_KEY_CHARS} characters "
                "(make one with: openssl rand -hex 24)"
            )
        return v


class GatewayConfig(_Model):
    """The client keys of `llm-router serve`: with any, every request needs one (Authorization: Bearer)."""

    keys: list[GatewayKeyConfig] = Field(min_length=1, description="The client keys, each with its tags and aliases.")

    @model_validator(mode="after")
    def _unique(self) -> GatewayConfig:
        names = [k.name for k in self.keys]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"key names must be unique: {', '.join(dup)}")
        seen: dict[str, str] = {}
        for k in self.keys:
            other = seen.setdefault(k.key.get_secret_value(), k.name)
            if other != k.name:  # never the value itself
                raise ValueError(f"keys {other!r} and {k.name!r} have the same secret: give each client its own")
        return self


def _check_gateway(cfg: RouterConfig, src: _Source) -> None:
    if cfg.gateway is None:
        return
    for i, k in enumerate(cfg.gateway.keys):
        for j, alias in enumerate(k.aliases or ()):
            if alias not in cfg.aliases:
                src.problem(
                    ("gateway", "keys", i, "aliases", j),
                    f"alias {alias!r} is not defined under aliases{_suggest(alias, cfg.aliases)}",
                )


class RouterConfig(_Model):
    """The whole config file."""

    version: Literal[1] = Field(description="Format version; always 1.")
    defaults: DefaultsConfig = DefaultsConfig()
    providers: dict[str, ProviderConfig] = Field(min_length=1)
    aliases: dict[str, AliasConfig] = Field(min_length=1)
    pricing: dict[str, PricingConfig] = Field(default_factory=dict)
    metrics: MetricsConfig = MetricsConfig()
    cache: CacheConfig | None = Field(None, description="The response cache's store (default: in this process).")
    tracing: TracingConfig | None = Field(None, description="OpenTelemetry traces (absent: none).")
    state: StateConfig = StateConfig()
    ledger: LedgerConfig | None = Field(None, description="Record every call (SQLite file or PostgreSQL).")
    budgets: list[BudgetConfig] = Field(default_factory=list, description="Spend limits, checked before requests.")
    gateway: GatewayConfig | None = Field(None, description="Client keys of `llm-router serve` (absent: none).")

    _tiers: dict[str, tuple[tuple[Target, ...], ...]] = PrivateAttr(default_factory=dict)
    _source: str = PrivateAttr("<config>")
    _sha256: str = PrivateAttr("")

    @property
    def source(self) -> str:
        """The file this config was read from."""
        return self._source

    @property
    def sha256(self) -> str:
        """sha256 of the config text, as `sha256sum FILE` prints it."""
        return self._sha256

    def tiers(self, alias: str) -> tuple[tuple[Target, ...], ...]:
        """The alias's tiers in fallback order (a plain target is a tier of one), resolved against providers."""
        return self._tiers[alias]

    def targets(self, alias: str) -> tuple[Target, ...]:
        """Every target of the alias in config order, tiers flattened."""
        return tuple(t for tier in self._tiers[alias] for t in tier)


@dataclass(frozen=True)
class Target:
    """A provider + model pair as the router calls it: everything litellm needs, resolved at load."""

    provider: str
    model: str
    kind: str
    api_base: str | None
    keys: tuple[ApiKey, ...]
    headers: Mapping[str, str]
    timeout_s: float
    params: Mapping[str, Any]
    pricing: PricingConfig | None = None
    weight: float = 1.0
    first_token_timeout_s: float | None = None
    stream_idle_timeout_s: float | None = None
    enabled: bool = True
    circuit: CircuitConfig = field(default_factory=CircuitConfig)
    engine: str = "litellm"  # what sends its requests (router.engines)
    key: str = field(init=False)
    litellm_model: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", f"{self.provider}/{self.model}")
        object.__setattr__(self, "litellm_model", f"{self.kind}/{self.model}")

    def __repr__(self) -> str:
        # A repr lands in logs and tracebacks: no header value (it may be a token), no password of api_base.
        shown = {f.name: getattr(self, f.name) for f in fields(self) if f.repr}
        shown["api_base"] = redact_url(self.api_base) if self.api_base else self.api_base
        shown["headers"] = dict.fromkeys(self.headers, MASK)
        return f"Target({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    @property
    def has_credentials(self) -> bool:
        """False when keys are configured but every one resolved to nothing (env var unset or empty)."""
        return not self.keys or any(k.usable for k in self.keys)

    @property
    def key_env_vars(self) -> tuple[str, ...]:
        """The env vars the target's keys are read from."""
        return tuple(v for k in self.keys for v in k.env_vars)


# OpenRouter names models "<vendor>/<model>"; users of the direct APIs write the bare model name.
_OPENROUTER_VENDORS = (
    (("gpt-", "o1", "o3", "o4", "chatgpt-", "text-embedding-"), "openai"),
    (("claude-",), "anthropic"),
    (("gemini-", "gemma-"), "google"),
    (("llama-", "meta-llama-"), "meta-llama"),
    (("mistral-", "mixtral-", "codestral-", "ministral-", "pixtral-"), "mistralai"),
    (("deepseek-",), "deepseek"),
    (("command-",), "cohere"),
    (("qwen",), "qwen"),
    (("grok-",), "x-ai"),
)


def normalize_model(kind: str, model: str) -> str:
    """Give a bare OpenRouter model name its vendor prefix (`gpt-4o` → `openai/gpt-4o`); others pass through."""
    if kind != "openrouter" or "/" in model:
        return model
    for prefixes, vendor in _OPENROUTER_VENDORS:
        if model.startswith(prefixes):
            return f"{vendor}/{model}"
    return model


# ---------------------------------------------------------------------------------------------------------
# Loading

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def interpolate(value: str, env: Mapping[str, str]) -> tuple[str, list[str], list[str]]:
    """Expand `${VAR}` and `${VAR:-default}` (`$$` is a literal `$`); return (text, vars used, vars unset)."""
    used: list[str] = []
    unset: list[str] = []

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, default = m.group(1), m.group(2)
        used.append(name)
        got = env.get(name, "")
        if got:
            return got
        if default is not None:
            return default
        unset.append(name)
        return ""

    return _VAR.sub(sub, value), used, unset


def _bad_reference(value: str) -> str | None:
    """The first `${` that is not a whole `${NAME}` or `${NAME:-default}` (a typo, or a nested default), if any.

    Left as text it would be sent on as it is, as a key or a URL; an env var's value is never expanded again.
    """
    at = 0
    for m in _VAR.finditer(value):
        if "${" in value[at : m.start()]:
            break
        if m.group(2) is not None and "${" in m.group(2):
            return m.group(0) + "}"
        at = m.end()
    start = value.find("${", at)
    if start < 0:
        return None
    end = value.find("}", start)
    return value[start : end + 1 if end >= 0 else start + 40]


def _key_path(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# -- what a config file may cost to load: a bad file costs a ConfigError, never the process --
MAX_CONFIG_BYTES = 4 * 1024 * 1024
"""Largest config file read (4 MiB; a config with 10,000 aliases is under 1 MiB)."""
MAX_CONFIG_NODES = 250_000
"""Most values (every scalar, list and mapping) a file may hold once YAML aliases are expanded."""
MAX_CONFIG_DEPTH = 64
"""Deepest nesting of lists and mappings, aliases expanded (a real config nests under 10 levels)."""
_too_deep = f"nested deeper than {MAX_CONFIG_DEPTH} levels (MAX_CONFIG_DEPTH)"
_MAX_INT_DIGITS = 30  # past this a YAML int is a typo, and int() of thousands of digits raises ValueError

# JSON's types and nothing else: no tag may construct an object (PyYAML's safe tags include bytes, sets,
# dates and ordered pairs, which the router would pass on to providers it cannot serialize them for).
_PLAIN_TAGS = frozenset(
    f"tag:yaml.org,2002:{t}" for t in ("null", "bool", "int", "float", "str", "seq", "map", "merge")
)


class _LimitError(yaml.YAMLError):
    """The document breaks a loading limit or uses a forbidden tag; raised while composing, before expansion."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


class _Bounded(yaml.composer.Composer):
    """A composer that counts what the document expands to while it composes the node graph.

    Every node composed counts 1 and every alias the expanded size of the node it points at, so an alias
    bomb is refused at the alias that crosses MAX_CONFIG_NODES, having cost no more than its own text.
    """

    # A date or `=` stays a string, as in JSON: `2024-08-06` is a model version, not a datetime.
    yaml_implicit_resolvers = {  # noqa: RUF012 (PyYAML's own class attribute)
        first: [(tag, rx) for tag, rx in resolvers if tag in _PLAIN_TAGS]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def _start_counting(self) -> None:
        self._depth = 0  # lists and mappings open around the node being composed
        self._total = 0  # values of the document so far, aliases expanded
        self._sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (values, levels) of its expansion

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        event = self.peek_event()  # type: ignore[attr-defined]
        line = event.start_mark.line + 1
        if isinstance(event, yaml.AliasEvent):
            node = super().compose_node(parent, index)
            size = self._sizes.get(id(node))
            if size is None:
                raise _LimitError(line, f"alias *{event.anchor} refers to itself: a config cannot contain itself")
            self._count(line, size, f"alias *{event.anchor}")
            return node
        tag = getattr(event, "tag", None)
        if tag is not None and tag not in ("!", *_PLAIN_TAGS):
            raise _LimitError(
                line,
                f"tag {tag.replace('tag:yaml.org,2002:', '!!')} is not allowed: a config holds only strings, "
                "numbers, booleans, null, lists and mappings",
            )
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            self._depth += 1
            if self._depth > MAX_CONFIG_DEPTH:
                raise _LimitError(line, _too_deep)
        try:
            node = super().compose_node(parent, index)
        finally:
            if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
                self._depth -= 1
        if node is None:
            return None
        if isinstance(node, yaml.ScalarNode):
            if node.tag == "tag:yaml.org,2002:int" and len(node.value) > _MAX_INT_DIGITS:
                raise _LimitError(line, f"integer of {len(node.value)} digits is too large")
            size = (1, 0)
        else:
            children = [c for kv in node.value for c in kv] if isinstance(node, yaml.MappingNode) else node.value
            sizes = [self._sizes[id(c)] for c in children]
            size = (1 + sum(n for n, _ in sizes), 1 + max((d for _, d in sizes), default=0))
        self._sizes[id(node)] = size
        self._total += 1
        if self._total > MAX_CONFIG_NODES:
            raise _LimitError(line, f"the document holds over {MAX_CONFIG_NODES:,} values (MAX_CONFIG_NODES)")
        return node

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)  # type: ignore[misc]
        except (ValueError, TypeError, IndexError, KeyError, OverflowError):
            # PyYAML's scalar constructors raise these for `!!int ""`, `0b_` or `!!bool maybe`
            if not isinstance(node, yaml.ScalarNode):
                raise
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            raise _LimitError(node.start_mark.line + 1, f"{node.value[:40]!r} is not a valid {tag}") from None

    def _count(self, line: int, size: tuple[int, int], what: str) -> None:
        values, levels = size
        self._total += values
        if self._total > MAX_CONFIG_NODES:
            raise _LimitError(
                line,
                f"{what} expands the document past {MAX_CONFIG_NODES:,} values (MAX_CONFIG_NODES): "
                "an alias bomb, or aliases nested too deep",
            )
        if self._depth + levels > MAX_CONFIG_DEPTH:
            raise _LimitError(line, f"{what} nests deeper than {MAX_CONFIG_DEPTH} levels (MAX_CONFIG_DEPTH)")


class _PyLoader(_Bounded, yaml.SafeLoader):
    """PyYAML's pure-Python safe loader, composing through `_Bounded`."""

    def __init__(self, text: str) -> None:
        yaml.SafeLoader.__init__(self, text)
        self._start_counting()


if yaml.__with_libyaml__:
    from yaml._yaml import CParser

    class _CLoader(_Bounded, CParser, yaml.constructor.SafeConstructor, yaml.resolver.Resolver):
        """libyaml parses (4x faster); composing, counting and constructing stay in Python, as in `_PyLoader`."""

        def __init__(self, text: str) -> None:
            CParser.__init__(self, text)
            yaml.constructor.SafeConstructor.__init__(self)
            yaml.resolver.Resolver.__init__(self)
            yaml.composer.Composer.__init__(self)
            self._start_counting()

    _Loader: type[_PyLoader] | type[_CLoader] = _CLoader
else:  # pragma: no cover - PyYAML built without libyaml
    _Loader = _PyLoader


class _Source:
    """A parsed YAML file plus the line of every key path, for error messages."""

    def __init__(self, text: str, file: str) -> None:
        self.file = file
        self.lines: dict[tuple[Any, ...], int] = {}
        self.problems: list[ConfigProblem] = []
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError as exc:  # a lone surrogate, from a str that never was a file's text
            at = text.count("\n", 0, exc.start) + 1
            raise ConfigError([ConfigProblem(file, at, "", "holds a character that is not Unicode text")]) from None
        if size > MAX_CONFIG_BYTES:
            raise ConfigError([_too_big(file, size)])
        try:
            loader = _Loader(text)
            try:
                node = loader.get_single_node()
                if node is not None:  # before constructing: that flattens `<<` merges into the nodes
                    self._walk(node, ())
                self.data = loader.construct_document(node) if node is not None else None
            finally:
                loader.dispose()
        except _LimitError as exc:
            raise ConfigError([ConfigProblem(file, exc.line, "", exc.message)]) from None
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark else None
            if "maximum nesting depth" in str(exc.problem):  # libyaml's own bound, met while scanning ahead
                raise ConfigError([ConfigProblem(file, line, "", _too_deep)]) from None
            what = " ".join(str(p) for p in (exc.context, exc.problem) if p)
            bad_line = text.splitlines()[line - 1] if line and line <= len(text.splitlines()) else ""
            if "${" in bad_line:
                what += ' (inside [...] or {...}, quote an env var: "${VAR}")'
            raise ConfigError([ConfigProblem(file, line, "", f"invalid YAML: {what}")]) from None
        except yaml.YAMLError as exc:
            raise ConfigError([ConfigProblem(file, None, "", f"invalid YAML: {exc}")]) from None

    def _walk(self, node: yaml.Node, path: tuple[Any, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            merged: list[yaml.Node] = []
            for k, v in node.value:
                if k.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys count where not given here
                    merged += v.value if isinstance(v, yaml.SequenceNode) else [v]
                    continue
                key = k.value if isinstance(k, yaml.ScalarNode) else f"<{k.id}>"
                if key in seen:
                    self.problem(
                        path + (key,), f"duplicate key (first defined on line {seen[key]})", k.start_mark.line + 1
                    )
                seen.setdefault(key, k.start_mark.line + 1)
                self.lines[path + (key,)] = k.start_mark.line + 1
                self._walk(v, path + (key,))
            for base in merged:
                if isinstance(base, yaml.MappingNode):
                    for k, v in base.value:
                        key = k.value if isinstance(k, yaml.ScalarNode) else f"<{k.id}>"
                        if path + (key,) not in self.lines:
                            self.lines[path + (key,)] = k.start_mark.line + 1
                            self._walk(v, path + (key,))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self.lines[path + (i,)] = item.start_mark.line + 1
                self._walk(item, path + (i,))

    def yaml_loc(self, loc: tuple[Any, ...]) -> tuple[Any, ...]:
        """`loc` without list indexes the YAML does not have (a plain target is validated as a tier of one)."""
        out: tuple[Any, ...] = ()
        for part in loc:
            if isinstance(part, int) and out + (part,) not in self.lines and out in self.lines:
                continue
            out += (part,)
        return out

    def line(self, loc: tuple[Any, ...]) -> int | None:
        for n in range(len(loc), 0, -1):
            if loc[:n] in self.lines:
                return self.lines[loc[:n]]
        return 1 if self.lines else None

    def problem(self, loc: tuple[Any, ...], message: str, line: int | None = None) -> None:
        self.problems.append(ConfigProblem(self.file, line or self.line(loc), _key_path(loc), message))


def _interpolate_tree(
    src: _Source, data: Any, env: Mapping[str, str]
) -> tuple[Any, dict[str, dict[int, tuple[str, ...]]], dict[str, list[str]]]:
    """Expand env vars in every string; an unset var is an error except in a key (its target is then skipped).
    Also returns, per provider, the env vars each key was read from and what env vars put into its headers."""
    key_env: dict[str, dict[int, tuple[str, ...]]] = {}
    header_env: dict[str, list[str]] = {}

    def walk(x: Any, loc: tuple[Any, ...]) -> Any:
        if isinstance(x, dict):
            return {k: walk(v, loc + (k,)) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v, loc + (i,)) for i, v in enumerate(x)]
        if isinstance(x, float) and not math.isfinite(x):
            src.problem(loc, "must be a finite number, not .inf or .nan")
            return x
        if not isinstance(x, str) or "$" not in x:
            return x
        bad = _bad_reference(x)
        if bad:
            src.problem(loc, f"{bad!r} is not an env var reference: write ${{NAME}} or ${{NAME:-default}} ($$ for a $)")
            return x
        text, used, unset = interpolate(x, env)
        if len(loc) == 4 and loc[0] == "providers" and loc[2] == "headers":
            header_env.setdefault(loc[1], []).extend(_substituted(x, env))
        index = _key_index(loc)
        if index is not None:
            key_env.setdefault(loc[1], {})[index] = tuple(used)
            if unset:  # "prefix-${UNSET}" is no key at all: the target is skipped, naming the variable
                return ""
        elif unset:
            names = ", ".join(unset)
            src.problem(loc, f"environment variable {names} is not set; set it or give a default: ${{{unset[0]}:-...}}")
        return text

    return walk(data, ()), key_env, header_env


def _substituted(value: str, env: Mapping[str, str]) -> list[str]:
    """What each `${VAR}` of `value` expands to (the variable, else its default)."""
    return [env.get(m.group(1), "") or (m.group(2) or "") for m in _VAR.finditer(value) if m.group(1)]


def _key_index(loc: tuple[Any, ...]) -> int | None:
    """Which key of a provider's pool `loc` points at: api_key, api_key[i] or api_key[i].key; else None."""
    if len(loc) < 3 or loc[0] != "providers" or loc[2] != "api_key":
        return None
    rest = loc[3:]
    if rest == ():
        return 0
    if len(rest) == 1 and isinstance(rest[0], int):
        return rest[0]
    if len(rest) == 2 and isinstance(rest[0], int) and rest[1] == "key":
        return rest[0]
    return None


def _friendly(err: Mapping[str, Any], model_fields: Iterable[str]) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        name = str(err["loc"][-1])
        close = difflib.get_close_matches(name, list(model_fields), n=1)
        return "unknown key" + (f" (did you mean {close[0]!r}?)" if close else "")
    if kind == "missing":
        return "required key is missing"
    msg = str(err["msg"])
    return msg.removeprefix("Value error, ")


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed where `loc` points, for did-you-mean hints."""
    model: Any = RouterConfig
    for part in loc[:-1]:
        if isinstance(part, int) or model is None:
            continue
        info = getattr(model, "model_fields", {}).get(part)
        if info is None:
            # inside a dict[str, Model]: the key is a name, the model is the dict's value type
            continue
        model = _model_in(info.annotation)
    return list(getattr(model, "model_fields", {}))


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as `list[list[TargetConfig]]` or `dict[str, X] | None`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def parse_config(text: str, file: str = "<config>", env: Mapping[str, str] | None = None) -> RouterConfig:
    """Validate config text; raise `ConfigError` listing every problem with file, line and key path."""
    env = os.environ if env is None else env
    src = _Source(text, file)
    if not isinstance(src.data, dict):
        raise ConfigError(
            [ConfigProblem(file, 1, "", "the file must be a mapping with version, providers and aliases")]
        )
    data, key_env, header_env = _interpolate_tree(src, src.data, env)
    if src.problems:
        raise ConfigError(src.problems)
    try:
        cfg = RouterConfig.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors(include_input=False, include_url=False):
            loc = src.yaml_loc(tuple(err["loc"]))
            src.problem(loc, _friendly(err, _fields_at(loc)))
        raise ConfigError(src.problems) from None
    for name, provider in cfg.providers.items():
        n = len(provider.api_key) if isinstance(provider.api_key, list) else 1
        provider._key_env_vars = tuple(key_env.get(name, {}).get(i, ()) for i in range(n))
        provider._header_env_values = tuple(header_env.get(name, ()))
    _check_references(cfg, src)
    if src.problems:
        raise ConfigError(src.problems)
    cfg._source = file
    cfg._sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return cfg


def _suggest(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_references(cfg: RouterConfig, src: _Source) -> None:
    d = cfg.defaults
    if d.model is not None and d.model not in cfg.aliases:
        src.problem(
            ("defaults", "model"), f"alias {d.model!r} is not defined under aliases{_suggest(d.model, cfg.aliases)}"
        )
    for name, p in cfg.providers.items():
        if (p.engine or d.engine) == "direct" and (why := direct_problem(p.kind, p.api_base)) is not None:
            at = ("providers", name, "engine") if p.engine else ("defaults", "engine")
            src.problem(at, why if p.engine else f"provider {name!r}: {why}")
    tiers: dict[str, tuple[tuple[Target, ...], ...]] = {}
    spelled: set[str] = set()
    for alias_name, alias in cfg.aliases.items():
        resolved: list[tuple[Target, ...]] = []
        for i, tier in enumerate(alias.targets):
            members = []
            for j, t in enumerate(tier):
                provider = cfg.providers.get(t.provider)
                if provider is None:
                    loc = src.yaml_loc(("aliases", alias_name, "targets", i, j))
                    src.problem(
                        loc,
                        f"provider {t.provider!r} is not defined under providers{_suggest(t.provider, cfg.providers)}",
                    )
                    continue
                model = normalize_model(provider.kind, t.model)
                spelled.update({f"{t.provider}/{t.model}", f"{t.provider}/{model}"})
                members.append(
                    Target(
                        provider=t.provider,
                        model=model,
                        kind=provider.kind,
                        api_base=provider.api_base,
                        keys=provider.api_keys(),
                        headers=dict(provider.headers),
                        timeout_s=provider.timeout_s or d.timeout_s,
                        params=dict(t.params),
                        pricing=cfg.pricing.get(f"{t.provider}/{t.model}") or cfg.pricing.get(f"{t.provider}/{model}"),
                        weight=t.weight,
                        first_token_timeout_s=t.first_token_timeout_s or d.first_token_timeout_s,
                        stream_idle_timeout_s=t.stream_idle_timeout_s or d.stream_idle_timeout_s,
                        enabled=provider.enabled,
                        circuit=_circuit(d.circuit, provider.circuit),
                        engine=provider.engine or d.engine,
                    )
                )
            if members:
                resolved.append(tuple(members))
        tiers[alias_name] = tuple(resolved)
    for key in cfg.pricing:
        if key not in spelled:
            src.problem(("pricing", key), f"matches no target of any alias{_suggest(key, spelled)}")
    cfg._tiers = tiers
    _check_budgets(cfg, src)
    _check_cache(cfg, src)
    _check_gateway(cfg, src)


def _circuit(base: CircuitConfig, override: CircuitOverride | None) -> CircuitConfig:
    if override is None:
        return base
    return base.model_copy(update=override.model_dump(exclude_none=True))


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> RouterConfig:
    """Read and validate a config file.

    `${VAR}` and `${VAR:-default}` are expanded from `env` (default: the process environment). An api_key whose
    variable is unset is allowed: its targets are skipped at call time. Raises `ConfigError` whose message has
    one line per problem, ``FILE:LINE: key.path: what is wrong``, and nothing else, whatever the file holds:
    it reads at most MAX_CONFIG_BYTES and refuses documents past MAX_CONFIG_NODES or MAX_CONFIG_DEPTH before
    expanding them, so a live worker can reload any file.
    """
    p = Path(path)
    raw = _read_bounded(p)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError([ConfigProblem(str(p), line, "", "is not UTF-8 text; save the file as UTF-8")]) from None
    cfg = parse_config(text, str(p), env)
    cfg._sha256 = hashlib.sha256(raw).hexdigest()  # the file's bytes, as sha256sum prints it
    return cfg


def _read_bounded(p: Path) -> bytes:
    """The file's bytes, at most MAX_CONFIG_BYTES of them, read from one open file so they are one version."""

    def fail(message: str) -> ConfigError:
        return ConfigError([ConfigProblem(str(p), None, "", message)])

    try:
        # O_NONBLOCK: opening a pipe that has no writer would otherwise wait for one, holding the reload lock
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise fail("config file not found") from None
    except OSError as exc:
        raise fail(f"cannot read: {exc.strerror or exc.__class__.__name__}") from None
    try:
        before = os.fstat(fd)
        if stat.S_ISDIR(before.st_mode):
            raise fail("is a directory, not a config file")
        if not stat.S_ISREG(before.st_mode):
            raise fail("is not a regular file (a pipe, socket or device); point to the config file itself")
        if before.st_size > MAX_CONFIG_BYTES:
            raise ConfigError([_too_big(str(p), before.st_size)])
        chunks: list[bytes] = []
        left = MAX_CONFIG_BYTES + 1  # the file may have grown since fstat
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        after = os.fstat(fd)
    except OSError as exc:
        raise fail(f"cannot read: {exc.strerror or exc.__class__.__name__}") from None
    finally:
        os.close(fd)
    raw = b"".join(chunks)
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError([_too_big(str(p), len(raw))])
    if (after.st_size, after.st_mtime_ns, after.st_ctime_ns) != (
        before.st_size,
        before.st_mtime_ns,
        before.st_ctime_ns,
    ) or len(raw) != after.st_size:
        # Written in place while read (an editor that does not rename): the bytes may be half of each version.
        raise fail("changed while it was read; it is read again at its next change (or call reload())")
    return raw


def file_sha256(path: str | os.PathLike[str]) -> str | None:
    """sha256 of the file's bytes as `load_config` would read them, for telling whether it changed; "" for
    what is no regular file (load_config refuses it) and None when it cannot be opened. Never waits on a pipe."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return ""
        with os.fdopen(fd, "rb") as f:
            fd = -1
            return hashlib.sha256(f.read(MAX_CONFIG_BYTES + 1)).hexdigest()
    except OSError:
        return None
    finally:
        if fd >= 0:
            os.close(fd)


def _too_big(file: str, size: int) -> ConfigProblem:
    return ConfigProblem(
        file, None, "", f"is {size:,} bytes, over the {MAX_CONFIG_BYTES:,}-byte limit (MAX_CONFIG_BYTES)"
    )


def config_schema() -> dict[str, Any]:
    """JSON Schema of the config file, for editors."""
    schema = RouterConfig.model_json_schema(mode="validation")
    schema["title"] = "llm-router config"
    # A target may also be written "<provider>/<model>", and a tier member {target: "<provider>/<model>", weight}.
    short = {"type": "string", "pattern": "^[^/]+/.+$"}
    member = {
        "anyOf": [
            short,
            {"$ref": "#/$defs/TargetConfig"},
            {
                "type": "object",
                "required": ["target"],
                "additionalProperties": False,
                "properties": {
                    "target": short,
                    "weight": {"type": "number", "minimum": 0},
                    "params": {"type": "object"},
                    "first_token_timeout_s": {"type": "number", "exclusiveMinimum": 0},
                    "stream_idle_timeout_s": {"type": "number", "exclusiveMinimum": 0},
                },
            },
        ]
    }
    alias = schema["$defs"]["AliasConfig"]["properties"]["targets"]
    alias["items"] = {"anyOf": [member, {"type": "array", "items": member, "minItems": 1}]}
    return schema
