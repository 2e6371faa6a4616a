"""The YAML config: pydantic models, `${VAR}` interpolation, line-numbered errors, cross-reference checks.

Every model forbids unknown keys, so a typo is an error, not silence. Every problem is reported as
``FILE:LINE: key.path: what is wrong``, all of them at once, and cross-references (targets → providers,
pricing → targets, the default alias) are checked here, at load time.
"""

from __future__ import annotations

import contextlib
import difflib
import gc
import hashlib
import itertools
import math
import os
import re
import stat
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
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
    ValidationInfo,
    field_validator,
    model_validator,
)

from . import outcomes
from .errors import ConfigError, ConfigProblem
from .secrets import CREDENTIAL_NAME, MASK, redact_url, url_secrets, worth_scrubbing

DEFAULT_FALLBACK_ON = list(outcomes.DEFAULT_FALLBACK_ON)
# Latency of LLM calls runs from tens of milliseconds (a cached or tiny answer) to minutes (long generations).
DEFAULT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)


# The provider kinds the direct engine speaks to, each with its default base URL (None: `api_base` is required).
# Each is the same OpenAI chat-completions protocol at `{base}/chat/completions`; every other OpenAI-compatible
# server (vLLM, Ollama's /v1, LM Studio, Groq, Together, DeepSeek, Mistral, Fireworks...) is `kind: openai` with
# its `api_base`. LiteLLM's own kinds for those vendors (groq, mistral, ...) adapt requests per vendor, so they
# stay on the litellm engine.
DIRECT_KINDS: dict[str, str | None] = {
    "openai": "https://api.openai.com/v1",
    "openrouter": "https://openrouter.ai/api/v1",
    "hosted_vllm": None,
    "lm_studio": None,
}


def direct_problem(kind: str, api_base: str | None) -> str | None:
    """Why a provider of `kind` (at `api_base`) cannot use the direct engine; None when it can."""
    if kind not in DIRECT_KINDS:
        return (
            f"engine direct speaks the OpenAI protocol of kinds {', '.join(DIRECT_KINDS)} (any OpenAI-compatible "
            f"server is kind openai with its api_base); kind {kind!r} needs engine: litellm"
        )
    if DIRECT_KINDS[kind] is None and not api_base:
        return f"engine direct needs the api_base of this {kind} server (e.g. http://127.0.0.1:8000/v1)"
    return None


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# -- quoting config values in errors: short, never a secret ------------------------------------------------

# What a pasted API key looks like: a vendor's prefix and a long token (sk-proj-..., sk-ant-..., sk-or-v1-...,
# AIza..., gsk_..., xai-..., hf_..., ghp_...), or a long unbroken run of letters and digits. Model and provider
# names are short words between separators; keys are not. Runs are classified by `_keyish`.
_KEY_RUN = re.compile(
    r"(?<![A-Za-z0-9])(?:(?:sk|rk|gsk|xai|hf|ghp|gho|ghs|ghu|github_pat|glpat|pplx|nvapi|r8|fw|csk|sess)[-_]"
    r"|AIza|AKIA|ASIA|eyJ)[A-Za-z0-9_.\-]{16,}"
    r"|[A-Za-z0-9]{20,}"
)
_HIDDEN = "<not shown: looks like an API key>"
_ECHO_CHARS = 60  # the most of one config value an error quotes


def _keyish(run: str, strict: bool) -> bool:
    """Whether one `_KEY_RUN` match is a key: a prefixed token with a digit, or a run of letters and digits
    (strict: 32+ characters of upper and lower case and digits, which no model name is; else 20+ with both)."""
    digits = any(c.isdigit() for c in run)
    if not run.isalnum():  # the prefixed form
        return digits
    if strict:
        return len(run) >= 32 and digits and any(c.isupper() for c in run) and any(c.islower() for c in run)
    return digits and any(c.isalpha() for c in run)


def looks_like_key(text: str) -> bool:
    """True when `text` holds something shaped like an API key (a value no provider or model name has)."""
    if len(text) < 19:  # the shortest: a prefix, a dash and 16 characters
        return False
    return any(_keyish(m.group(), strict=True) for m in _KEY_RUN.finditer(text))


def redact_keys(text: str) -> str:
    """`text` with every key-shaped stretch replaced by a placeholder (for messages: errs on hiding)."""
    return _KEY_RUN.sub(lambda m: _HIDDEN if _keyish(m.group(), strict=False) else m.group(), text)


class _Echo:
    """Quotes a config value in an error: at most _ECHO_CHARS of it, key-shaped stretches hidden, and a value
    that came from `${VAR}` shown as it is written in the file, never as the environment's value."""

    def __init__(self, written: Mapping[str, str] | None = None, env_values: Mapping[str, str] | None = None):
        self.written = written or {}  # expanded text -> the text in the file
        self.env_values = env_values or {}  # an env var's value -> "${NAME}"
        # values long enough that finding one inside a longer text is no coincidence
        self._long = sorted(((v, r) for v, r in self.env_values.items() if len(v) >= 6), key=lambda vr: -len(vr[0]))

    def hides(self, text: str) -> bool:
        """Whether `text` came from the environment (in whole or in part)."""
        return text in self.written or text in self.env_values or any(v in text for v, _ in self._long)

    def __call__(self, value: object, limit: int = _ECHO_CHARS) -> str:
        text = str(value)
        shown = self.written.get(text) or self.env_values.get(text)
        if shown is None:
            shown = text[: 2 * limit]  # enough to find a secret that straddles the cut
            for v, ref in self._long:
                shown = shown.replace(v, ref)
        shown = redact_keys(shown)
        if len(shown) > limit:
            shown = shown[: limit - 1] + "…"
        return repr(shown)


_PLAIN_ECHO = _Echo()


def _echo(info: ValidationInfo | None) -> _Echo:
    """The echo of the file being validated (it knows which values came from env vars)."""
    context = info.context if info is not None else None
    echo = context.get("echo") if isinstance(context, dict) else None
    return echo if isinstance(echo, _Echo) else _PLAIN_ECHO


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


def _known_outcome(name: str, info: ValidationInfo) -> str:
    if name not in outcomes.OUTCOMES:
        close = difflib.get_close_matches(name, outcomes.FAILURE_OUTCOMES, n=1) if len(name) <= 64 else []
        hint = f"; did you mean {close[0]!r}?" if close else ""
        shown = _echo(info)(name)
        raise ValueError(f"{shown} is not a failure outcome{hint} (outcomes: {', '.join(outcomes.FAILURE_OUTCOMES)})")
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


# LiteLLM's provider prefixes (litellm.provider_list of 1.106), read without importing LiteLLM. A kind not here
# is allowed (LiteLLM adds providers); one a single typo away from one here is refused with a suggestion.
LITELLM_PROVIDERS = frozenset(
    """a2a a2a_agent ai21 ai21_chat aiml aiohttp_openai amazon_nova anthropic anthropic_text apertis assemblyai
    auto_router aws_polly aws_textract azure azure_ai azure_speech azure_text baseten bedrock bedrock_mantle
    black_forest_labs bytez cerebras charity_engine chatgpt chutes clarifai cloudflare codestral cognition cohere
    cohere_chat cometapi compactifai cortecs cursor custom custom_openai darkbloom dashscope databricks datarobot
    deepgram deepinfra deepseek docker_model_runner dotprompt edenai elevenlabs empower fal_ai featherless_ai
    fireworks_ai friendliai galadriel gdc gemini gigachat github github_copilot gradient_ai groq helicone heroku
    hosted_vllm huggingface humanloop hyperbolic inception infinity jina_ai lambda_ai langflow langfuse langgraph
    lemonade libertai litellm_agent litellm_proxy llamafile lm_studio manus maritalk meta meta_llama milvus
    minimax mistral modelscope mongodb moonshot morph nadir nano-gpt nebius neosantara nlp_cloud novita nscale
    nvidia_nim nvidia_riva oci ollama ollama_chat oobabooga openai openai_like openrouter ovhcloud parasail
    perplexity petals pg_vector pinstripes poe predibase prism publicai qwen_ai_platform qwencloud ragflow recraft
    reducto reka replicate runwayml s3_vectors sagemaker sagemaker_chat sagemaker_nova sail sambanova sap scaleway
    scx-ai snowflake soniox stability strands_decider synthetic tencent tensormesh text-completion-codestral
    text-completion-inception text-completion-openai together_ai topaz transcribe triton typesafe v0 valkey
    vercel_ai_gateway vertex_ai vertex_ai_beta vllm volcengine voyage wandb watsonx watsonx_text xai xiaomi_mimo
    xinference zai""".split()  # noqa: SIM905 (a list of 166 quoted names reads worse)
)


def _one_edit_apart(a: str, b: str) -> bool:
    """True when `b` is `a` with one letter changed, added, dropped, or two neighbours swapped."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        diff = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
        if len(diff) == 2 and diff[1] == diff[0] + 1:  # two neighbours swapped
            return a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]]
        return len(diff) == 1
    short, long_ = sorted((a, b), key=len)
    i = next((i for i, (x, y) in enumerate(zip(short, long_, strict=False)) if x != y), len(short))
    return short[i:] == long_[i + 1 :]


def _kind_typo(kind: str) -> str | None:
    """The LiteLLM provider `kind` misspells (one edit away, 4+ letters), or None for a known or novel kind."""
    if kind in LITELLM_PROVIDERS or len(kind) < 4 or len(kind) > 40:
        return None
    return next((p for p in sorted(LITELLM_PROVIDERS) if len(p) >= 4 and _one_edit_apart(kind, p)), None)


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
    def _kind_is_a_prefix(cls, v: str, info: ValidationInfo) -> str:
        if not re.fullmatch(r"[a-z0-9][a-z0-9_\-]*", v):
            raise ValueError("must be a litellm provider prefix such as openai, anthropic or openrouter")
        typo = _kind_typo(v)
        if typo is not None:
            raise ValueError(f"{_echo(info)(v)} is not a LiteLLM provider (did you mean {typo!r}?)")
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
            counts = Counter(k.name for k in v if isinstance(k, KeyConfig))
            dup = sorted(n for n, c in counts.items() if c > 1)
            if dup:
                more = f" and {len(dup) - 5:,} more" if len(dup) > 5 else ""
                raise ValueError(f"key names must be unique: {', '.join(_PLAIN_ECHO(n)[1:-1] for n in dup[:5])}{more}")
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
    def _target_shorthand(cls, v: Any, info: ValidationInfo) -> Any:
        if isinstance(v, str):
            return _split_target(v, _echo(info))
        if isinstance(v, dict) and "target" in v:
            v = dict(v)
            target = v.pop("target")
            if not isinstance(target, str):
                raise ValueError("target must be a '<provider>/<model>' string")
            v = {**_split_target(target, _echo(info)), **v}
        return v

    @model_validator(mode="after")
    def _no_key_in_names(self) -> TargetConfig:
        # a name goes into metric labels, logs and `explain`: a key pasted here would be published
        for name in ("provider", "model"):
            if looks_like_key(getattr(self, name)):
                raise ValueError(f"the {name} looks like an API key (not shown): {_PUT_KEYS}")
        return self


_PUT_KEYS = 'put the key in providers.NAME.api_key, as "${ENV_VAR}"'


class _TargetError(ValueError):
    """A target string that is not '<provider>/<model>' (the loader adds an example with a real provider)."""

    def __init__(self, message: str, text: str) -> None:
        super().__init__(message)
        self.text = text


def _split_target(text: str, echo: _Echo = _PLAIN_ECHO) -> dict[str, str]:
    provider, sep, model = text.partition("/")
    if not sep and (redact_keys(text) != text or text.lower().startswith(("sk-", "sk_"))):
        raise ValueError(f"holds what looks like an API key (not shown): a target is '<provider>/<model>'; {_PUT_KEYS}")
    if not sep and len(text) > 24 and not any(c in text for c in "-.:"):
        # Not echoed: one long token without '/' (no model name looks so) may be a key of a shape we do not know.
        raise ValueError(f"a target must be written '<provider>/<model>'; this one has no '/' ({len(text)} characters)")
    if not sep or not provider or not model:
        raise _TargetError(f"target {echo(text)} must be written '<provider>/<model>'", text)
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
    shadow: ShadowConfig | None = Field(
        None, description="Send a sampled share of the answered calls to candidate targets too, in the background."
    )

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


class ShadowConfig(_Model):
    """Shadow traffic: a sampled share of an alias's answered calls is sent again to candidate targets, in the
    background, to compare them with the primary before switching (see README, "Trying a provider ...")."""

    targets: list[TargetConfig] = Field(
        min_length=1, description='The candidates, each "<provider>/<model>" or {provider, model, params}.'
    )
    percent: float = Field(
        ge=0, le=100, description="Share of the alias's answered calls shadowed (0: only calls with shadow=True)."
    )
    max_in_flight: PositiveInt = Field(
        8, le=10_000, description="Most shadow requests of the alias under way in one process; the rest are skipped."
    )
    skip_tags: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Never shadow calls with these tag values, e.g. {tenant: [acme]} (an opted-out tenant).",
    )

    @field_validator("targets")
    @classmethod
    def _unique_targets(cls, v: list[TargetConfig]) -> list[TargetConfig]:
        names = [f"{t.provider}/{t.model}" for t in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"shadow targets must be unique: {', '.join(dup)}")
        return v

    @field_validator("skip_tags")
    @classmethod
    def _tag_names(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for name in v:
            if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
                raise ValueError(f"tag name {name!r} must be 1-64 characters of letters, digits, '_', '.' or '-'")
        return v


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
    echo = src.echo
    named = {k.name for p in cfg.providers.values() for k in p.api_keys() if k.named}
    for i, b in enumerate(cfg.budgets):
        loc: tuple[Any, ...] = ("budgets", i)
        if b.name in seen:
            src.problem(loc + ("name",), f"budget name {echo(b.name)} is used twice")
        seen.add(b.name)
        for name in filter(None, (b.alias, b.fallback)):
            if name not in cfg.aliases:
                field_name = "alias" if name == b.alias else "fallback"
                src.problem(
                    loc + (field_name,),
                    f"alias {echo(name)} is not defined under aliases"
                    f"{src.suggest(name, cfg.aliases)}",
                )
        if b.fallback is not None and b.fallback == b.alias:
            src.problem(loc + ("fallback",), "falls back to the alias it limits")
        if b.provider is not None and b.provider not in cfg.providers:
            src.problem(
                loc + ("provider",),
                f"provider {echo(b.provider)} is not defined{src.suggest(b.provider or '', cfg.providers)}",
            )
        if b.key is not None and b.key not in named:
            src.problem(
                loc + ("key",),
                f"no provider has a key named {echo(b.key)}{src.suggest(b.key or '', named)}",
            )
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
        dup = sorted(n for n, c in Counter(k.name for k in self.keys).items() if c > 1)
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
                    f"alias {src.echo(alias)} is not defined under aliases{src.suggest(alias, cfg.aliases)}",
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
    _shadows: dict[str, tuple[Target, ...]] = PrivateAttr(default_factory=dict)
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

    def shadow_targets(self, alias: str) -> tuple[Target, ...]:
        """The alias's shadow targets (`shadow.targets`), resolved against providers; empty without a shadow."""
        return self._shadows.get(alias, ())

    def secrets(self) -> tuple[str, ...]:
        """Every secret of this config, longest first: what is scrubbed from errors, logs and traces (see
        router.secrets for what counts)."""
        found: list[str] = []
        for p in self.providers.values():
            found += [k.secret.get_secret_value() for k in p.api_keys()]
            found += p.header_env_values()
            for name, value in p.headers.items():
                if CREDENTIAL_NAME.search(name):
                    found += [value, value.rsplit(" ", 1)[-1]]
            if p.api_base:
                found += url_secrets(p.api_base)
        if self.state.url is not None:
            found += url_secrets(self.state.url.get_secret_value())
        if self.ledger is not None and self.ledger.dsn is not None:
            found += url_secrets(self.ledger.dsn.get_secret_value())
        return worth_scrubbing(found)


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

# A reference: `${NAME}` or the start of `${NAME:-default}`, after an even run of `$` (each `$$` is a literal `$`).
# It can only match where a run of `$` begins, and each part matches in one way, so a search is linear.
_REF = re.compile(r"(?<!\$)(?:\$\$)*\$\{([A-Za-z_][A-Za-z0-9_]*)(\}|:-)")
# A `${` that begins no reference: after an even run of `$`, like a reference, whatever follows it.
_OPEN = re.compile(r"(?<!\$)(?:\$\$)*\$\{")


def _references(value: str) -> Iterator[tuple[int, int, str, str | None]]:
    """Each whole `${NAME}` or `${NAME:-default}` in `value`, left to right: (start, end, name, default).

    Linear in the text, whatever it holds: the search runs in C, a default ends at the first `}` after it,
    and nothing past the last `}` is searched, since no reference can end there. (A regex whose default
    part backtracked to the end of the text at every `${NAME:-` took hours on a file of them, holding the
    GIL throughout.)"""
    end = value.rfind("}") + 1
    at = 0
    while (m := _REF.search(value, at, end)) is not None:
        start = m.start(1) - 2
        if m.group(2) == "}":
            yield start, m.end(), m.group(1), None
            at = m.end()
        else:
            close = value.index("}", m.end())  # one exists: the search ended at the last
            yield start, close + 1, m.group(1), value[m.end() : close]
            at = close + 1


def interpolate(value: str, env: Mapping[str, str]) -> tuple[str, list[str], list[str]]:
    """Expand `${VAR}` and `${VAR:-default}` (`$$` is a literal `$`); return (text, vars used, vars unset)."""
    used: list[str] = []
    unset: list[str] = []
    out: list[str] = []
    at = 0
    for start, end, name, default in _references(value):
        out.append(value[at:start].replace("$$", "$"))  # text between references pairs its `$`s afresh
        at = end
        used.append(name)
        got = env.get(name, "")
        if got:
            out.append(got)
        elif default is not None:
            out.append(default)
        else:
            unset.append(name)
    out.append(value[at:].replace("$$", "$"))
    return "".join(out), used, unset


def _bad_reference(value: str) -> str | None:
    """The first `${` that is not a whole `${NAME}` or `${NAME:-default}` (a typo, or a nested default), if any.

    Left as text it would be sent on as it is, as a key or a URL; an env var's value is never expanded again.
    """
    at = 0
    for start, end, _, default in _references(value):
        if _OPEN.search(value, at, start) is not None:
            break
        if default is not None and "${" in default:
            return value[start:end] + "}"
        at = end
    m = _OPEN.search(value, at)
    if m is None:
        return None
    start = m.end() - 2
    end = value.find("}", start)
    return value[start : end + 1 if end >= 0 else start + 40]


def _key_path(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        text = str(part)
        if len(text) > 80:  # a key of a megabyte is still one key
            text = text[:79] + "…"
        out += f"[{text}]" if isinstance(part, int) else (f".{text}" if out else text)
    return redact_keys(out)


# -- what a config file may cost to load: a bad file costs a ConfigError, never the process --
MAX_CONFIG_BYTES = 4 * 1024 * 1024
"""Largest config file read (4 MiB; a config with 10,000 aliases is under 1 MiB)."""
MAX_CONFIG_NODES = 200_000  # a document this big is checked in about 0.9 s on 2 cores: under a second, as promised
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


_TAG = "tag:yaml.org,2002:"
_STR, _SEQ, _MAP, _MERGE, _INT = _TAG + "str", _TAG + "seq", _TAG + "map", _TAG + "merge", _TAG + "int"
_SCALAR_TAGS = frozenset(_TAG + t for t in ("null", "bool", "int", "float", "str"))


class _Plain:
    """The implicit types of a config: JSON's. A date or `=` stays a string: `2024-08-06` is a model version."""

    yaml_implicit_resolvers = {  # noqa: RUF012 (PyYAML's own class attribute)
        first: [(tag, rx) for tag, rx in resolvers if tag in _PLAIN_TAGS]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }


class _PyLoader(_Plain, yaml.SafeLoader):
    """PyYAML's pure-Python parser, resolver and scalar constructors; `_Builder` makes the values."""


if yaml.__with_libyaml__:
    from yaml._yaml import CParser

    class _CLoader(_Plain, CParser, yaml.constructor.SafeConstructor, yaml.resolver.Resolver):
        """libyaml parses (4x faster); `_Builder` makes the values from its events, as from `_PyLoader`'s."""

        def __init__(self, text: str) -> None:
            CParser.__init__(self, text)
            yaml.constructor.SafeConstructor.__init__(self)
            yaml.resolver.Resolver.__init__(self)

    _Loader: type[_PyLoader] | type[_CLoader] = _CLoader
else:  # pragma: no cover - PyYAML built without libyaml
    _Loader = _PyLoader


@dataclass(frozen=True)
class _Anchor:
    """What an `&anchor` stands for: its value, its size once expanded, and where its text is (None: in a key)."""

    value: Any
    values: int
    levels: int
    path: tuple[Any, ...] | None
    mark: yaml.Mark


class _Lines:
    """The line of every key path: recorded where the text is, and followed through aliases and `<<` merges
    to their anchor's text when asked (so an alias costs one entry, whatever it expands to)."""

    def __init__(self) -> None:
        self.at: dict[tuple[Any, ...], int] = {}
        self.mounts: dict[tuple[Any, ...], tuple[Any, ...]] = {}  # where an alias is -> its anchor's path
        self.merged: dict[tuple[Any, ...], list[tuple[Any, ...]]] = {}  # a mapping -> anchors merged into it

    def text_of(self, loc: tuple[Any, ...], hops: int = 0) -> tuple[Any, ...] | None:
        """The path whose text `loc` is (itself, or inside an anchor), or None if the file has no such path."""
        if loc in self.at or hops > 16:
            return loc if loc in self.at else None
        for n in range(1, len(loc)):
            prefix, rest = loc[:n], loc[n:]
            if prefix in self.mounts:
                return self.text_of(self.mounts[prefix] + rest, hops + 1)
            if prefix + rest[:1] not in self.at and prefix in self.merged:
                for base in self.merged[prefix]:
                    found = self.text_of(base + rest, hops + 1)
                    if found is not None:
                        return found
                return None
        return None

    def __contains__(self, loc: tuple[Any, ...]) -> bool:
        return self.text_of(loc) is not None

    def get(self, loc: tuple[Any, ...]) -> int | None:
        found = self.text_of(loc)
        return None if found is None else self.at[found]

    def __bool__(self) -> bool:
        return bool(self.at)


class _Builder:
    """Makes the document's values straight from the parser's events, in one pass, within the limits.

    Every value counts 1 and every alias the expanded size of its anchor, so an alias bomb is refused at the
    alias that crosses MAX_CONFIG_NODES, having cost no more than its own text; nesting is counted the same
    way against MAX_CONFIG_DEPTH. A tag that would build anything but JSON's types is refused. The line of
    every key path is recorded for error messages, those inside an alias at the anchor's text. (PyYAML
    composes a node graph, then constructs values from it, and a third pass found the lines: four times
    slower, and that is most of what a big config costs to load.)
    """

    def __init__(self, loader: Any, lines: _Lines, duplicate: Callable[..., None]) -> None:
        self.loader = loader
        self.lines = lines
        self.duplicate = duplicate  # duplicate(path, first_line, line)
        self.anchors: dict[str, _Anchor] = {}
        self.open: dict[str, yaml.Mark] = {}  # anchors whose value is being built
        self.text_of: dict[int, tuple[Any, ...]] = {}  # id(an anchored value) -> where its text is
        self.total = 0  # values so far, aliases expanded
        self.depth = 0  # lists and mappings open around the value being built
        self.resolvers = loader.yaml_implicit_resolvers  # by first character: what a plain scalar may be

    def document(self) -> Any:
        """The single document's value (None for an empty stream)."""
        get, check = self.loader.get_event, self.loader.check_event
        get()  # stream start
        if check(yaml.StreamEndEvent):
            return None
        first = get()  # document start
        value = self.node(get(), ())[0]
        get()  # document end
        if not check(yaml.StreamEndEvent):
            raise yaml.composer.ComposerError(
                "expected a single document in the stream", first.start_mark, "but found another document",
                get().start_mark,
            )  # fmt: skip
        return value

    def count(self, line: int, values: int, levels: int, what: str) -> None:
        self.total += values
        if self.total > MAX_CONFIG_NODES:
            raise _LimitError(
                line,
                f"{what} expands the document past {MAX_CONFIG_NODES:,} values (MAX_CONFIG_NODES): "
                "an alias bomb, or aliases nested too deep",
            )
        if self.depth + levels > MAX_CONFIG_DEPTH:
            raise _LimitError(line, f"{what} nests deeper than {MAX_CONFIG_DEPTH} levels (MAX_CONFIG_DEPTH)")

    def node(self, event: Any, path: tuple[Any, ...] | None) -> tuple[Any, int, int]:
        """The value `event` starts, its size once expanded, and its levels; lines go under `path` (None: a key)."""
        value: Any
        if type(event) is yaml.ScalarEvent and event.tag is None and event.anchor is None:
            # most of a file: a plain or quoted string, with nothing to resolve unless its first character says so
            value = event.value
            if event.implicit[0] and value[:1] in self.resolvers:
                value = self.scalar(event)
            self.total += 1
            if self.total > MAX_CONFIG_NODES:
                raise self.too_many(event)
            return value, 1, 0
        line = event.start_mark.line + 1
        if isinstance(event, yaml.AliasEvent):
            return self.alias(event, path, line)
        tag = event.tag
        if tag is not None and tag not in ("!", *_PLAIN_TAGS):
            raise _LimitError(
                line,
                f"tag {tag.replace(_TAG, '!!')} is not allowed: a config holds only strings, "
                "numbers, booleans, null, lists and mappings",
            )
        anchor = event.anchor
        if anchor is not None:
            first = self.anchors[anchor].mark if anchor in self.anchors else self.open.get(anchor)
            if first is not None:
                raise yaml.composer.ComposerError(
                    f"found duplicate anchor {anchor!r}; first occurrence", first, "second occurrence",
                    event.start_mark,
                )  # fmt: skip
            self.open[anchor] = event.start_mark
        if isinstance(event, yaml.ScalarEvent):
            value, values, levels = self.scalar(event), 1, 0
        else:
            self.depth += 1
            if self.depth > MAX_CONFIG_DEPTH:
                raise _LimitError(line, _too_deep)
            if isinstance(event, yaml.SequenceStartEvent):
                value, values, levels = self.sequence(event, path)
            else:
                value, values, levels = self.mapping(event, path)
            self.depth -= 1
        self.total += 1
        if self.total > MAX_CONFIG_NODES:
            raise self.too_many(event)
        if anchor is not None:
            del self.open[anchor]
            self.anchors[anchor] = _Anchor(value, values, levels, path, event.start_mark)
            if path is not None:
                self.text_of[id(value)] = path
        return value, values, levels

    def too_many(self, event: Any) -> _LimitError:
        line = event.start_mark.line + 1
        return _LimitError(line, f"the document holds over {MAX_CONFIG_NODES:,} values (MAX_CONFIG_NODES)")

    def alias(self, event: Any, path: tuple[Any, ...] | None, line: int) -> tuple[Any, int, int]:
        name = event.anchor
        anchor = self.anchors.get(name)
        if anchor is None:
            if name in self.open:
                raise _LimitError(line, f"alias *{name} refers to itself: a config cannot contain itself")
            raise yaml.composer.ComposerError(None, None, f"found undefined alias {name!r}", event.start_mark)
        self.count(line, anchor.values, anchor.levels, f"alias *{name}")
        if path is not None and anchor.path is not None:  # its lines are the anchor's
            self.lines.mounts[path] = anchor.path
        return anchor.value, anchor.values, anchor.levels

    def scalar(self, event: Any) -> Any:
        line = event.start_mark.line + 1
        tag = event.tag
        if tag is None or tag == "!":
            tag = self.loader.resolve(yaml.ScalarNode, event.value, event.implicit)
        if tag == _STR:
            return event.value
        if tag in (_SEQ, _MAP):
            raise yaml.constructor.ConstructorError(
                None, None, f"expected a {'sequence' if tag == _SEQ else 'mapping'} node, but found scalar",
                event.start_mark,
            )  # fmt: skip
        if tag == _INT and len(event.value) > _MAX_INT_DIGITS:
            raise _LimitError(line, f"integer of {len(event.value)} digits is too large")
        node = yaml.ScalarNode(tag, event.value, event.start_mark, event.end_mark, style=event.style)
        construct = self.loader.yaml_constructors.get(tag) or self.loader.yaml_constructors[None]
        try:
            return construct(self.loader, node)
        except (ValueError, TypeError, IndexError, KeyError, OverflowError):
            # PyYAML's scalar constructors raise these for `!!int ""`, `0b_` or `!!bool maybe`
            shown = _PLAIN_ECHO(event.value, 40)
            raise _LimitError(line, f"{shown} is not a valid {tag.replace(_TAG, '!!')}") from None

    def _collection_tag(self, event: Any, kind: str) -> None:
        tag = event.tag
        if tag is None or tag == "!" or tag == (_SEQ if kind == "sequence" else _MAP):
            return
        wanted = "scalar" if tag in _SCALAR_TAGS else "sequence" if tag == _SEQ else "mapping" if tag == _MAP else ""
        problem = (
            f"expected a {wanted} node, but found {kind}"
            if wanted
            else f"could not determine a constructor for the tag {tag!r}"
        )
        raise yaml.constructor.ConstructorError(None, None, problem, event.start_mark)

    def sequence(self, event: Any, path: tuple[Any, ...] | None) -> tuple[list[Any], int, int]:
        self._collection_tag(event, "sequence")
        items: list[Any] = []
        values, levels = 1, 1
        get, node, at = self.loader.get_event, self.node, self.lines.at
        item_event = get()
        while type(item_event) is not yaml.SequenceEndEvent:
            sub = None
            if path is not None:
                sub = path + (len(items),)
                at[sub] = item_event.start_mark.line + 1
            item, n, d = node(item_event, sub)
            items.append(item)
            values += n
            if d >= levels:
                levels = d + 1
            item_event = get()
        return items, values, levels

    def mapping(self, event: Any, path: tuple[Any, ...] | None) -> tuple[dict[Any, Any], int, int]:
        self._collection_tag(event, "mapping")
        merged: list[tuple[Any, Any]] = []
        given: list[tuple[Any, Any]] = []
        seen: dict[Any, int] = {}
        values, levels = 1, 1
        get, node, at = self.loader.get_event, self.node, self.lines.at
        key_event = get()
        while type(key_event) is not yaml.MappingEndEvent:
            key_line = key_event.start_mark.line + 1
            # `<<: *base`: its keys count where the mapping does not give them
            if getattr(key_event, "value", None) == "<<" and _is_merge_key(key_event):
                self.total += 1
                values += 1
                value, n, d = node(get(), None)
                merged += _merge_pairs(value, event.start_mark, key_event.start_mark)
                if path is not None:  # the lines of keys it brings are its anchors'
                    for base in value if isinstance(value, list) else [value]:
                        if id(base) in self.text_of:
                            self.lines.merged.setdefault(path, []).append(self.text_of[id(base)])
            else:
                key, n, d = node(key_event, None)
                values += n
                if d >= levels:
                    levels = d + 1
                try:
                    hash(key)
                except TypeError:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", event.start_mark, "found unhashable key", key_event.start_mark
                    ) from None
                sub = None
                if path is not None:
                    sub = path + (key,)
                    if key in seen:
                        self.duplicate(sub, seen[key], key_line)
                    seen.setdefault(key, key_line)
                    at[sub] = key_line
                value, n, d = node(get(), sub)
                given.append((key, value))
            values += n
            if d >= levels:
                levels = d + 1
            key_event = get()
        return dict(merged + given), values, levels


def _is_merge_key(event: Any) -> bool:
    if not isinstance(event, yaml.ScalarEvent) or event.anchor is not None:
        return False
    return bool(event.tag == _MERGE or (event.tag is None and event.implicit[0] and event.value == "<<"))


def _merge_pairs(value: Any, start: yaml.Mark, at: yaml.Mark) -> list[tuple[Any, Any]]:
    """The pairs a `<<` merge adds, in PyYAML's order: of a list of mappings, the first wins."""
    if isinstance(value, dict):
        return list(value.items())
    if isinstance(value, list):
        pairs: list[tuple[Any, Any]] = []
        for base in reversed(value):
            if not isinstance(base, dict):
                found = "sequence" if isinstance(base, list) else "scalar"
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", start, f"expected a mapping for merging, but found {found}", at
                )
            pairs += base.items()
        return pairs
    raise yaml.constructor.ConstructorError(
        "while constructing a mapping", start, "expected a mapping or list of mappings for merging, but found scalar",
        at,
    )  # fmt: skip


_BREAK = re.compile(r"\r\n|[\r\n\x85\u2028\u2029]")  # YAML's line breaks (str.splitlines knows more)
_STRUCTURE = ("expected key", "mapping values are not allowed", "expected <block end>", "expected '-' indicator")
_INDENT_HINT = "(YAML reads indentation as structure)"


def _yaml_problem(text: str, file: str, exc: yaml.MarkedYAMLError) -> ConfigProblem:
    """A YAML syntax error as one problem: on the line that is wrong, saying what is wrong with it if we know."""
    mark = exc.problem_mark or exc.context_mark
    line = mark.line + 1 if mark else None
    if "maximum nesting depth" in str(exc.problem):  # libyaml's own bound, met while scanning ahead
        return ConfigProblem(file, line, "", _too_deep)
    what = " ".join(str(p) for p in (exc.context, exc.problem) if p)
    lines = _BREAK.split(text) if line is not None else []
    bad = lines[line - 1] if line is not None and line <= len(lines) else ""
    if line is not None and "\t" in bad[: len(bad) - len(bad.lstrip(" \t"))]:
        return ConfigProblem(file, line, "", "invalid YAML: a tab indents this line, and YAML forbids tabs for "
                             "indentation: indent with spaces")  # fmt: skip
    if line is not None and any(s in what for s in _STRUCTURE):
        found = _misindented(lines, line - 1)
        if found is not None:
            at, message = found
            return ConfigProblem(file, at + 1, "", f"invalid YAML: {message} {_INDENT_HINT}")
    flow = bad.find("${")
    if flow > 0 and ("[" in bad[:flow] or "{" in bad[:flow]):
        what += ' (inside [...] or {...}, quote an env var: "${VAR}")'
    return ConfigProblem(file, line, "", f"invalid YAML: {redact_keys(what)[:300]}")


def _misindented(lines: list[str], bad: int) -> tuple[int, str] | None:
    """The line before `bad` (0-based), when its indentation is what YAML tripped on at `bad`, and why.

    YAML notices a mis-indented line only at the next one that no longer fits. The line before is at fault
    when it is the odd one out among lines of its sort (list items, config fields, or names the user chose):
    between two lines that agree with each other (siblings, not its parent), or the first line of a block
    whose next lines agree. Otherwise YAML's own line stands.
    """

    def content(i: int) -> bool:
        stripped = lines[i].lstrip(" ")
        return bool(stripped) and not stripped.startswith("#")

    def indent(i: int) -> int:
        return len(lines[i]) - len(lines[i].lstrip(" "))

    def opens(i: int) -> bool:  # `key:` with its value on the lines below
        return lines[i].split(" #")[0].rstrip().endswith(":")

    def sort(i: int) -> str:  # a list item, a config field, or a name (an alias, a provider, a param...)
        text = lines[i].lstrip(" ")
        if text.startswith("- ") or text == "-":
            return "item"
        return "field" if text.split(":", 1)[0].strip("'\" ") in _FIELD_NAMES else "name"

    def before(i: int) -> int | None:
        return next((j for j in range(i - 1, max(i - 51, -1), -1) if content(j)), None)

    def after(i: int) -> int | None:
        return next((j for j in range(i + 1, min(i + 51, len(lines))) if content(j)), None)

    if not content(bad):
        return None
    here = indent(bad)
    prev, nxt = before(bad), after(bad)
    if prev is None or indent(prev) == here or sort(prev) != sort(bad):
        return None
    prior = before(prev)
    if prior is None or (nxt is not None and indent(nxt) == indent(prev)):  # then `bad` is the odd one
        return None
    parent = opens(prior) and indent(prior) < indent(prev)  # prev is the first line of prior's block
    if indent(prior) == here and not parent and sort(prior) == sort(prev):  # between two siblings that agree
        return prev, (
            f"this line is indented {indent(prev)} spaces and the lines around it ({prior + 1} and {bad + 1}) "
            f"{here}: indent it like them"
        )
    if parent and indent(prior) < here and nxt is not None and indent(nxt) == here and sort(nxt) == sort(prev):
        return prev, (  # the first line of a block, whose next lines agree with each other
            f"this line is indented {indent(prev)} spaces and the lines after it ({bad + 1} and {nxt + 1}) "
            f"{here}: indent it like them"
        )
    return None


MAX_REPORTED_PROBLEMS = 100
"""Most problems one ConfigError lists; the rest are counted (a broken file of thousands of lines says so)."""
_SUGGEST_BUDGET = 20_000  # names compared for did-you-mean hints, per file: a hint is worth milliseconds, not more


class _Source:
    """A parsed YAML file plus the line of every key path, and the problems found, for error messages."""

    def __init__(self, text: str, file: str) -> None:
        self.file = file
        self.lines = _Lines()
        self.problems: list[ConfigProblem] = []
        self.more = 0  # problems past MAX_REPORTED_PROBLEMS, counted
        self.echo = _PLAIN_ECHO
        self.from_env: dict[tuple[Any, ...], str] = {}  # where a value came from ${VAR}: the text as written
        self._suggest_budget = _SUGGEST_BUDGET
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
                self.data = _Builder(loader, self.lines, self._duplicate).document()
            finally:
                loader.dispose()
        except _LimitError as exc:
            raise ConfigError([ConfigProblem(file, exc.line, "", redact_keys(exc.message))]) from None
        except yaml.MarkedYAMLError as exc:
            raise ConfigError([_yaml_problem(text, file, exc)]) from None
        except yaml.YAMLError as exc:
            raise ConfigError([ConfigProblem(file, None, "", f"invalid YAML: {redact_keys(str(exc))[:200]}")]) from None

    def _duplicate(self, path: tuple[Any, ...], first: int, line: int) -> None:
        self.problem(path, f"duplicate key (first defined on line {first})", line)

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
            found = self.lines.get(loc[:n])
            if found is not None:
                return found
        return 1 if self.lines else None

    @property
    def full(self) -> bool:
        """Whether MAX_REPORTED_PROBLEMS are listed already (the next are only counted)."""
        return len(self.problems) >= MAX_REPORTED_PROBLEMS

    def problem(self, loc: tuple[Any, ...], message: str, line: int | None = None) -> None:
        """Report a problem at `loc` (once MAX_REPORTED_PROBLEMS are listed, only count it)."""
        if self.full:
            self.more += 1
            return
        self.problems.append(ConfigProblem(self.file, line or self.line(loc), _key_path(loc), redact_keys(message)))

    def error(self) -> ConfigError:
        """The ConfigError listing the problems (and counting those past the limit)."""
        more = [ConfigProblem(self.file, None, "", f"... and {self.more:,} more problems (fix these first)")]
        return ConfigError(self.problems + (more if self.more else []))

    def suggest(self, name: str, known: Mapping[str, Any] | Iterable[str]) -> str:
        """' (did you mean ...?)' for the closest known name, while the file's budget of comparisons lasts."""
        size = len(known) if isinstance(known, (Mapping, set, frozenset, list, tuple)) else _SUGGEST_BUDGET
        if len(name) > 64 or size > self._suggest_budget:
            return ""
        self._suggest_budget -= size
        close = difflib.get_close_matches(name, [k for k in known if len(k) <= 128], n=1)
        return f" (did you mean {_PLAIN_ECHO(close[0])}?)" if close else ""


def _interpolate_tree(
    src: _Source, data: Any, env: Mapping[str, str]
) -> tuple[Any, dict[str, dict[int, tuple[str, ...]]], dict[str, list[str]]]:
    """Expand env vars in every string; an unset var is an error except in a key (its target is then skipped).
    Also returns, per provider, the env vars each key was read from and what env vars put into its headers.

    Each value that came from the environment is noted (`src.from_env`, and `src.echo` quotes it as written),
    so that no error shows an env var's value: it may be a key pasted into the wrong place."""
    expand = _Expand(src, env)
    out = expand.walk(data, ())
    src.echo = _Echo(expand.written, expand.env_values)
    return out, expand.key_env, expand.header_env


_NOTHING_TO_CHECK = frozenset({int, bool, type(None)})


class _Expand:
    """One walk of `_interpolate_tree` (a class, not a closure: a recursive closure is a reference cycle that
    keeps the whole parsed file alive until the cyclic GC finds it)."""

    def __init__(self, src: _Source, env: Mapping[str, str]) -> None:
        self.src = src
        self.env = env
        self.key_env: dict[str, dict[int, tuple[str, ...]]] = {}
        self.header_env: dict[str, list[str]] = {}
        self.written: dict[str, str] = {}
        self.env_values: dict[str, str] = {}

    def walk(self, x: Any, loc: tuple[Any, ...]) -> Any:
        # a leaf with nothing to expand or check is taken as it is, without a call (most of a big file)
        walk, done = self.walk, _NOTHING_TO_CHECK
        if isinstance(x, dict):
            return {
                k: v if type(v) in done or (type(v) is str and "$" not in v) else walk(v, loc + (k,))
                for k, v in x.items()
            }
        if isinstance(x, list):
            return [
                v if type(v) in done or (type(v) is str and "$" not in v) else walk(v, loc + (i,))
                for i, v in enumerate(x)
            ]
        if isinstance(x, float) and not math.isfinite(x):
            self.src.problem(loc, "must be a finite number, not .inf or .nan")
            return x
        if not isinstance(x, str) or "$" not in x:
            return x
        return self.text(x, loc)

    def text(self, x: str, loc: tuple[Any, ...]) -> str:
        src, env = self.src, self.env
        bad = _bad_reference(x)
        if bad:
            src.problem(
                loc,
                f"{_PLAIN_ECHO(bad, 40)} is not an env var reference: write ${{NAME}} or ${{NAME:-default}} "
                "($$ for a $)",
            )
            return x
        text, used, unset = interpolate(x, env)
        for name in used:
            if env.get(name):
                self.env_values.setdefault(env[name], f"${{{name}}}")
        if used:
            src.from_env[loc] = x
            self.written.setdefault(text, x)
        if len(loc) == 4 and loc[0] == "providers" and loc[2] == "headers":
            self.header_env.setdefault(loc[1], []).extend(_substituted(x, env))
        index = _key_index(loc)
        if index is not None:
            self.key_env.setdefault(loc[1], {})[index] = tuple(used)
            if unset:  # "prefix-${UNSET}" is no key at all: the target is skipped, naming the variable
                return ""
        elif unset:
            names = ", ".join(unset)
            src.problem(loc, f"environment variable {names} is not set; set it or give a default: ${{{unset[0]}:-...}}")
        return text


def _substituted(value: str, env: Mapping[str, str]) -> list[str]:
    """What each `${VAR}` of `value` expands to (the variable, else its default)."""
    return [env.get(name, "") or (default or "") for _, _, name, default in _references(value)]


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
        close = difflib.get_close_matches(name, list(model_fields), n=1) if len(name) <= 64 else []
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


def _all_fields(model: type[BaseModel], seen: set[type[BaseModel]] | None = None) -> set[str]:
    """Every key any model under `model` has."""
    seen = set() if seen is None else seen
    if model in seen:
        return set()
    seen.add(model)
    out = set(model.model_fields)
    for info in model.model_fields.values():
        sub = _model_in(info.annotation)
        if sub is not None:
            out |= _all_fields(sub, seen)
    return out


# The keys of the config's own models, told apart from names users choose (of aliases, providers, params).
_FIELD_NAMES = frozenset(_all_fields(RouterConfig) | {"target"})


# Sections whose entries are named by the user: a field of an entry written at the level of the names is read
# as one more entry (`params:` two spaces short is an alias called "params").
_ENTRIES: dict[str, tuple[str, str, type[BaseModel], str]] = {
    # section: (what one entry is, what they are, its model, a key only a real entry has)
    "aliases": ("alias", "aliases", AliasConfig, "targets"),
    "providers": ("provider", "providers", ProviderConfig, "kind"),
    "pricing": ("price", "prices", PricingConfig, ""),
}


def _misplaced(loc: tuple[Any, ...], data: Mapping[str, Any]) -> tuple[tuple[Any, ...], str] | None:
    """A key written one level too high (by its indentation), and what to do about it; None if it is not that."""
    if len(loc) >= 2 and loc[0] in _ENTRIES and isinstance(loc[1], str):
        what, plural, model, marker = _ENTRIES[loc[0]]
        section = data.get(loc[0])
        value = section.get(loc[1]) if isinstance(section, dict) else None
        if loc[1] in model.model_fields and not (marker and isinstance(value, dict) and marker in value):
            prev = _key_before(section, loc[1])
            under = f"indent it under {what} {_PLAIN_ECHO(prev)}" if prev is not None else f"indent it under a {what}"
            return loc[:2], f"`{loc[1]}` sits at the level of the {plural}; {under}"
    if len(loc) == 1 and isinstance(loc[0], str) and loc[0] not in RouterConfig.model_fields:
        prev = _key_before(data, loc[0])
        if prev == "defaults" and loc[0] in DefaultsConfig.model_fields:
            return loc, f"`{loc[0]}` sits at the top level; indent it under defaults"
        if prev in _ENTRIES and loc[0] in _ENTRIES[prev][2].model_fields:
            last = _key_before(data.get(prev), None)
            what = _ENTRIES[prev][0]
            under = f"indent it under {what} {_PLAIN_ECHO(last)}" if last is not None else f"indent it under a {what}"
            return loc, f"`{loc[0]}` sits at the top level; {under}"
    return None


def _key_before(mapping: Any, key: Any) -> Any:
    """The key written just before `key` in `mapping` (None: the last key), or None."""
    if not isinstance(mapping, dict):
        return None
    prev = None
    for k in mapping:
        if k == key:
            return prev
        prev = k
    return prev if key is None else None


_UNITS = re.compile(r"^\s*(?:US)?\$?\s*(?P<n>[-+]?(?:\d[\d_]*\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*(?:\$|USD|usd)?\s*$")
_SECONDS = re.compile(r"^\s*(?P<n>[-+]?(?:\d+\.?\d*|\.\d+))\s*(?:s|sec|secs|seconds)\s*$")


def _number_hint(loc: tuple[Any, ...], value: Any, from_env: bool) -> str | None:
    """For a number written as text: `"$0.15"` → write 0.15; `"30s"` (a *_s key) → write 30; else None."""
    if not isinstance(value, str) or len(value) > 40 or not loc or not isinstance(loc[-1], str):
        return None
    if loc[-1].endswith("_s"):
        m, unit = _SECONDS.match(value), "seconds, without a unit"
    elif "_per_1" in loc[-1] or loc[-1].endswith("_usd"):
        m, unit = _UNITS.match(value), "USD, without $ or a unit"
    else:
        return None
    if m is None or (m.group("n") == value.strip()):  # no unit to drop: not this mistake
        return None
    return f"write a plain number of {unit}" + ("" if from_env else f": {m.group('n')}")


def _value_at(data: Any, loc: tuple[Any, ...]) -> Any:
    for part in loc:
        found = (isinstance(data, dict) and part in data) or (
            isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data)
        )
        if not found:
            return None
        data = data[part]
    return data


def _validation_problems(src: _Source, data: Mapping[str, Any], exc: ValidationError) -> None:
    """Each pydantic error as a problem at its file line, worded for the mistake people make there."""
    misplaced: dict[tuple[Any, ...], tuple[tuple[Any, ...], str] | None] = {}  # once per key: errors under it are many
    reported: set[tuple[Any, ...]] = set()
    for err in exc.errors(include_input=False, include_url=False):
        if src.full:
            src.more += 1
            continue
        loc = src.yaml_loc(tuple(err["loc"]))
        head = loc[:2] if len(loc) >= 2 and loc[0] in _ENTRIES else loc
        if head not in misplaced:
            misplaced[head] = _misplaced(head, data)
        moved = misplaced[head]
        if moved is not None:
            at, message = moved
            if at not in reported:
                reported.add(at)
                src.problem(at, message)
            continue
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, _TargetError):
            src.problem(loc, _target_hint(cause.text, data, src.echo))
            continue
        hint = None
        if err["type"] in ("float_parsing", "int_parsing", "float_type"):
            hint = _number_hint(loc, _value_at(data, loc), loc in src.from_env)
        src.problem(loc, hint or _friendly(err, _fields_at(loc)))


def _target_hint(text: str, data: Mapping[str, Any], echo: _Echo) -> str:
    """Say how a target is written, with an example on a provider of this file."""
    message = f"target {echo(text)} must be written '<provider>/<model>'"
    providers = data.get("providers")
    if not isinstance(providers, dict) or not providers or echo.hides(text) or len(text) > _ECHO_CHARS:
        return message
    names = [str(p) for p in itertools.islice(providers, 4)]
    more = ", ..." if len(providers) > 3 else ""
    return f"{message}, e.g. {_PLAIN_ECHO(names[0] + '/' + text)} (providers: {', '.join(names[:3])}{more})"


@contextlib.contextmanager
def _no_gc_pauses() -> Iterator[None]:
    """Hold off the cyclic garbage collector while a file is checked.

    Checking builds hundreds of thousands of objects and no cycles; each full collection over them held the
    GIL, and so every thread of a serving process, for a tenth of a second and more (and cost 40% of the
    time). The caller's setting is restored; a collection runs later, as usual."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def parse_config(text: str, file: str = "<config>", env: Mapping[str, str] | None = None) -> RouterConfig:
    """Validate config text; raise `ConfigError` listing every problem with file, line and key path."""
    with _no_gc_pauses():
        try:
            return _parse(text, file, os.environ if env is None else env)
        except ConfigError as exc:
            problems = exc.problems  # not the traceback: its frames hold the whole file, freed here, with GC off
    raise ConfigError(problems)


def _parse(text: str, file: str, env: Mapping[str, str]) -> RouterConfig:
    src = _Source(text, file)
    data: Any = None
    cfg: RouterConfig | None = None
    try:
        if not isinstance(src.data, dict):
            raise ConfigError(
                [ConfigProblem(file, 1, "", "the file must be a mapping with version, providers and aliases")]
            )
        data, key_env, header_env = _interpolate_tree(src, src.data, env)
        if src.problems:
            raise src.error()
        try:
            cfg = RouterConfig.model_validate(data, context={"echo": src.echo})
        except ValidationError as exc:
            _validation_problems(src, data, exc)
            raise src.error() from None
        for name, provider in cfg.providers.items():
            n = len(provider.api_key) if isinstance(provider.api_key, list) else 1
            provider._key_env_vars = tuple(key_env.get(name, {}).get(i, ()) for i in range(n))
            provider._header_env_values = tuple(header_env.get(name, ()))
        _check_references(cfg, src)
        if src.problems:
            raise src.error()
        cfg._source = file
        cfg._sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
        return cfg
    except ConfigError:
        if cfg is not None:
            _release(cfg.aliases, cfg.providers, cfg.pricing, cfg._tiers, levels=1)
        raise
    finally:
        _release(src.data, data, levels=2)


def _release(*trees: Any, levels: int) -> None:
    """Empty the top `levels` of each tree one entry at a time, so that freeing a big file is many small frees.

    Freed in one cascade, a file of 50,000 entries held the GIL for a tenth of a second and more. Only our own
    containers are emptied: below `levels` a value may be shared with the config (params are passed on as is).
    """
    for tree in trees:
        if not isinstance(tree, (dict, list)) or len(tree) < 256:  # small: freed at once, quickly
            continue
        pop = tree.popitem if isinstance(tree, dict) else tree.pop
        while tree:
            branch = pop()
            if levels > 1:
                _release(branch[1] if isinstance(branch, tuple) else branch, levels=levels - 1)
            del branch


def _check_references(cfg: RouterConfig, src: _Source) -> None:
    d = cfg.defaults
    echo = src.echo
    if d.model is not None and d.model not in cfg.aliases:
        src.problem(
            ("defaults", "model"),
            f"alias {echo(d.model)} is not defined under aliases{src.suggest(d.model or '', cfg.aliases)}",
        )
    for section, names in (("providers", cfg.providers), ("aliases", cfg.aliases)):
        for name in names:  # a name goes into metric labels, logs and `explain`
            if looks_like_key(name):
                src.problem((section, name), f"this name looks like an API key (not shown): {_PUT_KEYS}")
    for name, p in cfg.providers.items():
        if (p.engine or d.engine) == "direct" and (why := direct_problem(p.kind, p.api_base)) is not None:
            at = ("providers", name, "engine") if p.engine else ("defaults", "engine")
            src.problem(at, why if p.engine else f"provider {echo(name)}: {why}")
    keys = {name: p.api_keys() for name, p in cfg.providers.items()}  # once each: a pool may hold thousands
    circuits = {name: _circuit(d.circuit, p.circuit) for name, p in cfg.providers.items()}
    tiers: dict[str, tuple[tuple[Target, ...], ...]] = {}
    shadows: dict[str, tuple[Target, ...]] = {}
    spelled: set[str] = set()

    def resolve(t: TargetConfig, loc: tuple[Any, ...]) -> Target | None:
        provider = cfg.providers.get(t.provider)
        if provider is None and src.full:
            src.more += 1
            return None
        if provider is None:
            src.problem(
                src.yaml_loc(loc),
                f"provider {echo(t.provider)} is not defined under providers{src.suggest(t.provider, cfg.providers)}",
            )
            return None
        model = normalize_model(provider.kind, t.model)
        spelled.update({f"{t.provider}/{t.model}", f"{t.provider}/{model}"})
        return Target(
            provider=t.provider,
            model=model,
            kind=provider.kind,
            api_base=provider.api_base,
            keys=keys[t.provider],
            headers=dict(provider.headers),
            timeout_s=provider.timeout_s or d.timeout_s,
            params=dict(t.params),
            pricing=cfg.pricing.get(f"{t.provider}/{t.model}") or cfg.pricing.get(f"{t.provider}/{model}"),
            weight=t.weight,
            first_token_timeout_s=t.first_token_timeout_s or d.first_token_timeout_s,
            stream_idle_timeout_s=t.stream_idle_timeout_s or d.stream_idle_timeout_s,
            enabled=provider.enabled,
            circuit=circuits[t.provider],
            engine=provider.engine or d.engine,
        )

    for alias_name, alias in cfg.aliases.items():
        resolved: list[tuple[Target, ...]] = []
        for i, tier in enumerate(alias.targets):
            members = [
                m for j, t in enumerate(tier) if (m := resolve(t, ("aliases", alias_name, "targets", i, j))) is not None
            ]
            if members:
                resolved.append(tuple(members))
        tiers[alias_name] = tuple(resolved)
        if alias.shadow is not None:
            loc = ("aliases", alias_name, "shadow", "targets")
            found = [m for j, t in enumerate(alias.shadow.targets) if (m := resolve(t, (*loc, j))) is not None]
            shadows[alias_name] = tuple(found)
    for key in cfg.pricing:
        if key not in spelled:
            src.problem(("pricing", key), f"matches no target of any alias{src.suggest(key, spelled)}")
    cfg._tiers = tiers
    cfg._shadows = shadows
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
