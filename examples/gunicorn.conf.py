"""gunicorn settings for a service that calls llm-router: metrics summed over every worker, dead workers
marked dead. Use it as is (`gunicorn -c examples/gunicorn.conf.py app:app`) or copy the hooks into yours.

- PROMETHEUS_MULTIPROC_DIR must be in the environment before any worker imports prometheus_client: it is set
  here, at the top of the config file, which gunicorn reads before it forks, unless the unit file or the
  container's env sets it already (one directory per service). Each worker then writes its metrics to files
  in that directory, and /metrics (any worker's, via `router.metrics_registry()`) serves their sum.
- The directory is emptied when gunicorn starts: the counts of a previous run would be summed in otherwise
  (Prometheus sees a counter reset, as after any restart).
- `child_exit` marks each exited worker dead, so its in-flight calls, circuit states and config leave the
  gauges; its counts stay.
- LiteLLM is imported once, in the master (`router.preload()`): the workers inherit it, so they start at
  once and share its ~170 MB instead of each importing it at its first call. preload() also freezes that heap
  for the garbage collector, so no worker copies it page by page when it collects.
- `worker_exit` ends a stopping worker with `router.exit_worker()`: its atexit handlers run (the ledger's
  rows are written), then it exits at once instead of tearing down the inherited heap object by object. A
  SIGTERM then stops the workers in a fraction of a second instead of 3-6 s (tests/test_multiprocess.py).
- No `preload_app`: each worker builds its own Router after the fork (its watch thread would not survive it).
- With LLM_ROUTER_METRICS_PORT set, the master also serves /metrics on that port: a scrape then never
  waits for a busy worker.
"""

import glob
import os
import tempfile

# A fixed place from the unit file or the container's env; else a fresh one for this master (two services on
# one host must never share one: each would empty and sum the other's).
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="llm-router-metrics-")

bind = os.environ.get("BIND", "127.0.0.1:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", "4"))
preload_app = False
graceful_timeout = 30  # a worker told to stop finishes its calls (and closes their streams) first


def on_starting(server):  # type: ignore[no-untyped-def]
    path = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    os.makedirs(path, exist_ok=True)
    for f in glob.glob(os.path.join(path, "*.db")):
        os.remove(f)
    import router  # light: it does not import LiteLLM...

    router.preload()  # ...this does, once for all workers


def when_ready(server):  # type: ignore[no-untyped-def]
    port = os.environ.get("LLM_ROUTER_METRICS_PORT")
    if port:
        import router

        router.start_metrics_server(port=int(port), addr=os.environ.get("LLM_ROUTER_METRICS_ADDR", "127.0.0.1"))


def child_exit(server, worker):  # type: ignore[no-untyped-def]
    import router

    router.mark_process_dead(worker.pid)


def worker_exit(server, worker):  # type: ignore[no-untyped-def]
    import router

    router.exit_worker()  # last: after this hook, the worker process is gone
