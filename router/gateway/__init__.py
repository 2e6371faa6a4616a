"""The OpenAI-compatible gateway: `llm-router serve` over HTTP, and `openai_client()` in process.

This package imports nothing heavy: the OpenAI SDK and httpx load when a client is made, uvicorn when a
server starts. `protocol` is the wire format (pure), `app` the ASGI app both forms share, `inprocess` the
httpx transports of the in-process clients, `server` the `serve` command's process management.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

BASE_URL = "http://llm-router.in-process/v1"  # the base URL of the in-process clients (no host is ever resolved)

if TYPE_CHECKING:
    import httpx
    import openai

    from ..client import Router


def openai_client(
    router: Router | str | os.PathLike[str], *, api_key: str | None = None, **kwargs: Any
) -> openai.OpenAI:
    """An `openai.OpenAI` client whose requests `router` (a Router, or the path of a config file) answers in this
    process, with no socket and no server: everything `llm-router serve` answers, it answers the same way.

    With `gateway:` keys in the config, `api_key` must be one of them (its tags and aliases apply). Other
    keyword arguments go to `openai.OpenAI` (`max_retries`, `timeout`, ...). Closing the client closes a Router
    it made from a path.
    """
    from .inprocess import openai_client as make

    return make(router, api_key=api_key, **kwargs)


def async_openai_client(
    router: Router | str | os.PathLike[str], *, api_key: str | None = None, **kwargs: Any
) -> openai.AsyncOpenAI:
    """Async twin of `openai_client`: an `openai.AsyncOpenAI` answered on the caller's event loop."""
    from .inprocess import async_openai_client as make

    return make(router, api_key=api_key, **kwargs)


def http_client(router: Router | str | os.PathLike[str]) -> httpx.Client:
    """An `httpx.Client` whose requests `router` answers in process, for SDKs that take one instead of a base URL
    alone (langchain-openai's `http_client=`, pydantic-ai's): give them `base_url=BASE_URL` too."""
    from .inprocess import http_client as make

    return make(router)


def async_http_client(router: Router | str | os.PathLike[str]) -> httpx.AsyncClient:
    """Async twin of `http_client` (langchain-openai's `http_async_client=`)."""
    from .inprocess import async_http_client as make

    return make(router)
