"""The OpenAI SDK on the router, in process: httpx transports that hand each request to the gateway's ASGI app.

No socket and no server: `openai.OpenAI(http_client=httpx.Client(transport=InProcessTransport(gateway)))`
sends its request to the same `Gateway` that `llm-router serve` runs, so it answers exactly as the HTTP
gateway does (keys, errors, headers, streams). A response body is streamed as the app sends it; closing it
early (leaving a `with` block, `stream.close()`) is the client's disconnect, and the call is cancelled.

The async transport runs the app on the caller's event loop. The sync one runs it on an event loop of its
own, in a daemon thread, and waits for each piece of the answer.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import httpx

from .app import Gateway, Message

if TYPE_CHECKING:
    import openai

    from ..client import Router

from . import BASE_URL

_END: Message = {"type": "end"}  # the app returned (or raised: see Exchange.error)


class Exchange:
    """One request and its answer between an httpx transport and the ASGI app, on one event loop."""

    def __init__(self, app: Gateway, request: httpx.Request, body: bytes) -> None:
        self._queue: asyncio.Queue[Message] = asyncio.Queue()
        self._gone = asyncio.Event()
        self._sent = False
        self.error: BaseException | None = None
        url = request.url
        self._scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": request.method,
            "scheme": url.scheme,
            "path": url.path,
            "raw_path": url.raw_path.split(b"?", 1)[0],
            "query_string": url.query,
            "root_path": "",
            "headers": [(k.lower(), v) for k, v in request.headers.raw],
            "client": ("127.0.0.1", 0),
            "server": ("llm-router.in-process", 80),
        }
        self._body = body
        # httpx's read timeout (the OpenAI SDK's `timeout=`): the longest wait for the answer and each piece of it.
        self._read_s: float | None = (request.extensions.get("timeout") or {}).get("read")
        self._task = asyncio.ensure_future(self._run(app))

    async def _run(self, app: Gateway) -> None:
        try:
            await app(self._scope, self._receive, self._queue.put)
        except BaseException as exc:  # handed to the reader of the answer
            self.error = exc
        finally:
            self._queue.put_nowait(_END)

    async def _receive(self) -> Message:
        if not self._sent:
            self._sent = True
            return {"type": "http.request", "body": self._body, "more_body": False}
        await self._gone.wait()
        return {"type": "http.disconnect"}

    async def _next(self) -> Message:
        """The app's next message, within the read timeout; past it the client gives up, as over a socket."""
        if self._read_s is None:
            return await self._queue.get()
        try:
            return await asyncio.wait_for(self._queue.get(), self._read_s)
        except asyncio.TimeoutError:
            await self.aclose()  # the app sees the client leave: the call is cancelled
            raise httpx.ReadTimeout(f"no answer from the router within {self._read_s:g} s") from None

    async def start(self) -> tuple[int, list[tuple[bytes, bytes]]]:
        """The answer's status and headers, once the app has sent them."""
        message = await self._next()
        if message["type"] != "http.response.start":
            raise httpx.RemoteProtocolError(f"the gateway sent no answer: {self.error!r}") from self.error
        return message["status"], list(message.get("headers", ()))

    async def next_body(self) -> bytes | None:
        """The next piece of the body; None at its end."""
        message = await self._next()
        if message["type"] != "http.response.body":
            self._queue.put_nowait(_END)  # asked again, it answers the same
            if self.error is not None:
                raise httpx.RemoteProtocolError(f"the gateway broke off its answer: {self.error!r}") from self.error
            return None
        body: bytes = message.get("body", b"")
        if not message.get("more_body", False):
            self._queue.put_nowait(_END)
        return body

    async def aclose(self) -> None:
        """The reader is done: tell the app the client has gone, and wait for it to finish (and count the call)."""
        self._gone.set()
        await asyncio.shield(self._task)


class _AsyncBody(httpx.AsyncByteStream):
    def __init__(self, exchange: Exchange) -> None:
        self._exchange = exchange

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while (piece := await self._exchange.next_body()) is not None:
            if piece:
                yield piece

    async def aclose(self) -> None:
        await self._exchange.aclose()


class AsyncInProcessTransport(httpx.AsyncBaseTransport):
    """An httpx async transport whose requests go to a `Gateway` on the running event loop."""

    def __init__(self, app: Gateway, owns_router: bool = False) -> None:
        self.app = app
        self._owns_router = owns_router

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        exchange = Exchange(self.app, request, await request.aread())
        status, headers = await exchange.start()
        return httpx.Response(status, headers=headers, stream=_AsyncBody(exchange), request=request)

    async def aclose(self) -> None:
        if self._owns_router:
            await asyncio.to_thread(self.app.router.close)


class _LoopThread:
    """An event loop running in a daemon thread, for the sync transport."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="llm-router-inprocess", daemon=True)
        self._thread.start()

    def run(self, coro: Any) -> Any:
        """Run a coroutine on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self.loop.close()


class _SyncBody(httpx.SyncByteStream):
    def __init__(self, loop: _LoopThread, exchange: Exchange) -> None:
        self._loop = loop
        self._exchange = exchange
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        while (piece := self._loop.run(self._exchange.next_body())) is not None:
            if piece:
                yield piece

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if not self._loop.loop.is_closed():
                self._loop.run(self._exchange.aclose())


class InProcessTransport(httpx.BaseTransport):
    """An httpx transport whose requests go to a `Gateway` running on an event loop thread of its own."""

    def __init__(self, app: Gateway, owns_router: bool = False) -> None:
        self.app = app
        self._owns_router = owns_router
        self._loop: _LoopThread | None = None
        self._lock = threading.Lock()

    def _thread(self) -> _LoopThread:
        with self._lock:
            if self._loop is None:
                self._loop = _LoopThread()
            return self._loop

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        loop = self._thread()
        body = request.read()

        async def begin() -> tuple[Exchange, int, list[tuple[bytes, bytes]]]:
            exchange = Exchange(self.app, request, body)
            status, headers = await exchange.start()
            return exchange, status, headers

        exchange, status, headers = loop.run(begin())
        return httpx.Response(status, headers=headers, stream=_SyncBody(loop, exchange), request=request)

    def close(self) -> None:
        with self._lock:
            loop, self._loop = self._loop, None
        if loop is not None:
            loop.close()
        if self._owns_router:
            self.app.router.close()


def _gateway(router: Router | str | os.PathLike[str]) -> tuple[Gateway, bool]:
    """A Gateway on `router`, or on a Router made from the config file at that path (then owned: closed with
    the client)."""
    from ..client import Router

    if isinstance(router, Router):
        return Gateway(router), False
    return Gateway(Router.from_yaml(router)), True


def http_client(router: Router | str | os.PathLike[str]) -> httpx.Client:
    """An httpx client on the in-process transport, for SDKs that take one (base URL: BASE_URL)."""
    app, owned = _gateway(router)
    return httpx.Client(transport=InProcessTransport(app, owned), base_url=BASE_URL, timeout=None)


def async_http_client(router: Router | str | os.PathLike[str]) -> httpx.AsyncClient:
    """Async twin of `http_client`."""
    app, owned = _gateway(router)
    return httpx.AsyncClient(transport=AsyncInProcessTransport(app, owned), base_url=BASE_URL, timeout=None)


def openai_client(
    router: Router | str | os.PathLike[str], *, api_key: str | None = None, **kwargs: Any
) -> openai.OpenAI:
    """An `openai.OpenAI` whose requests the Router answers in this process (see `router.openai_client`)."""
    import openai

    return openai.OpenAI(api_key=api_key or "in-process", base_url=BASE_URL, http_client=http_client(router), **kwargs)


def async_openai_client(
    router: Router | str | os.PathLike[str], *, api_key: str | None = None, **kwargs: Any
) -> openai.AsyncOpenAI:
    """An `openai.AsyncOpenAI` whose requests the Router answers on the caller's event loop."""
    import openai

    http = async_http_client(router)
    return openai.AsyncOpenAI(api_key=api_key or "in-process", base_url=BASE_URL, http_client=http, **kwargs)
