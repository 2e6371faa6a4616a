"""Hedged requests against a heavy-tailed upstream: p50/p95/p99 with and without hedging, and what it cost.

``python -m bench.hedge [--calls 1000] [--concurrency 4] [--base-ms 100]`` writes bench/results/hedge.md and hedge.json.

Two simulated providers (the loopback sandbox, `router.sandbox.Upstream`) answer in `base` seconds (±20%),
and 5% of answers, independently per request, in 10× that. Three aliases on the same two targets run
interleaved, round by round in a new order each round, through `Router.agenerate` at a fixed concurrency:
``plain`` (no hedge), ``after_s`` (hedge after a fixed delay: twice the median measured in a warm-up) and
``p90`` (hedge after the 90th percentile of the target's recent latencies). Extra requests are what the
upstream received beyond one per call.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import threading
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from prometheus_client import CollectorRegistry

from router import Router, parse_config
from router.sandbox import Received, Reply, Upstream

RESULTS = Path(__file__).resolve().parent / "results"
# litellm drops the coroutine of a request cancelled while it is still being prepared: nothing was sent.
warnings.filterwarnings("ignore", "coroutine '.*acompletion' was never awaited", RuntimeWarning)
TAIL_SHARE = 0.05
TAIL_FACTOR = 10.0

CONFIG = """
version: 1
defaults: {{timeout_s: 10, deadline_s: 30}}
providers:
  a: {{kind: openai, api_base: "{up}/a/v1", api_key: sk-bench-a}}
  b: {{kind: openai, api_base: "{up}/b/v1", api_key: sk-bench-b}}
aliases:
  plain: {{targets: [a/model-a, b/model-b]}}
  after_s: {{targets: [a/model-a, b/model-b], hedge: {{after_s: {after_s}}}}}
  p90: {{targets: [a/model-a, b/model-b], hedge: {{after_percentile: 90, after_s: {after_s}}}}}
"""
VARIANTS = ("plain", "after_s", "p90")


class HeavyTail:
    """Replies in `base` seconds (±20%), 5% of them 10× slower; seeded, thread-safe."""

    def __init__(self, base_s: float, seed: int) -> None:
        self.base_s = base_s
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def __call__(self, received: Received) -> Reply:
        with self._lock:
            delay = self.base_s * self._rng.uniform(0.8, 1.2)
            if self._rng.random() < TAIL_SHARE:
                delay *= TAIL_FACTOR
        return Reply(text="a short answer", delay_s=delay, usage=(12, 4))


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    return s[max(0, min(len(s) - 1, int(-(-q * len(s) // 100)) - 1))]


async def batch(r: Router, alias: str, n: int, concurrency: int) -> list[float]:
    """Latencies of `n` calls to `alias`, `concurrency` at a time."""
    gate = asyncio.Semaphore(concurrency)
    out: list[float] = []

    async def one() -> None:
        async with gate:
            t0 = time.perf_counter()
            await r.agenerate("hi", model=alias)
            out.append(time.perf_counter() - t0)

    await asyncio.gather(*(one() for _ in range(n)))
    return out


async def run(calls: int, concurrency: int, base_s: float, rounds: int, seed: int) -> dict[str, Any]:
    with Upstream() as up:
        tail = HeavyTail(base_s, seed)
        up.set_default("a", tail)
        up.set_default("b", tail)
        # Warm-up (litellm's async path), and the fixed delay: twice the median of unhedged calls as measured
        # here, so the load on this machine does not decide whether every call or none is hedged.
        probe = Router(
            parse_config(CONFIG.format(up=up.url, after_s=1.0), "hedge-bench.yaml"), registry=CollectorRegistry()
        )
        after_s = round(2 * percentile(await batch(probe, "plain", 200, concurrency), 50), 4)
        registry = CollectorRegistry()
        r = Router(parse_config(CONFIG.format(up=up.url, after_s=after_s), "hedge-bench.yaml"), registry=registry)
        await batch(r, "p90", 60, concurrency)  # p90's latency window
        latencies: dict[str, list[float]] = {v: [] for v in VARIANTS}
        sent: dict[str, int] = dict.fromkeys(VARIANTS, 0)
        order = list(VARIANTS)
        shuffle = random.Random(seed + 1)
        per_round = max(1, calls // rounds)
        for _ in range(rounds):
            shuffle.shuffle(order)
            for alias in order:
                before = len(up.history)
                latencies[alias] += await batch(r, alias, per_round, concurrency)
                await asyncio.sleep(base_s * TAIL_FACTOR * 1.5)  # let cancelled requests' server threads finish
                sent[alias] += len(up.history) - before
        out: dict[str, Any] = {
            "calls_per_variant": per_round * rounds,
            "concurrency": concurrency,
            "base_s": base_s,
            "tail": f"{TAIL_SHARE:.0%} of answers {TAIL_FACTOR:g}x slower",
            "hedge_after_s": after_s,
            "variants": {},
        }
        for alias in VARIANTS:
            lat = latencies[alias]
            out["variants"][alias] = {
                "p50_s": percentile(lat, 50),
                "p95_s": percentile(lat, 95),
                "p99_s": percentile(lat, 99),
                "mean_s": statistics.fmean(lat),
                "requests_per_call": sent[alias] / len(lat),
                "extra_requests_pct": 100 * (sent[alias] - len(lat)) / len(lat),
            }
        plain = out["variants"]["plain"]
        for alias in VARIANTS:
            v = out["variants"][alias]
            v["p99_ratio_vs_plain"] = v["p99_s"] / plain["p99_s"]
            v["p50_ratio_vs_plain"] = v["p50_s"] / plain["p50_s"]
        return out


def report(res: dict[str, Any]) -> str:
    """The results as a Markdown table."""
    lines = [
        "# Hedged requests against a heavy-tailed upstream",
        "",
        f"{res['calls_per_variant']} calls per variant, agenerate at concurrency {res['concurrency']}, interleaved "
        f"rounds; upstream answers in {res['base_s'] * 1000:g} ms ±20%, {res['tail']}. Hedge delay: "
        f"`after_s: {res['hedge_after_s']}` (twice the median of unhedged calls in a warm-up of this run), or "
        "the target's own p90 as the router keeps it (`after_percentile: 90`; with exactly 5% slow answers, a "
        "p95 sits on the edge of the tail).",
        "",
        "| variant | p50 ms | p95 ms | p99 ms | p99 vs plain | p50 vs plain | requests per call | extra requests |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for alias, v in res["variants"].items():
        lines.append(
            f"| {alias} | {v['p50_s'] * 1000:.0f} | {v['p95_s'] * 1000:.0f} | {v['p99_s'] * 1000:.0f} | "
            f"{v['p99_ratio_vs_plain']:.2f}× | {v['p50_ratio_vs_plain']:.2f}× | {v['requests_per_call']:.3f} | "
            f"{v['extra_requests_pct']:.1f}% |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=1000, help="calls per variant")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--base-ms", type=float, default=100.0, help="typical answer time of the upstream")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    res = asyncio.run(run(args.calls, args.concurrency, args.base_ms / 1000, args.rounds, args.seed))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hedge.json").write_text(json.dumps(res, indent=2) + "\n")
    text = report(res)
    (args.out / "hedge.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
