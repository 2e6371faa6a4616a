"""The measurements: interleaved rounds of every variant, so drift in the machine hits all of them alike.

All timing is in this process; the upstream is another process, so `time.process_time()` is the client's
CPU alone (threads included: litellm's sync logging runs in a thread pool). Every window ends only after
litellm's deferred logging for its calls is done (`settle`), so that work is billed to the calls that made it.
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from .clients import Clients, Variant, settle, settle_sync

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """Resident set size of this process, from /proc/self/statm (no psutil)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def full_collections() -> int:
    """How many collections of the oldest generation this process has run."""
    return gc.get_stats()[-1]["collections"]


def percentile(xs: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100) of `xs`, linear between ranks."""
    s = sorted(xs)
    if not s:
        return float("nan")
    k = (len(s) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


class Runner:
    """Runs batches of calls on one event loop and reports CPU, wall and per-call latency."""

    def __init__(self, loop: asyncio.AbstractEventLoop, clients: Clients) -> None:
        self.loop = loop
        self.clients = clients
        self.settle_timeouts = 0
        self.collect = True  # gc.collect() before each batch; off when litellm's heap is not frozen (200+ ms each)

    # -- one batch -------------------------------------------------------------------------------------------

    def sequential(self, v: Variant, n: int) -> dict[str, Any]:
        """`n` calls one after another: CPU per call, wall of the batch, latency of each call."""
        if v.enter is not None:
            v.enter()
        try:
            return self._sequential(v, n)
        finally:
            if v.exit is not None:
                v.exit()

    def _sequential(self, v: Variant, n: int) -> dict[str, Any]:
        if self.collect:
            gc.collect()
        if v.mode == "async":
            return self.loop.run_until_complete(self._seq_async(v.call, n))
        lat = []
        g0 = full_collections()
        c0, w0 = time.process_time(), time.perf_counter()
        for _ in range(n):
            t = time.perf_counter()
            v.call()
            lat.append(time.perf_counter() - t)
        if not settle_sync():
            self.settle_timeouts += 1
        return {"cpu_s": (time.process_time() - c0) / n, "wall_s": time.perf_counter() - w0, "lat_s": lat,
                "gc2": full_collections() - g0}

    async def _seq_async(self, call: Callable[[], Any], n: int) -> dict[str, Any]:
        before = asyncio.all_tasks()
        lat = []
        g0 = full_collections()
        c0, w0 = time.process_time(), time.perf_counter()
        for _ in range(n):
            t = time.perf_counter()
            await call()
            lat.append(time.perf_counter() - t)
        if not await settle(before):
            self.settle_timeouts += 1
        return {"cpu_s": (time.process_time() - c0) / n, "wall_s": time.perf_counter() - w0, "lat_s": lat,
                "gc2": full_collections() - g0}

    def concurrent(self, v: Variant, n: int, concurrency: int) -> dict[str, Any]:
        """`n` calls from `concurrency` workers: calls per second (deferred logging included) and CPU per call."""
        if v.enter is not None:
            v.enter()
        try:
            if self.collect:
                gc.collect()
            return self.loop.run_until_complete(self._concurrent(v.call, n, concurrency))
        finally:
            if v.exit is not None:
                v.exit()

    async def _concurrent(self, call: Callable[[], Any], n: int, concurrency: int) -> dict[str, Any]:
        before = asyncio.all_tasks()
        todo = iter(range(n))

        async def worker() -> None:
            for _ in todo:
                await call()

        c0, w0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, n))))
        if not await settle(before):
            self.settle_timeouts += 1
        wall = time.perf_counter() - w0
        return {"rps": n / wall, "cpu_s": (time.process_time() - c0) / n, "wall_s": wall}

    def warm_up(self, variants: Sequence[Variant], n: int) -> None:
        """Fill every cache and pool (litellm's clients, connections, lazy imports) before measuring."""
        for v in variants:
            self.sequential(v, n)
            if v.mode == "async":
                self.concurrent(v, max(n, 50), 50)

    # -- the phases -----------------------------------------------------------------------------------------

    def rounds_sequential(self, variants: Sequence[Variant], rounds: int, n: int, seed: int = 1) -> dict[str, Any]:
        """CPU per call and latency at concurrency 1, `rounds` rounds, each visiting every variant in a new order."""
        rng = random.Random(seed)
        out: dict[str, Any] = {v.key: {"cpu_s": [], "wall_s": [], "lat_s": [], "gc2": 0} for v in variants}
        for _ in range(rounds):
            order = list(variants)
            rng.shuffle(order)
            for v in order:
                r = self.sequential(v, n)
                out[v.key]["cpu_s"].append(r["cpu_s"])
                out[v.key]["wall_s"].append(r["wall_s"])
                out[v.key]["lat_s"].extend(r["lat_s"])
                out[v.key]["gc2"] += r["gc2"]
        for v in variants:
            out[v.key]["rps"] = [n / w for w in out[v.key]["wall_s"]]
        return out

    def rounds_concurrent(
        self, variants: Sequence[Variant], levels: Sequence[int], rounds: int, n: int, waves: int = 3, seed: int = 2
    ) -> dict[str, Any]:
        """Throughput at each concurrency level, interleaved like `rounds_sequential`."""
        rng = random.Random(seed)
        out: dict[str, Any] = {str(c): {v.key: {"rps": [], "cpu_s": []} for v in variants} for c in levels}
        for _ in range(rounds):
            cells = [(c, v) for c in levels for v in variants]
            rng.shuffle(cells)
            for c, v in cells:
                r = self.concurrent(v, max(n, waves * c), c)  # several waves of workers, not one
                out[str(c)][v.key]["rps"].append(r["rps"])
                out[str(c)][v.key]["cpu_s"].append(r["cpu_s"])
        return out

    def fallback(self, rounds: int, n: int) -> dict[str, Any]:
        """A fallback after an instant 503 vs a direct call to the good target, alternating call by call."""
        return self.loop.run_until_complete(self._fallback(rounds, n))

    async def _fallback(self, rounds: int, n: int) -> dict[str, Any]:
        c = self.clients
        out: dict[str, Any] = {"direct_s": [], "fallback_s": [], "failed_attempt_s": [], "extra_s": []}
        if c.circuits:
            out.update({"open_s": [], "open_extra_s": []})
            res = await c.router_fallback_open_async()  # trips failopen's breaker (threshold 1), open for a day
        for _ in range(rounds):
            gc.collect()
            direct, fb, failed, opened = [], [], [], []
            for _ in range(n):
                t = time.perf_counter()
                await c.router_async()
                direct.append(time.perf_counter() - t)
                t = time.perf_counter()
                res = await c.router_fallback_async()
                fb.append(time.perf_counter() - t)
                if [a.outcome for a in res.attempts] != ["server_error", "success"]:
                    raise RuntimeError(f"the fallback alias did not fall back: {res.attempts}")
                failed.append(res.attempts[0].latency_s)
                if c.circuits:
                    t = time.perf_counter()
                    res = await c.router_fallback_open_async()
                    opened.append(time.perf_counter() - t)
                    if [a.outcome for a in res.attempts] != ["success"] or not any(
                        s.reason == "circuit_open" for s in res.skipped
                    ):
                        raise RuntimeError(f"failopen's circuit is not open: {res.attempts} {res.skipped}")
            # What the fallback costs beyond the failed attempt itself: (fallback call - its failed attempt)
            # against a direct call, medians of the round.
            beyond = [f - a for f, a in zip(fb, failed, strict=True)]
            out["direct_s"].append(statistics.median(direct))
            out["fallback_s"].append(statistics.median(fb))
            out["failed_attempt_s"].append(statistics.median(failed))
            out["extra_s"].append(statistics.median(beyond) - statistics.median(direct))
            if c.circuits:
                out["open_s"].append(statistics.median(opened))
                out["open_extra_s"].append(statistics.median(opened) - statistics.median(direct))
        return out

    def router_only(self, rounds: int, n: int) -> dict[str, Any]:
        """The router's own CPU per call: agenerate/generate with litellm's call replaced by a recorded answer.

        No network, no litellm: what is left is the plan, the attempt loop, reading the response, pricing and
        metrics. Patched in this process only, and restored.
        """
        from router.engines import litellm as _litellm

        c = self.clients
        recorded = self.loop.run_until_complete(c.router_async()).raw
        real_a, real_s = _litellm.acomplete, _litellm.complete

        stubbed = [0]

        async def acomplete(kwargs: dict[str, Any]) -> Any:
            stubbed[0] += 1
            return recorded

        def complete(kwargs: dict[str, Any]) -> Any:
            stubbed[0] += 1
            return recorded

        async def batch() -> float:
            c0 = time.process_time()
            for _ in range(n):
                await c.router_async()
            return (time.process_time() - c0) / n

        def batch_sync() -> float:
            c0 = time.process_time()
            for _ in range(n):
                c.router_sync()
            return (time.process_time() - c0) / n

        out: dict[str, list[float]] = {"async_cpu_s": [], "sync_cpu_s": []}
        _litellm.acomplete, _litellm.complete = acomplete, complete
        try:
            self.loop.run_until_complete(batch())  # warm
            for _ in range(rounds):
                gc.collect()
                out["async_cpu_s"].append(self.loop.run_until_complete(batch()))
                gc.collect()
                out["sync_cpu_s"].append(batch_sync())
        finally:
            _litellm.acomplete, _litellm.complete = real_a, real_s
        if stubbed[0] < rounds * n * 2:
            raise RuntimeError("the router no longer calls engines.litellm.acomplete/complete: update bench.measure")
        return out

    def leak(
        self, checkpoints: Sequence[int], deadline: float, concurrency: int = 50, chunk: int = 1000
    ) -> dict[str, Any]:
        """RSS after each checkpoint's number of `Router.agenerate` calls; stops early at `deadline`."""
        return self.loop.run_until_complete(self._leak(checkpoints, deadline, concurrency, chunk))

    async def _leak(self, checkpoints: Sequence[int], deadline: float, concurrency: int, chunk: int) -> dict[str, Any]:
        call = self.clients.router_async
        done = 0
        points: list[dict[str, Any]] = []
        gc.collect()
        points.append({"calls": 0, "rss": rss_bytes(), "t": 0.0})
        t0 = time.perf_counter()
        stopped_early = False
        for target in checkpoints:
            while done < target:
                if time.monotonic() > deadline:
                    stopped_early = True
                    break
                m = min(chunk, target - done)
                r = await self._concurrent(call, m, concurrency)
                done += m
                del r
            gc.collect()
            points.append({"calls": done, "rss": rss_bytes(), "t": time.perf_counter() - t0})
            if stopped_early:
                break
        return {"points": points, "stopped_early": stopped_early, "concurrency": concurrency}
