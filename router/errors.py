"""Every error llm-router raises.

The hierarchy::

    RouterError                              base of everything below
    ├── ConfigError (ValueError)             the YAML is missing, malformed or invalid   .problems
    ├── UnknownModelError (KeyError)         generate(model=...) names no alias          .alias .suggestions
    ├── UnknownProviderError (KeyError)      generate(provider=...) matches no target    .provider .alias
    ├── MissingCredentialsError              every target was skipped for want of a key  .alias .env_vars .skipped
    ├── ProviderError                        a failure that is not fallen back from      .attempts .outcome .status_code
    │                                        (e.g. a 400); the litellm exception is its __cause__
    ├── StreamInterruptedError               a stream broke after text was yielded       .text .usage .cost_usd
    ├── BudgetExceededError                  a budget refused the call before any request .budget .spent_usd
    │                                        (limit reached, price unknown, store down)   .limit_usd .resets_at .reason
    ├── HookFailedError                      a hook that rewrites requests or answers     .hook .method
    │                                        failed: the call fails closed
    └── AllTargetsFailedError                every target was tried and failed           .alias .attempts
        └── DeadlineExceededError            the call's deadline ran out first           .deadline_s

Errors carry data, not only text, and their messages say what to do. No message ever contains a secret:
errors are built from config names and redacted provider messages, never from key values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .types import Attempt, Skip, Usage


class RouterError(Exception):
    """Base class of every error raised by llm-router."""


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong with a config file: where it is and what is wrong."""

    file: str
    line: int | None
    key_path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.key_path}: {self.message}" if self.key_path else f"{where}: {self.message}"


class ConfigError(RouterError, ValueError):
    """The config file is missing, is not valid YAML, or does not validate; one problem per line."""

    def __init__(self, problems: Sequence[ConfigProblem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems)


class UnknownModelError(RouterError, KeyError):
    """`model=` names no alias in the config."""

    def __init__(self, alias: str, known: Sequence[str], suggestions: Sequence[str] = ()) -> None:
        self.alias = alias
        self.known = list(known)
        self.suggestions = list(suggestions)
        hint = f"; did you mean {', '.join(repr(s) for s in self.suggestions)}?" if self.suggestions else ""
        self.message = f"unknown model alias {alias!r}{hint} (aliases in the config: {', '.join(self.known) or 'none'})"
        super().__init__(self.message)

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.message


class UnknownProviderError(RouterError, KeyError):
    """`provider=` names a provider that is not configured, or that the alias has no target on."""

    def __init__(self, provider: str, alias: str, message: str) -> None:
        self.provider = provider
        self.alias = alias
        self.message = message
        super().__init__(message)

    def __str__(self) -> str:
        return self.message


class MissingCredentialsError(RouterError):
    """Every target of the alias was skipped because its provider's API key resolved to nothing."""

    def __init__(self, alias: str, skipped: Sequence[Skip]) -> None:
        self.alias = alias
        self.skipped = list(skipped)
        self.env_vars = sorted({v for s in self.skipped for v in s.env_vars})
        needs = "; ".join(
            f"{' or '.join(s.env_vars) or 'api_key'} is not set (needed by provider {s.provider!r})"
            for s in _unique_by_provider(self.skipped)
        )
        super().__init__(f"no target of alias {alias!r} has credentials: {needs}")


def _unique_by_provider(skipped: Sequence[Skip]) -> list[Skip]:
    seen: dict[str, Skip] = {}
    for s in skipped:
        seen.setdefault(s.provider, s)
    return list(seen.values())


class ProviderError(RouterError):
    """A provider failed in a way that is not retried or fallen back from (by default: bad_request, content_filter)."""

    def __init__(self, alias: str, attempts: Sequence[Attempt]) -> None:
        self.alias = alias
        self.attempts = list(attempts)
        last = self.attempts[-1]
        self.provider = last.provider
        self.model = last.model
        self.outcome = last.outcome
        self.status_code = last.status_code
        status = f" (HTTP {last.status_code})" if last.status_code else ""
        super().__init__(
            f"alias {alias!r}: {last.provider}/{last.model} failed with {last.outcome}{status}, "
            f"which is not in fallback_on: {last.error}"
        )


class StreamInterruptedError(RouterError):
    """A streamed answer broke off after text had been yielded, so it could not fall back; `.text` is what came."""

    def __init__(self, alias: str, attempts: Sequence[Attempt], text: str, usage: Usage, cost_usd: float) -> None:
        self.alias = alias
        self.attempts = list(attempts)
        self.text = text
        self.usage = usage
        self.cost_usd = cost_usd
        self.outcome = "stream_interrupted"
        last = self.attempts[-1]
        self.provider, self.model = last.provider, last.model
        super().__init__(
            f"alias {alias!r}: the stream from {last.provider}/{last.model} broke off after {len(text)} characters "
            f"({last.error}); .text holds what came"
        )


class BudgetExceededError(RouterError):
    """A `budgets:` entry refused the call before its request was sent; `.reason` says why.

    `reason` is "limit" (the call's worst-case cost does not fit in what is left), "unpriced" (the target has
    no known price, so its cost cannot be bounded) or "unavailable" (the budget's database cannot be reached).
    """

    outcome = "budget_exceeded"

    def __init__(
        self,
        budget: str,
        spent_usd: float,
        limit_usd: float,
        resets_at: datetime,
        reason: str = "limit",
        needed_usd: float = 0.0,
        target: str = "",
        scope_value: str | None = None,
    ) -> None:
        self.budget = budget
        self.spent_usd = spent_usd
        self.limit_usd = limit_usd
        self.resets_at = resets_at
        self.reason = reason
        self.needed_usd = needed_usd
        self.target = target
        self.scope_value = scope_value
        of = f"budget {budget!r}" + (f" ({scope_value})" if scope_value is not None else "")
        when = resets_at.strftime("%Y-%m-%d %H:%M UTC")
        if reason == "unpriced":
            msg = (
                f"{of} cannot bound the cost of {target}: its price is unknown; give it a pricing: entry "
                f"(or set unpriced: allow on the budget)"
            )
        elif reason == "unavailable":
            msg = f"{of} cannot be checked: its database is unreachable (set if_unavailable: allow to pass calls)"
        else:
            msg = (
                f"{of} cannot cover this call: ${spent_usd:.6f} of ${limit_usd:.6f} is used or reserved and the "
                f"call may cost up to ${needed_usd:.6f} on {target}; it resets at {when}, or raise limit_usd"
            )
        super().__init__(msg)


class AllTargetsFailedError(RouterError):
    """Every target was tried (with retries) and none answered; `.attempts` lists every attempt made."""

    def __init__(
        self, alias: str, attempts: Sequence[Attempt], reason: str = "every target failed", outcome: str | None = None
    ) -> None:
        self.alias = alias
        self.attempts = list(attempts)
        self.outcome = outcome or (self.attempts[-1].outcome if self.attempts else "other")
        lines = "; ".join(f"{a.provider}/{a.model}: {a.outcome}" for a in self.attempts)
        last = next((a.error for a in reversed(self.attempts) if a.error), None)
        detail = f"; last error: {last}" if last else ""
        super().__init__(f"alias {alias!r}: {reason} after {len(self.attempts)} attempt(s) [{lines}]{detail}")


class DeadlineExceededError(AllTargetsFailedError):
    """The call's deadline (`deadline_s`, or `timeout=` of the call) ran out before any target answered."""

    def __init__(self, alias: str, attempts: Sequence[Attempt], deadline_s: float) -> None:
        self.deadline_s = deadline_s
        super().__init__(
            alias, attempts, reason=f"deadline of {deadline_s:g}s exceeded", outcome=None if attempts else "timeout"
        )


class HookFailedError(RouterError):
    """A hook's rewrite_request or rewrite_text raised: the call fails rather than send (or return) what the hook
    was there to change, say a prompt it should have redacted. The hook's exception is the `__cause__`."""

    outcome = "hook_failed"

    def __init__(self, hook: str, method: str) -> None:
        self.hook = hook
        self.method = method
        super().__init__(f"hook {hook}.{method} failed, so the call was stopped (see the log for its traceback)")


def redact(text: str, secrets: Sequence[str]) -> str:
    """`text` with every secret replaced by `***`."""
    for s in secrets:
        if s and s in text:
            text = text.replace(s, "***")
    return text


def scrub(exc: BaseException, secrets: Sequence[str]) -> BaseException:
    """Redact secrets, in place, from an exception and every exception it was raised from or during.

    A provider may echo a key back in its error body; litellm and the openai SDK then carry that text in a
    chain of exceptions that a traceback prints whole.
    """
    if not secrets:
        return exc
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        try:
            e.args = tuple(redact(a, secrets) if isinstance(a, str) else a for a in e.args)
            for attr in ("message", "body"):
                value = getattr(e, attr, None)
                if isinstance(value, str):
                    setattr(e, attr, redact(value, secrets))
                elif isinstance(value, dict):
                    setattr(e, attr, _redact_tree(value, secrets))
        except (AttributeError, TypeError):  # an exception type with read-only attributes: leave it be
            pass
        todo += [e.__cause__, e.__context__, getattr(e, "original_exception", None)]
    return exc


def _redact_tree(value: object, secrets: Sequence[str]) -> object:
    if isinstance(value, str):
        return redact(value, secrets)
    if isinstance(value, dict):
        return {k: _redact_tree(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_tree(v, secrets) for v in value]
    return value
