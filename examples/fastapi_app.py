"""An ASGI (FastAPI) service calling llm-router, with /metrics summed over all its workers. Runs offline.

    .venv/bin/python examples/fastapi_app.py            # one process, with the SIMULATED sandbox on :8089

Several workers (see examples/gunicorn.conf.py; start the sandbox first, or point LLM_ROUTER_CONFIG at yours):

    .venv/bin/python -m router.sandbox --port 8089 &
    .venv/bin/gunicorn -c examples/gunicorn.conf.py -k uvicorn_worker.UvicornWorker examples.fastapi_app:app
    curl -s localhost:8000/generate -d '{"prompt": "hi", "model": "fast"}' -H 'content-type: application/json'
    curl -s localhost:8000/metrics | grep llm_router_requests_total
"""

from __future__ import annotations

import os

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

import router

os.environ.setdefault("LLM_ROUTER_CONFIG", "config/sandbox.yaml")
# Built at import, in each worker after the fork: every worker reports its config from the start, and with
# LLM_ROUTER_WATCH=1 each one watches the file.
llm = router.default_router()
registry = router.metrics_registry()  # every worker's metrics under PROMETHEUS_MULTIPROC_DIR, else this one's

app = FastAPI(title="llm-router example")


class Ask(BaseModel):
    prompt: str
    model: str | None = None


@app.post("/generate")
async def generate(ask: Ask) -> Response:
    try:
        res = await llm.agenerate(ask.prompt, model=ask.model)
    except router.RouterError as exc:  # typed, and never carries a key
        return JSONResponse({"error": type(exc).__name__, "message": str(exc)}, status_code=502)
    return JSONResponse(
        {
            "text": res.text,
            "provider": res.provider,
            "model": res.model,
            "cost_usd": res.cost_usd,
            "worker": os.getpid(),
        }
    )


@app.get("/metrics")
def metrics() -> Response:
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


if __name__ == "__main__":
    import uvicorn

    from router.sandbox import Upstream, simulated_providers

    with Upstream(port=8089) as up:
        simulated_providers(up)
        uvicorn.run(app, host="127.0.0.1", port=8000)
