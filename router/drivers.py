"""The drivers: they carry out the attempt loop's steps, sync (`drive`) or async (`adrive`), and hand streams
to the caller as `Stream` / `AsyncStream`.

The loop (`router.loop`) decides; a driver does what it is told and sends back what happened: a request's
Answer, opened stream or exception, a hook's return value, a race's events. The sync and async drivers differ
only in I/O: `engine.complete` vs `engine.acomplete`, `time.sleep` vs `asyncio.sleep`, a hook run in place vs
in a thread, a race run on the background loop vs on the caller's.

Races: `AsyncRacer` runs raced requests as tasks on the caller's event loop. `SyncRacer` runs them as tasks on
the background event loop, so that `generate()` can cancel a losing request for real (a thread blocked in a
socket read cannot be), and reads a winning stream through that loop (`SyncBridge`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import replace
from typing import Any

from .background import background_loop, run_on
from .engines import Chunk, Send, engine_for
from .errors import HookFailedError
from .loop import (
    CancelStep,
    Effect,
    HookTimedOut,
    LaunchStep,
    Loop,
    RunStep,
    SendStep,
    SleepStep,
    StreamStep,
    WaitStep,
)
from .streams import StreamState, close_later, within
from .types import Result

# -- the drivers ------------------------------------------------------------------------------------------------


def drive(loop: Loop, stream: bool, sleep: Callable[[float], None]) -> Any:
    """Run a call's loop on this thread: its Result, or a `Stream` (`stream`: the call asked for one)."""
    handed_over = False
    racer: SyncRacer | None = None
    try:
        step = next(loop)
        while True:
            if isinstance(step, StreamStep):
                handed_over = True
                return Stream(loop, step.state, step.rewrite)
            if isinstance(step, (LaunchStep, WaitStep, CancelStep)):
                racer = racer or SyncRacer()
                reply = racer.do(step)
            else:
                reply = _effect(step, sleep)
            step = loop.send(reply)
    except StopIteration as done:
        return Stream.replay(done.value) if stream else done.value  # a stream answered by a hook
    finally:
        if not handed_over:
            loop.close()
        if racer is not None:
            racer.abandon()


async def adrive(loop: Loop, stream: bool, asleep: Callable[[float], Any]) -> Any:
    """Async twin of `drive`: its Result, or an `AsyncStream`."""
    handed_over = False
    racer: AsyncRacer | None = None
    try:
        step = next(loop)
        while True:
            if isinstance(step, StreamStep):
                handed_over = True
                return AsyncStream(loop, step.state, step.rewrite)
            if isinstance(step, (LaunchStep, WaitStep, CancelStep)):
                racer = racer or AsyncRacer()
                reply = await racer.do(step)
            else:
                reply = await _aeffect(step, asleep)
            step = loop.send(reply)
    except StopIteration as done:
        return AsyncStream.replay(done.value) if stream else done.value
    finally:
        if not handed_over:
            loop.close()
        if racer is not None:
            racer.abandon()


def _effect(step: Effect, sleep: Callable[[float], None]) -> Any:
    if isinstance(step, SendStep):
        send = step.send
        try:
            engine = engine_for(send.target)
            return engine.open_stream(send) if send.stream else engine.complete(send)
        except Exception as exc:  # handed to the loop, which classifies it
            return exc
    if isinstance(step, SleepStep):
        sleep(step.seconds)
        return None
    assert isinstance(step, RunStep)
    return run_hook(step.fn)  # on the caller's thread: a blocking hook bounds itself by call.deadline_at


async def _aeffect(step: Effect, asleep: Callable[[float], Any]) -> Any:
    if isinstance(step, SendStep):
        send = step.send
        try:
            engine = engine_for(send.target)
            return await (engine.aopen_stream(send) if send.stream else engine.acomplete(send))
        except Exception as exc:  # handed to the loop, which classifies it
            return exc
    if isinstance(step, SleepStep):
        await asleep(step.seconds)
        return None
    assert isinstance(step, RunStep)
    if not step.blocking:
        return run_hook(step.fn)
    try:  # off the event loop, and no longer than the call has left
        return await within(asyncio.to_thread(run_hook, step.fn), step.timeout_s or 0.0)
    except asyncio.TimeoutError:
        return HookTimedOut(f"a blocking hook took longer than the {step.timeout_s:.3g}s the call had left")


def run_hook(fn: Callable[[], Any]) -> Any:
    """Run a hook for the loop: its return value, or the exception it raised (the loop re-raises it)."""
    try:
        return fn()
    except Exception as exc:
        return exc


# -- races ------------------------------------------------------------------------------------------------------


def _request(send: Send) -> Coroutine[Any, Any, Any]:
    engine = engine_for(send.target)
    return engine.aopen_stream(send) if send.stream else engine.acomplete(send)


async def _close(reply: Any) -> None:
    if isinstance(reply, StreamState):
        await reply.aclose()


class AsyncRacer:
    """Races requests as tasks on the running event loop."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._tasks: dict[int, asyncio.Task[Any]] = {}

    async def do(self, step: LaunchStep | WaitStep | CancelStep) -> Any:
        """Carry out one race step."""
        if isinstance(step, LaunchStep):
            return self.launch(step.send)
        if isinstance(step, WaitStep):
            return await self.wait(step.seconds)
        return await self.cancel(step.handles)

    def launch(self, send: Send) -> int:
        """Start one request (a stream held to its limits); its handle."""
        handle = next(self._ids)
        self._tasks[handle] = asyncio.ensure_future(_request(send))
        return handle

    async def wait(self, timeout: float) -> tuple[int, Any] | None:
        """The first request to finish within `timeout` seconds, with its reply (or exception); None if none."""
        if not self._tasks:
            return None
        done, _ = await asyncio.wait(self._tasks.values(), timeout=max(0.0, timeout), return_when="FIRST_COMPLETED")
        for handle, task in sorted(self._tasks.items()):
            if task in done:
                del self._tasks[handle]
                return handle, _outcome(task)
        return None

    async def cancel(self, handles: tuple[int, ...]) -> list[tuple[int, Any]]:
        """Cancel these requests and close what they opened; those that had finished come back with their reply."""
        out: list[tuple[int, Any]] = []
        pending = []
        for handle in handles:
            task = self._tasks.pop(handle, None)
            if task is None:
                continue
            if task.done():
                reply = _outcome(task)
                await _close(reply)
                out.append((handle, reply))
            else:
                task.cancel()
                pending.append(task)
                out.append((handle, None))
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)  # their connections are closed when this returns
        return out

    def abandon(self) -> None:
        """The call went away: cancel whatever is still running."""
        for task in self._tasks.values():
            task.cancel()
        self._tasks.clear()


def _outcome(task: asyncio.Future[Any] | concurrent.futures.Future[Any]) -> Any:
    if task.cancelled():
        return asyncio.CancelledError()
    exc = task.exception()
    return exc if exc is not None else task.result()


class SyncBridge:
    """An engine's async stream, read by a sync caller through the background loop (a `Stream`'s source), held to
    the idle and total limits of the `StreamState` it feeds, as a stream read on its own thread is."""

    def __init__(self, state: StreamState, loop: asyncio.AbstractEventLoop) -> None:
        self._source = state.source
        self._state = state
        self._loop = loop

    def __iter__(self) -> SyncBridge:
        return self

    def __next__(self) -> Any:
        async def step() -> tuple[bool, Any]:
            try:
                return True, await self._state.anext_chunk(self._source)
            except StopAsyncIteration:
                return False, None

        more, chunk = run_on(self._loop, step()).result()
        if not more:
            raise StopIteration
        return chunk

    def __getattr__(self, name: str) -> Any:  # provider_finished, provider_usage: what StreamState asks
        return getattr(self._source, name)

    def close(self) -> None:
        """Close the async stream on its loop."""
        state = StreamState(self._source)
        try:
            run_on(self._loop, state.aclose()).result(timeout=5)
        except Exception:  # already closed, or the loop is gone: nothing more to free
            pass


class SyncRacer:
    """Races requests for `generate()` on the background event loop, so a loser can be cancelled for real."""

    def __init__(self) -> None:
        self._loop = background_loop()
        self._ids = itertools.count(1)
        self._futures: dict[int, concurrent.futures.Future[Any]] = {}

    def do(self, step: LaunchStep | WaitStep | CancelStep) -> Any:
        """Carry out one race step."""
        if isinstance(step, LaunchStep):
            return self.launch(step.send)
        if isinstance(step, WaitStep):
            return self.wait(step.seconds)
        return self.cancel(step.handles)

    def launch(self, send: Send) -> int:
        """Start one request (a stream held to its limits); its handle."""
        handle = next(self._ids)
        self._futures[handle] = run_on(self._loop, _request(send))
        return handle

    def wait(self, timeout: float) -> tuple[int, Any] | None:
        """The first request to finish within `timeout` seconds, with its reply (or exception); None if none."""
        if not self._futures:
            return None
        done, _ = concurrent.futures.wait(
            self._futures.values(), timeout=max(0.0, timeout), return_when=concurrent.futures.FIRST_COMPLETED
        )
        for handle, fut in sorted(self._futures.items()):
            if fut in done:
                del self._futures[handle]
                return handle, self._bridged(_outcome(fut))
        return None

    def cancel(self, handles: tuple[int, ...]) -> list[tuple[int, Any]]:
        """Cancel these requests and close what they opened; those that had finished come back with their reply."""
        out: list[tuple[int, Any]] = []
        for handle in handles:
            fut = self._futures.pop(handle, None)
            if fut is None:
                continue
            if fut.done():
                reply = _outcome(fut)
                if isinstance(reply, StreamState):
                    run_on(self._loop, reply.aclose()).result(timeout=5)
                out.append((handle, reply))
            else:
                fut.cancel()  # cancels the task on the loop, which closes its connection
                out.append((handle, None))
        return out

    def abandon(self) -> None:
        """The call went away: cancel whatever is still running."""
        for fut in self._futures.values():
            fut.cancel()
        self._futures.clear()

    def _bridged(self, reply: Any) -> Any:
        if isinstance(reply, StreamState):
            reply.source = SyncBridge(reply, self._loop)
        return reply


# -- streams handed to the caller -------------------------------------------------------------------------------


class _Ended:
    """The exhausted source of a replayed stream, for both `Stream` and `AsyncStream`."""

    def __next__(self) -> Any:
        raise StopIteration

    async def __anext__(self) -> Any:
        raise StopAsyncIteration

    def provider_finished(self) -> bool:
        """A replayed answer was a finished one."""
        return True


def _pieces(text: str, size: int = 24) -> list[str]:
    """`text` in deltas of about `size` characters, cut after spaces, that join back to it."""
    out: list[str] = []
    while len(text) > size:
        cut = text.rfind(" ", 0, size) + 1 or size
        out.append(text[:cut])
        text = text[cut:]
    if text:
        out.append(text)
    return out


class _StreamBase:
    """What `Stream` and `AsyncStream` share: the content already read, the hooks' rewrite of its text on the way
    to the caller, and handing the end back to the loop."""

    def __init__(self, loop: Loop | None, state: StreamState, rewrite: Callable[[str, bool], str] | None = None):
        self._loop = loop
        self._answer: Result | None = None
        self._state = state
        self._pending = list(state.pending)  # the content read while deciding this target would do
        self._done = False
        self._ended = False  # the source has ended (what a rewrite held back may still be to come)
        self._rewrite = rewrite
        if rewrite is not None:
            state.shown = []
        self.result: Result | None = None
        if loop is not None:
            # A stream dropped unread: its loop (which counts the attempt and runs the after-hooks) is closed on
            # the closer thread, never in whatever thread the garbage collector happens to run in, which may hold
            # a lock a hook takes (the ledger's queue, a span's) mid-request.
            self._finalizer = weakref.finalize(self, close_later, loop)

    @property
    def text(self) -> str:
        """The text given so far."""
        return self._state.shown_text

    @classmethod
    def replay(cls, result: Result) -> Any:
        """A stream of an answer already made (a cache hit): its text in pieces, `.result` set at the end."""
        state = StreamState(_Ended())
        state.parts = _pieces(result.text)
        state.pending = [Chunk(text=p) for p in state.parts]
        state.finish_reason = result.finish_reason
        stream = cls(None, state)
        stream._answer = result
        return stream

    def _shown(self, chunk: Chunk) -> Chunk:
        """A chunk as the caller is given it: its text through the hooks' rewrite (HookFailedError if it fails)."""
        if self._rewrite is None or not chunk.text:
            return chunk
        text = self._rewrite(chunk.text, False)
        assert self._state.shown is not None
        self._state.shown.append(text)
        return replace(chunk, text=text)

    def _tail(self) -> Chunk | None:
        """At the end of the source: what the hooks' rewrite held back, if anything."""
        if self._rewrite is None:
            return None
        text = self._rewrite("", True)
        if not text:
            return None
        assert self._state.shown is not None
        self._state.shown.append(text)
        return Chunk(text=text)

    def _finish(self, error: BaseException | None) -> None:
        # The loop accounts for the stream: it returns the Result, or raises StreamInterruptedError.
        self._done = True
        self._disown()
        self._state.error = error
        if self._loop is None:  # a replay: the call is already accounted for
            self.result = self._answer
            return
        try:
            self._loop.send(self._state)
        except StopIteration as done:
            self.result = done.value

    def _failed(self, exc: HookFailedError) -> None:
        """A rewrite failed: the loop counts the stream as stopped and the call as failed; raises `exc`."""
        self._done = True
        self._disown()
        if self._loop is not None:
            try:
                self._loop.throw(exc)
            except StopIteration:  # the loop ended without re-raising: the caller still gets the failure
                pass

    def _abandon(self) -> bool:
        if self._done:
            return False
        self._done = True
        self._disown()
        return True

    def _disown(self) -> None:
        """The stream ends here, on the caller's thread: nothing is left for the finalizer."""
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer.detach()


class Stream(_StreamBase):
    """The text deltas of a streamed answer, as they come. When it ends, `.result` holds the `Result`.

    Use it as an iterator (and, to stop early, `close()` it or use it in a `with` block); a stream that breaks
    after text has been yielded raises `StreamInterruptedError`, carrying the text so far. `events()` gives the
    same stream as `router.engines.Chunk`s, tool-call deltas included.
    """

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> str:
        while (chunk := self._next_content()) is not None:
            if chunk.text:
                return chunk.text
        raise StopIteration

    def events(self) -> Iterator[Chunk]:
        """Each chunk that carries content (text or tool-call deltas), as it comes."""
        while (chunk := self._next_content()) is not None:
            yield chunk

    def _next_content(self) -> Chunk | None:
        try:
            return self._content()
        except HookFailedError as exc:
            self._state.close()
            self._failed(exc)
            raise

    def _content(self) -> Chunk | None:
        if self._pending:
            return self._shown(self._pending.pop(0))
        while not self._done:
            if self._ended:
                self._finish(None)
                break
            try:
                chunk = self._state.next_chunk()
            except StopIteration:
                self._ended = True
                tail = self._tail()
                if tail is not None:
                    return tail
                continue
            except Exception as exc:
                self._finish(exc)
                break
            if self._state.feed(chunk):
                return self._shown(chunk)
        return None

    def close(self) -> None:
        """Stop reading; the attempt and the call are counted as cancelled."""
        if self._abandon():
            self._state.close()
            if self._loop is not None:
                self._loop.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncStream(_StreamBase):
    """Async twin of `Stream`: `async for delta in stream`, then `stream.result`; `events()` as Stream's."""

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> str:
        while (chunk := await self._next_content()) is not None:
            if chunk.text:
                return chunk.text
        raise StopAsyncIteration

    async def events(self) -> AsyncIterator[Chunk]:
        """Each chunk that carries content (text or tool-call deltas), as it comes."""
        while (chunk := await self._next_content()) is not None:
            yield chunk

    async def _next_content(self) -> Chunk | None:
        try:
            return await self._content()
        except HookFailedError as exc:
            await self._state.aclose()
            self._failed(exc)
            raise

    async def _content(self) -> Chunk | None:
        if self._pending:
            return self._shown(self._pending.pop(0))
        while not self._done:
            if self._ended:
                self._finish(None)
                break
            try:
                chunk = await self._state.anext_chunk()
            except StopAsyncIteration:
                self._ended = True
                tail = self._tail()
                if tail is not None:
                    return tail
                continue
            except Exception as exc:
                self._finish(exc)
                break
            if self._state.feed(chunk):
                return self._shown(chunk)
        return None

    async def aclose(self) -> None:
        """Stop reading; the attempt and the call are counted as cancelled."""
        if self._abandon():
            await self._state.aclose()
            if self._loop is not None:
                self._loop.close()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
