"""Shadow traffic: a sampled share of an alias's answered calls, sent again to candidate targets in the background.

An alias with ``shadow: {targets: [...], percent: 5, max_in_flight: 8}`` has, for that share of its answered calls,
the request the answering target was sent (as the hooks rewrote it: system prompt, response format, tools and
params included; a stream's as a plain request) sent to each shadow target once the primary has answered (a
stream: once it has ended well). The caller never waits for a shadow and never sees its answer or its error:
`ShadowHook.call_finished` only draws the sample and hands the work to an event loop in a thread of its own
(`router.background.own_loop`: a loop of its own, so that a shadow never holds up the requests sync callers send
on the background loop). What is compared, per shadow request:

    outcome, duration        `llm_router_shadow_requests_total{alias, provider, model, outcome}`, `..._duration_seconds`
    tokens, cost             `llm_router_shadow_tokens_total`, `llm_router_shadow_cost_usd_total`
    agreement                with the primary's answer, 0 to 1 (`agreement()`): structured output and tool calls by
                             parsed equality (1 or 0), text by the Jaccard similarity of the two answers' words,
                             a rough signal, not a quality judgement; `llm_router_shadow_agreement`
    a ledger row             marked with the primary call's id (`shadow_of`), its agreement and how it was measured,
                             so `llm-router shadow-report` pairs them across workers and restarts

Bounds and safety:
- `max_in_flight` shadow requests per alias in one process; a sampled one beyond it is skipped and counted
  (`llm_router_shadow_skipped_total{reason="in_flight"}`), as are those of a tenant opted out by `skip_tags`,
  a target with no key or switched off, and those sampled while the router closes;
- one request per shadow target: no retry, no fallback, no circuit breaker, no key benching (a candidate's
  failures never touch the primary's health state);
- budgets that scope a shadow request (by the call's alias and tags, the target's provider, the key) reserve
  and settle it like any request, in the same database, and may refuse it: it is skipped and counted
  (`reason="budget"`), never the primary, which was answered already;
- a shadow's answer is never cached (it goes through no cache), and its request is never traced;
- `Router.close()`, and the exit of a process (atexit, which a gunicorn worker runs), waits at most
  `CLOSE_WAIT_S` (2 s) for the shadows under way, then cancels them: each is still counted and has its ledger
  row, with outcome `cancelled`. A reload never waits: shadows under way finish on what they started with.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import json
import logging
import os
import random
import re
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from .. import structured
from ..background import own_loop, run_on
from ..engines import Answer, Failure, engine_for
from ..engines import Send as EngineSend
from ..errors import RouterError
from ..hooks import AttemptReport, Call, Hook
from ..planner import DISABLED_ENV
from ..policy import price
from ..types import Attempt
from .ledger import SHADOW_MARK

if TYPE_CHECKING:
    from ..config import ApiKey, RouterConfig, Target
    from ..metrics import RouterMetrics
    from ..structured import Format
    from ..types import Result
    from . import Pool

log = logging.getLogger("router")

CLOSE_WAIT_S = 2.0  # Router.close() and process exit wait this long for shadows under way, then cancel them...
CANCEL_WAIT_S = 0.5  # ...and this long for the cancelled ones to be counted and written
# A shadow starts at a random moment within this long after its primary answered, not at once: its CPU work (the
# engine preparing a request takes milliseconds) then rarely lands on the caller's own, which at that moment is
# finishing the call, and competes with it for the interpreter lock.
START_SPREAD_S = 0.05
_SENT = "shadow.sent"  # Call.data key: target key -> the request body it was sent
_NOT_PLAIN = frozenset({"stream", "stream_options"})  # a streamed primary's shadow is a plain request


# -- pure decisions ---------------------------------------------------------------------------------------------


def sampled(percent: float, pinned: bool | None, draw: Callable[[], float]) -> bool:
    """Whether a call is shadowed: as `generate(shadow=...)` pinned it, else by a draw in [0, 1) under `percent`."""
    if pinned is not None:
        return pinned
    return percent >= 100 or (percent > 0 and draw() * 100 < percent)


def opted_out(skip_tags: Mapping[str, Sequence[str]], tags: Mapping[str, str]) -> bool:
    """Whether the call's tags opt it out of shadowing (`skip_tags: {tenant: [acme]}`)."""
    return any(name in tags and tags[name] in values for name, values in skip_tags.items())


def unusable(target: Target, disabled: frozenset[str]) -> str | None:
    """Why a shadow target gets no request now (`disabled`, `no_credentials`), or None."""
    if not target.enabled or target.provider in disabled:
        return "disabled"
    if not target.has_credentials:
        return "no_credentials"
    return None


def plain_request(body: Mapping[str, Any]) -> dict[str, Any]:
    """The request body for a shadow: the primary's, as a plain (not streamed) request."""
    return {k: v for k, v in body.items() if k not in _NOT_PLAIN}


_WORD = re.compile(r"\w+")


def text_similarity(a: str, b: str) -> float:
    """Jaccard similarity of two texts' sets of lower-cased words: 1 the same words, 0 none in common (two empty
    texts: 1). A rough signal of how alike two answers are, not of which is better."""
    wa, wb = set(_WORD.findall(a.lower())), set(_WORD.findall(b.lower()))
    if not wa and not wb:
        return 1.0
    return len(wa & wb) / len(wa | wb)


def tool_signature(tool_calls: Sequence[Mapping[str, Any]]) -> list[str]:
    """Tool calls as comparable values: each one's name and parsed arguments, in any order (ids left out)."""
    out = []
    for call in tool_calls:
        fn = call.get("function") or {}
        args = fn.get("arguments")
        try:
            value = json.loads(args) if isinstance(args, str) else args
        except ValueError:
            value = args
        out.append(json.dumps([fn.get("name"), value], sort_keys=True, default=str))
    return sorted(out)


@dataclass(frozen=True)
class Primary:
    """What the primary answered, kept to compare each shadow's answer with."""

    call_id: str
    text: str
    parsed: Any = None
    tool_calls: tuple[Mapping[str, Any], ...] = ()
    structured: bool = False  # the call asked for structured output (response_format=)


def agreement(primary: Primary, text: str, parsed: Any, tool_calls: Sequence[Mapping[str, Any]]) -> tuple[float, str]:
    """How far a shadow's answer agrees with the primary's, 0 to 1, and how that was measured: `tools` (the same
    tool calls: 1, else 0), `parsed` (structured output: equal parsed values 1, else 0) or `text`
    (`text_similarity`)."""
    if primary.tool_calls or tool_calls:
        return float(tool_signature(primary.tool_calls) == tool_signature(tool_calls)), "tools"
    if primary.structured:
        return float(primary.parsed == parsed), "parsed"
    return text_similarity(primary.text, text), "text"


def disabled_now(env: Mapping[str, str]) -> frozenset[str]:
    """The providers LLM_ROUTER_DISABLED_PROVIDERS switches off."""
    return frozenset(p.strip() for p in env.get(DISABLED_ENV, "").split(",") if p.strip())


# -- the hook ---------------------------------------------------------------------------------------------------


@dataclass
class _Job:
    """One shadow request: where, what, and what it is compared with and recorded in."""

    alias: str
    target: Target
    body: dict[str, Any]
    key: ApiKey | None
    call: Call  # the shadow's own call, as the ledger and the budgets see it
    primary: Primary
    fmt: Format | None
    ledger: Hook | None
    budgets: Hook | None
    borrowed: tuple[Hashable, ...]  # pool keys of the ledger and budgets, given back when the job ends
    start_after_s: float = 0.0


class ShadowHook(Hook):
    """Sends a sampled share of answered calls to their alias's shadow targets (see the module docstring).

    One hook serves every config snapshot while any alias has a shadow: the call's own config says which targets
    and how much, so a reload that edits a shadow takes effect at the next call and the in-flight counts carry
    over. `rng` draws the sample (seed it for a reproducible one)."""

    def __init__(
        self,
        metrics: RouterMetrics,
        pool: Pool,
        key_of: Callable[[str, RouterConfig], Hashable | None],
        rng: random.Random | None = None,
    ) -> None:
        self.metrics = metrics
        self.pool = pool
        self.key_of = key_of
        self.rng = rng or random.Random()
        self._spread = random.Random()  # when each shadow starts (apart from `rng`, which only draws the sample)
        self._cond = threading.Condition()
        self._in_flight: Counter[str] = Counter()  # per alias, in this process
        self._futures: set[concurrent.futures.Future[Any]] = set()
        self._closed = False
        self._pid = os.getpid()
        self._warned: set[tuple[str, str, str]] = set()
        self._keys: tuple[RouterConfig, tuple[Hashable | None, Hashable | None]] | None = None
        self._ledger_seen: int | None = None
        self._at_exit = partial(_close_at_exit, weakref.ref(self))
        atexit.register(self._at_exit)  # after the ledger's: atexit runs it first, so the rows get written

    def before_attempt(self, call: Call, target: Target, request: Mapping[str, Any]) -> None:
        if call.shadow is False or call.config is None:
            return
        alias = call.config.aliases.get(call.alias)
        if alias is not None and alias.shadow is not None:
            call.data.setdefault(_SENT, {})[target.key] = request  # the body as every hook rewrote it

    def call_finished(self, call: Call, result: Result | None, error: BaseException | None) -> None:
        sent = call.data.pop(_SENT, None)
        cfg = call.config
        if result is None or not sent or result.cached or cfg is None:
            return
        body = sent.get(f"{result.provider}/{result.model}")
        alias = cfg.aliases.get(call.alias)
        if body is None or alias is None or alias.shadow is None:
            return
        shadow = alias.shadow
        if not sampled(shadow.percent, call.shadow, self.rng.random):
            return
        targets = cfg.shadow_targets(call.alias)
        if opted_out(shadow.skip_tags, call.tags):
            for t in targets:
                self.metrics.shadow_skip(call.alias, t.provider, t.model, "opted_out")
            return
        structured_output = call.response_format is not None
        primary = Primary(call.id, result.text, result.parsed, tuple(result.tool_calls), structured_output)
        plain = plain_request(body)
        disabled = disabled_now(os.environ)
        for t in targets:
            reason = unusable(t, disabled) or self._take_slot(call.alias, shadow.max_in_flight)
            if reason is not None:
                self.metrics.shadow_skip(call.alias, t.provider, t.model, reason)
                continue
            try:
                self._launch(call, t, plain, primary)
            except BaseException:
                self._give_slot(call.alias)
                raise

    def close(self) -> None:
        """No more shadows; when the Router closes, wait for those under way (at most CLOSE_WAIT_S)."""
        self._stop(wait=self.pool.closing)
        if self.pool.closing:
            atexit.unregister(self._at_exit)

    def in_flight(self, alias: str | None = None) -> int:
        """Shadow requests under way in this process (of `alias`, or of all)."""
        with self._cond:
            return self._in_flight[alias] if alias is not None else sum(self._in_flight.values())

    def wait(self, timeout: float = 10.0) -> bool:
        """Wait until no shadow request is under way; whether that happened within `timeout` seconds."""
        with self._cond:
            return self._cond.wait_for(lambda: not any(self._in_flight.values()), timeout)

    # -- starting and ending a shadow request --------------------------------------------------------------

    def _take_slot(self, alias: str, limit: int) -> str | None:
        """Count one more shadow of `alias` under way; or why not (`closing`, `in_flight`)."""
        with self._cond:
            if os.getpid() != self._pid:  # a forked worker: the parent's shadows do not run here
                self._pid, self._in_flight, self._futures = os.getpid(), Counter(), set()
            if self._closed:
                return "closing"
            if self._in_flight[alias] >= limit:
                return "in_flight"
            self._in_flight[alias] += 1
            return None

    def _give_slot(self, alias: str) -> None:
        with self._cond:
            self._in_flight[alias] -= 1
            if self._in_flight[alias] <= 0:
                del self._in_flight[alias]
            self._cond.notify_all()

    def _launch(self, call: Call, target: Target, body: dict[str, Any], primary: Primary) -> None:
        cfg = call.config
        assert cfg is not None
        borrowed: list[Hashable] = []
        hooks: list[Hook | None] = []
        for key in self._plugin_keys(cfg):  # borrowed now, while the call's snapshot still holds them
            hook = self.pool.borrow(key) if key is not None else None
            if hook is not None:
                borrowed.append(key)
            hooks.append(hook)
        ledger, budgets = hooks
        if ledger is not None and id(ledger) != self._ledger_seen:
            # A ledger built after this hook (a reload changed it) registered its exit flush later: run ours first.
            self._ledger_seen = id(ledger)
            atexit.unregister(self._at_exit)
            atexit.register(self._at_exit)
        scall = Call(
            f"{call.id}~{target.key}",
            call.alias,
            body.get("messages") or [],
            {},
            call.tags,
            False,
            time.time(),
            config=cfg,
            response_format=call.response_format,
        )
        scall.data[SHADOW_MARK] = (call.id, None, None)
        key = next((k for k in target.keys if k.usable), None)
        fmt = call.response_format
        start_after = self._spread.uniform(0.0, START_SPREAD_S)
        job = _Job(call.alias, target, body, key, scall, primary, fmt, ledger, budgets, tuple(borrowed), start_after)
        self.metrics.shadow_running(call.alias, 1)
        fut = run_on(own_loop("llm-router-shadow"), self._run(job))
        with self._cond:
            self._futures.add(fut)
        fut.add_done_callback(self._forget)

    def _forget(self, fut: concurrent.futures.Future[Any]) -> None:
        with self._cond:
            self._futures.discard(fut)

    def _plugin_keys(self, cfg: RouterConfig) -> tuple[Hashable | None, Hashable | None]:
        """The pool keys of the ledger and the budgets of `cfg` (worked out once per config)."""
        known = self._keys
        if known is not None and known[0] is cfg:
            return known[1]
        keys = (self.key_of("ledger", cfg), self.key_of("budgets", cfg))
        self._keys = (cfg, keys)
        return keys

    async def _run(self, job: _Job) -> None:
        try:
            try:
                await asyncio.sleep(job.start_after_s)
            except asyncio.CancelledError:  # the router closed before it was sent
                self.metrics.shadow_skip(job.alias, job.target.provider, job.target.model, "closing")
                raise
            if job.budgets is not None and not await self._reserve(job):
                return
            await self._request(job)
        except Exception:  # a bug here must not cost the slot or the borrowed hooks
            log.exception("shadow of %s to %s failed in the router", job.alias, job.target.key)
        finally:
            self._end(job)

    async def _reserve(self, job: _Job) -> bool:
        """Whether the budgets in scope let the shadow request through (they reserve its worst case)."""
        assert job.budgets is not None
        t = job.target
        job.call.key_name = job.key.name if job.key is not None else None
        job.call.deadline_at = time.monotonic() + t.timeout_s
        try:
            await asyncio.to_thread(job.budgets.before_attempt, job.call, t, job.body)
        except RouterError:  # refused (a Reroute too: a shadow is never moved to another alias), or out of time
            self.metrics.shadow_skip(job.alias, t.provider, t.model, "budget")
            return False
        except asyncio.CancelledError:  # the router closed before it was sent (_end gives back any hold made)
            self.metrics.shadow_skip(job.alias, t.provider, t.model, "closing")
            raise
        return True

    async def _request(self, job: _Job) -> None:
        """Send the one request, then record it: however it ended, it is counted and has its ledger row."""
        t = job.target
        engine = engine_for(t)
        secret = job.key.secret.get_secret_value() if job.key is not None else None
        job.call.started_at = time.time()
        t0 = time.monotonic()
        try:
            engine.load()
            answer = await asyncio.wait_for(engine.acomplete(EngineSend(t, job.body, t.timeout_s, secret)), t.timeout_s)
        except asyncio.CancelledError:
            self._record(job, "cancelled", time.monotonic() - t0)
            raise
        except Exception as exc:
            self._record(job, "", time.monotonic() - t0, failure=engine.classify(exc))
            return
        took = time.monotonic() - t0
        parsed = None
        if job.fmt is not None:
            try:
                parsed = structured.parse(answer.text, job.fmt)
            except Exception as exc:  # billed, but not the answer asked for
                self._record(job, "", took, failure=engine.classify(exc), answer=answer)
                return
        self._record(job, "success", took, answer=answer, parsed=parsed)

    def _record(
        self,
        job: _Job,
        outcome: str,
        took: float,
        *,
        failure: Failure | None = None,
        answer: Answer | None = None,
        parsed: Any = None,
    ) -> None:
        """Count a shadow request, settle its budgets, compare its answer, and give the ledger its row."""
        t, call = job.target, job.call
        outcome = failure.outcome if failure is not None else outcome
        usage = cost = source = None
        if answer is not None:
            usage = answer.usage
            map_cost = None
            if t.pricing is None and answer.provider_cost is None:
                map_cost = engine_for(t).price_map_cost(t, usage)
            cost, source = price(usage, t, answer.provider_cost, map_cost)
        status = failure.status_code if failure is not None else None
        attempt = Attempt(t.provider, t.model, outcome, took, None, status)  # no message: it may quote a request
        key_name = job.key.name if job.key is not None else None
        report = AttemptReport(
            t,
            attempt,
            key_name,
            usage,
            cost,
            source,
            answer.model if answer is not None else None,
            answer.finish_reason if answer is not None else None,
        )
        if job.budgets is not None:
            job.budgets.attempt_finished(call, report)
        agreed = None
        if outcome == "success" and answer is not None:
            agreed = agreement(job.primary, answer.text, parsed, answer.tool_calls)
        call.outcome = outcome
        call.data[SHADOW_MARK] = (job.primary.call_id, *(agreed or (None, None)))
        if job.ledger is not None:
            job.ledger.attempt_finished(call, report)
            job.ledger.call_finished(call, None, None)
        tokens = (usage.input_tokens, usage.output_tokens) if usage is not None else None
        self.metrics.shadow_sent(job.alias, t.provider, t.model, outcome, took, tokens, cost or 0.0)
        if agreed is not None:
            self.metrics.shadow_agreed(job.alias, t.provider, t.model, agreed[0])
        if outcome not in ("success", "cancelled") and (job.alias, t.key, outcome) not in self._warned:
            self._warned.add((job.alias, t.key, outcome))
            log.warning(
                "%s: a shadow request to %s failed (%s); callers are not affected (logged once; "
                "llm_router_shadow_requests_total counts them)",
                job.alias,
                t.key,
                outcome,
            )

    def _end(self, job: _Job) -> None:
        """The shadow request is over: give back its budget holds left, its borrowed hooks and its slot."""
        if job.budgets is not None:
            job.budgets.call_finished(job.call, None, None)  # a reservation still being made gives its hold back
        for key in job.borrowed:  # the last holder of a ledger a reload replaced closes it: not on the event loop
            self.pool.release(key, in_thread=True)
        self.metrics.shadow_running(job.alias, -1)
        self._give_slot(job.alias)

    def _stop(self, wait: bool) -> None:
        """Take no more shadows; `wait`: give those under way CLOSE_WAIT_S, then cancel them."""
        with self._cond:
            self._closed = True
            if not wait or self._cond.wait_for(lambda: not any(self._in_flight.values()), CLOSE_WAIT_S):
                return
            futures = list(self._futures)
        for fut in futures:
            fut.cancel()  # cancels its task on the shadow loop, which records it as cancelled
        with self._cond:
            self._cond.wait_for(lambda: not any(self._in_flight.values()), CANCEL_WAIT_S)
        if not futures:
            return
        log.warning(
            "%d shadow request(s) still under way after %.1fs were cancelled (counted, with outcome cancelled)",
            len(futures),
            CLOSE_WAIT_S,
        )

    def __repr__(self) -> str:
        return f"<ShadowHook in_flight={self.in_flight()}>"


def _close_at_exit(ref: weakref.ReferenceType[ShadowHook]) -> None:
    hook = ref()
    if hook is not None:
        hook._stop(wait=True)


def shadow_hook(hooks: Sequence[Hook]) -> ShadowHook | None:
    """The ShadowHook among a Router's hooks, if any."""
    return next((h for h in hooks if isinstance(h, ShadowHook)), None)


__all__ = [
    "CLOSE_WAIT_S",
    "Primary",
    "ShadowHook",
    "agreement",
    "opted_out",
    "plain_request",
    "sampled",
    "shadow_hook",
    "text_similarity",
    "tool_signature",
    "unusable",
]
