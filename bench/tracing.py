"""What OpenTelemetry tracing costs a call: Router.agenerate's CPU per call with and without `tracing:`.

    python -m bench.tracing                  # ~1 min: 12 interleaved rounds of 200 calls per variant
    python -m bench.tracing --rounds 4 --calls 100

Variants, all on the bench upstream (another process, pinned to its own core when there are two):
``off`` has no `tracing:` section (no hook, nothing imported); ``noop`` has the hook on OpenTelemetry's no-op
tracer provider (the extra installed, no SDK configured); ``sdk`` records every span with the SDK and hands it
to a BatchSpanProcessor whose exporter drops it (what a service exporting spans pays in-process, the wire
aside). Ratios are medians of per-round ratios to ``off``; the order of the variants changes every round.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import statistics
import time
from collections.abc import Sequence

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # before litellm is imported: no price-map download

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from prometheus_client import CollectorRegistry

import router
from router.plugins.tracing import TracingHook

from . import clients as cl
from .run import pin
from .upstream import Upstream


class _Drop(SpanExporter):
    """Takes every batch and keeps nothing."""

    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans += len(spans)
        return SpanExportResult.SUCCESS


async def _batch(r: router.Router, calls: int) -> float:
    """CPU seconds per call of `calls` sequential agenerate() calls, litellm's deferred logging included."""
    before = set(asyncio.all_tasks())
    t0 = time.process_time()
    for _ in range(calls):
        await r.agenerate(messages=cl.MESSAGES, model="fallback")
    await cl.settle(before)
    return (time.process_time() - t0) / calls


async def _run(url: str, rounds: int, calls: int) -> None:
    cl.quiet()
    config = router.parse_config(cl.config_text(url), "bench.yaml", env={})
    traced = router.parse_config(cl.config_text(url) + "tracing: {enabled: true}\n", "bench.yaml", env={})
    exporter = _Drop()
    sdk = TracerProvider()
    sdk.add_span_processor(BatchSpanProcessor(exporter))
    variants = {
        "off": router.Router(config, registry=CollectorRegistry()),
        "noop": router.Router(
            config, registry=CollectorRegistry(), hooks=[TracingHook(tracer_provider=trace.NoOpTracerProvider())]
        ),
        "sdk": router.Router(config, registry=CollectorRegistry(), hooks=[TracingHook(tracer_provider=sdk)]),
    }
    assert not variants["off"]._hooks and router.Router(traced, registry=CollectorRegistry())._hooks
    for r in variants.values():  # warm up: imports, connection pools, litellm's caches
        await _batch(r, 50)
    gc.collect()
    gc.freeze()  # as bench.run does: a full GC pass with litellm loaded would land in one random batch
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    rng = random.Random(0)
    for i in range(rounds):
        order = list(variants)
        rng.shuffle(order)
        for key in order:
            cpu[key].append(await _batch(variants[key], calls))
        print(f"round {i + 1}/{rounds}: " + ", ".join(f"{k} {cpu[k][-1] * 1e3:.3f} ms" for k in variants), flush=True)
    sdk.force_flush()
    print(f"\nRouter.agenerate, a 503 fallback (2 attempts, so 3 spans a call), CPU per call, {rounds} x {calls}:")
    for key in variants:
        ratio = statistics.median(c / o for c, o in zip(cpu[key], cpu["off"], strict=True))
        print(f"  {key:<5} {statistics.median(cpu[key]) * 1e3:7.3f} ms   {ratio:.3f}x off")
    print(f"  (the sdk exporter received {exporter.spans} spans)")


def main(argv: list[str] | None = None) -> None:
    """Measure and print."""
    p = argparse.ArgumentParser(prog="python -m bench.tracing", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--calls", type=int, default=200)
    args = p.parse_args(argv)
    cpu, how = pin()
    print(how)
    with Upstream(cpu) as up:
        asyncio.run(_run(up.url, args.rounds, args.calls))


if __name__ == "__main__":
    main()
