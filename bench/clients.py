"""The contenders: one zero-argument call per variant, all sending the same request to the same upstream.

``raw_async`` (aiohttp) and ``raw_sync`` (http.client) are the floors: what one HTTP round trip costs with
no client library at all. The rest are litellm on its own, litellm's own Router, and ours. Every variant
sends the same messages and the same litellm kwargs the router builds (model, api_base, api_key,
max_retries=0, timeout), so any difference is the layer's own work.

Beside them, for the direct engine (issue 17): the router on a target with `engine: direct` (alias
`direct_engine`, the same upstream route), the official ``openai`` SDK, and bare ``httpx`` (the client the
direct engine is built on), sync and async; and each of those streaming (`stream_variants`).

Importing this module imports litellm: set ``LITELLM_LOCAL_MODEL_COST_MAP`` first (``bench.__main__``
does), or litellm tries to download its price map.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import aiohttp
import httpx
import litellm
import openai
from prometheus_client import CollectorRegistry

import router

API_KEY = "sk-bench-not-a-secret"
MODEL = "bench-model"
TIMEOUT_S = 30.0
MESSAGES = [{"role": "user", "content": "ping"}]

# The router's config: `direct` is one target; `fallback` first hits a route that answers 503 at once.
CONFIG = """\
version: 1
defaults:
  model: direct
  timeout_s: {timeout}
  deadline_s: 120
  retry: {{attempts: 1, backoff_s: 0}}
{circuit_defaults}providers:
  ok:   {{kind: openai, api_base: "{url}/ok/v1", api_key: {key}}}
  fail: {{kind: openai, api_base: "{url}/fail/v1", api_key: {key}}}
  okd:  {{kind: openai, api_base: "{url}/ok/v1", api_key: {key}, engine: direct}}
{circuit_provider}aliases:
  direct:   {{targets: [ok/{model}]}}
  fallback: {{targets: [fail/{model}, ok/{model}]}}
  direct_engine: {{targets: [okd/{model}]}}
{circuit_alias}pricing:
  ok/{model}:   {{input_per_1m: 0.15, output_per_1m: 0.6}}
  fail/{model}: {{input_per_1m: 0.15, output_per_1m: 0.6}}
  okd/{model}:  {{input_per_1m: 0.15, output_per_1m: 0.6}}
{circuit_pricing}"""


def has_circuits() -> bool:
    """Whether this version of the router has circuit breakers (`defaults.circuit` in the config)."""
    from router import config

    defaults = getattr(config, "DefaultsConfig", None)
    provider = getattr(config, "ProviderConfig", None)
    return all(m is not None and "circuit" in m.model_fields for m in (defaults, provider))


def config_text(url: str) -> str:
    """The bench config. With circuit breakers, `fail` never trips (the 503 fallback must reach it every time)
    and `failopen`, on the same 503 route, trips at its first failure and stays open: `fallback_open`."""
    circuits = has_circuits()
    return CONFIG.format(
        url=url, key=API_KEY, model=MODEL, timeout=TIMEOUT_S,
        circuit_defaults="  circuit: {failure_threshold: 1000000000, failure_ratio: null}\n" if circuits else "",
        circuit_provider=(
            f'  failopen: {{kind: openai, api_base: "{url}/fail/v1", api_key: {API_KEY}, '
            "circuit: {failure_threshold: 1, cooldown_s: 86400}}\n" if circuits else ""
        ),
        circuit_alias=f"  fallback_open: {{targets: [failopen/{MODEL}, ok/{MODEL}]}}\n" if circuits else "",
        circuit_pricing=f"  failopen/{MODEL}: {{input_per_1m: 0.15, output_per_1m: 0.6}}\n" if circuits else "",
    )


def quiet() -> None:
    """Silence litellm's and the router's logs for the run, without making the router skip its log calls.

    The router's records are still built (a production app has a handler) but go to a NullHandler.
    """
    litellm.suppress_debug_info = True
    litellm.set_verbose = False
    for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy", "httpx", "openai"):
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)
    log = logging.getLogger("router")
    log.handlers[:] = [logging.NullHandler()]
    log.propagate = False


@dataclass(frozen=True)
class Variant:
    """One way of making the call."""

    key: str
    label: str
    mode: str  # "async": call() returns an awaitable; "sync": call() blocks
    floor: str  # the key of the raw variant its latency is compared with
    call: Callable[[], Any]
    enter: Callable[[], None] | None = None  # run before each of its batches, outside the measurement
    exit: Callable[[], None] | None = None  # run after each of its batches


# litellm's module-level callback lists: whatever is in them runs on every litellm call in the process.
CALLBACK_LISTS = (
    "callbacks", "input_callback", "success_callback", "failure_callback",
    "_async_input_callback", "_async_success_callback", "_async_failure_callback",
)


class Clients:
    """Builds every variant against `url` on the current event loop; `aclose()` when done."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ok_base = f"{url}/ok/v1"
        self.config = router.parse_config(config_text(url), "bench.yaml", env={})
        self.circuits = has_circuits()
        self.router = router.Router(self.config, registry=CollectorRegistry())
        self.session: aiohttp.ClientSession | None = None
        self.lrouter: Any = None
        self.httpx_async: httpx.AsyncClient | None = None
        self.openai_async: openai.AsyncOpenAI | None = None
        self.httpx_sync = httpx.Client(limits=httpx.Limits(max_connections=1000, max_keepalive_connections=200))
        self.openai_sync = openai.OpenAI(base_url=self.ok_base, api_key=API_KEY, max_retries=0, timeout=TIMEOUT_S)
        self._json_body = {"model": MODEL, "messages": MESSAGES}
        parts = urlsplit(url)
        self._conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=TIMEOUT_S)
        self._body = json.dumps({"model": MODEL, "messages": MESSAGES}).encode()
        self._headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}

    async def astart(self) -> None:
        """Create what must live on the event loop: the raw aiohttp session and litellm's Router.

        Creating a litellm.Router appends its deployment-tracking methods to litellm's global success and
        failure callbacks, and from then on they run on every litellm call in the process, bare ones and ours
        included. So they are taken out again, and put back only around litellm.Router's own batches.
        """
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        # The openai SDK's own defaults (1000 connections); httpx with the same pool the direct engine uses.
        self.httpx_async = httpx.AsyncClient(limits=httpx.Limits(max_connections=1000, max_keepalive_connections=200))
        self.openai_async = openai.AsyncOpenAI(base_url=self.ok_base, api_key=API_KEY, max_retries=0, timeout=TIMEOUT_S)
        before = {name: list(getattr(litellm, name)) for name in CALLBACK_LISTS}
        self.lrouter = litellm.Router(
            model_list=[
                {
                    "model_name": "bench",
                    "litellm_params": {
                        "model": f"openai/{MODEL}",
                        "api_base": self.ok_base,
                        "api_key": API_KEY,
                        "max_retries": 0,
                        "timeout": TIMEOUT_S,
                    },
                }
            ],
            num_retries=0,
        )
        self._lrouter_callbacks = {
            name: [cb for cb in getattr(litellm, name) if not any(cb is b for b in before[name])]
            for name in CALLBACK_LISTS
        }
        self.detach_litellm_router()

    def attach_litellm_router(self) -> None:
        """Put litellm.Router's callbacks back into litellm's global lists (for its own batches)."""
        for name, cbs in self._lrouter_callbacks.items():
            getattr(litellm, name).extend(cbs)

    def detach_litellm_router(self) -> None:
        """Take litellm.Router's callbacks out of litellm's global lists."""
        for name, cbs in self._lrouter_callbacks.items():
            lst = getattr(litellm, name)
            lst[:] = [cb for cb in lst if not any(cb is c for c in cbs)]

    async def aclose(self) -> None:
        """Close the sessions this object opened."""
        if self.session is not None:
            await self.session.close()
        for client in (self.httpx_async, self.openai_async):
            if client is not None:
                await client.close() if isinstance(client, openai.AsyncOpenAI) else await client.aclose()
        self.httpx_sync.close()
        self.openai_sync.close()
        self._conn.close()

    # -- the calls -----------------------------------------------------------------------------------------

    def _litellm_kwargs(self) -> dict[str, Any]:
        return {
            "model": f"openai/{MODEL}",
            "messages": MESSAGES,
            "api_base": self.ok_base,
            "api_key": API_KEY,
            "max_retries": 0,
            "timeout": TIMEOUT_S,
        }

    async def raw_async(self) -> Any:
        assert self.session is not None
        async with self.session.post(
            f"{self.ok_base}/chat/completions", data=self._body, headers=self._headers
        ) as resp:
            resp.raise_for_status()
            return await resp.json()

    def raw_sync(self) -> Any:
        self._conn.request("POST", "/ok/v1/chat/completions", body=self._body, headers=self._headers)
        resp = self._conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"upstream answered {resp.status}")
        return json.loads(data)

    def litellm_async(self) -> Awaitable[Any]:
        return litellm.acompletion(**self._litellm_kwargs())

    def litellm_sync(self) -> Any:
        return litellm.completion(**self._litellm_kwargs())

    def litellm_router_async(self) -> Awaitable[Any]:
        return self.lrouter.acompletion(model="bench", messages=MESSAGES)

    def router_async(self) -> Awaitable[router.Result]:
        return self.router.agenerate(messages=MESSAGES, model="direct")

    def router_sync(self) -> router.Result:
        return self.router.generate(messages=MESSAGES, model="direct")

    def direct_async(self) -> Awaitable[router.Result]:
        return self.router.agenerate(messages=MESSAGES, model="direct_engine")

    def direct_sync(self) -> router.Result:
        return self.router.generate(messages=MESSAGES, model="direct_engine")

    async def openai_sdk_async(self) -> Any:
        assert self.openai_async is not None
        return await self.openai_async.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]

    def openai_sdk_sync(self) -> Any:
        return self.openai_sync.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]

    async def httpx_post_async(self) -> Any:
        assert self.httpx_async is not None
        url = f"{self.ok_base}/chat/completions"
        resp = await self.httpx_async.post(url, json=self._json_body, headers=self._headers)
        resp.raise_for_status()
        return resp.json()

    def httpx_post_sync(self) -> Any:
        resp = self.httpx_sync.post(f"{self.ok_base}/chat/completions", json=self._json_body, headers=self._headers)
        resp.raise_for_status()
        return resp.json()

    # -- streamed: each reads a whole streamed answer (bench.upstream.STREAM_CHUNKS content chunks) ------------

    async def litellm_stream_async(self) -> int:
        stream = await litellm.acompletion(**self._litellm_kwargs(), stream=True)
        return await _count(stream, _has_content)

    async def router_stream_async(self) -> int:
        stream = await self.router.agenerate(messages=MESSAGES, model="direct", stream=True)
        return await _count(stream)

    async def direct_stream_async(self) -> int:
        stream = await self.router.agenerate(messages=MESSAGES, model="direct_engine", stream=True)
        return await _count(stream)

    def direct_stream_sync(self) -> int:
        return sum(1 for _ in self.router.generate(messages=MESSAGES, model="direct_engine", stream=True))

    async def openai_stream_async(self) -> int:
        assert self.openai_async is not None
        stream = await self.openai_async.chat.completions.create(
            model=MODEL, messages=MESSAGES, stream=True  # type: ignore[arg-type]
        )
        return await _count(stream, _has_content)

    async def httpx_stream_async(self) -> int:
        """httpx with a minimal SSE reading: the floor of what parsing a stream costs in Python."""
        assert self.httpx_async is not None
        n = 0
        body = {**self._json_body, "stream": True}
        async with self.httpx_async.stream(
            "POST", f"{self.ok_base}/chat/completions", json=body, headers=self._headers
        ) as resp:
            async for line in resp.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                        n += 1
        return n

    def stream_variants(self) -> dict[str, Variant]:
        """The streamed contenders: each call reads one whole streamed answer."""
        vs = [
            Variant("httpx_stream_async", "httpx stream + json per event (floor)", "async", "httpx_stream_async",
                    self.httpx_stream_async),
            Variant("openai_stream_async", "openai SDK stream", "async", "httpx_stream_async",
                    self.openai_stream_async),
            Variant("litellm_stream_async", "litellm.acompletion stream", "async", "httpx_stream_async",
                    self.litellm_stream_async),
            Variant("router_stream_async", "router.Router.agenerate stream (litellm engine)", "async",
                    "httpx_stream_async", self.router_stream_async),
            Variant("direct_stream_async", "router.Router.agenerate stream (direct engine)", "async",
                    "httpx_stream_async", self.direct_stream_async),
            Variant("direct_stream_sync", "router.Router.generate stream (direct engine)", "sync",
                    "httpx_stream_async", self.direct_stream_sync),
        ]  # fmt: skip
        return {v.key: v for v in vs}

    def router_fallback_async(self) -> Awaitable[router.Result]:
        return self.router.agenerate(messages=MESSAGES, model="fallback")

    def router_fallback_open_async(self) -> Awaitable[router.Result]:
        return self.router.agenerate(messages=MESSAGES, model="fallback_open")

    def variants(self) -> dict[str, Variant]:
        """Every contender, by key, in display order."""
        vs = [
            Variant("raw_async", "raw aiohttp POST (floor)", "async", "raw_async", self.raw_async),
            Variant("litellm_async", "litellm.acompletion", "async", "raw_async", self.litellm_async),
            Variant(
                "litellm_router_async", "litellm.Router.acompletion", "async", "raw_async", self.litellm_router_async,
                self.attach_litellm_router, self.detach_litellm_router,
            ),
            Variant("router_async", "router.Router.agenerate", "async", "raw_async", self.router_async),
            Variant("httpx_async", "httpx.AsyncClient POST", "async", "raw_async", self.httpx_post_async),
            Variant("openai_async", "openai SDK (async)", "async", "raw_async", self.openai_sdk_async),
            Variant("direct_async", "router.Router.agenerate, direct engine", "async", "raw_async", self.direct_async),
            Variant("raw_sync", "raw http.client POST (sync floor)", "sync", "raw_sync", self.raw_sync),
            Variant("litellm_sync", "litellm.completion", "sync", "raw_sync", self.litellm_sync),
            Variant("router_sync", "router.Router.generate", "sync", "raw_sync", self.router_sync),
            Variant("httpx_sync", "httpx.Client POST", "sync", "raw_sync", self.httpx_post_sync),
            Variant("openai_sync", "openai SDK (sync)", "sync", "raw_sync", self.openai_sdk_sync),
            Variant("direct_sync", "router.Router.generate, direct engine", "sync", "raw_sync", self.direct_sync),
        ]
        return {v.key: v for v in vs}


async def _count(stream: Any, keep: Callable[[Any], bool] = bool) -> int:
    """How many items of an async stream `keep` takes (a streamed answer read to its end)."""
    n = 0
    async for item in stream:
        n += 1 if keep(item) else 0
    return n


def _has_content(chunk: Any) -> bool:
    return bool(chunk.choices and chunk.choices[0].delta.content)


# -- letting litellm's deferred work finish ------------------------------------------------------------------
#
# litellm logs a success after returning: async calls queue a coroutine on its logging worker, sync calls
# submit to a thread pool. That work is part of what a call costs, so every measurement window ends only
# once it is done, and it cannot spill into the next variant's window.


def _logging_worker() -> Any:
    mod = sys.modules.get("litellm.litellm_core_utils.logging_worker")
    return getattr(mod, "GLOBAL_LOGGING_WORKER", None)


def _executor_idle() -> bool:
    mod = sys.modules.get("litellm.litellm_core_utils.thread_pool_executor")
    ex = getattr(mod, "executor", None)
    slots = getattr(ex, "_pending_slots", None)
    if slots is None:
        return True
    return getattr(slots, "_value", 0) >= getattr(ex, "_max_pending_tasks", 0)


# Long-lived tasks a batch may start (a worker loop): learned on a timeout, ignored afterwards.
_daemons: set[asyncio.Task[Any]] = set()


async def settle(before: set[asyncio.Task[Any]], timeout_s: float = 3.0) -> bool:
    """Wait until the tasks started since `before` and litellm's logging queue are done; False on timeout."""
    me = asyncio.current_task()
    deadline = time.monotonic() + timeout_s
    while True:
        await asyncio.sleep(0)
        worker = _logging_worker()
        q = getattr(worker, "_queue", None)
        busy = q is not None and (q.qsize() > 0 or getattr(q, "_unfinished_tasks", 0) > 0)
        skip = {me, getattr(worker, "_worker_task", None), getattr(worker, "_timeout_summary_task", None)}
        pending = [t for t in asyncio.all_tasks() if t not in skip and t not in before and t not in _daemons]
        if not busy and not pending and _executor_idle():
            return True
        if time.monotonic() > deadline:
            _daemons.update(pending)
            return False
        await asyncio.sleep(0.0005)


def settle_sync(timeout_s: float = 3.0) -> bool:
    """Wait until litellm's logging thread pool has nothing queued or running; False on timeout."""
    deadline = time.monotonic() + timeout_s
    while not _executor_idle():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.0002)
    return True
