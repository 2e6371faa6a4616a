"""The direct engine: the router's own OpenAI chat-completions client, on httpx, for OpenAI-protocol providers.

OpenAI, OpenRouter and every OpenAI-compatible server (vLLM, Ollama's /v1, LM Studio, Groq, Together, DeepSeek,
Mistral, Fireworks) speak one documented protocol: a POST of JSON to `{base}/chat/completions`, answered with JSON
or with server-sent events. This module speaks it itself, never imports litellm, and hands the attempt loop what
the LiteLLM engine hands it for the same bytes: the same `Answer`s and `Chunk`s, and the same outcome for every
failure (`http_outcome`, held to LiteLLM's by tests/test_direct.py).

    pools      one `httpx.Client` per (provider, base URL, key), one `httpx.AsyncClient` per those and event loop
               (an AsyncClient's connections belong to the loop that opened them); keep-alive; new ones after fork
    deadline   every socket operation is held to the request's wall-clock deadline (`_Backend`), so a body
               trickled a byte at a time, headers and then silence, or a connection accepted and never answered,
               all end by the attempt's timeout, however the bytes come
    streams    SSE parsed here (`SSE`): comments (keep-alives) and empty deltas skipped, `data: [DONE]` ends the
               stream, an error object inside a 200 stream raises the error it names. Closing a sync stream from
               any thread shuts its socket down, so the thread blocked reading it wakes at once
    prices     the config's (the loop's), else the provider's (OpenRouter's `usage.cost`), else LiteLLM's price map,
               read as the JSON file LiteLLM ships without importing the package, else unknown
    tokens     a stream whose provider reported no usage is estimated at ~4 characters a token (`estimate_usage`)
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import socket
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import httpcore
import httpx

from .. import streams
from .._version import __version__
from ..types import Usage
from . import Answer, Chunk, Failure, Send, classify_common
from .price_map import PriceMap
from .wire import (
    DONE,
    DONE_FINISHES,
    SSE,
    ProviderHTTPError,
    answer_chunks,
    base_url,
    encode,
    estimate_usage,
    event_json,
    http_error,
    http_outcome,
    read_answer,
    read_chunk,
    request_body,
)

if TYPE_CHECKING:
    from ..config import Target
    from ..streams import StreamState

log = logging.getLogger("router")

DRAIN_S = 0.25  # see _Source._drain_by
SHARD = 4  # connections per httpx client (see _Shards)
MAX_SHARDS = 250  # clients per provider, key (and loop): 1,000 connections, for a few hundred requests in flight
LIMITS = httpx.Limits(max_connections=SHARD, max_keepalive_connections=SHARD, keepalive_expiry=30.0)

# -- the wall-clock deadline of a request -----------------------------------------------------------------------
#
# httpx's timeouts bound each socket operation, and httpcore reads a phase's timeout once: a provider that sends a
# byte every half second never trips a read timeout. So every connect, TLS handshake, read and write goes through
# `_Backend`'s streams, which bound the operation by what is left of the deadline of the request being served (a
# context variable, set around each request and each read of a stream), and fail at once past it.

_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("llm_router_direct_deadline", default=None)


def _left(timeout: float | None, error: type[Exception]) -> float | None:
    """`timeout` cut to what is left of the current request's deadline; raises `error` once it has passed."""
    at = _deadline.get()
    if at is None:
        return timeout
    left = at - time.monotonic()
    if left <= 0:
        raise error("the request's deadline passed")
    return left if timeout is None or left < timeout else timeout


class _Stream(httpcore.NetworkStream):
    """A connection whose every operation is held to the current request's deadline."""

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None) -> _Stream:
        return _Stream(self._inner.start_tls(ssl_context, server_hostname, _left(timeout, httpcore.ConnectTimeout)))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _Backend(httpcore.NetworkBackend):
    """httpcore's sync backend, its connections held to the current request's deadline."""

    def __init__(self, inner: httpcore.NetworkBackend) -> None:
        self._inner = inner

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> _Stream:
        limit = _left(timeout, httpcore.ConnectTimeout)
        return _Stream(self._inner.connect_tcp(host, port, limit, local_address, socket_options))

    def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options: Any = None) -> _Stream:
        return _Stream(self._inner.connect_unix_socket(path, _left(timeout, httpcore.ConnectTimeout), socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class _AsyncStream(httpcore.AsyncNetworkStream):
    """Async twin of `_Stream`."""

    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._inner.read(max_bytes, _left(timeout, httpcore.ReadTimeout))

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, _left(timeout, httpcore.WriteTimeout))

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None
    ) -> _AsyncStream:
        limit = _left(timeout, httpcore.ConnectTimeout)
        return _AsyncStream(await self._inner.start_tls(ssl_context, server_hostname, limit))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _AsyncBackend(httpcore.AsyncNetworkBackend):
    """Async twin of `_Backend`."""

    def __init__(self, inner: httpcore.AsyncNetworkBackend) -> None:
        self._inner = inner

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> _AsyncStream:
        limit = _left(timeout, httpcore.ConnectTimeout)
        return _AsyncStream(await self._inner.connect_tcp(host, port, limit, local_address, socket_options))

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Any = None
    ) -> _AsyncStream:
        limit = _left(timeout, httpcore.ConnectTimeout)
        return _AsyncStream(await self._inner.connect_unix_socket(path, limit, socket_options))

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def _hold_to_deadlines(client: httpx.Client | httpx.AsyncClient) -> None:
    """Put every connection pool of `client` (its own, and any proxy's from the environment) on `_Backend`."""
    transports = [client._transport, *client._mounts.values()]
    for transport in transports:
        pool = getattr(transport, "_pool", None)
        if pool is None:
            continue
        if not hasattr(pool, "_network_backend"):  # httpcore changed: deadlines would silently not hold
            raise RuntimeError(f"httpcore {httpcore.__version__}: the direct engine cannot bound its connections")
        wrap = _AsyncBackend if isinstance(client, httpx.AsyncClient) else _Backend
        pool._network_backend = wrap(pool._network_backend)


class _Source:
    """What sync and async streams share: the request, the SSE parser, the events parsed and not yet read."""

    def __init__(self, send: Send, response: Any, deadline: float | None, lease: _Lease) -> None:
        self.send = send
        self.response = response
        self.lease = lease  # the client it was sent by, given back when the stream ends or is closed
        self.deadline = deadline  # the stream's wall-clock end (the call's deadline): no read outlives it
        self.sse = SSE()
        self.events: deque[bytes] = deque()
        self.finished = False  # [DONE] came, or the body ended
        self.saw_finish = False
        self.json_answer: list[Chunk] | None = None  # a provider that answered a stream with plain JSON

    def _next_event(self) -> Chunk | None:
        """The next chunk from events already parsed; None when they are used up."""
        while self.events:
            event = self.events.popleft()
            if event == DONE:
                self.finished = True
                self.events.clear()
                if not self.saw_finish and self.send.target.kind in DONE_FINISHES:
                    self.saw_finish = True
                    return Chunk(finish_reason="stop")
                return None
            chunk = read_chunk(self.send, event_json(self.send, event))
            if chunk.finish_reason:
                self.saw_finish = True
            return chunk
        return None

    def _answered(self) -> Chunk:
        assert self.json_answer
        chunk = self.json_answer.pop(0)
        self.saw_finish = self.saw_finish or bool(chunk.finish_reason)
        return chunk

    def provider_finished(self) -> bool:
        """Whether the provider ended the answer: sent a finish reason (or, for the kinds that LiteLLM reads so,
        `data: [DONE]` after none)."""
        return self.saw_finish

    def _drain_by(self) -> float:
        """How long the rest of a body may take to read after `data: [DONE]`: only the chunked terminator is left,
        and reading it puts the connection back in the pool (a server that keeps talking is cut)."""
        return min(self.deadline or float("inf"), time.monotonic() + DRAIN_S)


class _SyncSource(_Source):
    """A blocking stream. `close()` may come from any thread: it shuts the socket down (waking a thread blocked
    reading it) and leaves the response to the reading thread, which closes it as its read returns."""

    def __init__(self, send: Send, response: httpx.Response, deadline: float | None, lease: _Lease) -> None:
        super().__init__(send, response, deadline, lease)
        self._raw: Iterator[bytes] = iter(response.stream)  # type: ignore[arg-type]
        self._lock = threading.Lock()
        self._reading = False
        self._closed = False

    def __iter__(self) -> _SyncSource:
        return self

    def __next__(self) -> Chunk:
        if self.json_answer is not None:
            if self.json_answer:
                return self._answered()
            self.lease.release()
            raise StopIteration
        with self._lock:
            if self._closed:
                raise StopIteration
            self._reading = True
        token = _deadline.set(self.deadline)
        ended = False
        try:
            while True:
                chunk = self._next_event()
                if chunk is not None:
                    return chunk
                if self.finished:
                    self._drain()
                    raise StopIteration
                try:
                    raw = next(self._raw)
                except StopIteration:
                    self.finished = True
                    self.events.extend(self.sse.end())
                    chunk = self._next_event()
                    if chunk is not None:
                        return chunk
                    raise
                self.events.extend(self.sse.feed(raw))
        except BaseException:  # its end, or a failure: either way the stream is over
            ended = True
            raise
        finally:
            _deadline.reset(token)
            with self._lock:
                self._reading = False
                closed = self._closed
            if closed or ended:
                self.response.close()
                self.lease.release()

    def _drain(self) -> None:
        _deadline.set(self._drain_by())  # reset by __next__, which set the one before
        try:
            for _ in self._raw:
                pass
        except Exception:  # cut, or too slow: the connection is closed instead of kept
            pass

    def close(self) -> None:
        """Stop the stream, from any thread."""
        with self._lock:
            self._closed = True
            reading, done = self._reading, self.finished
        if reading and not done:
            _shutdown(self.response)  # the reading thread closes the response and gives the client back
        else:
            self.response.close()
            self.lease.release()

    async def aclose(self) -> None:
        """Not an async source."""
        self.close()

    async def __anext__(self) -> Chunk:
        raise TypeError("a sync stream")


def _shutdown(response: httpx.Response | None) -> None:
    """Shut down the socket under a response still being read: a thread blocked reading it wakes at once."""
    stream = response.extensions.get("network_stream") if response is not None else None
    sock = stream.get_extra_info("socket") if stream is not None else None
    if isinstance(sock, socket.socket):
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # already closed
            pass


class _AsyncSource(_Source):
    """A stream read on the event loop."""

    def __init__(self, send: Send, response: httpx.Response, deadline: float | None, lease: _Lease) -> None:
        super().__init__(send, response, deadline, lease)
        self._raw: AsyncIterator[bytes] = response.stream.__aiter__()  # type: ignore[union-attr]
        weakref.finalize(self, lease.release)  # a stream dropped unread: its client counts it no more

    def __aiter__(self) -> _AsyncSource:
        return self

    async def __anext__(self) -> Chunk:
        if self.json_answer is not None:
            if self.json_answer:
                return self._answered()
            self.lease.release()
            raise StopAsyncIteration
        token = _deadline.set(self.deadline)
        try:
            while True:
                chunk = self._next_event()
                if chunk is not None:
                    return chunk
                if self.finished:
                    await self._drain()
                    await self.response.aclose()
                    self.lease.release()
                    raise StopAsyncIteration
                try:
                    raw = await self._raw.__anext__()
                except StopAsyncIteration:
                    self.finished = True
                    self.events.extend(self.sse.end())
                    continue
                self.events.extend(self.sse.feed(raw))
        except (Exception, asyncio.CancelledError):  # a failure, or a cut by a limit: the response is closed by aclose
            self.lease.release()
            raise
        finally:
            _deadline.reset(token)

    async def _drain(self) -> None:
        _deadline.set(self._drain_by())  # reset by __anext__, which set the one before
        try:
            async for _ in self._raw:
                pass
        except Exception:  # cut, or too slow: the connection is closed instead of kept
            pass

    async def aclose(self) -> None:
        """Close the response (its connection is dropped unless the stream was read to its end)."""
        try:
            await self.response.aclose()
        finally:
            self.lease.release()

    def close(self) -> None:
        """Best effort from sync code: the connection is dropped when the response is collected."""

    def __next__(self) -> Chunk:
        raise TypeError("an async stream")


def classify_error(exc: BaseException) -> Failure:
    """Map an exception of this engine (an HTTP error, a transport failure, the router's own checks) to an outcome."""
    status: int | None = None
    retry_after: float | None = None
    outcome = classify_common(exc)
    if isinstance(exc, ProviderHTTPError):
        status, retry_after = exc.status_code, exc.retry_after
        outcome = outcome or exc.outcome or http_outcome(exc.kind, exc.status_code, exc.body, exc.code)
    elif outcome is None:
        if isinstance(exc, httpx.TimeoutException):
            outcome = "timeout"
        elif isinstance(exc, httpx.DecodingError):  # a body its Content-Encoding does not decode
            outcome = "invalid_response"
        elif isinstance(exc, (httpx.TransportError, OSError)):
            outcome = "connection"
        else:
            outcome = "other"
    message = str(exc) or exc.__class__.__name__
    return Failure(outcome, status, retry_after, f"{exc.__class__.__name__}: {message}")


# -- the engine -------------------------------------------------------------------------------------------------


class _Lease:
    """One request's hold on a client of `_Shards`: given back once, however often `release` is called."""

    __slots__ = ("_held", "_i", "_shards", "client")

    def __init__(self, shards: _Shards, i: int) -> None:
        self.client = shards.clients[i]
        self._shards = shards
        self._i = i
        self._held = True

    def release(self) -> None:
        """Give the client back (from a finalizer too, for an async one: it takes no lock)."""
        if self._held:
            self._held = False
            self._shards.release(self._i)


class _Shards:
    """The httpx clients of one provider, base URL and key (and event loop, for async): each keeps at most SHARD
    connections, a request goes to the least busy, and one more client is made when every one has SHARD requests.

    httpcore's pool does work in the square of its connections each time it takes or gives back a request (every
    idle connection counts all the others): one pool of 50 connections cost 3-6 ms of CPU per request at
    concurrency 50 here, more than the request itself. Small pools keep that to a few microseconds.
    """

    def __init__(self, headers: Mapping[str, str], make: Any, threads: bool) -> None:
        self.headers = headers  # the target's, to notice a reload that changed them
        self.clients: list[Any] = []
        self.load: list[int] = []
        self._make = make
        self._lock: Any = threading.Lock() if threads else contextlib.nullcontext()

    def lease(self) -> _Lease:
        """A client for one request (the first idle one; else a new one; else the least busy)."""
        with self._lock:
            load = self.load
            best, least = -1, SHARD
            for i, n in enumerate(load):
                if n < least:
                    best, least = i, n
                    if n == 0:
                        break
            if best < 0:
                if len(load) < MAX_SHARDS:
                    self.clients.append(self._make())
                    load.append(0)
                    best = len(load) - 1
                else:
                    best = min(range(len(load)), key=load.__getitem__)
            load[best] += 1
            return _Lease(self, best)

    def release(self, i: int) -> None:
        """A request of client `i` is done."""
        with self._lock:
            self.load[i] -= 1


class _Pools:
    """The clients of each (provider, base URL, key), and for async of each event loop too (an AsyncClient's
    connections belong to the loop that opened them), made on first use (see `_Shards`).

    They share one SSL context: building one loads the CA bundle (tens of ms), and a caller that runs each request
    in its own `asyncio.run()` gets new AsyncClients every time.
    """

    def __init__(self) -> None:
        self._ssl: Any = None
        self._sync: dict[tuple[str, str, str | None], _Shards] = {}
        self._async: dict[Any, dict[tuple[str, str, str | None], _Shards]] = {}
        self._lock = threading.Lock()

    def _verify(self) -> Any:
        if self._ssl is None:
            self._ssl = httpx.create_ssl_context()  # honours SSL_CERT_FILE / SSL_CERT_DIR, as httpx does
        return self._ssl

    def _shards(self, cls: type[Any], target: Target, key: str | None) -> _Shards:
        headers = self._headers(target, key)
        verify = self._verify()

        def make() -> Any:
            client = cls(headers=headers, limits=LIMITS, follow_redirects=True, verify=verify)
            _hold_to_deadlines(client)
            return client

        return _Shards(target.headers, make, threads=cls is httpx.Client)

    def forget(self) -> None:
        """Drop every client without closing it: after fork, its sockets are the parent's."""
        self._sync = {}
        self._async = {}
        self._lock = threading.Lock()

    @staticmethod
    def _headers(target: Target, key: str | None) -> dict[str, str]:
        headers = {"User-Agent": f"llm-router/{__version__}", "Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        headers.update(target.headers)
        return headers

    def lease(self, target: Target, key: str | None) -> _Lease:
        """A sync client of the target's provider and this key, for one request."""
        k = (target.provider, target.api_base or "", key)
        got = self._sync.get(k)
        if got is None or not (got.headers is target.headers or got.headers == target.headers):
            with self._lock:
                got = self._sync.get(k)
                if got is None or got.headers != target.headers:
                    got = self._sync[k] = self._shards(httpx.Client, target, key)
        return got.lease()

    def alease(self, target: Target, key: str | None) -> _Lease:
        """An async client of the target's provider and this key, on the running event loop, for one request."""
        loop = asyncio.get_running_loop()
        clients = self._async.get(loop)
        if clients is None:
            with self._lock:  # a new loop: drop the clients of loops that have closed (asyncio.run() per call)
                self._async = {lp: c for lp, c in self._async.items() if not lp.is_closed()}
                clients = self._async.setdefault(loop, {})
        k = (target.provider, target.api_base or "", key)
        got = clients.get(k)
        if got is None or not (got.headers is target.headers or got.headers == target.headers):
            got = clients[k] = self._shards(httpx.AsyncClient, target, key)
        return got.lease()


_TIMEOUT_KEYS = ("connect", "read", "write", "pool")


class DirectEngine:
    """OpenAI-protocol providers, through the router's own httpx client (see the module docstring)."""

    name = "direct"

    def __init__(self) -> None:
        self.pools = _Pools()
        self.prices = PriceMap()
        self._urls: dict[str, str] = {}

    def load(self) -> None:
        """Build the shared SSL context (tens of ms, once) before a call's clock starts; httpx came with the module."""
        self.pools._verify()

    def _url(self, target: Target) -> str:
        url = self._urls.get(target.api_base or target.kind)
        if url is None:
            url = self._urls[target.api_base or target.kind] = base_url(target) + "/chat/completions"
        return url

    @staticmethod
    def _extensions(timeout_s: float) -> dict[str, Any]:
        return {"timeout": dict.fromkeys(_TIMEOUT_KEYS, timeout_s)}

    def complete(self, send: Send) -> Answer:
        """One blocking request, held to `send.timeout_s` of wall-clock time."""
        content = encode(request_body(send))
        lease = self.pools.lease(send.target, send.api_key)
        token = _deadline.set(time.monotonic() + send.timeout_s)
        try:
            response = lease.client.post(
                self._url(send.target), content=content, extensions=self._extensions(send.timeout_s)
            )
        except httpx.TimeoutException as exc:
            raise _timed_out(exc, "no complete answer", send.timeout_s) from exc
        finally:
            _deadline.reset(token)
            lease.release()
        return read_answer(send, response.status_code, response.headers, response.content)

    async def acomplete(self, send: Send) -> Answer:
        """One request on the running event loop, held to `send.timeout_s` of wall-clock time."""
        content = encode(request_body(send))
        lease = self.pools.alease(send.target, send.api_key)
        token = _deadline.set(time.monotonic() + send.timeout_s)
        try:
            response = await lease.client.post(
                self._url(send.target), content=content, extensions=self._extensions(send.timeout_s)
            )
        except httpx.TimeoutException as exc:
            raise _timed_out(exc, "no complete answer", send.timeout_s) from exc
        finally:
            _deadline.reset(token)
            lease.release()
        return read_answer(send, response.status_code, response.headers, response.content)

    def _deadlines(self, send: Send, started: float) -> tuple[float, float | None]:
        """A stream's deadlines: for its headers (no text comes before them), and for the whole stream."""
        limits = send.limits
        if limits is None:
            return started + send.timeout_s, None
        return started + min(send.timeout_s, limits.first_text_s), started + limits.total_s

    def open_stream(self, send: Send) -> StreamState:
        """Start a streamed request and read it up to its first content (see `streams.open_sync`)."""
        content = encode(request_body(send))
        url = self._url(send.target)
        started = time.monotonic()
        headers_by, ends_by = self._deadlines(send, started)

        def open_source() -> _SyncSource:
            lease = self.pools.lease(send.target, send.api_key)
            client = lease.client
            token = _deadline.set(headers_by)
            try:
                request = client.build_request(
                    "POST", url, content=content, headers={"Accept-Encoding": "identity"},
                    extensions=self._extensions(send.timeout_s),
                )  # fmt: skip
                try:
                    response = client.send(request, stream=True)
                except httpx.TimeoutException as exc:
                    raise _timed_out(exc, "no response", headers_by - started) from exc
                try:
                    if response.status_code >= 300 or not _is_sse(response):
                        body = response.read()
                        if response.status_code >= 300:
                            raise http_error(send, response.status_code, response.headers, body)
                        source = _SyncSource(send, response, ends_by, lease)
                        source.json_answer = answer_chunks(send, body)
                        return source
                except BaseException:
                    response.close()
                    raise
                return _SyncSource(send, response, ends_by, lease)
            except BaseException:
                lease.release()
                raise
            finally:
                _deadline.reset(token)

        return streams.open_sync(open_source, send.limits)

    async def aopen_stream(self, send: Send) -> StreamState:
        """Async twin of `open_stream`."""
        content = encode(request_body(send))
        url = self._url(send.target)
        started = time.monotonic()
        headers_by, ends_by = self._deadlines(send, started)

        async def open_source() -> _AsyncSource:
            lease = self.pools.alease(send.target, send.api_key)
            client = lease.client
            token = _deadline.set(headers_by)
            try:
                request = client.build_request(
                    "POST", url, content=content, headers={"Accept-Encoding": "identity"},
                    extensions=self._extensions(send.timeout_s),
                )  # fmt: skip
                try:
                    response = await client.send(request, stream=True)
                except httpx.TimeoutException as exc:
                    raise _timed_out(exc, "no response", headers_by - started) from exc
                try:
                    if response.status_code >= 300 or not _is_sse(response):
                        body = await response.aread()
                        if response.status_code >= 300:
                            raise http_error(send, response.status_code, response.headers, body)
                        source = _AsyncSource(send, response, ends_by, lease)
                        source.json_answer = answer_chunks(send, body)
                        return source
                except BaseException:
                    await response.aclose()
                    raise
                return _AsyncSource(send, response, ends_by, lease)
            except BaseException:
                lease.release()
                raise
            finally:
                _deadline.reset(token)

        return await streams.open_async(open_source, send.limits)

    def classify(self, exc: BaseException) -> Failure:
        """See `classify_error`."""
        return classify_error(exc)

    def count_tokens(self, target: Target, messages: list[dict[str, Any]], text: str) -> Usage:
        """An estimate (see `estimate_usage`), for a stream whose provider reported no usage."""
        return estimate_usage(messages, text)

    def price_map_cost(self, target: Target, usage: Usage) -> float | None:
        """The cost of `usage` by LiteLLM's model map, read as a file (see `PriceMap`)."""
        return self.prices.cost(target, usage)

    def supports_schema(self, target: Target) -> bool:
        """Whether LiteLLM's model map says the model takes a JSON Schema in response_format."""
        if target.kind == "lm_studio":  # LiteLLM takes every LM Studio model to (a local server's own schema mode)
            return True
        info = self.prices.entry(target)
        return bool(info and info.get("supports_response_schema"))

    def max_output_tokens(self, target: Target) -> int | None:
        """The model's largest answer in tokens by LiteLLM's model map; None when the model is not in it."""
        info = self.prices.entry(target)
        value = (info.get("max_output_tokens") or info.get("max_tokens")) if info else None
        return int(value) if value else None


def _timed_out(exc: httpx.TimeoutException, what: str, seconds: float) -> httpx.TimeoutException:
    """A timeout that says what did not come in how long (httpx's says only "timed out")."""
    return httpx.TimeoutException(f"{what} within {seconds:.3g}s of the request ({exc.__class__.__name__})")


def _is_sse(response: httpx.Response) -> bool:
    """Whether a 2xx answer to a stream request is a stream (anything but JSON is read as SSE)."""
    return "json" not in response.headers.get("content-type", "")


ENGINE = DirectEngine()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=ENGINE.pools.forget)
