"""Hedged requests: the I/O half of a race, and the latencies a percentile hedge is timed by.

The attempt loop in `client.py` decides everything: when to send a hedge, to which target, which answer wins,
what each request cost. It asks for a race with three steps that the drivers here carry out: `launch` a request
in the background (a handle comes back), `wait` up to some seconds for the next one to finish, `cancel` the
rest (closing their connections; any that finished meanwhile are handed back so their cost is counted).

`AsyncRacer` runs requests as tasks on the caller's event loop. `SyncRacer` runs them as tasks on one
background event loop thread, so that `generate()` can cancel a losing request for real (a thread blocked
in a socket read cannot be), and reads a winning stream through that loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import threading
from collections import deque
from collections.abc import Coroutine
from typing import Any

from .background import background_loop, run_on
from .engines import Send, engine_for
from .streams import StreamState

MIN_SAMPLES = 20  # latencies a target needs before its percentile times a hedge
WINDOW = 256  # the most recent latencies kept per target


class Latencies:
    """Recent latencies per target (answers, or first text of streams), for `after_percentile` hedges."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, bool], deque[float]] = {}
        self._lock = threading.Lock()

    def add(self, target: str, stream: bool, seconds: float) -> None:
        """One more latency of `target` (stream: time to first text)."""
        with self._lock:
            self._seen.setdefault((target, stream), deque(maxlen=WINDOW)).append(seconds)

    def percentile(self, target: str, stream: bool, q: float) -> float | None:
        """The `q`th percentile (nearest rank) of the target's recent latencies; None below MIN_SAMPLES."""
        with self._lock:
            seen = sorted(self._seen.get((target, stream), ()))
        if len(seen) < MIN_SAMPLES:
            return None
        rank = max(0, min(len(seen) - 1, int(-(-q * len(seen) // 100)) - 1))
        return seen[rank]


def hedge_delay(after_s: float | None, percentile: float | None, seen: float | None) -> float | None:
    """How long to wait before hedging: the percentile when known, else `after_s` (None: do not hedge)."""
    if percentile is not None and seen is not None:
        return seen
    return after_s


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
