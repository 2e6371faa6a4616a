"""One event loop in a daemon thread, for sync callers that need what only asyncio gives: cancelling a request
for real (a thread blocked in a socket read cannot be), and a wall-clock bound on one."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Awaitable
from typing import Any

_bg_lock = threading.Lock()
_bg_loop: asyncio.AbstractEventLoop | None = None
_bg_pid = 0


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
