"""Module-level `generate()`/`agenerate()` on a default `Router`, and what serves its metrics (`/metrics`)."""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server

from .client import Router
from .metrics import multiprocess_dir, multiprocess_registry

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
    shadow: bool | None = None,
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
        shadow=shadow,
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
    shadow: bool | None = None,
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
        shadow=shadow,
        **params,
    )


def metrics_registry() -> CollectorRegistry:
    """The registry to expose on /metrics (e.g. with `prometheus_client.make_wsgi_app(registry)`).

    With PROMETHEUS_MULTIPROC_DIR set: one that reads the metrics of every worker process from that directory,
    so any worker (or the gunicorn master) answers a scrape with the sum over all of them. Else the default
    Router's registry.
    """
    path = multiprocess_dir()
    if path is not None:
        return multiprocess_registry(path)
    return default_router().metrics.registry


def start_metrics_server(port: int = 9464, addr: str = "127.0.0.1", registry: CollectorRegistry | None = None) -> Any:
    """Serve /metrics of `registry` (default: `metrics_registry()`) over HTTP in a daemon thread."""
    if registry is None:
        registry = metrics_registry()
    return start_http_server(port, addr, registry=registry)


def preload(config: Any = None) -> None:
    """Load the engines now instead of at the first call: LiteLLM (seconds, ~170 MB), or with `config` (a
    RouterConfig or a path) exactly the engines its targets use (a direct-only config never imports LiteLLM).
    In a gunicorn master before the fork (see examples/gunicorn.conf.py) every worker inherits them: they start
    at once and share their memory."""
    from .config import RouterConfig, load_config
    from .engines import DEFAULT_ENGINE, get_engine

    if config is None:
        get_engine(DEFAULT_ENGINE).load()
    else:
        cfg = config if isinstance(config, RouterConfig) else load_config(config)
        for name in sorted({t.engine for alias in cfg.aliases for t in cfg.targets(alias)}):
            get_engine(name).load()
    # What is loaded now lives as long as the process: the collector never needs to look at it again. Frozen,
    # a forked worker's collections (the last one at exit above all) no longer write to every object of that
    # heap, which copied all of its pages into each worker: 1-3 s to exit and the memory the fork saved.
    gc.collect()
    gc.freeze()


def exit_worker() -> None:
    """Finish an exiting worker process at once: run its atexit handlers (the ledger's flush among them), flush
    stdout and stderr, and `os._exit` with the exit code it was leaving with, skipping the interpreter's
    teardown of the heap inherited from the master (most of a second with LiteLLM loaded). Call it from
    gunicorn's `worker_exit` hook (examples/gunicorn.conf.py). It does nothing, and the exit goes on as usual,
    unless a `SystemExit` is under way on the main thread and no other non-daemon thread is alive (the
    interpreter would wait for those first)."""
    exiting = sys.exc_info()[1]  # the hook runs in gunicorn's `finally`, while the SystemExit propagates
    if not isinstance(exiting, SystemExit) or threading.current_thread() is not threading.main_thread():
        return
    if any(not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        return
    code = exiting.code
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)  # what the interpreter does with sys.exit("message")
    atexit._run_exitfuncs()  # what the interpreter would run next, in the same order
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0 if code is None else code if isinstance(code, int) else 1)


def mark_process_dead(pid: int) -> None:
    """A worker process exited: drop its live gauges (in-flight calls, circuit states, config) from the aggregate;
    its counts stay. Call it from gunicorn's `child_exit` hook. Does nothing without PROMETHEUS_MULTIPROC_DIR."""
    path = multiprocess_dir()
    if path is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]
