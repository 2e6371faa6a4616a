"""The gunicorn worker class of `llm-router serve --workers N` (imported by gunicorn in each worker)."""

from __future__ import annotations

from typing import Any

from uvicorn_worker import UvicornWorker


class GatewayWorker(UvicornWorker):  # type: ignore[misc]
    """uvicorn-worker's gunicorn worker, which cancels answers still running just before gunicorn's graceful
    timeout would kill the worker, so that they end counted (as `cancelled`) rather than lost."""

    CONFIG_KWARGS = {"loop": "auto", "http": "auto", "server_header": False}  # noqa: RUF012

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.config.timeout_graceful_shutdown = max(1, round(self.cfg.graceful_timeout) - 1)
