"""llm-router: a thin, config-driven router over litellm with fallback, retries, cost and Prometheus metrics.

import router
res = router.generate("Write a haiku about queues", model="fast")
print(res.text, res.provider, res.cost_usd)
"""

from ._version import __version__
from .api import (
    agenerate,
    default_router,
    exit_worker,
    generate,
    mark_process_dead,
    metrics_registry,
    preload,
    set_default_router,
    start_metrics_server,
)
from .client import AsyncStream, Router, Stream
from .config import RouterConfig, Target, config_schema, load_config, parse_config
from .errors import (
    AllTargetsFailedError,
    BudgetExceededError,
    ConfigError,
    DeadlineExceededError,
    HookFailedError,
    MissingCredentialsError,
    ProviderError,
    RouterError,
    StreamInterruptedError,
    UnknownModelError,
    UnknownProviderError,
)
from .gateway import async_openai_client, openai_client
from .hooks import AttemptReport, Call, Hook
from .metrics import RouterMetrics
from .types import Attempt, Result, Skip, Usage
from .usage import query_usage

__all__ = [
    "AllTargetsFailedError",
    "AsyncStream",
    "Attempt",
    "AttemptReport",
    "BudgetExceededError",
    "Call",
    "ConfigError",
    "DeadlineExceededError",
    "Hook",
    "HookFailedError",
    "MissingCredentialsError",
    "ProviderError",
    "Result",
    "Router",
    "RouterConfig",
    "RouterError",
    "RouterMetrics",
    "Skip",
    "Stream",
    "StreamInterruptedError",
    "Target",
    "UnknownModelError",
    "UnknownProviderError",
    "Usage",
    "__version__",
    "agenerate",
    "async_openai_client",
    "config_schema",
    "default_router",
    "exit_worker",
    "generate",
    "load_config",
    "mark_process_dead",
    "metrics_registry",
    "openai_client",
    "parse_config",
    "preload",
    "query_usage",
    "set_default_router",
    "start_metrics_server",
]
