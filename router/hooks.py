"""The seam of a call's life: `Hook`s that the attempt loop calls at fixed points.

Every concern beyond routing itself (ledger, budgets, cache, tracing, a PII redactor, ...) plugs in here, so the
attempt loop (`router.loop`) stays the one place that decides and `Router` stays small. This module imports no
plugin: the config's own are built from the table in `router.plugins`. A call's life, as hooks see it::

    rewrite_request(call, target, request)  once per target the call may try, before anything else: return a
                                            new request body to send instead (a redactor masks the
                                            prompt). What the other hooks (cache, tracing, budgets) and
                                            the provider see is the rewritten body.
    call_started(call)                      once, before any request. May return a `Result` to answer the
                                            call without a request (a cache hit; a stream call then gets
                                            a `Stream` replaying its text), or raise a `RouterError`
                                            to refuse it (a budget). Runs off the event loop when the hook
                                            is `blocking`.
    before_attempt(call, target, request)   before each request (retries and fallbacks included). May raise
                                            a `RouterError` to stop the call, or `Reroute(alias, instead)`
                                            to re-plan it, once, on another alias (a cheaper model).
                                            `call.key_name` is the key it will use; `call.hedge` says
                                            it races requests of the call still in flight (their
                                            attempt_finished comes later). `blocking` as above.
    rewrite_text(call, text, final)         the answer's text on its way to the caller: a plain answer
                                            once (`final` True), before a structured answer is parsed;
                                            a stream's text delta by delta as it comes (`final` False),
                                            then once more with "" and `final` True to flush what the
                                            hook held back. Return the text to pass on.
    attempt_finished(call, report)          after each request, however it ended (`AttemptReport`).
    call_finished(call, result, error)      once, when the call ends: answered, raised or cancelled
                                            (`call.outcome` says which).
    close()                                 the hook is no longer used (a reload replaced it, or the
                                            Router is closed): flush and release what it holds.

The after-hooks and the rewrites run on the caller's thread and may not block: hand I/O to a background
writer. A hook that raises anything but a `RouterError` is logged and passed over (a broken plugin never fails a
call), except in a rewrite: a rewrite that fails fails the call with `HookFailedError`, rather than send or
return what the hook was there to change.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import HookFailedError, RouterError

if TYPE_CHECKING:
    from .config import RouterConfig, Target
    from .structured import Format
    from .types import Attempt, CostSource, Result, Usage

log = logging.getLogger("router")

_TAG_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
# C0 and C1 control characters (NUL included) and lone surrogates: a database refuses them or stores them mangled.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
MAX_TAGS = 32
MAX_TAG_VALUE = 256


def check_tags(tags: Mapping[str, Any] | None) -> dict[str, str]:
    """Validate `generate(tags=...)`: at most 32 names of [A-Za-z0-9_.-] (1-64 chars), each with a str value of
    at most 256 printable characters (no NUL or other control character)."""
    if tags is None:
        return {}
    if not isinstance(tags, Mapping):
        raise TypeError(f"tags must be a dict of str to str, not {type(tags).__name__}")
    if len(tags) > MAX_TAGS:
        raise ValueError(f"tags takes at most {MAX_TAGS} entries, not {len(tags)}")
    out: dict[str, str] = {}
    for name, value in tags.items():
        if not isinstance(name, str):
            raise TypeError(f"tag names must be str, not {type(name).__name__}")
        if not _TAG_NAME.fullmatch(name):
            raise ValueError(f"tag name {_short(name)} must be 1-64 characters of letters, digits, '_', '.' or '-'")
        if not isinstance(value, str):
            raise TypeError(f"tag {name!r} must have a str value, not {type(value).__name__}")
        if len(value) > MAX_TAG_VALUE:
            raise ValueError(f"tag {name!r} is longer than {MAX_TAG_VALUE} characters ({len(value)})")
        bad = _UNSAFE.search(value)
        if bad is not None:
            raise ValueError(
                f"tag {name!r} holds {bad.group()!r} at position {bad.start()}: tag values must be printable "
                "text (no NUL, control character or lone surrogate); strip or escape it before tagging"
            )
        out[name] = value
    return out


def _short(text: str, limit: int = 80) -> str:
    """repr() of `text`, cut to `limit` characters: an error message never carries a huge input."""
    r = repr(text)
    return r if len(r) <= limit else r[: limit - 4] + "...'"


@dataclass
class Call:
    """One generate() call as hooks see it. `data` is scratch space: each hook keeps its own key in it."""

    id: str
    alias: str
    messages: list[dict[str, Any]]
    params: Mapping[str, Any]
    tags: Mapping[str, str]
    stream: bool
    started_at: float  # unix time
    outcome: str = "cancelled"  # set before call_finished: success or the final error outcome
    data: dict[str, Any] = field(default_factory=dict)
    config: RouterConfig | None = None  # the config the call runs on (a reload does not change it mid-call)
    # The usable targets in try order, each with the litellm kwargs it would be sent (no key).
    requests: tuple[tuple[Target, Mapping[str, Any]], ...] = ()
    response_format: Format | None = None  # generate(response_format=...), as the router checks answers
    cache: bool = True  # False: generate(cache=False), the caller wants no answer from a cache
    key_name: str | None = None  # the key of the request about to go out (before_attempt), never the secret
    hedge: bool = False  # before_attempt: this request is a hedge, racing the call's requests still in flight
    rerouted_to: str | None = None  # the alias a Reroute moved the call to
    # When the call's deadline runs out, on time.monotonic(): a blocking hook (a budget on a busy database)
    # must give up by then.
    deadline_at: float | None = None

    @classmethod
    def new(
        cls,
        alias: str,
        messages: list[dict[str, Any]],
        params: Mapping[str, Any],
        tags: Mapping[str, str],
        stream: bool,
        **more: Any,
    ) -> Call:
        """A call starting now, with a fresh random id (`more`: the optional fields)."""
        return cls(uuid.uuid4().hex, alias, messages, params, tags, stream, time.time(), **more)


class Reroute(RouterError):
    """Raised by `before_attempt`: re-plan the call on `alias` (its targets replace what is left). A call is
    rerouted once; a second Reroute, or an alias that does not exist, raises `instead`."""

    def __init__(self, alias: str, instead: RouterError) -> None:
        self.alias = alias
        self.instead = instead
        super().__init__(f"reroute to alias {alias!r}: {instead}")


@dataclass(frozen=True)
class AttemptReport:
    """One finished request: the target, how it ended, the key's name, and what it was billed if anything."""

    target: Target
    attempt: Attempt
    key_name: str | None = None
    usage: Usage | None = None  # set when the attempt was billed (an answer, or a stream cut after text)
    cost_usd: float | None = None
    cost_source: CostSource | None = None
    response_model: str | None = None  # the model the provider says answered (when it answered)
    finish_reason: str | None = None


class Hook:
    """A plugin on the call's life. Every method is a no-op here: override the ones you need."""

    blocking = False  # True: call_started/before_attempt may do I/O, so agenerate() runs them in a thread

    def call_started(self, call: Call) -> Result | None:
        """A call is about to send its first request; return a Result to answer it without one."""
        return None

    def rewrite_request(self, call: Call, target: Target, request: Mapping[str, Any]) -> Mapping[str, Any] | None:
        """The request body to send to `target` instead of `request` (None: leave it as it is). Must not block."""
        return None

    def before_attempt(self, call: Call, target: Target, request: Mapping[str, Any]) -> None:
        """A request is about to go to `target` with this body (the OpenAI chat-completions body; never the key)."""

    def rewrite_text(self, call: Call, text: str, final: bool) -> str:
        """The answer's text (or a stream's next delta) to pass on to the caller. Must not block."""
        return text

    def attempt_finished(self, call: Call, report: AttemptReport) -> None:
        """A request ended (answered, failed or cancelled). Must not block."""

    def call_finished(self, call: Call, result: Result | None, error: BaseException | None) -> None:
        """The call ended with `result`, or with `error`, or neither (cancelled). Must not block."""

    def close(self) -> None:
        """The Router is closed: flush and release what the hook holds."""


class Hooks:
    """The hooks of a Router, called in order. A hook's own bug is logged once per hook and method, not raised."""

    def __init__(self, hooks: Sequence[Hook] = ()) -> None:
        self.hooks = tuple(hooks)
        self.blocking = any(h.blocking for h in self.hooks)
        self._warned: set[tuple[int, str]] = set()
        # Only hooks that override a rewrite are asked: a call with none pays nothing for the seam.
        self.request_rewriters = tuple(h for h in self.hooks if type(h).rewrite_request is not Hook.rewrite_request)
        self.text_rewriters = tuple(h for h in self.hooks if type(h).rewrite_text is not Hook.rewrite_text)

    def __bool__(self) -> bool:
        return bool(self.hooks)

    def call_started(self, call: Call) -> Result | None:
        """The first hook's Result that answers the call, or None."""
        for h in self.hooks:
            answer = self._guard(h, "call_started", h.call_started, call)
            if answer is not None:
                return answer  # type: ignore[no-any-return]
        return None

    def before_attempt(self, call: Call, target: Target, request: Mapping[str, Any]) -> None:
        """Every hook's before_attempt; a RouterError from one stops the call."""
        for h in self.hooks:
            self._guard(h, "before_attempt", h.before_attempt, call, target, request)

    def rewrite_request(self, call: Call, target: Target, request: Mapping[str, Any]) -> Mapping[str, Any]:
        """The body after every hook's rewrite_request, in order; a failing rewrite raises HookFailedError."""
        for h in self.request_rewriters:
            new = self._rewrite(h, "rewrite_request", h.rewrite_request, call, target, request)
            if new is not None:
                request = new
        return request

    def rewrite_text(self, call: Call, text: str, final: bool) -> str:
        """The text after every hook's rewrite_text, in order (at the end, what each flushes passes through the
        hooks after it); a failing rewrite raises HookFailedError."""
        for h in self.text_rewriters:
            text = self._rewrite(h, "rewrite_text", h.rewrite_text, call, text, final)
        return text

    def attempt_finished(self, call: Call, report: AttemptReport) -> None:
        """Every hook's attempt_finished."""
        for h in self.hooks:
            self._guard(h, "attempt_finished", h.attempt_finished, call, report, swallow_all=True)

    def call_finished(self, call: Call, result: Result | None, error: BaseException | None) -> None:
        """Every hook's call_finished."""
        for h in self.hooks:
            self._guard(h, "call_finished", h.call_finished, call, result, error, swallow_all=True)

    def close(self) -> None:
        """Close every hook."""
        for h in self.hooks:
            self._guard(h, "close", h.close, swallow_all=True)

    def _guard(self, hook: Hook, name: str, fn: Callable[..., Any], *args: Any, swallow_all: bool = False) -> Any:
        try:
            return fn(*args)
        except RouterError:
            if swallow_all:
                self._warn(hook, name)
                return None
            raise
        except Exception:
            self._warn(hook, name)
            return None

    def _rewrite(self, hook: Hook, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except RouterError:
            raise
        except Exception as exc:  # fail closed: never send or return what the hook was there to change
            log.exception("hook %s.%s failed; the call fails", type(hook).__name__, name)
            raise HookFailedError(type(hook).__name__, name) from exc

    def _warn(self, hook: Hook, name: str) -> None:
        if (id(hook), name) not in self._warned:
            self._warned.add((id(hook), name))
            log.exception("hook %s.%s failed; the call goes on without it", type(hook).__name__, name)
