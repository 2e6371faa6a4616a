"""The gateway's ASGI app: routes, client keys, headers, streams, client disconnects, health and readiness.

One `Gateway` answers both the HTTP server (`llm-router serve`, under uvicorn) and the in-process OpenAI clients
(`router.openai_client()`, whose transport calls it without a socket), so the two answer alike:

    POST /v1/chat/completions   the router's answer in OpenAI's shape, or its SSE stream
    GET  /v1/models[/ID]        the aliases the client's key may use
    GET  /healthz               alive
    GET  /readyz                a config in force, and every alias with a target it can use (503 otherwise)
    GET  /metrics               Prometheus exposition (every worker's, under PROMETHEUS_MULTIPROC_DIR)

The paths without the /v1 prefix answer too. It is plain ASGI on the standard library: five routes do not
need a framework, and the streaming path owns exactly how a client's disconnect reaches the provider request
(the call is cancelled, counted `cancelled`, and its budget hold released).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..errors import RouterError
from ..metrics import multiprocess_dir, multiprocess_registry
from ..policy import static_skip
from . import protocol
from .protocol import ChatRequest, GatewayError

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from ..client import AsyncStream, Router
    from ..config import GatewayConfig, GatewayKeyConfig
    from ..types import Result

log = logging.getLogger("router.gateway")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024  # base64 images make big bodies; OpenAI takes up to 20 MB per image
DISABLED_ENV = "LLM_ROUTER_DISABLED_PROVIDERS"
_SSE_HEADERS = {
    "content-type": "text/event-stream; charset=utf-8",
    "cache-control": "no-cache",
    "x-accel-buffering": "no",  # nginx and its kin: pass each event on at once
}


class Gateway:
    """The OpenAI-compatible ASGI app over one `Router` (see the module docstring).

    `require_keys`: refuse every /v1 request while the config in force has no `gateway:` keys (a server bound
    to a public address without --allow-unauthenticated: a reload that drops the keys must not open it up).
    `sighup`: reload the router's config file on SIGHUP, installed when the server starts (lifespan).
    `owns_router`: close the router when the server stops (flushing its ledger).
    """

    def __init__(
        self,
        router: Router,
        *,
        require_keys: bool = False,
        sighup: bool = False,
        owns_router: bool = False,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        self.router = router
        self.require_keys = require_keys
        self.sighup = sighup
        self.owns_router = owns_router
        self.max_body_bytes = max_body_bytes
        self.started = time.time()
        self._keys: tuple[GatewayConfig | None, tuple[tuple[bytes, GatewayKeyConfig], ...]] = (None, ())

    def __repr__(self) -> str:
        return f"<Gateway {self.router!r}>"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":  # websockets: not served
            return
        headers = _headers(scope)
        rid = protocol.request_id(headers.get("x-request-id"))
        path: str = scope["path"]
        route = _route(path)
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        status = 500
        try:
            if route == "chat":
                status = await self._chat(receive, tracked, headers, rid, scope["method"])
            else:
                status = await self._other(route, path, scope["method"], headers, rid, tracked)
        except GatewayError as exc:
            status = exc.status
            await _send_json(send, exc.status, exc.body(), {**exc.headers, "x-request-id": rid})
        except _Gone:
            status = 499  # the client left before its answer: nobody to send one to
        except Exception as exc:
            log.error("request %s: %s: %s", rid, type(exc).__name__, exc, exc_info=exc)
            if not started:
                err = protocol.error_for(exc)
                await _send_json(send, err.status, err.body(), {"x-request-id": rid})
        finally:
            self.router.metrics.gateway_response(route, status)

    # -- routes ---------------------------------------------------------------------------------------------

    async def _other(self, route: str, path: str, method: str, headers: Mapping[str, str], rid: str, send: Send) -> int:
        if route == "other":
            raise protocol.not_found(path)
        if method not in ("GET", "HEAD"):
            raise GatewayError(405, f"{path} takes GET, not {method}", code="method_not_allowed")
        base = {"x-request-id": rid}
        if route == "healthz":
            return await _send_json(send, 200, {"status": "ok"}, base)
        if route == "readyz":
            ready, body = self.readiness()
            return await _send_json(send, 200 if ready else 503, body, base)
        if route == "metrics":
            payload = generate_latest(self._registry())
            return await _send(send, 200, payload, {"content-type": CONTENT_TYPE_LATEST})
        if route in ("models", "model"):
            key = self._authenticate(headers)
            allowed = protocol.allowed_aliases(key, self.router.config.aliases)
            if route == "models":
                return await _send_json(send, 200, protocol.models(allowed, int(self.started)), base)
            alias = path.rstrip("/").rsplit("/", 1)[-1]
            if alias not in allowed:
                raise GatewayError(404, f"model {alias!r} does not exist", code="model_not_found", param="model")
            return await _send_json(send, 200, protocol.model_entry(alias, int(self.started)), base)
        raise protocol.not_found(path)  # pragma: no cover (every route is answered above)

    async def _chat(self, receive: Receive, send: Send, headers: Mapping[str, str], rid: str, method: str) -> int:
        if method != "POST":
            raise GatewayError(405, f"/v1/chat/completions takes POST, not {method}", code="method_not_allowed")
        body = await _read_body(receive, self.max_body_bytes)
        key = self._authenticate(headers)
        req = protocol.parse_chat(body)
        self._authorize(key, req.alias)
        # The answer runs as a task while the client's connection is watched: a client that goes away cancels
        # the call, and with it the provider request (counted `cancelled`; hooks release its budget hold).
        sent = False

        async def sending(message: Message) -> None:
            nonlocal sent
            # Once the last byte is handed over, a disconnect is the end of the exchange, not a client leaving.
            sent = sent or (message["type"] == "http.response.body" and not message.get("more_body", False))
            await send(message)

        work = asyncio.ensure_future(self._answer(req, key, rid, sending))
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the server is going down: the call goes with it
            await _cancel(work)
            raise
        finally:
            gone.cancel()
        if not work.done() and sent:
            return await work
        if not work.done():
            log.info("request %s: the client disconnected; its call is cancelled", rid)
            await _cancel(work)
            raise _Gone()
        return work.result()

    async def _answer(self, req: ChatRequest, key: GatewayKeyConfig | None, rid: str, send: Send) -> int:
        """Answer one chat request; the status sent."""
        kwargs = req.generate_kwargs(protocol.call_tags(key, req.user))
        cid, created = protocol.new_id(), int(time.time())
        base = {"x-request-id": rid, "x-llm-router-alias": req.alias}
        try:
            answer = await self.router.agenerate(**kwargs)
        except Exception as exc:
            err = self._error(exc, rid)
            return await _send_json(send, err.status, err.body(), {**err.headers, **base})
        if not kwargs["stream"]:
            result: Result = answer
            headers = {**base, **protocol.result_headers(result)}
            if req.stream:  # a format to validate first: the whole answer, sent as a stream
                await _start(send, 200, {**_SSE_HEADERS, **headers})
                await self._replay(send, result, req, cid, created)
                return 200
            return await _send_json(send, 200, protocol.completion(result, cid, created, req.alias), headers)
        await self._stream(send, answer, req, cid, created, base, rid)
        return 200

    async def _stream(
        self,
        send: Send,
        stream: AsyncStream,
        req: ChatRequest,
        cid: str,
        created: int,
        headers: Mapping[str, str],
        rid: str,
    ) -> None:
        def event(delta: Mapping[str, Any] | None, finish: str | None = None, **kw: Any) -> bytes:
            return protocol.sse(
                protocol.chunk(cid, created, req.alias, delta, finish, include_usage=req.include_usage, **kw)
            )

        try:
            await _start(send, 200, {**_SSE_HEADERS, **headers})
            await _body(send, event({"role": "assistant", "content": "", "refusal": None}))
            finish: str | None = None
            tool_calls = False
            async for text, calls, reason in _deltas(stream):
                delta: dict[str, Any] = {}
                if text:
                    delta["content"] = text
                if calls:
                    delta["tool_calls"] = [dict(c) for c in calls]
                    tool_calls = True
                if delta:
                    await _body(send, event(delta))
                finish = reason or finish
            result = stream.result
            if result is None:  # cannot happen once the stream ended; an error event beats a hang
                raise RuntimeError("the stream ended without a result")
            await self._finish(send, result, req, cid, created, finish, tool_calls)
        except OSError:  # the server could not send: the client has gone (and the watcher cancels the rest)
            raise _Gone() from None
        except Exception as exc:  # after text (StreamInterruptedError, ...): an error event, then the end, no [DONE]
            err = self._error(exc, rid)
            await _body(send, protocol.sse(err.body()), more=False)
        finally:
            # Ended, broken or cancelled (the client left): the call's end is counted either way. Shielded, so
            # the cancellation that brought us here cannot stop the provider request from being closed.
            await asyncio.shield(stream.aclose())

    async def _replay(self, send: Send, result: Result, req: ChatRequest, cid: str, created: int) -> None:
        first = {"role": "assistant", "content": "", "refusal": None}
        await _body(send, protocol.sse(protocol.chunk(cid, created, req.alias, first, include_usage=req.include_usage)))
        for piece in protocol.pieces(result.text) if result.text else ():
            delta = {"content": piece}
            await _body(
                send, protocol.sse(protocol.chunk(cid, created, req.alias, delta, include_usage=req.include_usage))
            )
        await self._finish(send, result, req, cid, created, None, False)

    async def _finish(
        self,
        send: Send,
        result: Result,
        req: ChatRequest,
        cid: str,
        created: int,
        finish: str | None,
        streamed_calls: bool,
    ) -> None:
        calls = protocol.tool_calls_of(result)
        if calls and not streamed_calls:  # a stream whose tool calls came only with its result
            delta = {"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]}
            await _body(
                send, protocol.sse(protocol.chunk(cid, created, req.alias, delta, include_usage=req.include_usage))
            )
        reason = protocol.finish_reason_of(finish or result.finish_reason, bool(calls) or streamed_calls)
        last = protocol.chunk(cid, created, req.alias, {}, reason, include_usage=req.include_usage)
        if req.include_usage:
            await _body(send, protocol.sse(last))
            last = protocol.chunk(cid, created, req.alias, None, usage=protocol.usage_json(result), include_usage=True)
        last["llm_router"] = protocol.router_info(result)
        await _body(send, protocol.sse(last) + protocol.DONE, more=False)

    # -- keys -------------------------------------------------------------------------------------------------

    def _authenticate(self, headers: Mapping[str, str]) -> GatewayKeyConfig | None:
        """The client key of a request (None when the config has no keys), or a 401."""
        gateway = self.router.config.gateway
        if gateway is None:
            if self.require_keys:
                raise protocol.unauthorized(
                    "this gateway is bound to a public address and its config has no gateway: keys; "
                    "its operators must add them (or restart it with --allow-unauthenticated)"
                )
            return None
        if self._keys[0] is not gateway:  # a reload brought new keys
            self._keys = (gateway, protocol.key_digests(gateway.keys))
        token = protocol.bearer_token(headers.get("authorization"))
        if token is None:
            raise protocol.unauthorized("this gateway needs a key: send the header Authorization: Bearer <key>")
        key = protocol.match_key(self._keys[1], token)
        if key is None:
            raise protocol.unauthorized("the key sent is not one of this gateway's keys")
        return key

    def _authorize(self, key: GatewayKeyConfig | None, alias: str) -> None:
        aliases = self.router.config.aliases
        if key is not None and key.aliases is not None and alias not in key.aliases:
            raise protocol.forbidden(key.name, alias, protocol.allowed_aliases(key, aliases))
        if alias not in aliases:
            import difflib

            close = difflib.get_close_matches(alias, protocol.allowed_aliases(key, aliases), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise GatewayError(404, f"model {alias!r} does not exist{hint}", code="model_not_found", param="model")

    def _error(self, exc: BaseException, rid: str) -> GatewayError:
        err = protocol.error_for(exc)
        if err.status >= 500 and not isinstance(exc, RouterError):
            log.error("request %s: %s: %s", rid, type(exc).__name__, exc, exc_info=exc)
        elif err.status >= 500:
            log.warning("request %s: %s: %s", rid, type(exc).__name__, exc)
        return err

    # -- health, readiness, metrics -------------------------------------------------------------------------

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Whether every alias of the config in force has a target it may use (enabled, not disabled by
        LLM_ROUTER_DISABLED_PROVIDERS, with a key), and the body saying so. Open circuits do not make it unready:
        they close by themselves, and taking every replica out of a load balancer for a provider's outage
        would turn fast errors and fallbacks into none at all."""
        cfg = self.router.config
        disabled = frozenset(p.strip() for p in os.environ.get(DISABLED_ENV, "").split(",") if p.strip())
        usable = {a: sum(static_skip(t, disabled, None) is None for t in cfg.targets(a)) for a in cfg.aliases}
        problems = [
            f"alias {a!r} has no usable target (all disabled or without keys)" for a, n in usable.items() if not n
        ]
        body = {
            "status": "not ready" if problems else "ready",
            "config": {"source": cfg.source, "sha256": cfg.sha256},
            "usable_targets": usable,
            "problems": problems,
        }
        return not problems, body

    def _registry(self) -> CollectorRegistry:
        path = multiprocess_dir()
        return multiprocess_registry(path) if path is not None else self.router.metrics.registry

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    if self.sighup:
                        self.router.install_sighup_handler()
                except Exception as exc:  # e.g. not the main thread: serve without it, and say so
                    log.warning("SIGHUP does not reload the config in this process: %s", exc)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.owns_router:
                    await asyncio.to_thread(self.router.close)
                await send({"type": "lifespan.shutdown.complete"})
                return


# -- ASGI plumbing ----------------------------------------------------------------------------------------------


class _Gone(Exception):
    """The client disconnected before its answer was sent."""


def _route(path: str) -> str:
    """The route name of a path (also the `route` label of the gateway's metric: a fixed set)."""
    p = path.rstrip("/") or "/"
    if p.startswith("/v1/"):
        p = p[3:]
    if p == "/chat/completions":
        return "chat"
    if p == "/models":
        return "models"
    if p.startswith("/models/") and p.count("/") == 2:
        return "model"
    if p in ("/healthz", "/readyz", "/metrics"):
        return p[1:]
    return "other"


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}


async def _read_body(receive: Receive, limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Gone()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise GatewayError(413, f"the request body is over {limit} bytes", code="request_too_large")
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


async def _cancel(task: asyncio.Future[Any]) -> None:
    """Cancel a task and wait for it to finish its cleanup."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, OSError, _Gone):
        await task


async def _disconnected(receive: Receive) -> None:
    """Return when the client has gone away (the server's `http.disconnect`)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _deltas(stream: AsyncStream) -> AsyncIterator[tuple[str, tuple[Mapping[str, Any], ...], str | None]]:
    """(text, tool-call deltas, finish reason) of each event of a stream: from `AsyncStream.events()` where the
    router has it, else from its text deltas."""
    events = getattr(stream, "events", None)
    if events is not None:
        async for ch in events():
            yield ch.text, tuple(ch.tool_calls or ()), ch.finish_reason
    else:
        async for text in stream:
            yield text, (), None


async def _start(send: Send, status: int, headers: Mapping[str, str]) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()],
        }
    )


async def _body(send: Send, data: bytes, more: bool = True) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": more})


async def _send(send: Send, status: int, payload: bytes, headers: Mapping[str, str]) -> int:
    await _start(send, status, {**headers, "content-length": str(len(payload))})
    await _body(send, payload, more=False)
    return status


async def _send_json(send: Send, status: int, obj: Any, headers: Mapping[str, str]) -> int:
    payload = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
    return await _send(send, status, payload, {"content-type": "application/json", **headers})
