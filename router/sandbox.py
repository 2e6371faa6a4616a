"""A real loopback HTTP server that simulates LLM providers (SIMULATED, offline).

`Upstream` runs a stdlib ``ThreadingHTTPServer`` in a daemon thread and speaks
just enough of the OpenAI chat-completions wire format (JSON and SSE
streaming) and the Anthropic messages format to be driven by litellm's real
HTTP clients.  The first path segment names a *route* (one simulated
provider)::

    POST /{route}/v1/chat/completions   (also /{route}/chat/completions)
    POST /{route}/v1/messages           (Anthropic)
    POST /{route}/.../models/{m}:generateContent, :streamGenerateContent   (Gemini: scripted raw replies only)
    POST /{route}/api/generate, /{route}/api/chat                          (Ollama: scripted raw replies only)

Tests script it like a fake upstream (``enqueue()`` replies per route, inspect
``history``); ``llm-router demo`` uses ``simulated_providers()`` as an offline
provider whose answers are clearly labelled as simulated.  Run it standalone
with ``python -m router.sandbox --port 8089``.

Standard library only, so importing it is cheap.
"""

from __future__ import annotations

import argparse
import contextlib
import http
import itertools
import json as _json
import random
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = [
    "Received",
    "Reply",
    "Route",
    "Upstream",
    "estimate_tokens",
    "main",
    "simulated_providers",
    "simulated_text",
]


@dataclass
class Reply:
    """One scripted answer from a simulated provider."""

    status: int = 200
    text: str | None = None  # completion text; None -> the route's text generator
    delay_s: float = 0.0  # wait before sending the headers (cut short, and nothing sent, if the client goes away)
    headers: dict[str, str] = field(default_factory=dict)  # e.g. {"Retry-After": "1"}
    json: Any = None  # if set, sent verbatim as the JSON body (overrides everything)
    raw: bytes | str | None = None  # if set, sent verbatim as the body (text/plain by default)
    raw_stream: list[bytes] | None = None  # if set, each item sent verbatim as one HTTP chunk (a recorded stream)
    chunk_delays: float | list[float] = 0.0  # raw_stream: pause before each chunk (one value, or one per chunk)
    content_type: str | None = None  # of raw / raw_stream (default text/plain / text/event-stream)
    usage: tuple[int, int] | None = None  # (prompt_tokens, completion_tokens); None -> estimated
    cost: float | None = None  # added as usage.cost (OpenRouter style)
    error: str | None = None  # message for a non-2xx status
    cut_after: int | None = None  # streaming: drop the connection after N content chunks
    drop: bool = False  # close the socket without any response
    error_event: bool = False  # streaming: after the content (or cut_after chunks of it) send an SSE error event
    no_finish: bool = False  # streaming: end the body cleanly after the content: no finish_reason, usage, [DONE]
    stream_usage: bool = True  # streaming (OpenAI): send the usage chunk when stream_options.include_usage asks
    # Hostile upstreams, for deadlines: each wait ends early when the client goes away (or the upstream stops).
    hang: bool = False  # read the request, then never answer: hold the connection until the client leaves
    stall_s: float = 0.0  # send the headers, then nothing for this long, then the body
    trickle_s: float = 0.0  # a plain (non-streamed) body: one byte at a time, this many seconds apart


@dataclass
class Received:
    """One request as the simulated provider saw it."""

    route: str
    path: str
    method: str
    headers: dict[str, str]  # names lower-cased
    body: Any  # parsed JSON, or None
    time: float
    raw_body: bytes = b""

    @property
    def model(self) -> str | None:
        """The ``model`` field of the JSON body, if any."""
        return self.body.get("model") if isinstance(self.body, dict) else None

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The ``messages`` list of the JSON body (empty if absent)."""
        msgs = self.body.get("messages") if isinstance(self.body, dict) else None
        return msgs if isinstance(msgs, list) else []

    @property
    def stream(self) -> bool:
        """Whether the request asked for a streamed answer."""
        return bool(self.body.get("stream")) if isinstance(self.body, dict) else False

    @property
    def prompt(self) -> str:
        """Text of the last user message ('' if none)."""
        for msg in reversed(self.messages):
            if isinstance(msg, dict) and msg.get("role") == "user":
                return _content_text(msg.get("content"))
        return ""


ReplySource = Reply | Callable[[Received], Reply]
TextFn = Callable[[Received], str]


def _content_text(content: Any) -> str:
    """Flatten an OpenAI/Anthropic message content (str or list of parts) to text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return " ".join(parts)
    return ""


def estimate_tokens(text: str) -> int:
    """Rough token count: one token per 4 characters, at least 1."""
    return max(1, len(text) // 4)


def simulated_text(received: Received) -> str:
    """Deterministic simulated answer echoing the last user message."""
    echo = " ".join(received.prompt.split())
    if len(echo) > 60:
        echo = echo[:57] + "..."
    return f"[simulated] {echo}" if echo else "[simulated] (no prompt)"


def _prompt_tokens(received: Received) -> int:
    body = received.body if isinstance(received.body, dict) else {}
    texts = [_content_text(m.get("content")) for m in received.messages if isinstance(m, dict)]
    texts.append(_content_text(body.get("system")))  # Anthropic top-level system prompt
    return estimate_tokens("".join(texts))


def _split3(text: str) -> list[str]:
    """Split text into about three pieces (at spaces when possible) that join back to it."""
    if len(text) < 3:
        return [text]
    pieces: list[str] = []
    start = 0
    for k in (1, 2):
        cut = max(start, len(text) * k // 3)
        space = text.find(" ", cut)
        if 0 <= space < len(text) - 1 and space - cut < 20:
            cut = space + 1
        if cut > start:
            pieces.append(text[start:cut])
            start = cut
    pieces.append(text[start:])
    return [p for p in pieces if p] or [text]


_OPENAI_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_quota",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout",
    409: "conflict_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}
_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def _reason(status: int) -> str:
    if status == 529:
        return "Overloaded"
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown Status"


class Route:
    """One simulated provider: a FIFO of scripted replies plus a default."""

    def __init__(self, name: str) -> None:
        """Create an empty route called `name`."""
        self.name = name
        self.queue: deque[ReplySource] = deque()
        self.default: ReplySource | None = None
        self.text_fn: TextFn = simulated_text  # used when a Reply has text=None
        self._lock = threading.Lock()

    def enqueue(self, *replies: ReplySource) -> None:
        """Append replies (or callables returning one) to this route's FIFO."""
        with self._lock:
            self.queue.extend(replies)

    def set_default(self, fn_or_reply: ReplySource | None) -> None:
        """Set what answers when the queue is empty (a Reply or callable(Received) -> Reply)."""
        with self._lock:
            self.default = fn_or_reply

    @property
    def pending(self) -> int:
        """Number of scripted replies not yet consumed."""
        with self._lock:
            return len(self.queue)

    def clear(self) -> None:
        """Drop queued replies, the default and the custom text generator."""
        with self._lock:
            self.queue.clear()
            self.default = None
            self.text_fn = simulated_text

    def _next(self, fallback: Callable[[Received], Reply] | None) -> ReplySource:
        with self._lock:
            if self.queue:
                return self.queue.popleft()
            if self.default is not None:
                return self.default
        return fallback if fallback is not None else Reply()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 256  # listen backlog; the default 5 stalls bursts of concurrent connects
    upstream: Upstream

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet about clients that went away (timeouts, drops)."""
        if self.upstream.verbose:
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "llm-router-sandbox/1 (SIMULATED)"
    timeout = 60  # idle keep-alive connections are closed after this
    server: _Server
    reply: Reply | None = None  # the scripted reply of the request being answered

    # -- plumbing -------------------------------------------------------
    def setup(self) -> None:
        super().setup()
        # headers and body go out in separate writes; avoid Nagle/delayed-ACK stalls
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.upstream._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.upstream._track(self.connection, False)

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.upstream.verbose:
            super().log_message(format, *args)

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            data = bytearray()
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(data)
                data += self.rfile.read(size)
                self.rfile.readline(65537)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _send(self, status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
        headers = {"Content-Type": content_type}
        for k, v in (extra or {}).items():
            # caller-supplied headers replace ours case-insensitively
            headers = {hk: hv for hk, hv in headers.items() if hk.lower() != k.lower()}
            headers[k] = v
        self.send_response(status, _reason(status))
        for k, v in headers.items():
            if k.lower() not in ("content-length", "transfer-encoding"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.flush()
        reply = self.reply
        if self.command == "HEAD" or (reply is not None and not self._stall(reply)):
            return
        if reply is not None and reply.trickle_s > 0:
            self._trickle(body, reply.trickle_s)
            return
        self.wfile.write(body)
        self.wfile.flush()

    def _trickle(self, body: bytes, every_s: float) -> None:
        """Send `body` one byte every `every_s` seconds, for as long as the client stays."""
        for i in range(len(body)):
            if not self._wait(every_s):
                return
            try:
                self.wfile.write(body[i : i + 1])
                self.wfile.flush()
            except OSError:  # the client went away between two bytes
                self.close_connection = True
                return

    def _stall(self, reply: Reply) -> bool:
        """The headers are out: send nothing for reply.stall_s; whether the client is still there."""
        return reply.stall_s <= 0 or self._wait(reply.stall_s)

    def _wait(self, seconds: float | None) -> bool:
        """Send nothing for `seconds` (None: for as long as the client stays); whether the client is still there.

        Unlike a sleep, this watches the connection: a client that gave up (closed it) ends the wait and the
        handler at once, so `Upstream.open_connections` shows what clients still hold open.
        """
        end = None if seconds is None else time.monotonic() + seconds
        with selectors.DefaultSelector() as sel:  # not select(): a test may hold over 1,024 sockets open
            sel.register(self.connection, selectors.EVENT_READ)
            while True:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return True
                if not sel.select(1.0 if left is None else min(left, 1.0)):
                    continue
                try:
                    data = self.connection.recv(1, socket.MSG_PEEK)
                except OSError:  # reset by the client, or shut down by Upstream.stop()
                    data = b""
                if not data:  # the client closed the connection
                    self.close_connection = True
                    return False
                time.sleep(0.05)  # the client sent more (a pipelined request): it is still there

    def _send_json(self, status: int, obj: Any, extra: dict[str, str] | None = None) -> None:
        self._send(status, _json.dumps(obj).encode(), "application/json", extra)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _drop(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    # -- dispatch -------------------------------------------------------
    def do_POST(self) -> None:
        self._dispatch()

    def do_GET(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        up = self.server.upstream
        self.reply = None
        raw = self._read_body()
        try:
            body = _json.loads(raw) if raw else None
        except ValueError:
            body = None
        path = self.path.split("?", 1)[0]
        segments = [s for s in path.split("/") if s]
        route_name = segments[0] if segments else ""
        rest = "/" + "/".join(segments[1:])
        received = Received(
            route=route_name,
            path=self.path,
            method=self.command,
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
            time=time.time(),
            raw_body=raw,
        )
        up._record(received)

        if self.command == "POST" and rest.endswith("/chat/completions"):  # Azure: /openai/deployments/{d}/...
            flavour = "openai"
        elif self.command == "POST" and rest in ("/v1/messages", "/messages"):
            flavour = "anthropic"
        elif self.command == "POST" and rest.endswith((":generateContent", ":streamGenerateContent")):
            flavour = "gemini"
        elif self.command == "POST" and rest in ("/api/generate", "/api/chat"):
            flavour = "ollama"
        else:
            self._send_json(
                404,
                {
                    "error": {
                        "message": f"SIMULATED sandbox: no such endpoint {self.command} {path}",
                        "type": "not_found_error",
                        "code": 404,
                    }
                },
            )
            return

        route = up.route(route_name)
        source = route._next(up.default)
        reply = source(received) if callable(source) else source
        if reply.text is None:
            reply = _with_text(reply, route.text_fn(received))
        self.reply = reply
        if reply.hang:
            self._wait(None)
            return
        if reply.delay_s > 0 and not self._wait(reply.delay_s):
            return
        if reply.drop:
            self._drop()
            return
        if reply.json is not None:
            self._send_json(reply.status, reply.json, reply.headers)
            return
        if reply.raw_stream is not None:
            self._send_raw_stream(reply)
            return
        if reply.raw is not None:
            data = reply.raw.encode() if isinstance(reply.raw, str) else reply.raw
            self._send(reply.status, data, reply.content_type or "text/plain; charset=utf-8", reply.headers)
            return
        if flavour == "gemini":
            self._send_json(
                501, {"error": {"message": "SIMULATED sandbox: gemini routes serve scripted raw replies only"}}
            )
            return
        if not 200 <= reply.status < 300:
            self._send_error(reply, flavour)
            return
        if flavour == "openai":
            self._openai(received, reply)
        else:
            self._anthropic(received, reply)

    def _send_error(self, reply: Reply, flavour: str) -> None:
        message = reply.error or _reason(reply.status)
        if flavour == "anthropic":
            etype = _ANTHROPIC_ERROR_TYPES.get(reply.status, "api_error")
            obj: Any = {"type": "error", "error": {"type": etype, "message": message}}
        else:
            fallback = "server_error" if reply.status >= 500 else "invalid_request_error"
            etype = _OPENAI_ERROR_TYPES.get(reply.status, fallback)
            obj = {"error": {"message": message, "type": etype, "code": reply.status}}
        self._send_json(reply.status, obj, reply.headers)

    # -- OpenAI ---------------------------------------------------------
    def _openai(self, received: Received, reply: Reply) -> None:
        up = self.server.upstream
        text = reply.text or ""
        prompt_toks, completion_toks = reply.usage or (_prompt_tokens(received), estimate_tokens(text))
        usage: dict[str, Any] = {
            "prompt_tokens": prompt_toks,
            "completion_tokens": completion_toks,
            "total_tokens": prompt_toks + completion_toks,
        }
        if reply.cost is not None:
            usage["cost"] = reply.cost
        rid = f"chatcmpl-sim-{up._next_id()}"
        created = int(time.time())
        model = received.model or "simulated"
        if not received.stream:
            self._send_json(
                reply.status,
                {
                    "id": rid,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": usage,
                },
                reply.headers,
            )
            return

        def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
            return {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }

        events: list[dict[str, Any]] = []
        for i, piece in enumerate(_split3(text)):
            events.append(chunk({"role": "assistant", "content": piece} if i == 0 else {"content": piece}, None))
        n_content = len(events)
        if reply.error_event or reply.no_finish:
            frames = [_sse(e) for e in events[: _kept(reply, n_content)]]
            if reply.error_event:
                message = reply.error or "SIMULATED stream error"
                frames.append(_sse({"error": {"message": message, "type": "server_error", "code": None}}))
            self._stream_sse(replace(reply, cut_after=None), frames, 0, 0)
            return
        events.append(chunk({}, "stop"))
        opts = received.body.get("stream_options") if isinstance(received.body, dict) else None
        if reply.stream_usage and isinstance(opts, dict) and opts.get("include_usage"):
            events.append(
                {
                    "id": rid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": usage,
                }
            )
        self._stream_sse(reply, [_sse(e) for e in events] + [b"data: [DONE]\n\n"], 0, n_content)

    def _send_raw_stream(self, reply: Reply) -> None:
        """Send reply.raw_stream verbatim, one HTTP chunk per item, pausing chunk_delays before each."""
        items = reply.raw_stream or []
        delays = reply.chunk_delays
        pauses = list(delays) if isinstance(delays, list) else [delays] * len(items)
        self.send_response(reply.status, _reason(reply.status))
        headers = {"Content-Type": reply.content_type or "text/event-stream", "Cache-Control": "no-cache"}
        headers.update(reply.headers)
        for k, v in headers.items():
            if k.lower() not in ("content-length", "transfer-encoding"):
                self.send_header(k, v)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        if not self._stall(reply):
            return
        try:
            for i, item in enumerate(items):
                pause = pauses[i] if i < len(pauses) else 0.0
                if pause > 0 and not self._wait(pause):
                    return
                self._chunk(item)
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:  # the client went away mid-stream (abandoned it): nothing left to send to
            self.close_connection = True

    def _stream_sse(self, reply: Reply, frames: list[bytes], first_content: int, n_content: int) -> None:
        """Send SSE frames with chunked transfer-encoding; honour reply.cut_after (counted in content frames)."""
        cut_at = None if reply.cut_after is None else first_content + max(0, min(reply.cut_after, n_content))
        self.send_response(reply.status, _reason(reply.status))
        headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        headers.update(reply.headers)
        for k, v in headers.items():
            if k.lower() not in ("content-length", "transfer-encoding"):
                self.send_header(k, v)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        if not self._stall(reply):
            return
        for i, frame in enumerate(frames):
            if cut_at is not None and i >= cut_at:
                self._drop()
                return
            self._chunk(frame)
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    # -- Anthropic ------------------------------------------------------
    def _anthropic(self, received: Received, reply: Reply) -> None:
        up = self.server.upstream
        text = reply.text or ""
        in_toks, out_toks = reply.usage or (_prompt_tokens(received), estimate_tokens(text))
        mid = f"msg_sim_{up._next_id()}"
        model = received.model or "simulated"
        usage = {"input_tokens": in_toks, "output_tokens": out_toks}
        if not received.stream:
            self._send_json(
                reply.status,
                {
                    "id": mid,
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [{"type": "text", "text": text}],
                    "stop_reason": "end_turn",
                    "stop_sequence": None,
                    "usage": usage,
                },
                reply.headers,
            )
            return

        def ev(name: str, data: dict[str, Any]) -> bytes:
            return f"event: {name}\ndata: {_json.dumps(data)}\n\n".encode()

        pieces = _split3(text)
        frames = [
            ev(
                "message_start",
                {
                    "type": "message_start",
                    "message": {
                        "id": mid,
                        "type": "message",
                        "role": "assistant",
                        "model": model,
                        "content": [],
                        "stop_reason": None,
                        "stop_sequence": None,
                        "usage": {"input_tokens": in_toks, "output_tokens": 0},
                    },
                },
            ),
            ev(
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            ),
        ]
        frames += [
            ev(
                "content_block_delta",
                {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}},
            )
            for p in pieces
        ]
        if reply.error_event or reply.no_finish:
            frames = frames[: 2 + _kept(reply, len(pieces))]
            if reply.error_event:
                message = reply.error or "SIMULATED stream error"
                frames.append(ev("error", {"type": "error", "error": {"type": "overloaded_error", "message": message}}))
            self._stream_sse(replace(reply, cut_after=None), frames, 0, 0)
            return
        frames += [
            ev("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ev(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": out_toks},
                },
            ),
            ev("message_stop", {"type": "message_stop"}),
        ]
        self._stream_sse(reply, frames, 2, len(pieces))


def _sse(event: dict[str, Any]) -> bytes:
    return b"data: " + _json.dumps(event).encode() + b"\n\n"


def _kept(reply: Reply, n_content: int) -> int:
    """Content chunks sent before an error event or a finish-less end: all, or cut_after of them."""
    return n_content if reply.cut_after is None else max(0, min(reply.cut_after, n_content))


def _with_text(reply: Reply, text: str) -> Reply:
    return replace(reply, text=text)


class Upstream:
    """A scriptable loopback server simulating one or more LLM providers (routes)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        default: Callable[[Received], Reply] | None = None,
        *,
        verbose: bool = False,
    ) -> None:
        """Configure (but do not start) the server; port 0 picks a free port."""
        self.host = host
        self.port = port
        self.default = default
        self.verbose = verbose
        self.history: list[Received] = []
        self._routes: dict[str, Route] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._conns: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------
    @property
    def url(self) -> str:
        """Base URL such as ``http://127.0.0.1:PORT`` (only after start())."""
        if self._server is None:
            raise RuntimeError("Upstream not started")
        host = self.host if self.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self._server.server_port}"

    def start(self) -> Upstream:
        """Bind and serve in a daemon thread; returns self."""
        if self._server is not None:
            return self
        server = _Server((self.host, self.port), _Handler)
        server.upstream = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="sandbox-upstream", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket and open connections."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._lock:
            conns = list(self._conns)
            self._conns.clear()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def serve_forever(self) -> None:
        """Start (if needed) and block until interrupted."""
        self.start()
        assert self._thread is not None
        try:
            while self._thread.is_alive():
                self._thread.join(0.5)
        finally:
            self.stop()

    def __enter__(self) -> Upstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def open_connections(self) -> int:
        """Connections a client holds open to the server right now (idle keep-alive ones included)."""
        with self._lock:
            return len(self._conns)

    # -- scripting ------------------------------------------------------
    def route(self, name: str) -> Route:
        """The route called `name`, created on first use."""
        with self._lock:
            r = self._routes.get(name)
            if r is None:
                r = self._routes[name] = Route(name)
            return r

    @property
    def routes(self) -> dict[str, Route]:
        """Snapshot of the routes created so far."""
        with self._lock:
            return dict(self._routes)

    def base_url(self, route: str, flavour: str = "openai") -> str:
        """api_base for a route: ``{url}/{route}/v1`` (openai) or ``{url}/{route}`` (anthropic)."""
        if flavour == "openai":
            return f"{self.url}/{route}/v1"
        if flavour == "anthropic":
            return f"{self.url}/{route}"
        raise ValueError(f"unknown flavour {flavour!r} (expected 'openai' or 'anthropic')")

    def enqueue(self, route: str, *replies: ReplySource) -> None:
        """Queue replies for a route (FIFO); when empty the route's default answers."""
        self.route(route).enqueue(*replies)

    def set_default(self, route: str, fn_or_reply: ReplySource | None) -> None:
        """Set a route's default: a Reply or a callable(Received) -> Reply."""
        self.route(route).set_default(fn_or_reply)

    def requests(self, route: str) -> list[Received]:
        """Requests received on one route, in order."""
        with self._lock:
            return [r for r in self.history if r.route == route]

    def reset(self) -> None:
        """Clear all queues, defaults and the history."""
        with self._lock:
            routes = list(self._routes.values())
            self.history.clear()
        for r in routes:
            r.clear()

    # -- internals used by the handler ----------------------------------
    def _record(self, received: Received) -> None:
        with self._lock:
            self.history.append(received)

    def _next_id(self) -> int:
        with self._lock:
            return next(self._ids)

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)


# -- demo providers ---------------------------------------------------------

_TOPIC_SENTENCES = (
    "Here is a short overview of {topic}.",
    "The key idea behind {topic} is to break the problem into small, testable steps.",
    "A common pitfall with {topic} is skipping the measurement phase.",
    "In practice, most teams start with the simplest approach to {topic} and iterate.",
    "Trade-offs around {topic} usually come down to latency, cost and reliability.",
    "For {topic}, a good next step is a small prototype you can benchmark.",
)


_LEAD_INS = (
    "what is", "what are", "how do i", "how do you", "how to", "tell me about", "explain", "describe",
    "why is", "why do", "can you", "please", "write", "summarise", "summarize", "name",
)  # fmt: skip


def _plausible_answer(received: Received, label: str) -> str:
    """A prompt-dependent multi-sentence answer, deterministic for a given prompt."""
    topic = " ".join(received.prompt.split()).strip(" ?!.").lower()
    stripped = True
    while stripped:
        stripped = False
        for lead in _LEAD_INS:
            if topic.startswith(lead + " "):
                topic, stripped = topic[len(lead) + 1 :], True
    words = topic.split()
    topic = " ".join(words[:6]) if words else "your question"
    seed = sum(map(ord, received.prompt))
    picks = [_TOPIC_SENTENCES[(seed + i * 2) % len(_TOPIC_SENTENCES)] for i in range(3)]
    return f"[simulated {label}] " + " ".join(s.format(topic=topic) for s in picks)


def simulated_providers(upstream: Upstream, seed: int = 0) -> None:
    """Configure the demo routes sim-fast, sim-slow (latency) and sim-flaky (always 503)."""
    rng = random.Random(seed)
    rng_lock = threading.Lock()

    def latency(lo: float, hi: float) -> float:
        with rng_lock:
            return rng.uniform(lo, hi)

    fast = upstream.route("sim-fast")
    fast.text_fn = lambda rec: _plausible_answer(rec, "sim-fast")
    fast.set_default(lambda rec: Reply(delay_s=latency(0.040, 0.150)))

    slow = upstream.route("sim-slow")
    slow.text_fn = lambda rec: _plausible_answer(rec, "sim-slow")
    slow.set_default(lambda rec: Reply(delay_s=latency(0.300, 0.600)))

    upstream.set_default(
        "sim-flaky",
        Reply(status=503, headers={"Retry-After": "0"}, error="SIMULATED outage: sim-flaky is always unavailable"),
    )


def main(argv: list[str] | None = None) -> None:
    """Serve the SIMULATED demo providers until interrupted."""
    parser = argparse.ArgumentParser(
        prog="python -m router.sandbox", description="Serve SIMULATED LLM providers on loopback."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8089)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-v", "--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    up = Upstream(args.host, args.port, verbose=args.verbose)
    simulated_providers(up, seed=args.seed)
    up.start()
    print("=== SIMULATED LLM providers (offline sandbox, not real models) ===")
    print(f"listening on {up.url}")
    for name in ("sim-fast", "sim-slow", "sim-flaky"):
        print(f"  {name:<10} openai api_base={up.base_url(name)}  anthropic api_base={up.base_url(name, 'anthropic')}")
    print("Ctrl-C to stop.", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        up.serve_forever()


if __name__ == "__main__":
    main()
