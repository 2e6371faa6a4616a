"""A worker service calling generate() from a thread pool, with /metrics for Prometheus. Runs offline.

.venv/bin/python examples/threaded_worker.py
"""

import os
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import router
from router.sandbox import Upstream, simulated_providers

with Upstream() as up:
    simulated_providers(up)
    os.environ["LLM_ROUTER_SANDBOX_URL"] = up.url
    r = router.Router.from_yaml("config/sandbox.yaml")
    router.set_default_router(r)
    server, _ = router.start_metrics_server(port=0)

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda i: router.generate(f"job {i}", model="fast"), range(16)))
    print(f"{len(results)} jobs answered, ${sum(x.cost_usd for x in results):.6f} in all")

    port = server.server_address[1]
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    print("\n".join(ln for ln in body.splitlines() if ln.startswith("llm_router_requests_total")))
    server.shutdown()
