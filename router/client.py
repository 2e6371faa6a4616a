"""`Router`: resolve the alias, plan the targets, run the attempt loop, return a `Result`.

The attempt loop is written once, as a generator that yields what it wants done (send a request, sleep)
and receives the outcome. `generate()` drives it with `litellm.completion` and `time.sleep`, `agenerate()`
with `litellm.acompletion` and `asyncio.sleep`: the two paths differ only in I/O, so they cannot drift.
"""

from __future__ import annotations

import asyncio
import difflib
import logging
import os
import random
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry

from . import _litellm
from .config import RouterConfig, Target, load_config
from .errors import (
    AllTargetsFailedError,
    DeadlineExceededError,
    MissingCredentialsError,
    ProviderError,
    UnknownModelError,
    UnknownProviderError,
    redact,
    scrub,
)
from .metrics import RouterMetrics
from .policy import Step, backoff_delay, build_messages, merge_params, next_step, plan_targets, price
from .types import Attempt, Result, Skip

log = logging.getLogger("router")

# Params the router sets itself; passing them to generate() would bypass routing or leak around it.
_RESERVED = frozenset(
    {"model", "messages", "api_key", "api_base", "base_url", "extra_headers", "max_retries", "num_retries", "stream"}
)


@dataclass(frozen=True)
class _Send:
    """The loop asks for one request with these litellm kwargs."""

    kwargs: dict[str, Any]


@dataclass(frozen=True)
class _Sleep:
    """The loop asks to wait before a retry."""

    seconds: float


@dataclass(frozen=True)
class _Plan:
    """Everything a call needs, worked out before the first request."""

    alias: str
    targets: tuple[tuple[Target, dict[str, Any]], ...]  # each target with its request kwargs, less the timeout
    skipped: tuple[Skip, ...]
    deadline_s: float


_Loop = Generator[_Send | _Sleep, Any, Result]


class Router:
    """Routes generate() calls over the targets of a config's aliases, with retries, fallback and metrics.

    ``Router(config, registry=...)`` or ``Router.from_yaml(path)``. `registry` is the prometheus
    CollectorRegistry to record into (default: prometheus_client's global one); Routers on one registry
    share its metrics. `sleep`, `asleep` and `jitter` are injectable so tests never wait.
    """

    def __init__(
        self,
        config: RouterConfig,
        *,
        registry: CollectorRegistry | None = None,
        sleep: Callable[[float], None] = time.sleep,
        asleep: Callable[[float], Any] = asyncio.sleep,
        jitter: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.metrics = RouterMetrics.on(registry, config.metrics.namespace, config.metrics.buckets)
        self._sleep = sleep
        self._asleep = asleep
        self._jitter = jitter
        self._clock = clock
        # Values to scrub from every error text; short literals like "none" are not secrets.
        self._secrets = tuple(
            v for p in config.providers.values() if p.api_key and len(v := p.api_key.get_secret_value()) >= 6
        )
        self._warned_skips: set[tuple[str, str]] = set()

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str], *, registry: CollectorRegistry | None = None, **kwargs: Any) -> Router:
        """A Router on the config file at `path` (see `load_config`)."""
        return cls(load_config(path), registry=registry, **kwargs)

    def __repr__(self) -> str:
        return f"<Router {self.config.source} aliases={list(self.config.aliases)}>"

    # -- public API ----------------------------------------------------------------------------------------

    def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Mapping[str, Any]] | None = None,
        model: str | None = None,
        system: str | None = None,
        provider: str | None = None,
        timeout: float | None = None,
        **params: Any,
    ) -> Result:
        """Answer `prompt` (or `messages`) with the alias `model`, falling back over its targets in order.

        `system` is prepended unless the messages start with a system message. `provider` restricts the call
        to that provider's targets. `timeout` bounds the whole call (default: `defaults.deadline_s`). Other
        keyword arguments are litellm params (temperature, max_tokens, ...) and override the target's and
        the alias's. Raises a `RouterError` subclass when no target answers.
        """
        plan, messages_ = self._prepare(prompt, messages, model, system, provider, timeout, params)
        loop = self._attempts(plan, messages_)
        try:
            step = next(loop)
            while True:
                if isinstance(step, _Sleep):
                    self._sleep(step.seconds)
                    reply: Any = None
                else:
                    try:
                        reply = _litellm.complete(step.kwargs)
                    except Exception as exc:
                        reply = exc
                step = loop.send(reply)
        except StopIteration as done:
            result: Result = done.value
            return result
        finally:
            loop.close()

    async def agenerate(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Mapping[str, Any]] | None = None,
        model: str | None = None,
        system: str | None = None,
        provider: str | None = None,
        timeout: float | None = None,
        **params: Any,
    ) -> Result:
        """Async twin of `generate()`, for event loops."""
        plan, messages_ = self._prepare(prompt, messages, model, system, provider, timeout, params)
        loop = self._attempts(plan, messages_)
        try:
            step = next(loop)
            while True:
                if isinstance(step, _Sleep):
                    await self._asleep(step.seconds)
                    reply: Any = None
                else:
                    try:
                        reply = await _litellm.acomplete(step.kwargs)
                    except Exception as exc:
                        reply = exc
                step = loop.send(reply)
        except StopIteration as done:
            result: Result = done.value
            return result
        finally:
            loop.close()

    # -- the shared core -------------------------------------------------------------------------------------

    def _prepare(
        self,
        prompt: str | None,
        messages: Sequence[Mapping[str, Any]] | None,
        model: str | None,
        system: str | None,
        provider: str | None,
        timeout: float | None,
        params: dict[str, Any],
    ) -> tuple[_Plan, list[dict[str, Any]]]:
        cfg = self.config
        reserved = _RESERVED.intersection(params)
        if reserved:
            raise TypeError(f"generate() does not take {', '.join(sorted(reserved))}: the router sets it from the config")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        alias_name = model if model is not None else cfg.defaults.model
        if alias_name is None:
            raise UnknownModelError("(none)", list(cfg.aliases), ())
        alias = cfg.aliases.get(alias_name)
        if alias is None:
            close = difflib.get_close_matches(alias_name, list(cfg.aliases), n=3, cutoff=0.5)
            raise UnknownModelError(alias_name, list(cfg.aliases), close)
        all_targets = cfg.targets(alias_name)
        if provider is not None:
            if provider not in cfg.providers:
                raise UnknownProviderError(
                    provider, alias_name,
                    f"provider {provider!r} is not configured (providers: {', '.join(cfg.providers)})",
                )
            if not any(t.provider == provider for t in all_targets):
                on = sorted({t.provider for t in all_targets})
                raise UnknownProviderError(
                    provider, alias_name,
                    f"alias {alias_name!r} has no target on provider {provider!r} (its targets use: {', '.join(on)})",
                )
        usable, skipped = plan_targets(all_targets, provider)
        msgs = build_messages(prompt, messages, system if system is not None else alias.system)
        plan = _Plan(
            alias=alias_name,
            targets=tuple((t, _litellm.request_kwargs(t, msgs, merge_params(alias, t, params), t.timeout_s)) for t in usable),
            skipped=tuple(skipped),
            deadline_s=timeout if timeout is not None else cfg.defaults.deadline_s,
        )
        return plan, msgs

    def _attempts(self, plan: _Plan, messages: list[dict[str, Any]]) -> _Loop:
        """The attempt loop: yields `_Send`/`_Sleep`, is sent the reply (a response or an exception)."""
        m, alias, clock = self.metrics, plan.alias, self._clock
        retry, fallback_on = self.config.defaults.retry, self.config.defaults.fallback_on
        start = clock()
        deadline = start + plan.deadline_s
        attempts: list[Attempt] = []
        final = "cancelled"  # if the caller goes away mid-call (task cancelled, KeyboardInterrupt)
        m.request_started(alias)
        try:
            for s in plan.skipped:
                self._note_skip(alias, s)
            if not plan.targets:
                final = "no_credentials"
                raise MissingCredentialsError(alias, plan.skipped)
            for i, (target, kwargs) in enumerate(plan.targets):
                has_next = i + 1 < len(plan.targets)
                tries = 0
                while True:
                    remaining = deadline - clock()
                    if remaining <= 0:
                        final = attempts[-1].outcome if attempts else "timeout"
                        raise DeadlineExceededError(alias, attempts, plan.deadline_s)
                    tries += 1
                    t0 = clock()
                    reply = yield _Send({**kwargs, "timeout": min(target.timeout_s, remaining)})
                    took = clock() - t0
                    answer = None
                    if not isinstance(reply, BaseException):
                        try:
                            answer = _litellm.read_response(reply)
                        except _litellm.InvalidResponse as exc:
                            reply = exc
                    if answer is not None:
                        m.attempt(alias, target.provider, target.model, "success", took)
                        attempts.append(Attempt(target.provider, target.model, "success", took))
                        cost, source = price(
                            answer.usage, target, answer.provider_cost,
                            _litellm.price_map_cost(target, answer.usage)
                            if target.pricing is None and answer.provider_cost is None else None,
                        )
                        m.answered(
                            alias, target.provider, target.model, answer.usage.input_tokens,
                            answer.usage.output_tokens, cost, source != "unknown",
                        )
                        final = "success"
                        return Result(
                            text=answer.text, alias=alias, provider=target.provider, model=target.model,
                            usage=answer.usage, cost_usd=cost, cost_source=source, latency_s=clock() - start,
                            attempts=tuple(attempts), skipped=plan.skipped, finish_reason=answer.finish_reason,
                            raw=reply,
                        )
                    scrub(reply, self._secrets)
                    failure = _litellm.classify_error(reply)
                    error = redact(failure.message, self._secrets)
                    m.attempt(alias, target.provider, target.model, failure.outcome, took)
                    attempts.append(Attempt(target.provider, target.model, failure.outcome, took, error, failure.status_code))
                    step = next_step(failure.outcome, tries, retry, fallback_on, has_next)
                    if step is Step.RETRY:
                        delay = backoff_delay(tries, retry, failure.retry_after, self._jitter())
                        if delay < deadline - clock():
                            log.info("%s: %s failed (%s), retry %d in %.2fs", alias, target.key, failure.outcome, tries, delay)
                            if delay > 0:
                                yield _Sleep(delay)
                            continue
                        # Waiting would outlast the deadline: better to move on now.
                        step = Step.FALLBACK if failure.outcome in fallback_on and has_next else Step.FAIL
                    if step is Step.FALLBACK:
                        nxt = plan.targets[i + 1][0]
                        m.fallback(alias, target.provider, nxt.provider, failure.outcome)
                        log.warning("%s: %s failed (%s), falling back to %s", alias, target.key, failure.outcome, nxt.key)
                        break
                    final = failure.outcome
                    log.warning("%s: %s failed (%s): %s", alias, target.key, failure.outcome, error)
                    if failure.outcome in fallback_on:
                        raise AllTargetsFailedError(alias, attempts) from reply
                    raise ProviderError(alias, attempts) from reply
            raise AssertionError("unreachable: the last target either answers or raises")  # pragma: no cover
        finally:
            m.request_finished(alias, final, clock() - start)

    def _note_skip(self, alias: str, s: Skip) -> None:
        self.metrics.skip(alias, s.provider, s.model, s.reason)
        if (s.provider, s.reason) not in self._warned_skips:
            self._warned_skips.add((s.provider, s.reason))
            need = " or ".join(s.env_vars) or "api_key"
            log.warning("provider %r skipped: %s is not set", s.provider, need)
