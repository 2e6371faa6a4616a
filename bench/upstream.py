"""A loopback OpenAI-compatible upstream for the benchmark, run in its own process.

``POST /{route}/v1/chat/completions`` answers a fixed, small ``chat.completion`` with usage, from bytes built
once; a route whose name starts with ``fail`` answers 503 at once, one starting with ``cost`` adds
OpenRouter's ``usage.cost`` (the provider-reported price the router must keep reading), and ``wait<N>`` answers
after N ms ±20% (a provider's think time, for latency benchmarks). A request with
``"stream": true`` gets the same answer as server-sent events: STREAM_CHUNKS content chunks, a finish chunk, a
usage chunk and ``data: [DONE]``, built once and written one event at a time. Being another
process, its CPU never shows in the benchmark's ``time.process_time()``; it is pinned to its own core where
there is one to spare, so it is not the bottleneck.

    with Upstream() as up:
        up.url   # http://127.0.0.1:PORT

Run it alone with ``python -m bench.upstream`` (prints ``PORT <n>`` once it listens).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from types import TracebackType

REPLY = {
    "id": "chatcmpl-bench",
    "object": "chat.completion",
    "created": 1_700_000_000,
    "model": "bench-model",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "pong"},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15},
}
BODY = json.dumps(REPLY, separators=(",", ":")).encode()
PROVIDER_COST = 0.000042
COST_BODY = json.dumps(
    {**REPLY, "usage": {**REPLY["usage"], "cost": PROVIDER_COST}}, separators=(",", ":")
).encode()
FAIL_BODY = json.dumps({"error": {"message": "bench: unavailable", "type": "server_error", "code": 503}}).encode()
STREAM_CHUNKS = 20  # content chunks of a streamed answer: CPU per chunk is a streamed call's CPU / this


def _stream_events() -> list[bytes]:
    def event(payload: object) -> bytes:
        return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"

    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1_700_000_000, "model": "bench-model"}
    chunks = [{**base, "choices": [{"index": 0, "delta": {"content": f"tok{i} "}, "finish_reason": None}]}
              for i in range(STREAM_CHUNKS)]  # fmt: skip
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    chunks.append({**base, "choices": [], "usage": REPLY["usage"]})
    return [event(c) for c in chunks] + [b"data: [DONE]\n\n"]


STREAM_EVENTS = _stream_events()  # written one at a time, as a provider sends them


def serve(cpu: int | None = None) -> None:
    """Serve forever on a free loopback port; print ``PORT <n>`` on stdout once listening."""
    import asyncio
    import random
    import re

    from aiohttp import web

    wait = re.compile(r"^wait(\d+)")

    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})

    async def chat(request: web.Request) -> web.StreamResponse:
        raw = await request.read()  # drain the body so keep-alive connections stay usable
        route = request.match_info["route"]
        if route.startswith("fail"):
            return web.Response(status=503, body=FAIL_BODY, content_type="application/json")
        m = wait.match(route)
        if m:
            await asyncio.sleep(int(m.group(1)) / 1000 * random.uniform(0.8, 1.2))
        if b'"stream":true' in raw.replace(b" ", b""):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for event in STREAM_EVENTS:
                await resp.write(event)
            await resp.write_eof()
            return resp
        return web.Response(body=COST_BODY if route.startswith("cost") else BODY, content_type="application/json")

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/{route}/v1/chat/completions", chat)
        app.router.add_post("/{route}/chat/completions", chat)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        site = web.SockSite(runner, sock, backlog=1024)
        await site.start()
        print(f"PORT {sock.getsockname()[1]}", flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass


class Upstream:
    """The upstream in a child process: started on enter, waited for until it accepts, always terminated."""

    def __init__(self, cpu: int | None = None, start_timeout_s: float = 20.0) -> None:
        self.cpu = cpu
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """Base URL of the server."""
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Upstream:
        cmd = [sys.executable, "-m", "bench.upstream"]
        if self.cpu is not None:
            cmd += ["--cpu", str(self.cpu)]
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=root)
        try:
            assert self.proc.stdout is not None
            line = self.proc.stdout.readline()  # blocks until the child listens (or dies: EOF)
            if not line.startswith("PORT "):
                raise RuntimeError(f"bench upstream did not start (exit code {self.proc.poll()})")
            self.port = int(line.split()[1])
            self._wait_accepting()
        except BaseException:
            self.close()
            raise
        return self

    def _wait_accepting(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline or (self.proc and self.proc.poll() is not None):
                    raise RuntimeError("bench upstream does not accept connections") from None
                time.sleep(0.02)

    def close(self) -> None:
        """Stop the child process (terminate, then kill if it lingers)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", type=int, default=None, help="pin the server to this CPU")
    serve(ap.parse_args().cpu)
