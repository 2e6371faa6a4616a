"""`llm-router serve`: the gateway under uvicorn, in one process or as N gunicorn-supervised uvicorn workers.

- One process (`--workers 1`): uvicorn runs the app; SIGHUP or an edit of the file (watched) reloads the
  config; SIGTERM stops taking connections and lets answers in flight, streams included, finish for up to
  `--graceful-timeout` seconds before they are cancelled (and counted `cancelled`).
- N workers: gunicorn supervises N uvicorn workers on one socket, each with its own Router built after the
  fork. PROMETHEUS_MULTIPROC_DIR must be in the environment before prometheus_client is imported, so `serve`
  re-executes itself with it set (a fresh directory unless given): /metrics then sums every worker's. SIGHUP to
  the master is passed to every worker, each of which reloads its config in place (no restart, no dropped
  stream); each worker also watches the file. SIGTERM is the same graceful stop in every worker.
- Without `gateway:` keys the gateway binds to loopback only, unless told `--allow-unauthenticated`.
"""

from __future__ import annotations

import glob
import ipaddress
import logging
import math
import os
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import values

from ..config import RouterConfig, load_config
from ..metrics import MULTIPROC_ENV

log = logging.getLogger("router.gateway")

_REEXEC_ENV = "LLM_ROUTER_SERVE_MULTIPROC"  # set on the re-executed `serve`: the metrics env is in place


@dataclass(frozen=True)
class ServeOptions:
    """What `llm-router serve` was asked for."""

    config: str
    host: str = "127.0.0.1"
    port: int = 4000
    workers: int = 1
    allow_unauthenticated: bool = False
    graceful_timeout_s: float = 30.0
    watch: bool = True
    access_log: bool = True
    log_level: str = "info"


def is_loopback(host: str) -> bool:
    """Whether `host` is a loopback address (or localhost): reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def bind_problem(host: str, cfg: RouterConfig, allow_unauthenticated: bool) -> str | None:
    """Why the gateway must not bind `host` with this config, or None."""
    if cfg.gateway is not None or allow_unauthenticated or is_loopback(host):
        return None
    return (
        f"refusing to serve on {host} without client keys: anyone who reaches it could spend your providers' "
        "credit. Add a gateway: section with keys (see the README's Gateway section), bind to 127.0.0.1, or "
        "pass --allow-unauthenticated if something in front of it checks every request"
    )


def workers_note(cfg: RouterConfig, workers: int) -> str | None:
    """What to tell an operator running `workers` workers on this config, or None."""
    if workers > 1 and cfg.state.backend == "memory":
        return (
            f"{workers} workers keep their circuit breakers and benched keys each to itself (state.backend memory): "
            "each finds a failing provider on its own. Add state: {backend: sqlite, path: ...} to share them"
        )
    return None


def gateway_app(opts: ServeOptions) -> Any:
    """The app of one server process: a Router on the config file, and the Gateway over it."""
    from ..client import Router
    from .app import Gateway

    router = Router.from_yaml(opts.config, watch=opts.watch)
    require = not (is_loopback(opts.host) or opts.allow_unauthenticated)
    return Gateway(router, require_keys=require, sighup=True, owns_router=True)


def serve(opts: ServeOptions, argv: Sequence[str]) -> int:
    """Run the gateway until it is told to stop; the exit code. `argv`: the command line, to re-execute it."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("router").setLevel(opts.log_level.upper())  # LiteLLM's own INFO lines stay out
    if opts.workers > 1 and not getattr(values.ValueClass, "_multiprocess", False):
        _reexec_with_metrics_dir(argv)  # does not return
    from .. import api

    if opts.workers > 1:
        note = workers_note(load_config(opts.config), opts.workers)
        if note:
            log.warning("%s", note)
    api.preload()  # LiteLLM once, before serving (and, with workers, before the fork: they share it)
    if opts.workers > 1:
        return _run_gunicorn(opts)
    import uvicorn

    config = uvicorn.Config(
        gateway_app(opts),
        host=opts.host,
        port=opts.port,
        lifespan="on",
        access_log=opts.access_log,
        log_level=opts.log_level,
        timeout_graceful_shutdown=max(1, round(opts.graceful_timeout_s)),
        server_header=False,
    )
    uvicorn.Server(config).run()
    return 0


def _reexec_with_metrics_dir(argv: Sequence[str]) -> None:
    env = dict(os.environ)
    if not env.get(MULTIPROC_ENV):
        env[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="llm-router-metrics-")
    env[_REEXEC_ENV] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "router.cli", *argv], env)


def _run_gunicorn(opts: ServeOptions) -> int:
    from gunicorn.app.base import BaseApplication
    from gunicorn.arbiter import Arbiter

    class HupToWorkers(Arbiter):  # type: ignore[misc]
        """gunicorn's master, but SIGHUP reloads each worker's config in place instead of replacing them."""

        def handle_hup(self) -> None:
            log.info("SIGHUP: every worker reloads its config")
            for pid in list(self.WORKERS):
                try:
                    os.kill(pid, signal.SIGHUP)
                except ProcessLookupError:
                    pass

    class Application(BaseApplication):  # type: ignore[misc]
        def __init__(self, settings: dict[str, Any], load: Callable[[], Any]) -> None:
            self._settings = settings
            self._load = load
            super().__init__()

        def load_config(self) -> None:
            for name, value in self._settings.items():
                self.cfg.set(name, value)

        def load(self) -> Any:
            return self._load()

        def run(self) -> None:
            HupToWorkers(self).run()

    host = f"[{opts.host}]" if ":" in opts.host and not opts.host.startswith("[") else opts.host
    settings: dict[str, Any] = {
        "bind": [f"{host}:{opts.port}"],
        "workers": opts.workers,
        "worker_class": "router.gateway.worker.GatewayWorker",
        "graceful_timeout": max(1, math.ceil(opts.graceful_timeout_s)),
        "timeout": 120,
        "keepalive": 5,
        "preload_app": False,  # each worker builds its Router after the fork (threads do not survive one)
        "accesslog": "-" if opts.access_log else None,
        "errorlog": "-",
        "loglevel": opts.log_level,
        "proc_name": "llm-router",
        "on_starting": _on_starting,
        "child_exit": _child_exit,
    }
    Application(settings, lambda: gateway_app(opts)).run()
    return 0


def _on_starting(server: Any) -> None:
    path = os.environ[MULTIPROC_ENV]
    os.makedirs(path, exist_ok=True)
    for f in glob.glob(os.path.join(path, "*.db")):  # a previous run's counts would be summed in otherwise
        os.remove(f)


def _child_exit(server: Any, worker: Any) -> None:
    from ..api import mark_process_dead

    mark_process_dead(worker.pid)
