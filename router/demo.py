"""`llm-router demo`: the router end to end, offline, on the SIMULATED sandbox provider.

It starts router/sandbox.py on loopback, routes a handful of calls by config/sandbox.yaml (one provider
always fails, one has no key), prints what happened to each, then scrapes its own /metrics over HTTP. Calls
are tagged by tenant and recorded in a SQLite ledger in a temp dir (unless the config has its own
`ledger:`), under a small per-tenant budget; the demo ends with the usage by tenant that the ledger holds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
import urllib.request
from pathlib import Path

from prometheus_client import CollectorRegistry

from .client import Router
from .config import parse_config
from .engines import DEFAULT_ENGINE, get_engine
from .errors import BudgetExceededError, RouterError
from .sandbox import Upstream, simulated_providers
from .types import Result


def _find_config(path: str | None) -> Path:
    if path:
        return Path(path)
    here = Path("config/sandbox.yaml")
    return here if here.exists() else Path(__file__).resolve().parent.parent / "config" / "sandbox.yaml"


def _show(label: str, res: Result) -> None:
    tried = " → ".join(f"{a.provider}:{a.outcome}" for a in res.attempts)
    skipped = "".join(f"  (skipped {s.provider}: {s.reason})" for s in res.skipped)
    print(f"\n▶ {label}")
    print(f"  alias {res.alias!r} answered by {res.provider}/{res.model} in {res.latency_s * 1000:.0f} ms")
    print(f"  attempts: {tried}{skipped}")
    print(
        f"  tokens: {res.usage.input_tokens} in / {res.usage.output_tokens} out, "
        f"cost ${res.cost_usd:.8f} ({res.cost_source} price)"
    )
    text = res.text if len(res.text) <= 160 else res.text[:157] + "..."
    print(f"  text: {text}")


async def _concurrent(r: Router, n: int) -> list[Result]:
    done = await asyncio.gather(
        *(r.agenerate(f"Name a queueing discipline, #{i}", model="fast", tags={"tenant": "acme"}) for i in range(n))
    )
    return list(done)


def run(config: str | None = None) -> int:
    """Run the demo; 0 when every call behaved as the config says it should."""
    print("llm-router demo: every provider below is SIMULATED on loopback (router/sandbox.py). No keys, no network.")
    os.environ.pop("SANDBOX_PREMIUM_KEY", None)  # the demo shows a provider skipped for want of a key
    logging.basicConfig(level=logging.WARNING, format="  [log] %(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    get_engine(DEFAULT_ENGINE).load()  # so the first call's latency is the call's, not the import's
    print(f"(imported litellm in {time.perf_counter() - t0:.1f} s)")
    with Upstream() as up, tempfile.TemporaryDirectory(prefix="llm-router-demo-") as tmp:
        simulated_providers(up)
        os.environ["LLM_ROUTER_SANDBOX_URL"] = up.url
        registry = CollectorRegistry()
        path = _find_config(config)
        text = path.read_text(encoding="utf-8")
        if "\nledger:" not in text:  # the demo's own ledger, and a small daily budget for tenant "trial"
            text += (
                f'\nledger: {{path: "{Path(tmp) / "ledger.sqlite3"}", flush_interval_s: 0.1}}\n'
                "budgets:\n  - {name: trial-daily, tags: {tenant: trial}, period: day, limit_usd: 0.004}\n"
            )
        r = Router(parse_config(text, str(path)), registry=registry)
        print(f"config: {r.config.source}; simulator at {up.url}")
        try:
            _calls(r, registry)
        finally:
            r.close()  # flushes the ledger
        if r.config.ledger is not None:
            from .usage import query_usage, render

            by = ["tenant", "provider", "outcome"]
            print("\n▶ llm-router usage --since 1h --by tenant,provider,outcome  # from the ledger, not from metrics")
            print("\n".join("  " + ln for ln in render(query_usage(r.config, since="1h", by=by), by).splitlines()))
    return 0


def _calls(r: Router, registry: CollectorRegistry) -> None:
    """The demo's calls, then a scrape of /metrics."""
    _show(
        "generate('Write a haiku about queues', model='fast', tags={'tenant': 'acme'})",
        r.generate("Write a haiku about queues", model="fast", tags={"tenant": "acme"}),
    )
    _show(
        "generate('What is a fallback?')  # default alias 'chat': its first provider always answers 503",
        r.generate("What is a fallback?"),
    )
    _show(
        "generate('Summarise Little's law', model='premium')  # 'premium' has no key set",
        r.generate("Summarise Little's law", model="premium"),
    )
    print("\n▶ generate('Tell me about backpressure', stream=True)  # flaky fails before any text: fallback")
    stream = r.generate("Tell me about backpressure", stream=True)
    print("  ", end="")
    for delta in stream:
        print(delta, end="", flush=True)
    print()
    if stream.result is not None:
        res = stream.result
        tried = " → ".join(f"{a.provider}:{a.outcome}" for a in res.attempts)
        print(f"  attempts: {tried}; {res.usage.output_tokens} tokens out, ${res.cost_usd:.8f}")

    results = asyncio.run(_concurrent(r, 5))
    print(
        f"\n▶ 5 concurrent agenerate(..., model='fast'): {sum(1 for x in results if x.text)} answered, "
        f"max latency {max(x.latency_s for x in results) * 1000:.0f} ms, "
        f"total cost ${sum(x.cost_usd for x in results):.8f}"
    )
    print("\n▶ generate(..., model='chat', max_tokens=200, tags={'tenant': 'trial'}) until its budget is spent")
    for i in range(1, 6):
        try:
            res = r.generate("Explain retries", max_tokens=200, tags={"tenant": "trial"})
            print(f"  call {i}: answered by {res.provider}, ${res.cost_usd:.8f}")
        except BudgetExceededError as exc:
            print(f"  call {i}: {exc.__class__.__name__} (no request sent): {exc}")
            break
    print("\n▶ generate('hi', model='caht')  # a typo in the alias")
    try:
        r.generate("hi", model="caht")
    except RouterError as exc:
        print(f"  {exc.__class__.__name__}: {exc}")

    from .api import start_metrics_server

    server, _thread = start_metrics_server(port=0, registry=registry)
    port = server.server_address[1]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    server.shutdown()
    lines = [
        ln for ln in text.splitlines() if ln.startswith("llm_router_") and "_bucket" not in ln and "_created" not in ln
    ]
    print(f"\n▶ GET http://127.0.0.1:{port}/metrics (histogram buckets and _created omitted here)")
    print("\n".join("  " + ln for ln in lines))
