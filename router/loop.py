"""The attempt loop: the one place that decides what a call does next.

It is written once, without I/O, as a generator (`CallLoop.run()`) that yields the effects it wants and is sent
their outcome: send a request (`SendStep`), hand an opened stream to the caller (`StreamStep`), run a hook
(`RunStep`), wait before a retry (`SleepStep`), and for a hedged race start a request in the background
(`LaunchStep`), wait for the next one to finish (`WaitStep`) or cancel the rest (`CancelStep`). `router.drivers`
carries the steps out, sync or async: the two paths differ only in I/O, so they cannot drift.

`CallLoop` holds one call's state (its plan, attempts, skipped targets, the targets held back by an open breaker);
`Context` what a Router lends every call (metrics, breaker and key stores, clock, jitter, latencies).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, NoReturn

from . import hedge, structured
from .config import ApiKey, Target
from .engines import Answer, Failure, InvalidResponse, Send, StreamLimits, engine_for
from .errors import (
    AllTargetsFailedError,
    DeadlineExceededError,
    HookFailedError,
    MissingCredentialsError,
    ProviderError,
    RouterError,
    StreamInterruptedError,
    redact,
    scrub,
)
from .health import STATE_VALUE, CircuitStore, KeyStore
from .hooks import AttemptReport, Reroute
from .metrics import RouterMetrics
from .outcomes import outcome as outcome_of
from .planner import Plan, replan
from .policy import Step, backoff_delay, next_step, price
from .streams import StreamState
from .types import Attempt, CostSource, Result, Skip, Usage

log = logging.getLogger("router")


# -- the steps the loop yields ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SendStep:
    """Send one request (streamed: open it and read to its first content); sent the Answer, the StreamState, or
    the exception."""

    send: Send


@dataclass(frozen=True)
class StreamStep:
    """Hand an opened stream to the caller; the loop is sent the same state back when the stream ends. `rewrite`:
    what each text delta (then "" at the end, `final` True) passes through on its way to the caller."""

    state: StreamState
    rewrite: Callable[[str, bool], str] | None = None


@dataclass(frozen=True)
class RunStep:
    """Run a hook (in a thread under agenerate() when it may block, for at most `timeout_s`); sent its return
    value, or the exception it raised (`HookTimedOut` when the time ran out)."""

    fn: Callable[[], Any]
    blocking: bool = False
    timeout_s: float | None = None


@dataclass(frozen=True)
class SleepStep:
    """Wait before a retry."""

    seconds: float


@dataclass(frozen=True)
class LaunchStep:
    """Start a request in the background (a hedged race); sent its handle."""

    send: Send


@dataclass(frozen=True)
class WaitStep:
    """Wait up to `seconds` for the next raced request to finish; sent (handle, reply) or None."""

    seconds: float


@dataclass(frozen=True)
class CancelStep:
    """Cancel and close raced requests; sent [(handle, reply or None)], a reply for each one that had finished."""

    handles: tuple[int, ...]


Effect = SendStep | SleepStep | StreamStep | RunStep | LaunchStep | WaitStep | CancelStep
RACE_STEPS = (LaunchStep, WaitStep, CancelStep)
Loop = Generator[Effect, Any, Result]


class HookTimedOut(Exception):
    """A blocking hook outlasted what was left of the call's deadline (the driver stopped waiting for it)."""


# -- what the loop works with -----------------------------------------------------------------------------------


@dataclass
class Context:
    """What a Router lends every call: where metrics go, the breaker and key stores, the clock and the dice."""

    metrics: RouterMetrics
    circuits: CircuitStore
    keys: KeyStore
    clock: Callable[[], float]
    jitter: Callable[[], float]
    rng: random.Random
    latencies: hedge.Latencies
    warned_skips: set[tuple[str, str]]


Chosen = tuple[Target, Mapping[str, Any], ApiKey | None, bool]  # a target, its request body, the key, a probe?


@dataclass
class InFlight:
    """One request sent (or raced): where, with what, and when."""

    target: Target
    send: Send
    key: ApiKey | None
    probe: bool
    t0: float
    hedge: bool = False
    took: float = 0.0

    def done(self, clock: Callable[[], float]) -> InFlight:
        """Note when it ended."""
        self.took = clock() - self.t0
        return self


@dataclass(frozen=True)
class Answered:
    """A usable answer: the engine's Answer, the structured value when one was asked for, the raw response."""

    answer: Answer
    parsed: Any
    raw: Any


@dataclass(frozen=True)
class Bill:
    """What a request was billed, and what the provider said of its answer."""

    usage: Usage
    cost: float
    source: CostSource
    model: str | None = None
    finish_reason: str | None = None


def read(reply: Any, fmt: structured.Format | None) -> Answered | BaseException:
    """A reply made usable (parsed when structured), or the exception it is (InvalidResponse if it does not parse)."""
    if not isinstance(reply, Answer):
        return reply if isinstance(reply, BaseException) else InvalidResponse(f"not an answer: {type(reply)}")
    try:
        parsed = structured.parse(reply.text, fmt) if fmt is not None else None
    except InvalidResponse as exc:
        return exc
    return Answered(reply, parsed, reply.raw)


def raised(reply: Any) -> Any:
    """A RunStep reply: raise it if the hook raised, else hand it back."""
    if isinstance(reply, BaseException):
        raise reply
    return reply


def health_signal(outcome: str) -> bool | None:
    """Whether a failure counts against the target's breaker (None: it says nothing about its health)."""
    return True if outcome_of(outcome).against_target else None


def no_target_outcome(skipped: list[Skip]) -> str:
    """The outcome of a call that had no target to try: the first reason by precedence."""
    reasons = {s.reason for s in skipped}
    for reason in ("no_credentials", "key_not_in_pool", "keys_benched", "disabled", "circuit_open"):
        if reason in reasons:
            return reason
    return "other"


# -- the loop ---------------------------------------------------------------------------------------------------


class CallLoop:
    """One call's attempts and what they found: run() is the loop (see the module docstring)."""

    def __init__(self, ctx: Context, plan: Plan) -> None:
        self.ctx = ctx
        self.plan = plan
        self.hooks = plan.snap.hooks
        self.alias = plan.alias
        self.start = ctx.clock()
        self.deadline = self.start + plan.deadline_s
        self.attempts: list[Attempt] = []
        self.skipped = list(plan.skipped)
        self.queue: list[tuple[Target, Mapping[str, Any]]] = []
        # Targets found open, kept aside: if all are, the one cooling down first may still be tried.
        self.held_open: list[tuple[float, Target, Mapping[str, Any]]] = []
        self.planned_at = 0  # attempts made before the plan in force (a Reroute re-plans): its first may race
        self.final = "cancelled"  # if the caller goes away mid-call (task cancelled, KeyboardInterrupt)
        self.result: Result | None = None
        self.error: BaseException | None = None

    def run(self) -> Loop:
        """The call, start to end: hooks first, then the targets; counted and told to the hooks however it ends."""
        m = self.ctx.metrics
        m.request_started(self.alias)
        snap = self.plan.snap
        try:
            answered = None
            if self.hooks:
                self._rewrite_requests()
                answered = yield from self._hook(self.hooks.call_started, self.plan.call)
            if answered is None:
                for s in self.plan.skipped:
                    self._note_skip(s)
                answered = yield from self._targets()
            self.final, self.result = "success", answered
            return answered
        except (ProviderError, AllTargetsFailedError, StreamInterruptedError) as exc:
            self.final, self.error = exc.outcome, exc
            raise
        except RouterError as exc:  # MissingCredentialsError, or a hook's refusal (e.g. a budget)
            self.error = exc
            said = getattr(exc, "outcome", None)
            self.final = said if isinstance(said, str) else self.final if self.final != "cancelled" else "refused"
            raise
        finally:
            self._skip_open()
            m.request_finished(self.alias, self.final, self.ctx.clock() - self.start)
            if self.hooks:
                self.plan.call.outcome = self.final
                self.hooks.call_finished(self.plan.call, self.result, self.error)
            snap.leave()  # entered when the call was planned (Router._plan)

    def _targets(self) -> Generator[Effect, Any, Result]:
        """Try the plan's targets in order (retries, fallbacks, hedges, one reroute): the Result, or raise."""
        self.queue = list(self.plan.targets)
        try_soonest = self.plan.snap.config.defaults.circuit.when_all_open == "try_soonest"
        left: tuple[str, str] | None = None  # (provider, reason) of the target just fallen back from
        last_error: BaseException | None = None
        while self.queue or (self.held_open and not self.attempts and try_soonest):
            chosen = self._next_target()
            if chosen is None:
                continue
            target = chosen[0]
            if left is not None:
                self.ctx.metrics.fallback(self.alias, left[0], target.provider, left[1])
            raced = self.plan.hedge is not None and len(self.attempts) == self.planned_at
            try:
                outcome = yield from (self._race(chosen) if raced else self._on_target(chosen, bool(self.queue)))
            except Reroute as rr:  # a hook (a budget) moves the call to another alias, once
                self._reroute(rr)
                left = None
                continue
            if isinstance(outcome, Result):
                self._skip_open()
                return replace(outcome, skipped=tuple(self.skipped)) if self.skipped else outcome
            failure, last_error = outcome
            left = (target.provider, failure.outcome)
            if raced and (yield from self._retry_lost_race(chosen, failure)):
                left = None
        self._skip_open()
        self._nothing_answered(last_error)

    def _nothing_answered(self, last_error: BaseException | None) -> NoReturn:
        if self.attempts:
            raise AllTargetsFailedError(self.alias, self.attempts) from last_error
        reason = no_target_outcome(self.skipped)
        if reason == "no_credentials":
            self.final = reason
            raise MissingCredentialsError(self.alias, self.skipped)
        raise AllTargetsFailedError(self.alias, [], reason=f"no target is usable ({reason})", outcome=reason)

    def _next_target(self) -> Chosen | None:
        """The next target to try, admitted by its breaker and with a key; None: look again."""
        if self.queue:
            return self._admitted(*self.queue.pop(0))
        # every usable target is open: try the one whose cooldown ends first, as a probe
        chosen = min(self.held_open, key=lambda h: h[0])
        self.held_open.remove(chosen)
        _, target, body = chosen
        key = self._pick_key(target, self.plan.pinned_key, set())
        if target.keys and key is None:
            self._skip(Skip(target.provider, target.model, "keys_benched"))
            return None
        return target, body, key, True

    def _admitted(self, target: Target, body: Mapping[str, Any]) -> Chosen | None:
        """`target` with a key if its breaker lets a request through (else held open) and a key is free."""
        admission = self.ctx.circuits.admit(target.key, target.circuit, self.ctx.clock())
        if admission.transition:
            self._circuit_changed(target, admission.transition)
        if not admission.allowed:
            self.held_open.append((admission.open_until, target, body))
            return None
        key = self._pick_key(target, self.plan.pinned_key, set())
        if target.keys and key is None:
            self._skip(Skip(target.provider, target.model, "keys_benched"))
            return None
        return target, body, key, admission.probe

    def _reroute(self, rr: Reroute) -> None:
        """Re-plan the call on the alias a hook asked for (once; else what the hook would have raised)."""
        plan = self.plan
        if plan.call.rerouted_to is not None or rr.alias not in plan.snap.config.aliases:
            raise rr.instead from None
        log.warning("%s: rerouted to alias %r: %s", self.alias, rr.alias, rr.instead)
        plan.call.rerouted_to = rr.alias
        self._skip_open()
        self.plan, passed = replan(plan, rr.alias, self.ctx.rng)
        for s in passed:
            self._skip(s)
        self._rewrite_requests(into_call=False)
        self.planned_at = len(self.attempts)
        self.queue = list(self.plan.targets)

    def _rewrite_requests(self, into_call: bool = True) -> None:
        """The plan's request bodies as the hooks rewrite them: what every later hook and the provider see."""
        hooks, call = self.hooks, self.plan.call
        if not hooks.request_rewriters:
            return
        targets = tuple((t, hooks.rewrite_request(call, t, body)) for t, body in self.plan.targets)
        self.plan = replace(self.plan, targets=targets)
        if into_call:
            call.requests = targets

    def _retry_lost_race(self, chosen: Chosen, failure: Failure) -> Generator[Effect, Any, bool]:
        """A lost race with nothing left to fall back to: the first target gets its usual retries."""
        retry = self.plan.snap.config.defaults.retry
        if self.queue or not outcome_of(failure.outcome).transient or retry.attempts <= 1:
            return False
        delay = backoff_delay(1, retry, failure.retry_after, self.ctx.jitter())
        if delay >= self.deadline - self.ctx.clock():
            return False
        if delay > 0:
            yield SleepStep(delay)
        self.queue.append((chosen[0], chosen[1]))
        return True

    # -- one target: attempts, retries, key rotation -------------------------------------------------------------

    def _on_target(self, chosen: Chosen, has_next: bool) -> Generator[Effect, Any, Result | tuple[Failure, Any]]:
        """Attempts on one target, with retries and key rotation: a Result, or the failure to fall back from."""
        target, body, key, probe = chosen
        keys_tried: set[str] = set()
        tries = 0
        while True:
            tries += 1
            send = yield from self._send_for(target, body, key, False)
            if key is not None:
                keys_tried.add(key.name)
            flight = InFlight(target, send, key, probe, self.ctx.clock())
            try:
                reply = yield SendStep(send)
            except GeneratorExit:  # the caller went away mid-request: the attempt still counts
                self._attempted(flight.done(self.ctx.clock), "cancelled", listed=False)
                raise
            if isinstance(reply, StreamState):
                return (yield from self._streamed(flight, reply))
            flight.done(self.ctx.clock)
            answered = read(reply, self.plan.fmt)
            if isinstance(answered, Answered):
                return self._succeeded(flight, answered)
            failure = self._classify(target, answered)
            self._attempted(flight, failure.outcome, failure=failure)
            rotated = self._rotated_key(flight, failure, keys_tried)
            if rotated is not None:
                key, tries = rotated, tries - 1
                continue
            step = yield from self._decide(flight, failure, tries, has_next, answered)
            if step is Step.FALLBACK:
                return failure, answered

    def _send_for(
        self, target: Target, body: Mapping[str, Any], key: ApiKey | None, is_hedge: bool
    ) -> Generator[Effect, Any, Send]:
        """The request to send to `target` now: the hooks' say (before_attempt), then its bounds and key."""
        plan = self.plan
        if self.deadline - self.ctx.clock() <= 0:
            raise DeadlineExceededError(self.alias, self.attempts, plan.deadline_s)
        if self.hooks:
            plan.call.key_name = key.name if key is not None else None
            plan.call.hedge = is_hedge
            yield from self._hook(self.hooks.before_attempt, plan.call, target, body)
        remaining = self.deadline - self.ctx.clock()
        if remaining <= 0:
            raise DeadlineExceededError(self.alias, self.attempts, plan.deadline_s)
        limits = None
        if plan.stream:  # wall-clock bounds: keep-alives and empty deltas reset no timer
            first = min(target.first_token_timeout_s or target.timeout_s, remaining)
            idle = target.stream_idle_timeout_s or target.timeout_s
            limits = StreamLimits(first, idle, remaining)
        if key is not None:
            self.ctx.metrics.key_used(target.provider, key.name)
        secret = key.secret.get_secret_value() if key is not None else None
        return Send(target, body, min(target.timeout_s, remaining), secret, limits)

    def _hook(self, method: Callable[..., Any], *args: Any) -> Generator[Effect, Any, Any]:
        """Run a hook method as a step, bounded by what is left of the deadline when it may block."""
        timeout = max(0.0, self.deadline - self.ctx.clock()) if self.hooks.blocking else None
        reply = yield RunStep(partial(method, *args), self.hooks.blocking, timeout)
        if isinstance(reply, HookTimedOut):
            raise DeadlineExceededError(self.alias, self.attempts, self.plan.deadline_s) from reply
        return raised(reply)

    def _rotated_key(self, flight: InFlight, failure: Failure, tried: set[str]) -> ApiKey | None:
        """In a key pool, a key refused (401/402) is benched, and a refused or rate-limited request goes out again
        at once with the next key, before any retry or fallback: that key, or None. Records the target's health
        when the request does not go out again."""
        target, key, what = flight.target, flight.key, outcome_of(failure.outcome)
        pooled = key is not None and sum(k.usable for k in target.keys) > 1
        if pooled and key is not None:
            if what.key_fault:
                self.ctx.keys.bench(target.provider, key.name, self.ctx.clock() + target.circuit.cooldown_s)
                log.warning(
                    "%s: key %r of provider %r benched after %s", self.alias, key.name, target.provider, what.name
                )
            if self.plan.pinned_key is None and what.rotate_key:
                nxt = self._pick_key(target, None, tried)
                if nxt is not None:
                    return nxt
        # A key refused while the pool has others is that key's fault, not the target's.
        self._record_health(target, None if pooled and what.key_fault else health_signal(failure.outcome), flight.probe)
        return None

    def _decide(
        self, flight: InFlight, failure: Failure, tries: int, has_next: bool, cause: BaseException
    ) -> Generator[Effect, Any, Step]:
        """After a failed attempt: retry (after its backoff), fall back, or raise the call's error."""
        defaults, target, clock = self.plan.snap.config.defaults, flight.target, self.ctx.clock
        retry, fallback_on = defaults.retry, defaults.fallback_on
        step = next_step(failure.outcome, tries, retry, fallback_on, has_next)
        if step is Step.RETRY:
            delay = backoff_delay(tries, retry, failure.retry_after, self.ctx.jitter())
            # A probe gets one request; a breaker that just opened, or a wait that would outlast the deadline,
            # means moving on now.
            if (
                not flight.probe
                and delay < self.deadline - clock()
                and self.ctx.circuits.admit(target.key, target.circuit, clock()).allowed
            ):
                log.info("%s: %s failed (%s), retry %d in %.2fs", self.alias, target.key, failure.outcome, tries, delay)
                if delay > 0:
                    yield SleepStep(delay)
                return Step.RETRY
            step = Step.FALLBACK if failure.outcome in fallback_on and has_next else Step.FAIL
        if step is Step.FALLBACK:
            log.warning("%s: %s failed (%s), falling back", self.alias, target.key, failure.outcome)
            return step
        log.warning("%s: %s failed (%s): %s", self.alias, target.key, failure.outcome, failure.message)
        if failure.outcome == "timeout" and clock() >= self.deadline:  # cut at the call's deadline, not its own
            raise DeadlineExceededError(self.alias, self.attempts, self.plan.deadline_s) from cause
        if failure.outcome in fallback_on:
            raise AllTargetsFailedError(self.alias, self.attempts) from cause
        raise ProviderError(self.alias, self.attempts) from cause

    # -- answers: streams, successes, and what each request is counted and billed as ---------------------------

    def _streamed(self, flight: InFlight, state: StreamState) -> Generator[Effect, Any, Result]:
        """A stream past its first content: hand it to the caller, then account for it when it ends or breaks."""
        m, target, clock = self.ctx.metrics, flight.target, self.ctx.clock
        m.first_token(self.alias, target.provider, target.model, clock() - flight.t0)
        if self.plan.hedge is not None:
            self.ctx.latencies.add((self.alias, target.key), True, clock() - flight.t0)
        rewrite = partial(self.hooks.rewrite_text, self.plan.call) if self.hooks.text_rewriters else None
        try:
            yield StreamStep(state, rewrite)  # the caller reads the stream; we are resumed when it ends or breaks
        except (GeneratorExit, HookFailedError) as stopped:  # the caller stopped reading, or a rewrite failed
            bill = self._stream_bill(flight.done(clock), state, None)
            self._attempted(flight, "cancelled", bill=bill, listed=isinstance(stopped, HookFailedError))
            raise
        bill = self._stream_bill(flight.done(clock), state, state.provider_cost)
        if state.error is None and state.finished:
            self._attempted(flight, "success", bill=bill)
            self._record_health(target, False, flight.probe)
            return self._result(target, state.shown_text, bill, tool_calls=state.tool_call_list())
        error = state.error
        text = self._classify(target, error).message if error is not None else state.unfinished_reason
        failure = Failure("stream_interrupted", None, None, text)
        self._attempted(flight, "stream_interrupted", bill=bill, failure=failure)
        m.interrupted(self.alias, target.provider, target.model)
        self._record_health(target, True, flight.probe)
        log.warning(
            "%s: stream from %s broke off after %d characters: %s", self.alias, target.key, len(state.text), text
        )
        shown = state.shown_text
        raise StreamInterruptedError(self.alias, self.attempts, shown, bill.usage, bill.cost) from state.error

    def _succeeded(self, flight: InFlight, answered: Answered, also_billed: float = 0.0) -> Result:
        """An answered request: bill it, count it, close its breaker, and make the call's Result (`also_billed`:
        what the other requests of a hedged race cost)."""
        answer = answered.answer
        bill = self._answer_bill(flight.target, answer)
        self._attempted(flight, "success", bill=bill)
        self._record_health(flight.target, False, flight.probe)
        text, parsed = answer.text, answered.parsed
        if self.hooks.text_rewriters:
            text, parsed = self._rewritten(text, parsed)
        return self._result(
            flight.target, text, bill, also_billed, parsed=parsed, raw=answered.raw, tool_calls=answer.tool_calls
        )

    def _rewritten(self, text: str, parsed: Any) -> tuple[str, Any]:
        """An answer's text as the hooks rewrite it, and a structured answer parsed again from that text."""
        text = self.hooks.rewrite_text(self.plan.call, text, True)
        if self.plan.fmt is None:
            return text, parsed
        try:
            return text, structured.parse(text, self.plan.fmt)
        except InvalidResponse as exc:
            raise HookFailedError("(the text rewrites)", "rewrite_text") from exc

    def _result(self, target: Target, text: str, bill: Bill, also_billed: float = 0.0, **more: Any) -> Result:
        return Result(
            text=text,
            alias=self.alias,
            provider=target.provider,
            model=target.model,
            usage=bill.usage,
            cost_usd=bill.cost + also_billed,
            cost_source=bill.source,
            latency_s=self.ctx.clock() - self.start,
            attempts=tuple(self.attempts),
            finish_reason=bill.finish_reason,
            **more,
        )

    def _attempted(
        self, flight: InFlight, outcome: str, *, bill: Bill | None = None, failure: Failure | None = None,
        listed: bool = True,
    ) -> None:  # fmt: skip
        """One request ended: count it, add it to the call's attempts (`listed`), tell the hooks."""
        target, took = flight.target, flight.took
        self.ctx.metrics.attempt(self.alias, target.provider, target.model, outcome, took)
        if self.plan.hedge is not None and outcome == "success" and not self.plan.stream:
            self.ctx.latencies.add((self.alias, target.key), False, took)
        error, status = (failure.message, failure.status_code) if failure is not None else (None, None)
        attempt = Attempt(target.provider, target.model, outcome, took, error, status)
        if listed:
            self.attempts.append(attempt)
        if self.hooks:
            name = flight.key.name if flight.key is not None else None
            report = AttemptReport(target, attempt, name)
            if bill is not None:
                report = AttemptReport(
                    target, attempt, name, bill.usage, bill.cost, bill.source, bill.model, bill.finish_reason
                )
            self.hooks.attempt_finished(self.plan.call, report)

    def _classify(self, target: Target, exc: BaseException) -> Failure:
        """A failure as its engine classifies it, secrets scrubbed from the exception and its message."""
        secrets = self.plan.snap.secrets
        scrub(exc, secrets)
        failure = engine_for(target).classify(exc)
        return replace(failure, message=redact(failure.message, secrets))

    def _answer_bill(self, target: Target, answer: Answer) -> Bill:
        cost, source = self._bill(target, answer.usage, answer.provider_cost)
        return Bill(answer.usage, cost, source, answer.model, answer.finish_reason)

    def _stream_bill(self, flight: InFlight, state: StreamState, provider_cost: float | None) -> Bill:
        target = flight.target
        usage = state.reported_usage
        if usage is None:
            usage = engine_for(target).count_tokens(target, flight.send.body["messages"], state.text)
        cost, source = self._bill(target, usage, provider_cost)
        return Bill(usage, cost, source, state.model, state.finish_reason)

    def _bill(self, target: Target, usage: Usage, provider_cost: float | None) -> tuple[float, CostSource]:
        """Price a usage (config, provider-reported, the engine's map, unknown) and count its tokens and cost."""
        map_cost = None
        if target.pricing is None and provider_cost is None:
            map_cost = engine_for(target).price_map_cost(target, usage)
        cost, source = price(usage, target, provider_cost, map_cost)
        self.ctx.metrics.answered(
            self.alias, target.provider, target.model, usage.input_tokens, usage.output_tokens, cost,
            source != "unknown",
        )  # fmt: skip
        return cost, source

    # -- hedged requests -----------------------------------------------------------------------------------------

    def _race(self, first: Chosen) -> Generator[Effect, Any, Result | tuple[Failure, Any]]:
        """A hedged first attempt: the first target, and while no answer has come, the next ones, `after` apart.

        The first success wins and the rest are cancelled and closed. A failure leaves the others racing; when
        every raced request has failed, the call falls back to the targets not raced, the usual way.
        """
        cfg, clock = self.plan.hedge, self.ctx.clock
        assert cfg is not None
        seen = None
        if cfg.after_percentile is not None:
            seen = self.ctx.latencies.percentile((self.alias, first[0].key), self.plan.stream, cfg.after_percentile)
        delay = hedge.hedge_delay(cfg.after_s, cfg.after_percentile, seen)
        racing: dict[int, InFlight] = {}
        last: tuple[Failure, Any] | None = None
        extra = 0
        try:
            handle, flight = yield from self._launch(first, False)
            racing[handle] = flight
            next_at = None if delay is None else clock() + delay
            while racing:
                now = clock()
                if now >= self.deadline:
                    yield from self._cancel_race(racing, "timeout")
                    raise DeadlineExceededError(self.alias, self.attempts, self.plan.deadline_s)
                hedging = next_at is not None and extra < cfg.max_extra
                if hedging and next_at is not None and now >= next_at:
                    launched = yield from self._hedge(first, racing)
                    extra, next_at = (extra + 1, now + (delay or 0.0)) if launched else (extra, None)
                    continue
                wait = self.deadline - now
                if hedging and next_at is not None:
                    wait = min(wait, next_at - now)
                event = yield WaitStep(wait)
                if event is not None:
                    handle, reply = event
                    done = yield from self._race_reply(racing, racing.pop(handle).done(clock), reply)
                    if isinstance(done, Result):
                        return done
                    last = done
        except GeneratorExit:  # the caller went away mid-race: every request still counts
            for flight in racing.values():
                self._attempted(flight.done(clock), "cancelled")
            raise
        assert last is not None
        return last

    def _hedge(self, first: Chosen, racing: dict[int, InFlight]) -> Generator[Effect, Any, bool]:
        """Launch one more request into the race; False when there is no target to hedge on."""
        nxt = self._hedge_target(first)
        if nxt is None:
            return False
        try:
            handle, flight = yield from self._launch(nxt, True)
        except RouterError:  # a hook refused the hedge: the race is off
            yield from self._cancel_race(racing)
            raise
        racing[handle] = flight
        return True

    def _race_reply(
        self, racing: dict[int, InFlight], flight: InFlight, reply: Any
    ) -> Generator[Effect, Any, Result | tuple[Failure, Any]]:
        """A raced request finished: the call's Result if it won (the rest are cancelled), else its failure."""
        target, m = flight.target, self.ctx.metrics
        if isinstance(reply, StreamState):
            yield from self._cancel_race(racing)
            if flight.hedge:
                m.hedge_won(self.alias, target.provider, target.model)
            return (yield from self._streamed(flight, reply))
        answered = read(reply, self.plan.fmt)
        if isinstance(answered, Answered):
            also = yield from self._cancel_race(racing)
            if flight.hedge:
                m.hedge_won(self.alias, target.provider, target.model)
            return self._succeeded(flight, answered, also)
        failure = self._classify(target, answered)
        stop = failure.outcome not in self.plan.snap.config.defaults.fallback_on
        if stop:  # the rest are cancelled first, so the call's outcome is this failure's
            yield from self._cancel_race(racing)
        self._attempted(flight, failure.outcome, failure=failure)
        self._record_health(target, health_signal(failure.outcome), flight.probe)
        log.warning("%s: %s failed (%s) in a hedged race", self.alias, target.key, failure.outcome)
        if stop:
            raise ProviderError(self.alias, self.attempts) from answered
        return failure, answered

    def _launch(self, chosen: Chosen, is_hedge: bool) -> Generator[Effect, Any, tuple[int, InFlight]]:
        """Start one raced request: its handle and what the race keeps of it."""
        target, body, key, probe = chosen
        send = yield from self._send_for(target, body, key, is_hedge)
        if is_hedge:
            self.ctx.metrics.hedged(self.alias, target.provider, target.model)
            log.info("%s: no answer yet, hedging on %s", self.alias, target.key)
        handle = yield LaunchStep(send)
        return handle, InFlight(target, send, key, probe, self.ctx.clock(), is_hedge)

    def _hedge_target(self, first: Chosen) -> Chosen | None:
        """The next target to hedge on: the next one admitted with a key, else the first again (not a probe)."""
        while self.queue:
            chosen = self._admitted(*self.queue.pop(0))
            if chosen is not None:
                return chosen
        target, body, _, probe = first
        key = self._pick_key(target, self.plan.pinned_key, set())
        if probe or (target.keys and key is None):
            return None
        return target, body, key, False

    def _cancel_race(self, racing: dict[int, InFlight], cut: str = "cancelled") -> Generator[Effect, Any, float]:
        """Cancel and close the requests still racing; count each (`cut`: the outcome of one cut off), and bill
        any that answered meanwhile. What those cost."""
        if not racing:
            return 0.0
        also = 0.0
        done = yield CancelStep(tuple(racing))
        for handle, reply in done:
            flight = racing.pop(handle).done(self.ctx.clock)
            outcome, bill, failure = cut, None, None
            if isinstance(reply, Answer):  # it answered too: the provider bills it
                outcome, bill = "success", self._answer_bill(flight.target, reply)
            elif isinstance(reply, StreamState):  # it had sent text: what came is billed
                bill = self._stream_bill(flight, reply, reply.provider_cost)
            elif isinstance(reply, BaseException) and not isinstance(reply, asyncio.CancelledError):
                failure = self._classify(flight.target, reply)
                outcome = failure.outcome
            if bill is not None:
                also += bill.cost
            self._attempted(flight, outcome, bill=bill, failure=failure)
        racing.clear()
        return also

    # -- breakers, keys, skips ----------------------------------------------------------------------------------

    def _pick_key(self, target: Target, pinned: str | None, tried: set[str]) -> ApiKey | None:
        if not target.keys:
            return None
        if pinned is not None:
            return next((k for k in target.keys if k.name == pinned and k.name not in tried), None)
        return self.ctx.keys.pick(target.provider, target.keys, self.ctx.clock(), frozenset(tried))

    def _record_health(self, target: Target, failed: bool | None, probe: bool) -> None:
        to = self.ctx.circuits.record(target.key, target.circuit, self.ctx.clock(), failed, probe)
        if to is not None:
            self._circuit_changed(target, to)

    def _circuit_changed(self, target: Target, to: str) -> None:
        self.ctx.metrics.circuit(target.provider, target.model, to, STATE_VALUE[to], True)
        log.warning("circuit of %s is now %s", target.key, to.replace("_", "-"))

    def _skip_open(self) -> None:
        """Count the targets passed over for an open circuit (once the call knows it did not try them)."""
        for _, t, _ in self.held_open:
            self._skip(Skip(t.provider, t.model, "circuit_open"))
        self.held_open.clear()

    def _skip(self, s: Skip) -> None:
        self.skipped.append(s)
        self._note_skip(s)

    def _note_skip(self, s: Skip) -> None:
        self.ctx.metrics.skip(self.alias, s.provider, s.model, s.reason)
        if s.reason == "no_credentials" and (s.provider, s.reason) not in self.ctx.warned_skips:
            self.ctx.warned_skips.add((s.provider, s.reason))
            need = " or ".join(s.env_vars) or "api_key"
            log.warning("provider %r skipped: %s is not set", s.provider, need)
