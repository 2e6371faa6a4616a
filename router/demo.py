"""`llm-router demo`: the router end to end, offline, on the SIMULATED sandbox provider.

It starts router/sandbox.py on loopback, routes a handful of calls by config/sandbox.yaml (one provider
always fails, one has no key), prints what happened to each, then scrapes its own /metrics over HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import urllib.request
from pathlib import Path

from prometheus_client import CollectorRegistry

from . import _litellm
from .client import Router
from .errors import RouterError
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
    done = await asyncio.gather(*(r.agenerate(f"Name a queueing discipline, #{i}", model="fast") for i in range(n)))
    return list(done)


def run(config: str | None = None) -> int:
    """Run the demo; 0 when every call behaved as the config says it should."""
    print("llm-router demo: every provider below is SIMULATED on loopback (router/sandbox.py). No keys, no network.")
    os.environ.pop("SANDBOX_PREMIUM_KEY", None)  # the demo shows a provider skipped for want of a key
    logging.basicConfig(level=logging.WARNING, format="  [log] %(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    _litellm.litellm()  # so the first call's latency is the call's, not the import's
    print(f"(imported litellm in {time.perf_counter() - t0:.1f} s)")
    with Upstream() as up:
        simulated_providers(up)
        os.environ["LLM_ROUTER_SANDBOX_URL"] = up.url
        registry = CollectorRegistry()
        r = Router.from_yaml(_find_config(config), registry=registry)
        print(f"config: {r.config.source}; simulator at {up.url}")

        _show(
            "generate('Write a haiku about queues', model='fast')",
            r.generate("Write a haiku about queues", model="fast"),
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
            ln
            for ln in text.splitlines()
            if ln.startswith("llm_router_") and "_bucket" not in ln and "_created" not in ln
        ]
        print(f"\n▶ GET http://127.0.0.1:{port}/metrics (histogram buckets and _created omitted here)")
        print("\n".join("  " + ln for ln in lines))
    return 0
