"""A pytest plugin that runs the test suite with one `bench.profile` candidate in force, to check that a setting
which saves CPU changes no behaviour the tests pin down:

    BENCH_CANDIDATE=quiet_call .venv/bin/python -m pytest -q -p no:cacheprovider -p bench.pytest_candidate tests/

`BENCH_CANDIDATE=gc_freeze` freezes the heap once litellm is imported instead.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

_stack = contextlib.ExitStack()


def pytest_configure(config: Any) -> None:
    name = os.environ.get("BENCH_CANDIDATE", "")
    if not name:
        return
    if name == "gc_freeze":
        import gc

        from router.engines import litellm as _litellm

        _litellm.litellm()
        gc.collect()
        gc.freeze()
        return
    from bench.profile import CANDIDATES, applied

    by_name = {c.name: c for c in CANDIDATES}
    if name not in by_name:
        raise ValueError(f"BENCH_CANDIDATE={name!r}: not one of {', '.join(by_name)}, gc_freeze")
    _stack.enter_context(applied(by_name[name]))


def pytest_report_header(config: Any) -> str | None:
    name = os.environ.get("BENCH_CANDIDATE", "")
    return f"bench candidate in force: {name}" if name else None


def pytest_unconfigure(config: Any) -> None:
    _stack.close()
