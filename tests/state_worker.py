"""One worker process for tests/test_state.py: a Router per config file, driven line by line over stdin.

    python tests/state_worker.py CONFIG.yaml [CONFIG.yaml ...]

Commands (one per line), each answered by one JSON line on stdout:
    ready                 import litellm and wait for one exchange with each state store -> {"ok": true}
    call I ALIAS N        N generate() calls in turn on the I-th Router -> {"providers": [...], "errors": [...]}
    quit                  close the Routers and exit
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from prometheus_client import CollectorRegistry

from router import Router, RouterError
from router.engines import litellm as _litellm


def main(paths: list[str]) -> None:
    routers = [Router.from_yaml(path, registry=CollectorRegistry()) for path in paths]
    out = sys.stdout
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "quit":
            break
        if cmd[0] == "ready":
            _litellm.litellm()
            synced = [r._state.wait_synced(10) for r in routers if r._state is not None]
            reply: dict[str, object] = {"ok": all(synced)}
        elif cmd[0] == "call":
            providers, errors = [], []
            router = routers[int(cmd[1])]
            for _ in range(int(cmd[3])):
                try:
                    providers.append(router.generate("hello", model=cmd[2]).provider)
                except RouterError as exc:
                    errors.append(type(exc).__name__)
            reply = {"providers": providers, "errors": errors}
        else:
            reply = {"error": f"unknown command {cmd[0]!r}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()
    for r in routers:
        r.close()


if __name__ == "__main__":
    main(sys.argv[1:])
