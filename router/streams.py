"""A stream as the router reads it, whatever engine opened it: its content so far, and its clock.

An engine opens a stream and hands over a `StreamSource` of neutral `Chunk`s; `StreamState` takes them one at a
time, keeps the text, tool calls, finish reason, usage and cost, and holds the stream to its `StreamLimits`:
content must come within `first_text_s` of the request, then at most `idle_s` apart, and the whole stream within
`total_s` (what was left of the call's deadline). Keep-alive comments, empty deltas and reasoning reset no timer.

A sync caller reads an async source through the background event loop (`read_on_loop`): each chunk is awaited
there, held to the limits, and a stream closed or dropped unread is closed there at once, however silent its
provider. No thread sits in a socket read: a thread blocked in `recv` wakes for no close from another thread,
only for the provider's next byte. A blocking source (an engine with no async half) is read on a daemon thread
(`_Pump`) instead, so that its reader can wait with a timeout: a provider that sends keep-alives, or trickles
bytes, resets every socket timeout, so the blocking read itself cannot be bounded. `open_sync`/`open_async` read
a new stream up to its first content, so that a failure before it can still fall back.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from . import background
from .answers import Chunk, ContentFiltered, EmptyStream, FirstTextTimeout, InvalidResponse, StreamLimits, StreamStalled
from .types import Usage

_CHUNK, _END, _FAILED = 0, 1, 2


class _Pump:
    """Reads a blocking stream on a daemon thread; the thread ends with the stream, or is told to stop."""

    def __init__(self, open_source: Callable[[], Any]) -> None:
        self.items: queue.SimpleQueue[tuple[int, Any]] = queue.SimpleQueue()
        self.source: Any = None
        self.stopped = False
        self.opened = threading.Event()
        threading.Thread(target=self._run, args=(open_source,), name="llm-router-stream", daemon=True).start()

    def _run(self, open_source: Callable[[], Any]) -> None:
        try:
            self.source = open_source()
            self.opened.set()
            if self.stopped:  # abandoned while the request was being answered
                return
            for chunk in self.source:
                if self.stopped:
                    break
                self.items.put((_CHUNK, chunk))
            self.items.put((_END, None))
        except Exception as exc:  # handed to the reader, who classifies it
            self.items.put((_FAILED, exc))
        finally:
            self.opened.set()
            if self.stopped:
                close_quietly(self.source)

    def get(self, timeout: float) -> tuple[int, Any] | None:
        """The next item, or None when none came within `timeout` seconds."""
        try:
            return self.items.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            return None

    def stop(self) -> None:
        """Abandon the stream: the thread closes it and ends."""
        self.stopped = True
        close_quietly(self.source)


# A stream dropped unread is closed by this thread, never by the garbage collector's: the collector may run in
# a thread that holds an HTTP client's connection-pool lock (mid-request), and closing a response takes that same
# lock, so closing it there deadlocks the thread. SimpleQueue.put is safe to call from a finalizer.
_closing: queue.SimpleQueue[Any] = queue.SimpleQueue()
_closer_lock = threading.Lock()
_closer_pid: int | None = None


def _start_closer() -> None:
    """Start (once per process: a fork leaves the thread behind) the thread that closes abandoned streams."""
    global _closer_pid
    if _closer_pid == os.getpid():
        return
    with _closer_lock:
        if _closer_pid != os.getpid():
            threading.Thread(target=_close_forever, name="llm-router-stream-closer", daemon=True).start()
            _closer_pid = os.getpid()


def _close_forever() -> None:
    while True:
        source = _closing.get()
        close_quietly(source)


class _OnLoop:
    """An async source read through the background loop, closed there (from any other thread)."""

    def __init__(self, source: Any) -> None:
        self.source = source

    def close(self) -> None:
        """Close the source on the loop; wait for it (a second at most: the loop may be busy)."""
        background.run_on(background.background_loop(), _aclose_quietly(self.source)).result(timeout=CLOSE_WAIT_S)


async def _aclose_quietly(source: Any) -> None:
    try:
        await source.aclose()
    except Exception:  # already closed, or half-open: nothing more to free
        pass


CLOSE_WAIT_S = 1.0


def close_later(thing: Any) -> None:
    """Have `thing` closed on the closer thread, not this one (safe from a finalizer: a queue put)."""
    _start_closer()
    _closing.put(thing)


def _abandoned(pump: _Pump) -> None:
    """Finalizer of a dropped stream: tell its pump to stop and leave the closing to the closer thread."""
    pump.stopped = True
    if pump.source is not None:
        _closing.put(pump.source)


def close_quietly(source: Any) -> None:
    """Close a stream source, if there is one and it can be (already closed: nothing more to free)."""
    close = getattr(source, "close", None)
    if callable(close):
        try:
            close()
        except Exception:  # already closed, or half-open: nothing more to free
            pass


class StreamState:
    """What a stream has delivered so far, fed one `Chunk` at a time (sync or async), and its clock."""

    def __init__(self, source: Any, limits: StreamLimits | None = None, started: float | None = None) -> None:
        self.source = source
        self.pending: list[Chunk] = []  # content read while deciding whether this target would do
        self.parts: list[str] = []
        self.tool_calls: dict[int, dict[str, Any]] = {}  # by the delta's index
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.provider_cost: float | None = None
        self.error: BaseException | None = None
        self.model: str | None = None  # the model the provider says answered
        self.shown: list[str] | None = None  # the text the caller was given, when hooks rewrite it on its way
        self.limits = limits
        self.started = time.monotonic() if started is None else started
        self.last_text = self.started
        self._pump: _Pump | None = None
        self._on_loop: weakref.finalize[Any, StreamState] | None = None  # read through the background loop

    @property
    def text(self) -> str:
        """The text received so far."""
        return "".join(self.parts)

    @property
    def shown_text(self) -> str:
        """The text the caller was given: as received, or as the hooks rewrote it."""
        return "".join(self.shown) if self.shown is not None else self.text

    @property
    def has_content(self) -> bool:
        """Whether any text or tool call has come."""
        return bool(self.parts or self.tool_calls)

    @property
    def finished(self) -> bool:
        """Whether the provider itself ended the answer, as the router saw it: a finish reason came, it was not
        content_filter, and the engine says the provider sent it (not made up for a stream that just stopped)."""
        if self.finish_reason is None or self.finish_reason == "content_filter":
            return False
        check = getattr(self.source, "provider_finished", None)
        return bool(check()) if callable(check) else True

    @property
    def unfinished_reason(self) -> str:
        """Why a stream that ended without an error did not end normally."""
        if self.finish_reason == "content_filter":
            return "the provider's content filter stopped the stream"
        return "the stream ended without a finish reason"

    @property
    def reported_usage(self) -> Usage | None:
        """The usage the provider reported; None when it reported none (the caller then estimates it)."""
        check = getattr(self.source, "provider_usage", None)
        return check(self.usage) if callable(check) else self.usage

    def tool_call_list(self) -> tuple[Mapping[str, Any], ...]:
        """The tool calls streamed so far, their deltas joined, in index order (OpenAI's shape)."""
        return tuple(self.tool_calls[i] for i in sorted(self.tool_calls))

    def _wait(self) -> float:
        """Seconds the next content may take: to the first-text, idle or total limit, whichever comes first."""
        if self.limits is None:
            return 365 * 86400.0
        lim, now = self.limits, time.monotonic()
        content = self.has_content
        until = self.started + (lim.total_s if content else lim.first_text_s)
        if content:
            until = min(until, self.last_text + lim.idle_s)
        return until - now

    def timed_out(self) -> TimeoutError:
        """The error of a stream that ran past one of its limits."""
        lim = self.limits
        assert lim is not None
        if not self.has_content:
            return FirstTextTimeout(f"no text within {lim.first_text_s:g}s of the request")
        if time.monotonic() - self.started >= lim.total_s - 1e-3:
            return StreamStalled(f"the stream outlasted the call's deadline ({lim.total_s:.3g}s left at its request)")
        return StreamStalled(f"the stream sent no text for {lim.idle_s:g}s")

    def next_chunk(self) -> Chunk:
        """The next chunk of a blocking stream. Raises StopIteration at its end, TimeoutError past a limit."""
        if self._on_loop is not None:
            try:
                more, chunk = background.run(self._step(), self._wait())
            except background.AttemptTimeout:  # cancelled on the loop, where the step closes the stream
                raise self.timed_out() from None
            if not more:
                raise StopIteration
            return chunk  # type: ignore[no-any-return]
        pump = self._pump
        if pump is None:
            return next(self.source)  # type: ignore[no-any-return]
        got = pump.get(self._wait())
        if got is None:
            pump.stop()
            raise self.timed_out()
        kind, item = got
        if kind == _END:
            raise StopIteration
        if kind == _FAILED:
            raise item
        return item  # type: ignore[no-any-return]

    async def anext_chunk(self, source: Any = None) -> Chunk:
        """The next chunk of an async stream. Raises StopAsyncIteration at its end, TimeoutError past a limit.
        `source`: read this one instead of `self.source` (the async source of a sync bridge, see drivers)."""
        src = self.source if source is None else source
        if self.limits is None:
            return await src.__anext__()  # type: ignore[no-any-return]
        try:
            return await within(src.__anext__(), self._wait())  # type: ignore[no-any-return]
        except asyncio.TimeoutError:
            raise self.timed_out() from None

    async def _step(self) -> tuple[bool, Chunk | None]:
        """On the background loop: the next chunk (False at the end); a stream that broke, or ran past a limit,
        is closed before its error goes back to the reader."""
        try:
            return True, await self.anext_chunk()
        except StopAsyncIteration:
            return False, None
        except BaseException:  # an error, a limit passed, or cancelled by the reader's own clock
            if self._on_loop is not None and self._on_loop.detach() is not None:
                await self.aclose()
            raise

    def close(self) -> None:
        """Release the HTTP response of an abandoned stream (best effort)."""
        if self._on_loop is not None:
            if self._on_loop.detach() is not None:  # not closed yet
                close_quietly(_OnLoop(self.source))
        elif self._pump is not None:
            self._pump.stop()
        else:
            close_quietly(self.source)

    async def aclose(self) -> None:
        """Async twin of `close`."""
        aclose = getattr(self.source, "aclose", None)
        if callable(aclose):
            try:
                await aclose()
            except Exception:  # already closed: nothing more to free
                pass
        else:
            self.close()

    def feed(self, chunk: Chunk) -> bool:
        """Take one chunk; whether it carried content (text or a tool call)."""
        if chunk.usage is not None:
            self.usage = chunk.usage
        if chunk.provider_cost is not None:
            self.provider_cost = chunk.provider_cost
        if self.model is None and chunk.model:
            self.model = chunk.model
        if chunk.finish_reason:
            self.finish_reason = chunk.finish_reason
        if chunk.tool_calls:
            for delta in chunk.tool_calls:
                _merge_tool_call(self.tool_calls, delta)
        if chunk.text:
            self.parts.append(chunk.text)
        if chunk.text or chunk.tool_calls:
            self.last_text = time.monotonic()
            return True
        return False


def _merge_tool_call(calls: dict[int, dict[str, Any]], delta: Mapping[str, Any]) -> None:
    """Join one OpenAI tool-call delta into the call at its index (name and arguments arrive in pieces)."""
    index = delta.get("index", len(calls))
    index = index if isinstance(index, int) else len(calls)
    call = calls.setdefault(index, {"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
    if delta.get("id"):
        call["id"] = delta["id"]
    if delta.get("type"):
        call["type"] = delta["type"]
    fn = delta.get("function") or {}
    if fn.get("name"):
        call["function"]["name"] += fn["name"]
    if fn.get("arguments"):
        call["function"]["arguments"] += fn["arguments"]


async def within(aw: Awaitable[Any], seconds: float) -> Any:
    """Await `aw` for at most `seconds` (asyncio.TimeoutError after). Not wait_for on 3.11+: it runs `aw` in a
    task of its own, and an aiohttp stream opened in one task and read in another loses its first chunk."""
    timeout = getattr(asyncio, "timeout", None)
    if timeout is not None:
        async with timeout(max(seconds, 0.0)):
            return await aw
    # Python 3.10: the same, by hand: cancel this task when the time is up, and say so as a TimeoutError.
    task, fired = asyncio.current_task(), threading.Event()
    assert task is not None

    def fire() -> None:
        fired.set()
        task.cancel()

    handle = asyncio.get_running_loop().call_later(max(seconds, 0.0), fire)
    try:
        return await aw
    except asyncio.CancelledError:
        if fired.is_set():
            raise asyncio.TimeoutError from None
        raise
    finally:
        handle.cancel()


def _no_content(state: StreamState) -> InvalidResponse:
    if state.finish_reason == "content_filter":
        return ContentFiltered("the provider's content filter stopped the stream before any text")
    return EmptyStream("the stream ended before any text")


def _read_to_content(state: StreamState) -> StreamState:
    while True:
        try:
            chunk = state.next_chunk()
        except StopIteration:
            raise _no_content(state) from None
        if state.feed(chunk):
            state.pending.append(chunk)
            return state


def open_sync(open_source: Callable[[], Any], limits: StreamLimits | None = None) -> StreamState:
    """Open a blocking stream (`open_source()` sends the request) and read it up to its first content.

    With `limits`, the stream is read on a thread (see `_Pump`) and abandoned with FirstTextTimeout when no content
    came within `limits.first_text_s` of the request, however busy the connection was.
    """
    if limits is None:
        return _read_to_content(StreamState(open_source()))
    started = time.monotonic()
    _start_closer()
    pump = _Pump(open_source)
    state = StreamState(None, limits, started)
    state._pump = pump
    weakref.finalize(state, _abandoned, pump)  # a stream dropped unread is closed, off the collecting thread
    if not pump.opened.wait(max(state._wait(), 0.0)):
        pump.stop()
        raise state.timed_out()
    state.source = pump.source
    return _read_to_content(state)


def read_on_loop(state: StreamState) -> StreamState:
    """Make `state`, opened by an async engine on the background loop, readable by a sync caller: its chunks
    are awaited on that loop, held to its limits; `close()` closes it there, and so does the closer thread when
    the state is dropped unread (never the garbage collector's thread, see `_closing`)."""
    _start_closer()
    state._on_loop = weakref.finalize(state, _closing.put, _OnLoop(state.source))
    return state


async def open_async(open_source: Callable[[], Awaitable[Any]], limits: StreamLimits | None = None) -> StreamState:
    """Async twin of `open_sync`: `await open_source()` sends the request and gives an async source."""
    started = time.monotonic()
    if limits is None:
        state = StreamState(await open_source())
    else:
        try:
            source = await within(open_source(), limits.first_text_s)
        except asyncio.TimeoutError:
            raise FirstTextTimeout(f"no text within {limits.first_text_s:g}s of the request") from None
        state = StreamState(source, limits, started)
    try:
        while True:
            try:
                chunk = await state.anext_chunk()
            except StopAsyncIteration:
                raise _no_content(state) from None
            if state.feed(chunk):
                state.pending.append(chunk)
                return state
    except BaseException:
        await state.aclose()
        raise
