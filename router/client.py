"""`Router`: the config in force, its reload, and each call as "plan, then drive".

A call is planned on the config snapshot in force when it starts (`router.planner`), then its attempt loop
(`router.loop`, the one place that decides) is driven sync or async (`router.drivers`). The snapshot is
immutable: `reload()` swaps in a new one for the calls that start afterwards, and a call finishes on the one it
started with. No lock is held across a request.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from . import hedge
from .config import RouterConfig, file_sha256, load_config
from .drivers import AsyncStream, Stream, adrive, drive
from .errors import ConfigError
from .health import CircuitStore, KeyStore, MemoryCircuitStore, MemoryKeyStore
from .hooks import Hook, Hooks
from .loop import CallLoop, Context
from .metrics import RouterMetrics
from .planner import CallArgs, Plan, Snapshot, disabled_providers, make_plan
from .plugins import Pool, wire
from .secrets import guard_logs
from .state import shared_state

__all__ = ["AsyncStream", "Router", "Stream"]

log = logging.getLogger("router")


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
        self._user_hooks = tuple(hooks)
        self._pool = Pool()  # the config's hooks and what they share, kept while a snapshot uses them
        self._path: Path | None = None
        self._reload_lock = threading.Lock()
        self._watch_stop: threading.Event | None = None
        self._latencies = hedge.Latencies()  # per target, for hedges timed by a percentile
        self._ctx = Context(
            self.metrics, self._circuits, self._keys, clock, jitter, self._rng, self._latencies, set()
        )
        self._snap = self._snapshot(config)
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
            old_snap, self._snap = self._snap, self._snapshot(config)
            old_snap.retire()  # its hooks are let go of once the calls that started on it end
            # The sha switches first: a scrape that sees this reload counted sees only the new sha in force.
            self.metrics.config_in_force(config.sha256, old.sha256, time.time())
            self.metrics.reload_result(True)
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
        self._pool.close()
        Hooks(self._user_hooks).close()
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
        args = CallArgs(
            prompt, messages, model, system, provider, timeout, key, stream, response_format, tags, cache, params
        )
        plan = self._plan(args)
        return drive(CallLoop(self._ctx, plan).run(), stream, self._sleep)

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
        args = CallArgs(
            prompt, messages, model, system, provider, timeout, key, stream, response_format, tags, cache, params
        )
        plan = self._plan(args)
        return await adrive(CallLoop(self._ctx, plan).run(), stream, self._asleep)

    def explain(self, alias: str | None = None) -> str:
        """The plan a call would follow right now: tiers and weights, what is skipped and why, prices."""
        from .explain import explain

        snap, now = self._snap, self._clock()
        return explain(snap.config, alias, snap.disabled, lambda t: self._circuits.peek(t.key), now)

    @property
    def _hooks(self) -> Hooks:
        """The hooks calls starting now run with."""
        return self._snap.hooks

    def _snapshot(self, config: RouterConfig) -> Snapshot:
        hooks, keys = wire(config, self.metrics, self._pool)

        def release() -> None:
            for key in keys:
                self._pool.release(key)

        all_hooks = Hooks([*hooks, *self._user_hooks])
        secrets = guard_logs(config.secrets())  # scrubbed from every error text and every log line
        return Snapshot(config, disabled_providers(config, os.environ), secrets, all_hooks, release)

    def _plan(self, args: CallArgs) -> Plan:
        """The call's plan on the snapshot in force, which it enters (CallLoop.run leaves it when the call ends)."""
        snap = self._snap
        while not snap.enter():  # released by a reload between the read and the enter: take the newer one
            snap = self._snap
        try:
            return make_plan(snap, args, self._rng)
        except BaseException:
            snap.leave()
            raise


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


