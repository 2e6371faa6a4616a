"""The router skips litellm's own logging only while nothing reads it: an application's litellm callbacks
(Langfuse and the like) still see every router call, sync and async."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import MakeRouter

from router.engines import litellm as _litellm
from router.sandbox import Reply, Upstream


class Seen:
    """Counts the success events a litellm CustomLogger receives."""

    def __init__(self) -> None:
        self.events = 0
        self.lock = threading.Lock()

    def add(self) -> None:
        with self.lock:
            self.events += 1

    def wait_for(self, n: int, within_s: float = 5.0) -> int:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline and self.events < n:
            time.sleep(0.01)
        return self.events


@pytest.fixture
def seen() -> Iterator[Seen]:
    lm = _litellm.litellm()
    from litellm.integrations.custom_logger import CustomLogger

    counter = Seen()

    class AppLogger(CustomLogger):  # type: ignore[misc]
        def log_success_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
            counter.add()

        async def async_log_success_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
            counter.add()

    logger = AppLogger()
    lm.callbacks.append(logger)
    try:
        yield counter
    finally:
        for name in _litellm._CALLBACK_LISTS:
            lst = getattr(lm, name, None)
            if isinstance(lst, list):
                lst[:] = [cb for cb in lst if cb is not logger]


def test_an_applications_litellm_callback_sees_sync_calls(make_router: MakeRouter, up: Upstream, seen: Seen) -> None:
    up.enqueue("a", Reply(text="one"), Reply(text="two"))
    r = make_router()
    r.generate("hello", model="single")
    r.generate("hello", model="single")
    assert seen.wait_for(2) >= 2


@pytest.mark.asyncio
async def test_an_applications_litellm_callback_sees_async_calls(
    make_router: MakeRouter, up: Upstream, seen: Seen
) -> None:
    up.enqueue("a", Reply(text="one"))
    r = make_router()
    await r.agenerate("hello", model="single")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and seen.events < 1:
        await asyncio.sleep(0.01)
    assert seen.events >= 1


def test_without_callbacks_the_router_still_gets_usage_and_provider_cost(make_router: MakeRouter, up: Upstream) -> None:
    # The quiet path must keep what the router reads: usage, and OpenRouter's reported cost.
    lm = _litellm.litellm()
    assert not any(getattr(lm, n, None) for n in _litellm._CALLBACK_LISTS)
    up.enqueue("or", Reply(text="priced", usage=(12, 3), cost=0.0042))
    r = make_router(
        """
        version: 1
        providers:
          or: {kind: openrouter, api_base: "{UP}/or/v1", api_key: sk-or-test-0123456789}
        aliases:
          x: {targets: [or/openai/gpt-4o-mini]}
        """
    )
    res = r.generate("hello", model="x")
    assert (res.usage.input_tokens, res.usage.output_tokens) == (12, 3)
    assert (res.cost_usd, res.cost_source) == (0.0042, "provider")
