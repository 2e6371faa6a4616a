"""What a wall-clock bound costs `generate()`: CPU per sync call, the request sent three ways (~1 min).

    python -m bench.sync_deadline                    # 5 interleaved rounds of 200 calls per variant
    python -m bench.sync_deadline --rounds 3 --calls 100

``blocking`` is how `generate()` sent a request before deadlines held: `litellm.completion` on the calling
thread, bounded only per socket read (a body trickled a byte at a time is never cut). ``loop`` is how it sends
one now: `litellm.acompletion` on the background event loop, held to the attempt's time, the caller waiting
for it. ``thread`` is the other way to bound a blocking call: `litellm.completion` on a worker thread, the
caller waiting at most the attempt's time (it can walk away, but the worker's socket stays open: not chosen).
``async`` is `agenerate()` on the caller's own loop, for reference. Streams: ``stream_pump`` reads the blocking
stream on a thread per stream (before), ``stream_loop`` the async one through the background loop (now); each
stream is read to its end (five chunks).

The upstream is `router.sandbox` in its own process, pinned to its own core when there are two, so
`time.process_time` is the client alone. The order of the variants changes every round; ratios are medians of
per-round ratios to ``blocking`` (``stream_pump`` for streams).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import gc
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # before litellm is imported: no price-map download

from prometheus_client import CollectorRegistry

import router
from router import background, streams
from router.engines import Answer, Send
from router.engines import litellm as L
from router.streams import StreamState

from .clients import quiet, settle, settle_sync
from .run import pin

CONFIG = """
version: 1
defaults: {{model: chat, timeout_s: 30, deadline_s: 60, retry: {{attempts: 1}}}}
providers:
  p: {{kind: openai, api_base: "{url}/p/v1", api_key: sk-bench-not-a-secret}}
aliases:
  chat: {{targets: [p/bench-model]}}
pricing:
  p/bench-model: {{input_per_1m: 0.15, output_per_1m: 0.6}}
"""
TEXT = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen"


def blocking_complete(send: Send) -> Answer:
    """The sync request as it was: litellm.completion on the calling thread."""
    return L.read_response(L.complete(L.request_kwargs(send)))


_pool = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="bench-worker")


def thread_complete(send: Send) -> Answer:
    """The blocking request on a worker thread, waited for at most the attempt's time."""
    return _pool.submit(blocking_complete, send).result(timeout=send.timeout_s)


def pump_open_stream(send: Send) -> StreamState:
    """The sync stream as it was: the blocking litellm stream, read on a thread of its own."""
    kwargs = L.request_kwargs(send)
    return streams.open_sync(lambda: L._Source(L.litellm().completion(**kwargs)), send.limits)


class Sandbox:
    """`python -m router.sandbox` in a child process, on a free port, pinned to `cpu` when given."""

    def __init__(self, cpu: int | None) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "router.sandbox", "--port", str(self.port)], stdout=subprocess.DEVNULL
        )
        if cpu is not None and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(self.proc.pid, {cpu})
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.proc.kill()
                    raise RuntimeError("the sandbox upstream did not start") from None
                time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=5)


def _settle_loop() -> None:
    """Wait until litellm's deferred work on the background loop (and its thread pool) is done."""
    loop = background.background_loop()

    async def idle() -> None:
        await settle({t for t in asyncio.all_tasks() if t is not asyncio.current_task()})

    background.run_on(loop, idle()).result(timeout=10)
    settle_sync()


def main(argv: list[str] | None = None) -> None:
    """Measure and print a table of CPU per call."""
    parser = argparse.ArgumentParser(prog="python -m bench.sync_deadline")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args(argv)
    cpu, pinning = pin()
    quiet()
    up = Sandbox(cpu)
    try:
        _run(up.url, args.rounds, args.calls, pinning)
    finally:
        up.close()


def _run(url: str, rounds: int, calls: int, pinning: str) -> None:
    cfg = router.parse_config(CONFIG.format(url=url), "bench.yaml", env={})
    r = router.Router(cfg, registry=CollectorRegistry())
    engine = L.ENGINE
    cls = type(engine)
    aloop = asyncio.new_event_loop()

    def plain(complete: Callable[[Send], Answer]) -> Callable[[], None]:
        def batch() -> None:
            engine.complete = complete  # type: ignore[method-assign]
            try:
                for _ in range(calls):
                    assert r.generate(TEXT).text
            finally:
                del engine.complete

        return batch

    def stream(open_stream: Callable[[Send], StreamState]) -> Callable[[], None]:
        def batch() -> None:
            engine.open_stream = open_stream  # type: ignore[method-assign]
            try:
                for _ in range(calls):
                    s = r.generate(TEXT, stream=True)
                    assert "".join(s) and s.result is not None
            finally:
                del engine.open_stream

        return batch

    def async_batch() -> None:
        async def go() -> None:
            for _ in range(calls):
                assert (await r.agenerate(TEXT)).text
            await settle(set())

        aloop.run_until_complete(go())

    variants: dict[str, Callable[[], None]] = {
        "blocking": plain(blocking_complete),
        "loop": plain(lambda send: cls.complete(engine, send)),
        "thread": plain(thread_complete),
        "async": async_batch,
        "stream_pump": stream(pump_open_stream),
        "stream_loop": stream(lambda send: cls.open_stream(engine, send)),
    }
    for batch in variants.values():  # warm-up: imports, connection pools, litellm's first-call work
        batch()
        _settle_loop()
    gc.collect()
    gc.freeze()  # litellm's heap: a full pass would land in a random batch (see bench/README.md)

    cpu: dict[str, list[float]] = {k: [] for k in variants}
    wall: dict[str, list[float]] = {k: [] for k in variants}
    order = list(variants)
    for _ in range(rounds):
        random.shuffle(order)
        for key in order:
            _settle_loop()
            t0, w0 = time.process_time(), time.perf_counter()
            variants[key]()
            _settle_loop()
            cpu[key].append((time.process_time() - t0) / calls)
            wall[key].append((time.perf_counter() - w0) / calls)

    def ratio(key: str, base: str) -> float:
        return statistics.median(a / b for a, b in zip(cpu[key], cpu[base], strict=True))

    print(f"{rounds} rounds x {calls} calls, {pinning}")
    print(f"{'variant':<12} {'CPU ms/call':>12} {'wall ms/call':>13} {'CPU vs before':>14}")
    for key in variants:
        base = "stream_pump" if key.startswith("stream") else "blocking"
        print(
            f"{key:<12} {statistics.median(cpu[key]) * 1e3:>12.3f} {statistics.median(wall[key]) * 1e3:>13.3f}"
            f" {ratio(key, base):>13.3f}x"
        )


if __name__ == "__main__":
    main()
