"""Quick start, runnable offline: the SIMULATED sandbox stands in for real providers.

    .venv/bin/python examples/quickstart.py

With real keys, drop the sandbox lines and point LLM_ROUTER_CONFIG at config/router.yaml.
"""

import asyncio
import os

import router
from router.sandbox import Upstream, simulated_providers

with Upstream() as up:  # a simulated OpenAI-compatible provider on 127.0.0.1
    simulated_providers(up)
    os.environ["LLM_ROUTER_SANDBOX_URL"] = up.url
    os.environ["LLM_ROUTER_CONFIG"] = "config/sandbox.yaml"

    res = router.generate("Write a haiku about queues", model="fast")
    print(f"{res.provider}/{res.model}: {res.text[:80]}...")
    print(f"tokens {res.usage.input_tokens}+{res.usage.output_tokens}, ${res.cost_usd:.6f}, {res.latency_s:.3f}s")

    async def main() -> None:
        results = await asyncio.gather(*(router.agenerate(f"question {i}", model="chat") for i in range(3)))
        for r in results:
            print(r.alias, "->", r.provider, [a.outcome for a in r.attempts])

    asyncio.run(main())
