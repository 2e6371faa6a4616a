"""One event loop in a daemon thread, for sync callers that need what only asyncio gives: cancelling a request
for real (a thread blocked in a socket read cannot be), and a wall-clock bound on one.

`generate()` sends its requests as the async ones, on this loop: `run(coro, seconds)` blocks the calling thread
until the coroutine, which holds itself to its attempt's bound (`streams.within`), ends. Past the bound the
request is cancelled, whatever the upstream does meanwhile (a body trickled a byte at a time resets every socket
timeout), and a cancelled request closes its connection on the loop: nothing is left reading.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Awaitable, Coroutine
from typing import Any

_bg_lock = threading.Lock()
_bg_loop: asyncio.AbstractEventLoop | None = None
_bg_pid = 0

class AttemptTimeout(TimeoutError):
    """A request outlasted its wall-clock bound (the attempt's timeout, or what was left of the call's deadline)."""


def background_loop() -> asyncio.AbstractEventLoop:
    """The background event loop, in a daemon thread started on first use (again in a forked worker, where the
    parent's thread does not run)."""
    global _bg_loop, _bg_pid
    with _bg_lock:
        if _bg_loop is None or _bg_pid != os.getpid():
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="llm-router-background", daemon=True).start()
            _bg_loop, _bg_pid = loop, os.getpid()
        return _bg_loop


def run_on(loop: asyncio.AbstractEventLoop, coro: Awaitable[Any]) -> concurrent.futures.Future[Any]:
    """Run `coro` on `loop` (from another thread); its concurrent Future."""
    async def run() -> Any:
        return await coro

    return asyncio.run_coroutine_threadsafe(run(), loop)


def submit(coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
    """Run `coro` as a task of the background loop; its concurrent Future, whose cancel() cancels the task. The
    task runs in a copy of the caller's context (asyncio copies it where the task is scheduled), so an
    application's context variables, a tracing span among them, still hold there."""
    return asyncio.run_coroutine_threadsafe(coro, background_loop())


def run(coro: Coroutine[Any, Any, Any], bound_s: float) -> Any:
    """Run `coro` on the background loop and wait for it at most `bound_s` seconds: its result, or its exception.
    Past `bound_s` it is cancelled and AttemptTimeout raised, by the caller's own clock: a loop kept busy meanwhile
    (litellm building another request's exception takes it for a while) does not hold the caller past its bound.
    A caller interrupted while waiting (KeyboardInterrupt, a signal handler's exception) cancels it too."""
    future = submit(coro)
    try:
        concurrent.futures.wait((future,), timeout=max(bound_s, 0.0))
    finally:
        if not future.done():
            future.cancel()
    if future.cancelled():
        raise AttemptTimeout(f"no complete answer within {bound_s:.3g}s")
    return future.result()
