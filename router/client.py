"""`Router`: resolve the alias, plan the targets, run the attempt loop, return a `Result`.

The attempt loop is written once, as a generator that yields what it wants done (send a request, sleep)
and receives the outcome. `generate()` drives it with `litellm.completion` and `time.sleep`, `agenerate()`
with `litellm.acompletion` and `asyncio.sleep`: the two paths differ only in I/O, so they cannot drift.

The config in force is an immutable snapshot. A call reads it once, at its start, and finishes on it;
`reload()` swaps in a new one for the calls that start afterwards. No lock is held across a request.
"""

from __future__ import annotations

import asyncio
import difflib
import logging
import os
import random
import signal
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from . import hedge, structured
from .config import ApiKey, HedgeConfig, RouterConfig, Target, file_sha256, load_config
from .engines import Answer, Chunk, Failure, InvalidResponse, Send, StreamLimits, engine_for, get_engine
from .errors import (
    AllTargetsFailedError,
    ConfigError,
    DeadlineExceededError,
    MissingCredentialsError,
    ProviderError,
    RouterError,
    StreamInterruptedError,
    UnknownModelError,
    UnknownProviderError,
    redact,
    scrub,
)
from .health import STATE_VALUE, CircuitStore, KeyStore, MemoryCircuitStore, MemoryKeyStore
from .hooks import AttemptReport, Call, Hook, Hooks, Reroute, check_tags
from .metrics import RouterMetrics
from .outcomes import outcome as outcome_of
from .plugins import config_hooks
from .policy import (
    Step,
    backoff_delay,
    build_messages,
    merge_params,
    next_step,
    order_tiers,
    plan_targets,
    price,
)
from .state import shared_state
from .streams import StreamState
from .structured import Format, make_format
from .types import Attempt, CostSource, Result, Skip, Usage

log = logging.getLogger("router")

# Params the router sets itself; passing them to generate() would bypass routing or leak around it.
_RESERVED = frozenset(
    {
        "model",
        "messages",
        "api_key",
        "api_base",
        "base_url",
        "extra_headers",
        "max_retries",
        "num_retries",
        "stream_options",
    }
)

DISABLED_ENV = "LLM_ROUTER_DISABLED_PROVIDERS"


@dataclass(frozen=True)
class _Send:
    """The loop asks for one request to be sent (streamed: opened and read to the first text)."""

    send: Send


@dataclass(frozen=True)
class _Stream:
    """The loop hands an opened stream to the caller; it is sent the same state back when the stream ends."""

    state: StreamState


@dataclass(frozen=True)
class _Run:
    """The loop asks for a hook to be run (in a thread under agenerate() when it may block); sent its return
    value, or the exception it raised."""

    fn: Callable[[], Any]
    blocking: bool = False


@dataclass(frozen=True)
class _Sleep:
    """The loop asks to wait before a retry."""

    seconds: float


@dataclass(frozen=True)
class _Launch:
    """The loop asks for a request to be started in the background (a hedged race); it is sent its handle."""

    send: Send


@dataclass(frozen=True)
class _Wait:
    """The loop asks for the next raced request to finish within `seconds`; sent (handle, reply) or None."""

    seconds: float


@dataclass(frozen=True)
class _Cancel:
    """The loop asks for raced requests to be cancelled and closed; sent [(handle, reply or None)], a reply for
    each one that had finished meanwhile."""

    handles: tuple[int, ...]


@dataclass
class _Racing:
    """A request of a hedged race, in flight."""

    target: Target
    send: Send
    key: ApiKey | None
    probe: bool
    t0: float
    hedge: bool


@dataclass(frozen=True)
class _Snapshot:
    """The config in force and what is derived from it, swapped whole on reload."""

    config: RouterConfig
    disabled: frozenset[str]
    secrets: tuple[str, ...]


def _snapshot(config: RouterConfig, env: Mapping[str, str]) -> _Snapshot:
    disabled = frozenset(p.strip() for p in env.get(DISABLED_ENV, "").split(",") if p.strip())
    unknown = disabled - set(config.providers)
    if unknown:
        log.warning("%s names providers not in the config: %s", DISABLED_ENV, ", ".join(sorted(unknown)))
    # Values to scrub from every error text; short literals like "none" are not secrets.
    secrets = tuple(
        v for p in config.providers.values() for k in p.api_keys() if len(v := k.secret.get_secret_value()) >= 6
    )
    return _Snapshot(config, disabled, secrets)


@dataclass(frozen=True)
class _Plan:
    """Everything a call needs, worked out before the first request."""

    snap: _Snapshot
    alias: str
    targets: tuple[tuple[Target, dict[str, Any]], ...]  # in try order, each with its kwargs less timeout and key
    skipped: tuple[Skip, ...]
    deadline_s: float
    pinned_key: str | None
    call: Call
    stream: bool = False
    fmt: Format | None = None
    hedge: HedgeConfig | None = None


_Step = _Send | _Sleep | _Stream | _Run | _Launch | _Wait | _Cancel
_RaceStep = (_Launch, _Wait, _Cancel)
_Loop = Generator[_Step, Any, Result]


class Router:
    """Routes generate() calls over the targets of a config's aliases, with retries, fallback and metrics.

    ``Router(config, registry=...)`` or ``Router.from_yaml(path, watch=True)``. `registry` is the prometheus
    CollectorRegistry to record into (default: prometheus_client's global one); Routers on one registry
    share its metrics. `circuits` and `keys` are the stores of breaker and key-pool state (default: in this
    process). `hooks` plug into each call's life (see `router.hooks`). `sleep`, `asleep`, `jitter` and `rng`
    (weighted tiers) are injectable so tests never wait.
    """

    def __init__(
        self,
        config: RouterConfig,
        *,
        registry: CollectorRegistry | None = None,
        sleep: Callable[[float], None] = time.sleep,
        asleep: Callable[[float], Any] = asyncio.sleep,
        jitter: Callable[[], float] = random.random,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        circuits: CircuitStore | None = None,
        keys: KeyStore | None = None,
        hooks: Sequence[Hook] = (),
    ) -> None:
        self.metrics = RouterMetrics.on(registry, config.metrics.namespace, config.metrics.buckets)
        self._sleep = sleep
        self._asleep = asleep
        self._jitter = jitter
        self._rng = rng or random.Random()
        self._clock = clock
        # config.state: breakers and benched keys shared with other workers and replicas, unless given here
        self._state = (
            shared_state(config.state, self.metrics, clock)
            if config.state.backend != "memory" and (circuits is None or keys is None)
            else None
        )
        self._circuits: CircuitStore = circuits or (self._state.circuits if self._state else MemoryCircuitStore())
        self._keys: KeyStore = keys or (self._state.keys if self._state else MemoryKeyStore())
        self._hooks = Hooks([*config_hooks(config, self.metrics), *hooks])
        self._path: Path | None = None
        self._reload_lock = threading.Lock()
        self._watch_stop: threading.Event | None = None
        self._warned_skips: set[tuple[str, str]] = set()
        self._latencies = hedge.Latencies()  # per target, for hedges timed by a percentile
        self._snap = _snapshot(config, os.environ)
        self.metrics.config_in_force(config.sha256, None, time.time())

    @classmethod
    def from_yaml(
        cls,
        path: str | os.PathLike[str],
        *,
        registry: CollectorRegistry | None = None,
        watch: bool = False,
        poll_s: float = 0.5,
        **kwargs: Any,
    ) -> Router:
        """A Router on the config file at `path` (see `load_config`); `watch=True` reloads it when it changes."""
        r = cls(load_config(path), registry=registry, **kwargs)
        r._path = Path(path)
        if watch:
            r.watch(poll_s)
        return r

    @property
    def config(self) -> RouterConfig:
        """The config in force."""
        return self._snap.config

    def __repr__(self) -> str:
        return f"<Router {self.config.source} aliases={list(self.config.aliases)}>"

    # -- hot reload ----------------------------------------------------------------------------------------

    def reload(self) -> bool:
        """Re-read the config file (and LLM_ROUTER_DISABLED_PROVIDERS); a file that fails validation is rejected
        whole and the last good config stays in force. Calls already under way finish on the config they
        started with. Returns whether the new config was applied."""
        if self._path is None:
            raise RuntimeError("reload() needs a Router made by Router.from_yaml(path)")
        with self._reload_lock:
            try:
                config = load_config(self._path)
            except ConfigError as exc:
                self.metrics.reload_result(False)
                log.error("config reload rejected, keeping the last good config:\n%s", exc)
                return False
            old = self._snap.config
            m = config.metrics
            if (m.namespace, tuple(m.buckets)) != (old.metrics.namespace, tuple(old.metrics.buckets)):
                log.warning("metrics namespace and buckets change at restart only; keeping %r", old.metrics.namespace)
            if config.state != old.state:
                log.warning("the state section changes at restart only; keeping state.backend %s", old.state.backend)
            self._snap = _snapshot(config, os.environ)
            self.metrics.reload_result(True)
            self.metrics.config_in_force(config.sha256, old.sha256, time.time())
            log.info("config reloaded from %s (sha256 %s)", config.source, config.sha256[:12])
            return True

    def watch(self, poll_s: float = 0.5) -> None:
        """Poll the config file every `poll_s` seconds in a daemon thread and reload it when it changes."""
        if self._path is None:
            raise RuntimeError("watch() needs a Router made by Router.from_yaml(path)")
        if self._watch_stop is not None:
            return
        stop = self._watch_stop = threading.Event()
        thread = threading.Thread(
            target=_watch, args=(weakref.ref(self), self._path, poll_s, stop), name="llm-router-watch", daemon=True
        )
        thread.start()

    def close(self) -> None:
        """Stop watching the config file, close the hooks (flushing what they hold) and the shared state store."""
        if self._watch_stop is not None:
            self._watch_stop.set()
            self._watch_stop = None
        self._hooks.close()
        if self._state is not None:
            self._state.close()

    def install_sighup_handler(self) -> None:
        """Reload on SIGHUP (opt-in, for processes that own their signals; main thread only)."""
        ref = weakref.ref(self)

        def on_hup(signum: int, frame: Any) -> None:
            r = ref()
            if r is not None:  # not in the handler itself: the interrupted code may hold the reload lock
                threading.Thread(target=r.reload, name="llm-router-sighup", daemon=True).start()

        signal.signal(signal.SIGHUP, on_hup)

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
        key: str | None = None,
        stream: bool = False,
        response_format: Any = None,
        tags: Mapping[str, str] | None = None,
        cache: bool = True,
        **params: Any,
    ) -> Any:
        """Answer `prompt` (or `messages`) with the alias `model`, falling back over its targets in order.

        Returns a `Result`; with `stream=True`, a `Stream` of text deltas whose `.result` is set when it ends
        (a failure before the first text falls back like any other; one after it raises
        `StreamInterruptedError`). `response_format` (a pydantic model class or a JSON Schema dict) asks for
        JSON and puts the validated value in `Result.parsed`; a reply that does not validate is retried, then
        fallen back from. `system` is prepended unless the messages start with a system message. `provider`
        restricts the call to that provider's targets; `key` pins a named key of the providers' key pools.
        `tags` (str to str, e.g. ``{"tenant": "acme"}``) go to the hooks (ledger, budgets), never to metrics.
        `cache=False` neither reads nor writes the response cache of an alias that has one.
        `timeout` bounds the whole call (default: `defaults.deadline_s`). Other keyword arguments are litellm
        params (temperature, max_tokens, ...) and override the target's and the alias's. Raises a
        `RouterError` subclass when no target answers.
        """
        plan = self._prepare(
            prompt, messages, model, system, provider, timeout, key, stream, response_format, tags, params, cache
        )
        loop = self._attempts(plan)
        handed_over = False
        racer: hedge.SyncRacer | None = None
        try:
            step = next(loop)
            while True:
                if isinstance(step, _Stream):
                    handed_over = True
                    return Stream(loop, step.state)
                if isinstance(step, _Sleep):
                    self._sleep(step.seconds)
                    reply: Any = None
                elif isinstance(step, _Run):
                    reply = _run(step.fn)
                elif isinstance(step, _RaceStep):
                    racer = racer or hedge.SyncRacer()
                    if isinstance(step, _Launch):
                        reply = racer.launch(step.send)
                    elif isinstance(step, _Wait):
                        reply = racer.wait(step.seconds)
                    else:
                        reply = racer.cancel(step.handles)
                else:
                    send = step.send
                    try:
                        engine = engine_for(send.target)
                        reply = engine.open_stream(send) if send.stream else engine.complete(send)
                    except Exception as exc:
                        reply = exc
                step = loop.send(reply)
        except StopIteration as done:
            return Stream.replay(done.value) if plan.stream else done.value  # a stream answered by a hook
        finally:
            if not handed_over:
                loop.close()
            if racer is not None:
                racer.abandon()

    async def agenerate(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Mapping[str, Any]] | None = None,
        model: str | None = None,
        system: str | None = None,
        provider: str | None = None,
        timeout: float | None = None,
        key: str | None = None,
        stream: bool = False,
        response_format: Any = None,
        tags: Mapping[str, str] | None = None,
        cache: bool = True,
        **params: Any,
    ) -> Any:
        """Async twin of `generate()`, for event loops; with `stream=True` it returns an `AsyncStream`."""
        plan = self._prepare(
            prompt, messages, model, system, provider, timeout, key, stream, response_format, tags, params, cache
        )
        loop = self._attempts(plan)
        handed_over = False
        racer: hedge.AsyncRacer | None = None
        try:
            step = next(loop)
            while True:
                if isinstance(step, _Stream):
                    handed_over = True
                    return AsyncStream(loop, step.state)
                if isinstance(step, _Sleep):
                    await self._asleep(step.seconds)
                    reply: Any = None
                elif isinstance(step, _Run):
                    reply = await asyncio.to_thread(_run, step.fn) if step.blocking else _run(step.fn)
                elif isinstance(step, _RaceStep):
                    racer = racer or hedge.AsyncRacer()
                    if isinstance(step, _Launch):
                        reply = racer.launch(step.send)
                    elif isinstance(step, _Wait):
                        reply = await racer.wait(step.seconds)
                    else:
                        reply = await racer.cancel(step.handles)
                else:
                    send = step.send
                    try:
                        engine = engine_for(send.target)
                        reply = await (engine.aopen_stream(send) if send.stream else engine.acomplete(send))
                    except Exception as exc:
                        reply = exc
                step = loop.send(reply)
        except StopIteration as done:
            return AsyncStream.replay(done.value) if plan.stream else done.value
        finally:
            if not handed_over:
                loop.close()
            if racer is not None:
                racer.abandon()

    def explain(self, alias: str | None = None) -> str:
        """The plan a call would follow right now: tiers and weights, what is skipped and why, prices."""
        from .explain import explain

        snap, now = self._snap, self._clock()
        return explain(snap.config, alias, snap.disabled, lambda t: self._circuits.peek(t.key), now)

    # -- the shared core -------------------------------------------------------------------------------------

    def _prepare(
        self,
        prompt: str | None,
        messages: Sequence[Mapping[str, Any]] | None,
        model: str | None,
        system: str | None,
        provider: str | None,
        timeout: float | None,
        key: str | None,
        stream: bool,
        response_format: Any,
        tags: Mapping[str, str] | None,
        params: dict[str, Any],
        cache: bool = True,
    ) -> _Plan:
        snap = self._snap  # read once: the whole call runs on this config
        cfg = snap.config
        reserved = _RESERVED.intersection(params)
        if reserved:
            raise TypeError(
                f"generate() does not take {', '.join(sorted(reserved))}: the router sets it from the config"
            )
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        alias_name = model if model is not None else cfg.defaults.model
        if alias_name is None:
            raise UnknownModelError("(none)", list(cfg.aliases), ())
        alias = cfg.aliases.get(alias_name)
        if alias is None:
            close = difflib.get_close_matches(alias_name, list(cfg.aliases), n=3, cutoff=0.5)
            raise UnknownModelError(alias_name, list(cfg.aliases), close)
        if provider is not None:
            _check_provider(cfg, alias_name, provider)
        if key is not None:
            _check_key(cfg, alias_name, key)
        ordered = order_tiers(cfg.tiers(alias_name), self._rng.random)
        usable, skipped = plan_targets(ordered, provider, snap.disabled, key)
        msgs = build_messages(prompt, messages, system if system is not None else alias.system)
        fmt = make_format(response_format)
        if fmt is not None and stream:
            raise TypeError("generate() takes stream=True or response_format=, not both")
        for engine in {t.engine for t in usable}:  # the first call loads it: not inside any attempt's clock
            get_engine(engine).load()
        targets = tuple((t, _request(t, msgs, merge_params(alias, t, params), stream, fmt)) for t in usable)
        call = Call.new(
            alias_name, msgs, params, check_tags(tags), stream, config=cfg, requests=targets, response_format=fmt
        )
        call.cache = bool(cache)
        deadline_s = timeout if timeout is not None else cfg.defaults.deadline_s
        call.deadline_at = time.monotonic() + deadline_s
        return _Plan(
            snap=snap,
            alias=alias_name,
            targets=targets,
            skipped=tuple(skipped),
            deadline_s=deadline_s,
            pinned_key=key,
            call=call,
            stream=stream,
            fmt=fmt,
            hedge=alias.hedge,
        )

    def _attempts(self, plan: _Plan) -> _Loop:
        """The attempt loop: yields `_Send`/`_Sleep`/`_Run`, is sent the reply (a response or an exception)."""
        m, alias, clock, hooks = self.metrics, plan.alias, self._clock, self._hooks
        start = clock()
        attempts: list[Attempt] = []
        skipped = list(plan.skipped)
        final = "cancelled"  # if the caller goes away mid-call (task cancelled, KeyboardInterrupt)
        result: Result | None = None
        error: BaseException | None = None
        held_open: list[tuple[float, Target, dict[str, Any]]] = []
        planned_at = 0  # attempts made before the plan in force (a Reroute re-plans): its first one may race
        m.request_started(alias)
        try:
            if hooks:
                answered: Result | None = _raised((yield _Run(partial(hooks.call_started, plan.call), hooks.blocking)))
                if answered is not None:
                    final, result = "success", answered
                    return answered
            for s in plan.skipped:
                self._note_skip(alias, s)
            queue = list(plan.targets)
            # held_open: targets found open, kept aside: if all are, the one cooling down first may still be tried.
            try_soonest = plan.snap.config.defaults.circuit.when_all_open == "try_soonest"
            left: tuple[str, str] | None = None  # (provider, reason) of the target just fallen back from
            last_error: BaseException | None = None
            while queue or (held_open and not attempts and try_soonest):
                if queue:
                    target, kwargs = queue.pop(0)
                    admission = self._circuits.admit(target.key, target.circuit, clock())
                    if admission.transition:
                        self._circuit_changed(target, admission.transition)
                    probe = admission.probe
                    if not admission.allowed:
                        held_open.append((admission.open_until, target, kwargs))
                        continue
                else:  # every usable target is open: try the one whose cooldown ends first, as a probe
                    chosen = min(held_open, key=lambda h: h[0])
                    held_open.remove(chosen)
                    _, target, kwargs = chosen
                    probe = True
                key = self._pick_key(target, plan.pinned_key, set())
                if target.keys and key is None:
                    self._skip(alias, skipped, Skip(target.provider, target.model, "keys_benched"))
                    continue
                if left is not None:
                    m.fallback(alias, left[0], target.provider, left[1])
                raced = plan.hedge is not None and len(attempts) == planned_at
                try:
                    if raced:
                        first = (target, kwargs, key, probe)
                        outcome = yield from self._race(plan, start, first, queue, attempts, skipped, held_open)
                    else:
                        outcome = yield from self._on_target(
                            plan, start, target, kwargs, key, probe, attempts, bool(queue)
                        )
                except Reroute as rr:  # a hook (a budget) moves the call to another alias, once
                    if plan.call.rerouted_to is not None or rr.alias not in plan.snap.config.aliases:
                        raise rr.instead from None
                    log.warning("%s: rerouted to alias %r: %s", alias, rr.alias, rr.instead)
                    plan.call.rerouted_to = rr.alias
                    self._skip_open(alias, skipped, held_open)
                    plan, left = self._replan(plan, rr.alias, skipped), None
                    planned_at = len(attempts)
                    queue = list(plan.targets)
                    continue
                if isinstance(outcome, Result):
                    final = "success"
                    self._skip_open(alias, skipped, held_open)
                    result = replace(outcome, skipped=tuple(skipped)) if skipped else outcome
                    return result
                failure, last_error = outcome
                left = (target.provider, failure.outcome)
                retry = plan.snap.config.defaults.retry
                if raced and not queue and outcome_of(failure.outcome).transient and retry.attempts > 1:
                    # A lost race with nothing left to fall back to: the first target gets its usual retries.
                    delay = backoff_delay(1, retry, failure.retry_after, self._jitter())
                    if delay < start + plan.deadline_s - clock():
                        if delay > 0:
                            yield _Sleep(delay)
                        queue.append((target, kwargs))
                        left = None
            self._skip_open(alias, skipped, held_open)
            if attempts:
                raise AllTargetsFailedError(alias, attempts) from last_error
            reason = _no_target_outcome(skipped)
            if reason == "no_credentials":
                final = reason
                raise MissingCredentialsError(alias, skipped)
            raise AllTargetsFailedError(alias, [], reason=f"no target is usable ({reason})", outcome=reason)
        except (ProviderError, AllTargetsFailedError, StreamInterruptedError) as exc:
            final, error = exc.outcome, exc
            raise
        except RouterError as exc:  # MissingCredentialsError, or a hook's refusal (e.g. a budget)
            error = exc
            said = getattr(exc, "outcome", None)
            final = said if isinstance(said, str) else final if final != "cancelled" else "refused"
            raise
        finally:
            self._skip_open(alias, skipped, held_open)
            m.request_finished(alias, final, clock() - start)
            if hooks:
                plan.call.outcome = final
                hooks.call_finished(plan.call, result, error)

    def _replan(self, plan: _Plan, alias_name: str, skipped: list[Skip]) -> _Plan:
        """The call's plan on another alias: its targets, the call's own messages and params (no key pinned)."""
        cfg, call = plan.snap.config, plan.call
        ordered = order_tiers(cfg.tiers(alias_name), self._rng.random)
        usable, passed = plan_targets(ordered, None, plan.snap.disabled, None)
        for s in passed:
            self._skip(plan.alias, skipped, s)
        alias = cfg.aliases[alias_name]
        targets = tuple(
            (t, _request(t, call.messages, merge_params(alias, t, call.params), plan.stream, plan.fmt)) for t in usable
        )
        return replace(plan, targets=targets, skipped=(), pinned_key=None, hedge=alias.hedge)

    def _skip_open(
        self, alias: str, skipped: list[Skip], held_open: list[tuple[float, Target, dict[str, Any]]]
    ) -> None:
        """Count the targets passed over for an open circuit (once the call knows it did not try them)."""
        for _, t, _ in held_open:
            self._skip(alias, skipped, Skip(t.provider, t.model, "circuit_open"))
        held_open.clear()

    def _on_target(
        self,
        plan: _Plan,
        start: float,
        target: Target,
        kwargs: dict[str, Any],
        key: ApiKey | None,
        probe: bool,
        attempts: list[Attempt],
        has_next: bool,
    ) -> Generator[_Step, Any, Result | tuple[Failure, BaseException]]:
        """Attempts on one target, with retries and key rotation: a Result, or the failure to fall back from."""
        m, alias, clock = self.metrics, plan.alias, self._clock
        defaults = plan.snap.config.defaults
        retry, fallback_on = defaults.retry, defaults.fallback_on
        deadline = start + plan.deadline_s
        keys_tried: set[str] = set()
        tries = 0
        while True:
            remaining = deadline - clock()
            if remaining <= 0:
                raise DeadlineExceededError(alias, attempts, plan.deadline_s)
            tries += 1
            limit = min(target.timeout_s, remaining)
            limits = None
            if plan.stream:  # wall-clock bounds: keep-alives and empty deltas reset no timer
                first = min(target.first_token_timeout_s or target.timeout_s, remaining)
                idle = target.stream_idle_timeout_s or target.timeout_s
                limits = StreamLimits(first, idle, remaining)
            if self._hooks:
                plan.call.key_name = key.name if key is not None else None
                plan.call.hedge = False
                hook = partial(self._hooks.before_attempt, plan.call, target, kwargs)
                _raised((yield _Run(hook, self._hooks.blocking)))
            if key is not None:
                keys_tried.add(key.name)
                m.key_used(target.provider, key.name)
            send = Send(target, kwargs, limit, key.secret.get_secret_value() if key is not None else None, limits)
            t0 = clock()
            try:
                reply = yield _Send(send)
            except GeneratorExit:  # the caller went away mid-request: the attempt still counts
                self._attempted(plan, target, "cancelled", clock() - t0, key)
                raise
            if isinstance(reply, StreamState):
                return (yield from self._streamed(plan, start, target, send, reply, t0, probe, attempts, key))
            took = clock() - t0
            answer, parsed, reply = _read(reply, plan.fmt)
            if answer is not None:
                return self._succeeded(plan, start, target, took, key, probe, attempts, answer, parsed, reply)
            scrub(reply, plan.snap.secrets)
            failure = engine_for(target).classify(reply)
            error = redact(failure.message, plan.snap.secrets)
            self._attempted(plan, target, failure.outcome, took, key, attempts, error, failure.status_code)

            # In a key pool, a key refused (401/402) is benched, and a refused or rate-limited request goes
            # out again at once with the next key, before any retry or fallback.
            pooled = key is not None and sum(k.usable for k in target.keys) > 1
            if pooled and key is not None:
                if outcome_of(failure.outcome).key_fault:
                    self._keys.bench(target.provider, key.name, clock() + target.circuit.cooldown_s)
                    log.warning(
                        "%s: key %r of provider %r benched after %s", alias, key.name, target.provider, failure.outcome
                    )
                if plan.pinned_key is None and outcome_of(failure.outcome).rotate_key:
                    nxt = self._pick_key(target, None, keys_tried)
                    if nxt is not None:
                        key, tries = nxt, tries - 1
                        continue
            # A key refused while the pool has others is that key's fault, not the target's.
            health = None if pooled and outcome_of(failure.outcome).key_fault else _health_signal(failure.outcome)
            self._record_health(target, health, probe)
            step = next_step(failure.outcome, tries, retry, fallback_on, has_next)
            if step is Step.RETRY:
                delay = backoff_delay(tries, retry, failure.retry_after, self._jitter())
                # A probe gets one request; a breaker that just opened, or a wait that would outlast the
                # deadline, means moving on now.
                if (
                    not probe
                    and delay < deadline - clock()
                    and self._circuits.admit(target.key, target.circuit, clock()).allowed
                ):
                    log.info("%s: %s failed (%s), retry %d in %.2fs", alias, target.key, failure.outcome, tries, delay)
                    if delay > 0:
                        yield _Sleep(delay)
                    continue
                step = Step.FALLBACK if failure.outcome in fallback_on and has_next else Step.FAIL
            if step is Step.FALLBACK:
                log.warning("%s: %s failed (%s), falling back", alias, target.key, failure.outcome)
                return failure, reply
            log.warning("%s: %s failed (%s): %s", alias, target.key, failure.outcome, error)
            if failure.outcome in fallback_on:
                raise AllTargetsFailedError(alias, attempts) from reply
            raise ProviderError(alias, attempts) from reply

    def _streamed(
        self,
        plan: _Plan,
        start: float,
        target: Target,
        send: Send,
        state: StreamState,
        t0: float,
        probe: bool,
        attempts: list[Attempt],
        key: ApiKey | None,
    ) -> Generator[_Step, Any, Result]:
        """A stream past its first text: hand it to the caller, then account for it when it ends or breaks."""
        m, alias, clock = self.metrics, plan.alias, self._clock
        p, model = target.provider, target.model
        m.first_token(alias, p, model, clock() - t0)
        if plan.hedge is not None:
            self._latencies.add(target.key, True, clock() - t0)
        try:
            yield _Stream(state)  # the caller reads the stream; we are resumed when it ends or breaks
        except GeneratorExit:  # the caller stopped reading (closed the stream, or dropped it)
            took = clock() - t0
            usage = state.reported_usage or engine_for(target).count_tokens(target, send.body["messages"], state.text)
            cost, source = self._bill(alias, target, usage, None)
            answered = (state.model, state.finish_reason)
            self._attempted(plan, target, "cancelled", took, key, billed=(usage, cost, source), answered=answered)
            raise
        took = clock() - t0
        usage = state.reported_usage or engine_for(target).count_tokens(target, send.body["messages"], state.text)
        cost, source = self._bill(alias, target, usage, state.provider_cost)
        billed, answered = (usage, cost, source), (state.model, state.finish_reason)
        if state.error is None and state.finished:
            self._attempted(plan, target, "success", took, key, attempts, billed=billed, answered=answered)
            self._record_health(target, False, probe)
            return Result(
                text=state.text,
                alias=alias,
                provider=p,
                model=model,
                usage=usage,
                cost_usd=cost,
                cost_source=source,
                latency_s=clock() - start,
                attempts=tuple(attempts),
                finish_reason=state.finish_reason,
                raw=None,
                tool_calls=state.tool_call_list(),
            )
        if state.error is not None:
            scrub(state.error, plan.snap.secrets)
            error = redact(engine_for(target).classify(state.error).message, plan.snap.secrets)
        else:
            error = state.unfinished_reason
        self._attempted(
            plan, target, "stream_interrupted", took, key, attempts, error, billed=billed, answered=answered
        )
        m.interrupted(alias, p, model)
        self._record_health(target, True, probe)
        log.warning("%s: stream from %s broke off after %d characters: %s", alias, target.key, len(state.text), error)
        raise StreamInterruptedError(alias, attempts, state.text, usage, cost) from state.error

    # -- hedged requests -------------------------------------------------------------------------------------

    def _race(
        self,
        plan: _Plan,
        start: float,
        first: tuple[Target, dict[str, Any], ApiKey | None, bool],
        queue: list[tuple[Target, dict[str, Any]]],
        attempts: list[Attempt],
        skipped: list[Skip],
        held_open: list[tuple[float, Target, dict[str, Any]]],
    ) -> Generator[_Step, Any, Result | tuple[Failure, BaseException]]:
        """A hedged first attempt: the first target, and while no answer has come, the next ones, `after` apart.

        The first success wins and the rest are cancelled and closed. A failure leaves the others racing; when
        every raced request has failed, the call falls back to the targets not raced, the usual way.
        """
        assert plan.hedge is not None
        cfg, m, alias, clock = plan.hedge, self.metrics, plan.alias, self._clock
        fallback_on = plan.snap.config.defaults.fallback_on
        deadline = start + plan.deadline_s
        seen = (
            self._latencies.percentile(first[0].key, plan.stream, cfg.after_percentile)
            if cfg.after_percentile is not None
            else None
        )
        delay = hedge.hedge_delay(cfg.after_s, cfg.after_percentile, seen)
        racing: dict[int, _Racing] = {}
        last: tuple[Failure, BaseException] | None = None
        extra = 0
        try:
            handle, entry = yield from self._launch(plan, deadline, *first, False)
            racing[handle] = entry
            next_at = None if delay is None else clock() + delay
            while racing:
                now = clock()
                if now >= deadline:
                    yield from self._cancel_race(plan, racing, attempts, "timeout")
                    raise DeadlineExceededError(alias, attempts, plan.deadline_s)
                hedging = next_at is not None and extra < cfg.max_extra
                if hedging and next_at is not None and now >= next_at:
                    nxt = self._hedge_target(plan, queue, skipped, held_open, first)
                    if nxt is None:
                        next_at = None
                        continue
                    try:
                        handle, entry = yield from self._launch(plan, deadline, *nxt, True)
                    except RouterError:  # a hook refused the hedge: the race is off
                        yield from self._cancel_race(plan, racing, attempts)
                        raise
                    racing[handle] = entry
                    extra += 1
                    next_at = now + (delay or 0.0)
                    continue
                wait = deadline - now
                if hedging and next_at is not None:
                    wait = min(wait, next_at - now)
                event = yield _Wait(wait)
                if event is None:
                    continue
                handle, reply = event
                entry = racing.pop(handle)
                took = clock() - entry.t0
                target = entry.target
                if isinstance(reply, StreamState):
                    yield from self._cancel_race(plan, racing, attempts)
                    if entry.hedge:
                        m.hedge_won(alias, target.provider, target.model)
                    return (
                        yield from self._streamed(
                            plan, start, target, entry.send, reply, entry.t0, entry.probe, attempts, entry.key
                        )
                    )
                answer, parsed, reply = _read(reply, plan.fmt)
                if answer is not None:
                    also = yield from self._cancel_race(plan, racing, attempts)
                    if entry.hedge:
                        m.hedge_won(alias, target.provider, target.model)
                    return self._succeeded(
                        plan, start, target, took, entry.key, entry.probe, attempts, answer, parsed, reply, also
                    )
                scrub(reply, plan.snap.secrets)
                failure = engine_for(target).classify(reply)
                error = redact(failure.message, plan.snap.secrets)
                stop = failure.outcome not in fallback_on
                if stop:  # the rest are cancelled first, so the call's outcome is this failure's
                    yield from self._cancel_race(plan, racing, attempts)
                self._attempted(plan, target, failure.outcome, took, entry.key, attempts, error, failure.status_code)
                self._record_health(target, _health_signal(failure.outcome), entry.probe)
                log.warning("%s: %s failed (%s) in a hedged race", alias, target.key, failure.outcome)
                if stop:
                    raise ProviderError(alias, attempts) from reply
                last = (failure, reply)
        except GeneratorExit:  # the caller went away mid-race: every request still counts
            for entry in racing.values():
                self._attempted(plan, entry.target, "cancelled", clock() - entry.t0, entry.key, attempts)
            raise
        assert last is not None
        return last

    def _launch(
        self,
        plan: _Plan,
        deadline: float,
        target: Target,
        kwargs: dict[str, Any],
        key: ApiKey | None,
        probe: bool,
        is_hedge: bool,
    ) -> Generator[_Step, Any, tuple[int, _Racing]]:
        """Start one raced request: its handle and what the race keeps of it."""
        remaining = deadline - self._clock()
        limit = min(target.timeout_s, remaining)
        limits = None
        if plan.stream:  # as in _on_target: wall-clock bounds that keep-alives and empty deltas do not reset
            first = min(target.first_token_timeout_s or target.timeout_s, remaining)
            idle = target.stream_idle_timeout_s or target.timeout_s
            limits = StreamLimits(first, idle, remaining)
        if self._hooks:
            plan.call.key_name = key.name if key is not None else None
            plan.call.hedge = is_hedge
            _raised((yield _Run(partial(self._hooks.before_attempt, plan.call, target, kwargs), self._hooks.blocking)))
        if key is not None:
            self.metrics.key_used(target.provider, key.name)
        send = Send(target, kwargs, limit, key.secret.get_secret_value() if key is not None else None, limits)
        if is_hedge:
            self.metrics.hedged(plan.alias, target.provider, target.model)
            log.info("%s: no answer yet, hedging on %s", plan.alias, target.key)
        handle = yield _Launch(send)
        return handle, _Racing(target, send, key, probe, self._clock(), is_hedge)

    def _hedge_target(
        self,
        plan: _Plan,
        queue: list[tuple[Target, dict[str, Any]]],
        skipped: list[Skip],
        held_open: list[tuple[float, Target, dict[str, Any]]],
        first: tuple[Target, dict[str, Any], ApiKey | None, bool],
    ) -> tuple[Target, dict[str, Any], ApiKey | None, bool] | None:
        """The next target to hedge on: the next one admitted with a key, else the first again (not a probe)."""
        while queue:
            target, kwargs = queue.pop(0)
            admission = self._circuits.admit(target.key, target.circuit, self._clock())
            if admission.transition:
                self._circuit_changed(target, admission.transition)
            if not admission.allowed:
                held_open.append((admission.open_until, target, kwargs))
                continue
            key = self._pick_key(target, plan.pinned_key, set())
            if target.keys and key is None:
                self._skip(plan.alias, skipped, Skip(target.provider, target.model, "keys_benched"))
                continue
            return target, kwargs, key, admission.probe
        target, kwargs, _, probe = first
        key = self._pick_key(target, plan.pinned_key, set())
        if probe or (target.keys and key is None):
            return None
        return target, kwargs, key, False

    def _cancel_race(
        self, plan: _Plan, racing: dict[int, _Racing], attempts: list[Attempt], cut: str = "cancelled"
    ) -> Generator[_Step, Any, float]:
        """Cancel and close the requests still racing; count each (`cut`: the outcome of one cut off), and bill
        any that answered meanwhile."""
        if not racing:
            return 0.0
        also = 0.0
        done = yield _Cancel(tuple(racing))
        for handle, reply in done:
            e = racing.pop(handle)
            took = self._clock() - e.t0
            outcome, error, status, billed = cut, None, None, None
            answered: tuple[str | None, str | None] = (None, None)
            if isinstance(reply, Answer):  # it answered too: the provider bills it
                outcome, answered = "success", (reply.model, reply.finish_reason)
                billed = (reply.usage, *self._bill(plan.alias, e.target, reply.usage, reply.provider_cost))
            if isinstance(reply, StreamState):  # it had sent text: what came is billed
                engine = engine_for(e.target)
                usage = reply.reported_usage or engine.count_tokens(e.target, e.send.body["messages"], reply.text)
                billed = (usage, *self._bill(plan.alias, e.target, usage, reply.provider_cost))
                answered = (reply.model, reply.finish_reason)
            elif isinstance(reply, BaseException) and not isinstance(reply, asyncio.CancelledError):
                scrub(reply, plan.snap.secrets)
                failure = engine_for(e.target).classify(reply)
                outcome, status = failure.outcome, failure.status_code
                error = redact(failure.message, plan.snap.secrets)
            if billed is not None:
                also += billed[1]
            if outcome == cut:  # at least this slow: keeps the tail in the percentile
                self._latencies.add(e.target.key, plan.stream, took)
            self._attempted(plan, e.target, outcome, took, e.key, attempts, error, status, billed, answered)
        racing.clear()
        return also

    def _succeeded(
        self,
        plan: _Plan,
        start: float,
        target: Target,
        took: float,
        key: ApiKey | None,
        probe: bool,
        attempts: list[Attempt],
        answer: Answer,
        parsed: Any,
        reply: Any,
        also_billed: float = 0.0,
    ) -> Result:
        """An answered request: bill it, count it, close its breaker, and make the call's Result (`also_billed`:
        what the other requests of a hedged race cost)."""
        cost, source = self._bill(plan.alias, target, answer.usage, answer.provider_cost)
        billed, answered = (answer.usage, cost, source), (answer.model, answer.finish_reason)
        self._attempted(plan, target, "success", took, key, attempts, billed=billed, answered=answered)
        self._record_health(target, False, probe)
        return Result(
            text=answer.text,
            alias=plan.alias,
            provider=target.provider,
            model=target.model,
            usage=answer.usage,
            cost_usd=cost + also_billed,
            cost_source=source,
            latency_s=self._clock() - start,
            attempts=tuple(attempts),
            finish_reason=answer.finish_reason,
            parsed=parsed,
            raw=reply,
            tool_calls=answer.tool_calls,
        )

    def _attempted(
        self,
        plan: _Plan,
        target: Target,
        outcome: str,
        took: float,
        key: ApiKey | None,
        attempts: list[Attempt] | None = None,
        error: str | None = None,
        status_code: int | None = None,
        billed: tuple[Usage, float, CostSource] | None = None,
        answered: tuple[str | None, str | None] = (None, None),
    ) -> None:
        """One request ended: count it, add it to the call's attempts, tell the hooks (`answered`: the response's
        model and finish reason)."""
        self.metrics.attempt(plan.alias, target.provider, target.model, outcome, took)
        if plan.hedge is not None and outcome == "success" and not plan.stream:
            self._latencies.add(target.key, False, took)
        attempt = Attempt(target.provider, target.model, outcome, took, error, status_code)
        if attempts is not None:
            attempts.append(attempt)
        if self._hooks:
            usage, cost, source = billed if billed is not None else (None, None, None)
            name = key.name if key is not None else None
            report = AttemptReport(target, attempt, name, usage, cost, source, *answered)
            self._hooks.attempt_finished(plan.call, report)

    def _bill(self, alias: str, target: Target, usage: Usage, provider_cost: float | None) -> tuple[float, CostSource]:
        """Price a usage (config, provider-reported, litellm's map, unknown) and count its tokens and cost."""
        map_cost = None
        if target.pricing is None and provider_cost is None:
            map_cost = engine_for(target).price_map_cost(target, usage)
        cost, source = price(usage, target, provider_cost, map_cost)
        self.metrics.answered(
            alias, target.provider, target.model, usage.input_tokens, usage.output_tokens, cost, source != "unknown"
        )
        return cost, source

    def _pick_key(self, target: Target, pinned: str | None, tried: set[str]) -> ApiKey | None:
        if not target.keys:
            return None
        if pinned is not None:
            return next((k for k in target.keys if k.name == pinned and k.name not in tried), None)
        return self._keys.pick(target.provider, target.keys, self._clock(), frozenset(tried))

    def _record_health(self, target: Target, failed: bool | None, probe: bool) -> None:
        to = self._circuits.record(target.key, target.circuit, self._clock(), failed, probe)
        if to is not None:
            self._circuit_changed(target, to)

    def _circuit_changed(self, target: Target, to: str) -> None:
        self.metrics.circuit(target.provider, target.model, to, STATE_VALUE[to], True)
        log.warning("circuit of %s is now %s", target.key, to.replace("_", "-"))

    def _skip(self, alias: str, skipped: list[Skip], s: Skip) -> None:
        skipped.append(s)
        self._note_skip(alias, s)

    def _note_skip(self, alias: str, s: Skip) -> None:
        self.metrics.skip(alias, s.provider, s.model, s.reason)
        if s.reason == "no_credentials" and (s.provider, s.reason) not in self._warned_skips:
            self._warned_skips.add((s.provider, s.reason))
            need = " or ".join(s.env_vars) or "api_key"
            log.warning("provider %r skipped: %s is not set", s.provider, need)


def _read(reply: Any, fmt: Format | None) -> tuple[Answer | None, Any, Any]:
    """A reply's answer and parsed value; an unusable one becomes the InvalidResponse it is (answer None)."""
    if not isinstance(reply, Answer):
        return None, None, reply
    try:
        parsed = structured.parse(reply.text, fmt) if fmt is not None else None
    except InvalidResponse as exc:
        return None, None, exc
    return reply, parsed, reply.raw


def _run(fn: Callable[[], Any]) -> Any:
    """Run a hook for the loop: its return value, or the exception it raised (the loop re-raises it)."""
    try:
        return fn()
    except Exception as exc:
        return exc


def _raised(reply: Any) -> Any:
    """A `_Run` reply: raise it if the hook raised, else hand it back."""
    if isinstance(reply, BaseException):
        raise reply
    return reply


def _request(
    target: Target, messages: list[dict[str, Any]], params: dict[str, Any], stream: bool, fmt: Format | None
) -> dict[str, Any]:
    """A target's litellm kwargs, less timeout and key: streaming options, structured-output request."""
    if stream:
        params = {**params, "stream": True, "stream_options": {"include_usage": True}}
    if fmt is not None:
        if engine_for(target).supports_schema(target):
            params = {**params, **structured.request_params(fmt, True)}
        else:
            messages = structured.with_instruction(messages, fmt)
    return {**params, "messages": messages}


def _health_signal(outcome: str) -> bool | None:
    """Whether a failure counts against the target's breaker (None: it says nothing about its health)."""
    return True if outcome_of(outcome).against_target else None


def _no_target_outcome(skipped: Sequence[Skip]) -> str:
    reasons = {s.reason for s in skipped}
    for reason in ("no_credentials", "key_not_in_pool", "keys_benched", "disabled", "circuit_open"):
        if reason in reasons:
            return reason
    return "other"


def _check_provider(cfg: RouterConfig, alias: str, provider: str) -> None:
    if provider not in cfg.providers:
        raise UnknownProviderError(
            provider, alias, f"provider {provider!r} is not configured (providers: {', '.join(cfg.providers)})"
        )
    on = sorted({t.provider for t in cfg.targets(alias)})
    if provider not in on:
        raise UnknownProviderError(
            provider,
            alias,
            f"alias {alias!r} has no target on provider {provider!r} (its targets use: {', '.join(on)})",
        )


def _check_key(cfg: RouterConfig, alias: str, key: str) -> None:
    names = sorted({k.name for t in cfg.targets(alias) for k in t.keys if k.named})
    if key not in names:
        raise UnknownProviderError(
            "",
            alias,
            f"no provider of alias {alias!r} has a key named {key!r} (named keys: {', '.join(names) or 'none'})",
        )


def _watch(ref: weakref.ReferenceType[Router], path: Path, poll_s: float, stop: threading.Event) -> None:
    """Poll `path`; reload the router when the file's content changes. Ends with the router or `stop`."""
    last: tuple[int, int, int] | None = None  # the first poll compares contents: an edit made before it counts
    while not stop.wait(poll_s):
        now = _stat(path)
        if now == last:
            continue
        last = now
        r = ref()
        if r is None:
            return
        digest = file_sha256(path)  # None: mid-replace or removed, and the next poll looks again
        if digest is not None and digest != r.config.sha256:
            r.reload()
        del r


def _stat(path: Path) -> tuple[int, int, int]:
    try:
        st = path.stat()
    except OSError:
        return (0, 0, 0)
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class _Ended:
    """The exhausted source of a replayed stream, for both `Stream` and `AsyncStream`."""

    def __next__(self) -> Any:
        raise StopIteration

    async def __anext__(self) -> Any:
        raise StopAsyncIteration

    def provider_finished(self) -> bool:
        """A replayed answer was a finished one."""
        return True


def _pieces(text: str, size: int = 24) -> list[str]:
    """`text` in deltas of about `size` characters, cut after spaces, that join back to it."""
    out: list[str] = []
    while len(text) > size:
        cut = text.rfind(" ", 0, size) + 1 or size
        out.append(text[:cut])
        text = text[cut:]
    if text:
        out.append(text)
    return out


class _StreamBase:
    """What `Stream` and `AsyncStream` share: the content already read, and handing the end back to the loop."""

    def __init__(self, loop: _Loop | None, state: StreamState) -> None:
        self._loop = loop
        self._answer: Result | None = None
        self._state = state
        self._pending = list(state.pending)  # the content read while deciding this target would do
        self._done = False
        self.result: Result | None = None

    @property
    def text(self) -> str:
        """The text received so far."""
        return self._state.text

    @classmethod
    def replay(cls, result: Result) -> Any:
        """A stream of an answer already made (a cache hit): its text in pieces, `.result` set at the end."""
        state = StreamState(_Ended())
        state.parts = _pieces(result.text)
        state.pending = [Chunk(text=p) for p in state.parts]
        state.finish_reason = result.finish_reason
        stream = cls(None, state)
        stream._answer = result
        return stream

    def _finish(self, error: BaseException | None) -> None:
        # The loop accounts for the stream: it returns the Result, or raises StreamInterruptedError.
        self._done = True
        self._state.error = error
        if self._loop is None:  # a replay: the call is already accounted for
            self.result = self._answer
            return
        try:
            self._loop.send(self._state)
        except StopIteration as done:
            self.result = done.value

    def _abandon(self) -> bool:
        if self._done:
            return False
        self._done = True
        return True


class Stream(_StreamBase):
    """The text deltas of a streamed answer, as they come. When it ends, `.result` holds the `Result`.

    Use it as an iterator (and, to stop early, `close()` it or use it in a `with` block); a stream that breaks
    after text has been yielded raises `StreamInterruptedError`, carrying the text so far. `events()` gives the
    same stream as `router.engines.Chunk`s, tool-call deltas included.
    """

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> str:
        while (chunk := self._next_content()) is not None:
            if chunk.text:
                return chunk.text
        raise StopIteration

    def events(self) -> Iterator[Chunk]:
        """Each chunk that carries content (text or tool-call deltas), as it comes."""
        while (chunk := self._next_content()) is not None:
            yield chunk

    def _next_content(self) -> Chunk | None:
        if self._pending:
            return self._pending.pop(0)
        while not self._done:
            try:
                chunk = self._state.next_chunk()
            except StopIteration:
                self._finish(None)
                break
            except Exception as exc:
                self._finish(exc)
                break
            if self._state.feed(chunk):
                return chunk
        return None

    def close(self) -> None:
        """Stop reading; the attempt and the call are counted as cancelled."""
        if self._abandon():
            self._state.close()
            if self._loop is not None:
                self._loop.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncStream(_StreamBase):
    """Async twin of `Stream`: `async for delta in stream`, then `stream.result`; `events()` as Stream's."""

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> str:
        while (chunk := await self._next_content()) is not None:
            if chunk.text:
                return chunk.text
        raise StopAsyncIteration

    async def events(self) -> AsyncIterator[Chunk]:
        """Each chunk that carries content (text or tool-call deltas), as it comes."""
        while (chunk := await self._next_content()) is not None:
            yield chunk

    async def _next_content(self) -> Chunk | None:
        if self._pending:
            return self._pending.pop(0)
        while not self._done:
            try:
                chunk = await self._state.anext_chunk()
            except StopAsyncIteration:
                self._finish(None)
                break
            except Exception as exc:
                self._finish(exc)
                break
            if self._state.feed(chunk):
                return chunk
        return None

    async def aclose(self) -> None:
        """Stop reading; the attempt and the call are counted as cancelled."""
        if self._abandon():
            await self._state.aclose()
            if self._loop is not None:
                self._loop.close()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
