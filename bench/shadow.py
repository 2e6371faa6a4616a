"""Shadow traffic and the caller's latency: p50/p99 of the primary with a shadow 10× slower, beside no shadow.

``python -m bench.shadow [--calls 400] [--rounds 8] [--base-ms 50] [--concurrency 4]`` writes
bench/results/shadow.md and shadow.json.

The bench's loopback upstream (`bench.upstream`, in its own process and on its own core when there is one, so
that serving the shadows costs the measured process nothing) answers the primary target in `base` (±20%) and
the shadow target in 10× that. Three aliases on the same primary target run interleaved, round by round in a
new order each round, in one Router: ``plain`` (no shadow), ``shadow5`` (`percent: 5`, the share a trial would
use) and ``shadow100`` (every call shadowed, with `max_in_flight` high enough that none is skipped: the most
background work the setting allows). Each batch starts once the shadows of the one before have ended, so a
batch pays only for its own. Both callers are measured: `generate()` one call after another, and `agenerate()`
at a fixed concurrency. What is compared is the caller's wall time per call; the shadows' own count is
reported beside it. The seed orders the rounds. As in the other benchmarks, the heap is frozen after the warm-up
(`gc.freeze()`, what `router.preload()` does in a gunicorn master), so a full collection over LiteLLM's heap
(~200 ms) does not land in a random batch; `--no-gc-freeze` measures without.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from prometheus_client import CollectorRegistry

from router import Router, parse_config
from router.plugins.shadow import shadow_hook

from .upstream import Upstream

RESULTS = Path(__file__).resolve().parent / "results"
SHADOW_FACTOR = 10.0

CONFIG = """
version: 1
defaults: {{timeout_s: 30, deadline_s: 60}}
providers:
  primary: {{kind: openai, api_base: "{up}/wait{primary_ms}/v1", api_key: sk-bench-primary}}
  candidate: {{kind: openai, api_base: "{up}/wait{shadow_ms}/v1", api_key: sk-bench-candidate}}
aliases:
  plain: {{targets: [primary/model-p]}}
  shadow5:
    targets: [primary/model-p]
    shadow: {{targets: [candidate/model-c], percent: 5, max_in_flight: {max_in_flight}}}
  shadow100:
    targets: [primary/model-p]
    shadow: {{targets: [candidate/model-c], percent: 100, max_in_flight: {max_in_flight}}}
  warm:
    targets: [primary/model-p]
    shadow: {{targets: [candidate/model-c], percent: 100, max_in_flight: {max_in_flight}}}
pricing:
  primary/model-p: {{input_per_1m: 1.0, output_per_1m: 2.0}}
  candidate/model-c: {{input_per_1m: 0.2, output_per_1m: 0.4}}
"""
VARIANTS = ("plain", "shadow5", "shadow100")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    return s[max(0, min(len(s) - 1, int(-(-q * len(s) // 100)) - 1))]


def sync_batch(r: Router, alias: str, n: int) -> list[float]:
    """Latencies of `n` generate() calls to `alias`, one after another."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        r.generate("hi", model=alias)
        out.append(time.perf_counter() - t0)
    return out


async def async_batch(r: Router, alias: str, n: int, concurrency: int) -> list[float]:
    """Latencies of `n` agenerate() calls to `alias`, `concurrency` at a time."""
    gate = asyncio.Semaphore(concurrency)
    out: list[float] = []

    async def one() -> None:
        async with gate:
            t0 = time.perf_counter()
            await r.agenerate("hi", model=alias)
            out.append(time.perf_counter() - t0)

    await asyncio.gather(*(one() for _ in range(n)))
    return out


def summary(lat: list[float]) -> dict[str, float]:
    return {
        "p50_s": percentile(lat, 50),
        "p95_s": percentile(lat, 95),
        "p99_s": percentile(lat, 99),
        "mean_s": statistics.fmean(lat),
    }


def run(calls: int, rounds: int, base_s: float, concurrency: int, seed: int, freeze: bool = True) -> dict[str, Any]:
    per_round = max(1, calls // rounds)
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    with Upstream(cpu=cpus[-1] if len(cpus) > 1 else None) as up:
        registry = CollectorRegistry()
        # Enough room that no shadow is skipped: the most background work this alias can cause.
        max_in_flight = max(64, 4 * concurrency * int(SHADOW_FACTOR))
        text = CONFIG.format(
            up=up.url,
            max_in_flight=max_in_flight,
            primary_ms=round(base_s * 1000),
            shadow_ms=round(base_s * 1000 * SHADOW_FACTOR),
        )
        cfg = parse_config(text, "shadow-bench.yaml")
        r = Router(cfg, registry=registry)
        hook = shadow_hook(r._hooks.hooks)
        assert hook is not None
        sync_batch(r, "plain", 20)  # warm-up: litellm's sync and async paths
        asyncio.run(async_batch(r, "plain", 20, concurrency))
        asyncio.run(async_batch(r, "warm", 20, concurrency))  # the shadow path too, counted apart
        hook.wait(60)
        if freeze:
            gc.collect()
            gc.freeze()
        latencies: dict[str, dict[str, list[float]]] = {
            "sync": {v: [] for v in VARIANTS},
            "async": {v: [] for v in VARIANTS},
        }
        order = [(mode, alias) for mode in ("sync", "async") for alias in VARIANTS]
        shuffle = random.Random(seed + 2)
        for _ in range(rounds):
            shuffle.shuffle(order)
            for mode, alias in order:
                hook.wait(60)
                if mode == "sync":
                    latencies[mode][alias] += sync_batch(r, alias, per_round)
                else:
                    latencies[mode][alias] += asyncio.run(async_batch(r, alias, per_round, concurrency))
        hook.wait(60)

        def count(name: str, **labels: str) -> float:
            return registry.get_sample_value(name, labels) or 0.0

        def shadows(alias: str, name: str, **labels: str) -> float:
            return count(name, alias=alias, provider="candidate", model="model-c", **labels)

        out: dict[str, Any] = {
            "calls_per_variant_and_mode": per_round * rounds,
            "rounds": rounds,
            "concurrency": concurrency,
            "primary_base_s": base_s,
            "shadow_base_s": base_s * SHADOW_FACTOR,
            "max_in_flight": max_in_flight,
            "gc_frozen": freeze,
            "shadows_sent": {
                a: shadows(a, "llm_router_shadow_requests_total", outcome="success") for a in VARIANTS[1:]
            },
            "shadows_skipped": {
                a: sum(
                    shadows(a, "llm_router_shadow_skipped_total", reason=reason)
                    for reason in ("in_flight", "budget", "no_credentials", "disabled", "closing", "opted_out")
                )
                for a in VARIANTS[1:]
            },
            "modes": {},
        }
        for mode, by_alias in latencies.items():
            m = out["modes"][mode] = {alias: summary(lat) for alias, lat in by_alias.items()}
            plain = m["plain"]
            for alias in VARIANTS[1:]:
                m[alias]["p50_vs_plain"] = m[alias]["p50_s"] / plain["p50_s"]
                m[alias]["p99_vs_plain"] = m[alias]["p99_s"] / plain["p99_s"]
        r.close()
        return out


def report(res: dict[str, Any]) -> str:
    """The results as a Markdown table."""
    lines = [
        "# Shadow traffic and the caller's latency",
        "",
        f"{res['calls_per_variant_and_mode']} calls per alias and caller, in {res['rounds']} interleaved rounds; the "
        f"primary answers in {res['primary_base_s'] * 1000:g} ms ±20%, the shadow target in "
        f"{res['shadow_base_s'] * 1000:g} ms ±20% ({SHADOW_FACTOR:g}× slower), `max_in_flight: "
        f"{res['max_in_flight']}`. Shadows answered: "
        + ", ".join(f"{a} {n:.0f} (skipped {res['shadows_skipped'][a]:.0f})" for a, n in res["shadows_sent"].items())
        + f". `generate()` calls one after another; `agenerate()` at concurrency {res['concurrency']}. Heap "
        + ("frozen after the warm-up." if res["gc_frozen"] else "not frozen (--no-gc-freeze)."),
        "",
        "| caller | alias | p50 ms | p95 ms | p99 ms | mean ms | p50 vs plain | p99 vs plain |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, m in res["modes"].items():
        for alias in VARIANTS:
            v = m[alias]
            ratios = f"{v['p50_vs_plain']:.3f}× | {v['p99_vs_plain']:.3f}×" if alias != "plain" else "1 | 1"
            lines.append(
                f"| {mode} | {alias} | {v['p50_s'] * 1000:.1f} | {v['p95_s'] * 1000:.1f} | {v['p99_s'] * 1000:.1f} | "
                f"{v['mean_s'] * 1000:.1f} | {ratios} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=400, help="calls per alias and caller")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--base-ms", type=float, default=50.0, help="typical answer time of the primary")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--seed", type=int, default=20)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--no-gc-freeze", dest="freeze", action="store_false", help="leave the heap unfrozen")
    args = ap.parse_args(argv)
    res = run(args.calls, args.rounds, args.base_ms / 1000, args.concurrency, args.seed, args.freeze)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shadow.json").write_text(json.dumps(res, indent=2) + "\n")
    text = report(res)
    (args.out / "shadow.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
