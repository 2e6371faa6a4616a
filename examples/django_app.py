"""A WSGI (Django) service calling llm-router, with /metrics summed over all its workers. Runs offline.

A whole Django project in one file (settings, views, URLs, the WSGI application), to show where the router
goes in yours: build it once per process at import (here, or in an AppConfig.ready()), call `generate()` in
views, and serve `router.metrics_registry()` on /metrics.

    .venv/bin/python examples/django_app.py             # one process, with the SIMULATED sandbox on :8089

Several workers (see examples/gunicorn.conf.py; start the sandbox first, or point LLM_ROUTER_CONFIG at yours):

    .venv/bin/python -m router.sandbox --port 8089 &
    .venv/bin/gunicorn -c examples/gunicorn.conf.py examples.django_app:application
    curl -s localhost:8000/generate -d '{"prompt": "hi", "model": "fast"}'
    curl -s localhost:8000/metrics | grep llm_router_requests_total
"""

from __future__ import annotations

import json
import os

import django
from django.conf import settings
from django.core.wsgi import get_wsgi_application
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import path
from django.views.decorators.http import require_GET, require_POST
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import router

settings.configure(
    DEBUG=False,
    ALLOWED_HOSTS=["127.0.0.1", "localhost"],
    ROOT_URLCONF=__name__,
    SECRET_KEY=os.environ.get("DJANGO_SECRET_KEY", "example-only-not-a-secret"),
    MIDDLEWARE=[],  # an API called by services: no sessions, no CSRF cookies
)
django.setup()

os.environ.setdefault("LLM_ROUTER_CONFIG", "config/sandbox.yaml")
# Built at import, in each worker after the fork: every worker reports its config from the start, and with
# LLM_ROUTER_WATCH=1 each one watches the file.
llm = router.default_router()
registry = router.metrics_registry()  # every worker's metrics under PROMETHEUS_MULTIPROC_DIR, else this one's


@require_POST
def generate(request: HttpRequest) -> HttpResponse:
    ask = json.loads(request.body or b"{}")
    try:
        res = llm.generate(ask["prompt"], model=ask.get("model"))
    except router.RouterError as exc:  # typed, and never carries a key
        return JsonResponse({"error": type(exc).__name__, "message": str(exc)}, status=502)
    return JsonResponse(
        {
            "text": res.text,
            "provider": res.provider,
            "model": res.model,
            "cost_usd": res.cost_usd,
            "worker": os.getpid(),
        }
    )


@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)


urlpatterns = [path("generate", generate), path("metrics", metrics)]
application = get_wsgi_application()

if __name__ == "__main__":
    from wsgiref.simple_server import make_server

    from router.sandbox import Upstream, simulated_providers

    with Upstream(port=8089) as up, make_server("127.0.0.1", 8000, application) as server:
        simulated_providers(up)
        print("serving on http://127.0.0.1:8000 (/generate, /metrics); Ctrl-C to stop", flush=True)
        server.serve_forever()
