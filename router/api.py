"""Module-level `generate()`/`agenerate()` on a default `Router`, and the `/metrics` server."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server

from .client import Router

DEFAULT_CONFIG = "config/router.yaml"

_default: Router | None = None
_lock = threading.Lock()


def default_router() -> Router:
    """The Router used by `router.generate()`: from $LLM_ROUTER_CONFIG, else ./config/router.yaml; built once.

    With LLM_ROUTER_WATCH=1 it reloads the file when it changes.
    """
    global _default
    if _default is None:
        with _lock:
            if _default is None:
                _default = Router.from_yaml(
                    os.environ.get("LLM_ROUTER_CONFIG") or DEFAULT_CONFIG,
                    watch=os.environ.get("LLM_ROUTER_WATCH", "").lower() in ("1", "true", "yes"),
                )
    return _default


def set_default_router(router: Router | None) -> None:
    """Replace the default Router (None: build it again from the config file on next use)."""
    global _default
    with _lock:
        _default = router


def generate(
    prompt: str | None = None,
    *,
    messages: Sequence[Mapping[str, Any]] | None = None,
    model: str | None = None,
    system: str | None = None,
    provider: str | None = None,
    timeout: float | None = None,
    key: str | None = None,
    stream: bool = False,
    response_format: Any = None,
    tags: Mapping[str, str] | None = None,
    cache: bool = True,
    **params: Any,
) -> Any:
    """`Router.generate` on the default Router (see `default_router`): a `Result`, or a `Stream`."""
    return default_router().generate(
        prompt,
        messages=messages,
        model=model,
        system=system,
        provider=provider,
        timeout=timeout,
        key=key,
        stream=stream,
        response_format=response_format,
        tags=tags,
        cache=cache,
        **params,
    )


async def agenerate(
    prompt: str | None = None,
    *,
    messages: Sequence[Mapping[str, Any]] | None = None,
    model: str | None = None,
    system: str | None = None,
    provider: str | None = None,
    timeout: float | None = None,
    key: str | None = None,
    stream: bool = False,
    response_format: Any = None,
    tags: Mapping[str, str] | None = None,
    cache: bool = True,
    **params: Any,
) -> Any:
    """`Router.agenerate` on the default Router (see `default_router`): a `Result`, or an `AsyncStream`."""
    return await default_router().agenerate(
        prompt,
        messages=messages,
        model=model,
        system=system,
        provider=provider,
        timeout=timeout,
        key=key,
        stream=stream,
        response_format=response_format,
        tags=tags,
        cache=cache,
        **params,
    )


def start_metrics_server(port: int = 9464, addr: str = "127.0.0.1", registry: CollectorRegistry | None = None) -> Any:
    """Serve /metrics of `registry` (default: the default Router's) over HTTP in a daemon thread."""
    if registry is None:
        registry = default_router().metrics.registry
    return start_http_server(port, addr, registry=registry)
