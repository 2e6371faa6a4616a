"""`llm-router check`: a live preflight of every target, for CI and for the minute before a deploy.

Each target of the named aliases (each key of a key pool) gets the cheapest request that proves it works: one
user message of one token, `max_tokens: 1`, sent through its engine exactly as a call would send it (model,
base URL, headers, key), at most `parallel` at once, each bounded by a timeout. What it tells per target:
where its key comes from (never the key), whether the provider was reached, took the key and knows the model,
which price a call will be billed at, the latency, and the outcome when it failed. An alias works when at
least one of its targets does.

Nothing is recorded: no Router is built, so no ledger row, budget spend, cache entry or metric comes of it.

    plan_probes()      what to send, and what not to (disabled, key unset): pure
    facts()            what an outcome proves: reached, authenticated, model found: pure
    price_source()     where a call's price will come from: pure
    failing_aliases()  the aliases none of whose targets works: pure
    run_checks()       send the probes, bounded in number and time
    render_table() / render_json()
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Any

from .config import ApiKey, RouterConfig, Target
from .engines import Send, engine_for
from .errors import redact
from .planner import disabled_providers
from .policy import static_skip
from .secrets import guard_logs
from .types import Usage

WARNING = (
    "llm-router check sends a real request to each target (one prompt token, max_tokens 1): "
    "providers may bill them. Nothing is recorded in the ledger, budgets or metrics."
)
PROBE_BODY: Mapping[str, Any] = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
GRACE_S = 2.0  # past its own timeout, how long a request may take before the check stops waiting for it


@dataclass(frozen=True)
class Probe:
    """One request to make: a target with one of its keys, the aliases it serves, or why it is not sent."""

    target: Target
    key: ApiKey | None
    aliases: tuple[str, ...]
    skip: str | None = None  # "disabled", "no_credentials": no request, the target cannot work as configured


@dataclass(frozen=True)
class TargetCheck:
    """What the check found for one target (and key)."""

    target: str  # provider/model
    key: str | None  # the key's name when the provider has a pool (its name or key-<hash>, never the key)
    key_source: str
    aliases: tuple[str, ...]
    outcome: str  # "ok", a failure outcome (router.outcomes), or why nothing was sent
    reachable: bool | None  # None: the outcome does not tell
    authenticated: bool | None
    model_found: bool | None
    price: str  # config, provider, litellm (the engine's price map), unknown
    latency_s: float | None = None
    status_code: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the target answered."""
        return self.outcome == "ok"


# outcome -> (reachable, authenticated, model found); anything else: None, None, None
_FACTS: dict[str, tuple[bool | None, bool | None, bool | None]] = {
    "ok": (True, True, True),
    "connection": (False, None, None),
    "auth": (True, False, None),
    "payment_required": (True, True, None),  # the key was taken; the account has no credit
    "not_found": (True, True, False),  # providers check the key before the model
    "bad_request": (True, True, None),
    "context_window": (True, True, True),
    "content_filter": (True, True, True),
    "rate_limit": (True, None, None),
    "server_error": (True, None, None),
    "invalid_response": (True, None, None),
}


def facts(outcome: str) -> tuple[bool | None, bool | None, bool | None]:
    """What an outcome proves: (reached the provider, key accepted, model found); None where it says nothing."""
    return _FACTS.get(outcome, (None, None, None))


def price_source(target: Target, provider_cost: float | None, in_price_map: bool) -> str:
    """Where a call's price will come from, in `policy.price`'s order: config, provider, litellm, unknown."""
    if target.pricing is not None:
        return "config"
    if provider_cost is not None:
        return "provider"
    return "litellm" if in_price_map else "unknown"


def key_source(key: ApiKey | None, env: Mapping[str, str]) -> str:
    """Where a key comes from, never a character of it."""
    if key is None:
        return "no key configured"
    if not key.env_vars:
        return "in the config file" if key.usable else "empty in the config file"
    if not key.usable:
        return f"${' or $'.join(key.env_vars)} not set"
    given = [v for v in key.env_vars if env.get(v)]
    return ", ".join(f"${v}" for v in given) if given else f"the default of ${{{key.env_vars[0]}:-...}}"


def plan_probes(cfg: RouterConfig, aliases: Sequence[str], disabled: frozenset[str] = frozenset()) -> list[Probe]:
    """One probe per target and key of `aliases`, in config order; a target shared by aliases is probed once."""
    probes: dict[tuple[str, str | None], Probe] = {}
    for alias in aliases:
        for target in cfg.targets(alias):
            for key in target.keys or (None,):
                ident = (target.key, key.name if key is not None else None)
                if ident in probes:
                    p = probes[ident]
                    if alias not in p.aliases:
                        probes[ident] = Probe(p.target, p.key, (*p.aliases, alias), p.skip)
                    continue
                skip = static_skip(target, disabled, None)
                reason = skip.reason if skip is not None else None
                if reason is None and key is not None and not key.usable:
                    reason = "no_credentials"  # one key of a pool whose others are set
                probes[ident] = Probe(target, key, (alias,), reason)
    return list(probes.values())


def failing_aliases(aliases: Sequence[str], checks: Sequence[TargetCheck]) -> list[str]:
    """The aliases none of whose targets answered: every call to them would fail."""
    working = {a for c in checks if c.ok for a in c.aliases}
    return [a for a in aliases if a not in working]


# -- sending ----------------------------------------------------------------------------------------------------


def _pooled(target: Target) -> bool:
    return len(target.keys) > 1


def _in_price_map(target: Target) -> bool:
    return engine_for(target).price_map_cost(target, Usage(1, 1)) is not None


def _row(probe: Probe, env: Mapping[str, str], outcome: str, **more: Any) -> TargetCheck:
    reachable, authenticated, found = facts(outcome)
    price = more.pop("price", None) or price_source(probe.target, None, _in_price_map(probe.target))
    if reachable is False:
        more["status_code"] = None  # litellm reports a refused connection as a 500 no server sent
    return TargetCheck(
        target=probe.target.key,
        key=probe.key.name if probe.key is not None and _pooled(probe.target) else None,
        key_source=key_source(probe.key, env),
        aliases=probe.aliases,
        outcome=outcome,
        reachable=reachable,
        authenticated=authenticated,
        model_found=found,
        price=price,
        **more,
    )


def check_target(
    probe: Probe,
    timeout_s: float,
    secrets: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> TargetCheck:
    """Send one probe (unless it is skipped) and say what came of it; never raises for a failed request."""
    env = {} if env is None else env
    if probe.skip is not None:
        return _row(probe, env, probe.skip)
    target = probe.target
    engine = engine_for(target)
    secret = probe.key.secret.get_secret_value() if probe.key is not None else None
    t0 = clock()
    try:
        answer = engine.complete(Send(target, PROBE_BODY, timeout_s, secret))
    except Exception as exc:  # every failure is an outcome to report, not a crash of the check
        took = clock() - t0
        failure = engine.classify(exc)
        return _row(
            probe,
            env,
            failure.outcome,
            latency_s=took,
            status_code=failure.status_code,
            error=redact(failure.message, secrets),
        )
    took = clock() - t0
    price = price_source(target, answer.provider_cost, _in_price_map(target))
    return _row(probe, env, "ok", latency_s=took, price=price)


def _bounded(fn: Callable[[], TargetCheck], seconds: float, late: Callable[[], TargetCheck]) -> TargetCheck:
    """fn() if it returns within `seconds`, else late(): a request that hangs past its timeout is left behind
    (on a daemon thread, which the process does not wait for), so the check itself always ends."""
    box: list[TargetCheck] = []
    worker = threading.Thread(target=lambda: box.append(fn()), name="llm-router-check", daemon=True)
    worker.start()
    worker.join(seconds)
    return box[0] if box else late()


def run_checks(
    probes: Sequence[Probe],
    *,
    parallel: int = 8,
    timeout_s: float = 10.0,
    secrets: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> list[TargetCheck]:
    """Every probe's result, in the probes' order: at most `parallel` requests at once, each bounded by the
    smaller of `timeout_s` and its target's own timeout."""
    sent = [p for p in probes if p.skip is None]
    for engine in {engine_for(p.target) for p in sent}:
        engine.load()  # imports LiteLLM (seconds) before any clock starts
    kinds = {(p.target.engine, p.target.kind): p.target for p in sent if p.target.kind in WARM_UP_KINDS}

    def one(probe: Probe) -> TargetCheck:
        limit = min(timeout_s, probe.target.timeout_s)
        return _bounded(
            lambda: check_target(probe, limit, secrets, env),
            limit + GRACE_S,
            lambda: _row(probe, env or {}, "timeout", latency_s=limit + GRACE_S, error="no answer in time"),
        )

    with ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="llm-router-check") as pool:
        with _closed_port() as nowhere:
            list(pool.map(lambda t: _warm_up(t, nowhere), kinds.values()))
        return list(pool.map(one, probes))


@contextlib.contextmanager
def _closed_port() -> Iterator[str]:
    """A loopback URL that refuses connections: its port is bound, so nothing else takes it, but not listening."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


# Kinds whose requests LiteLLM sends to `api_base` when one is given (checked on the sandbox): a warm-up request
# to a closed port reaches no one. Others (bedrock, vertex_ai, ...) may sign and send to their cloud whatever
# api_base says, so they get no warm-up, and their first request's latency includes LiteLLM's imports.
WARM_UP_KINDS = frozenset(
    {
        "openai", "openrouter", "anthropic", "azure", "gemini", "ollama", "groq", "mistral", "deepseek",
        "together_ai", "fireworks_ai", "xai", "cohere", "perplexity", "huggingface", "cerebras",
    }
)  # fmt: skip
WARM_UP_S = 10.0  # bounds the imports only: the closed port refuses the request at once


def _warm_up(target: Target, nowhere: str) -> None:
    """Pay the one-time setup of a kind of provider before any clock starts: LiteLLM imports a provider's code
    path at its first request (~1 s, serialised across threads), which would show as every target's latency.
    The request goes to a closed loopback port, with no key: it reaches no one."""
    bare = replace(target, api_base=nowhere, keys=(), headers={})
    thread = threading.Thread(target=_send_quietly, args=(bare,), name="llm-router-check-warm-up", daemon=True)
    thread.start()
    thread.join(WARM_UP_S + GRACE_S)


def _send_quietly(target: Target) -> None:
    try:
        engine_for(target).complete(Send(target, PROBE_BODY, WARM_UP_S, "warm-up"))
    except Exception:  # refused, as intended
        pass


def check_config(
    cfg: RouterConfig,
    aliases: Sequence[str] = (),
    *,
    parallel: int = 8,
    timeout_s: float = 10.0,
    env: Mapping[str, str] | None = None,
) -> list[TargetCheck]:
    """Check every target of `aliases` (default: all) as a call made in `env` (default: this process's) would
    send to it. Targets whose key is unset, or whose provider is switched off (`enabled: false`,
    LLM_ROUTER_DISABLED_PROVIDERS), are reported and not sent anything."""
    env = os.environ if env is None else env
    secrets = guard_logs(cfg.secrets())  # what litellm or a provider logs or echoes is scrubbed too
    probes = plan_probes(cfg, list(aliases) or list(cfg.aliases), disabled_providers(cfg, env))
    return run_checks(probes, parallel=parallel, timeout_s=timeout_s, secrets=secrets, env=env)


# -- showing ----------------------------------------------------------------------------------------------------


NOT_SENT = {"no_credentials": "not sent: no key", "disabled": "not sent: provider disabled"}


def _yes(c: TargetCheck, v: bool | None) -> str:
    return "-" if c.outcome in NOT_SENT else "?" if v is None else "yes" if v else "NO"


def _result(c: TargetCheck, width: int = 100) -> str:
    if c.ok:
        return "ok"
    if c.outcome in NOT_SENT:
        return NOT_SENT[c.outcome]
    head = c.outcome + (f" ({c.status_code})" if c.status_code is not None else "")
    # The provider's own words, without the chain of wrapper class names litellm puts before them (JSON keeps all).
    error = c.error.rsplit("Exception - ", 1)[-1] if c.error else None
    text = f"{head}: {error}" if error else head
    text = " ".join(text.split())  # one line, whatever the provider's message held
    return text if len(text) <= width else text[: width - 3] + "..."


def render_table(checks: Sequence[TargetCheck], aliases: Sequence[str]) -> str:
    """The checks as an aligned table, then each alias's verdict."""
    head = ["target", "key", "reached", "key ok", "model", "price", "latency", "result"]
    rows = [
        [
            c.target,
            f"{c.key}: {c.key_source}" if c.key else c.key_source,
            _yes(c, c.reachable),
            _yes(c, c.authenticated),
            _yes(c, c.model_found),
            c.price,
            f"{c.latency_s * 1000:.0f} ms" if c.latency_s is not None else "-",
            _result(c),
        ]
        for c in checks
    ]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(r)).rstrip() for r in [head, *rows]]
    failing = failing_aliases(aliases, checks)
    lines.append("")
    width = max(len(a) for a in aliases) if aliases else 0
    for alias in aliases:
        working = [c.target for c in checks if c.ok and alias in c.aliases]
        if working:
            lines.append(f"{alias.ljust(width)}  ok: {', '.join(dict.fromkeys(working))} answered")
        else:
            lines.append(f"{alias.ljust(width)}  FAILS: no target answered, every call to it would fail")
    lines.append("")
    lines.append(verdict(failing, len(aliases)))
    return "\n".join(lines)


def verdict(failing: Sequence[str], n_aliases: int) -> str:
    """One line: every alias works, or which would fail every call."""
    if not failing:
        return f"ok: each of the {n_aliases} alias(es) has a working target"
    return f"FAILED: {len(failing)} of {n_aliases} alias(es) would fail every call: {', '.join(failing)}"


def render_json(checks: Sequence[TargetCheck], aliases: Sequence[str]) -> str:
    """The checks as JSON: the verdict, each alias, each target."""
    failing = failing_aliases(aliases, checks)
    targets = []
    for c in checks:
        row = asdict(c)
        row["aliases"] = list(c.aliases)
        row["ok"] = c.ok
        row["latency_s"] = round(c.latency_s, 4) if c.latency_s is not None else None
        targets.append(row)
    return json.dumps(
        {
            "ok": not failing,
            "failing_aliases": failing,
            "aliases": {
                a: {
                    "ok": a not in failing,
                    "working_targets": list(dict.fromkeys(c.target for c in checks if c.ok and a in c.aliases)),
                }
                for a in aliases
            },
            "targets": targets,
        },
        indent=2,
    )
