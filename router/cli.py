"""The `llm-router` command: validate | explain | generate | usage | serve | demo | schema.

`validate`, `explain`, `usage` and `schema` never import litellm, so they answer in well under a second.
Exit codes: 0 fine, 1 the config or the call failed, 2 the command line is wrong.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from collections.abc import Sequence

from prometheus_client import CollectorRegistry

from .config import RouterConfig, config_schema, load_config
from .errors import ConfigError, RouterError

DEFAULT_CONFIG = "config/router.yaml"


def _default_config() -> str:
    return os.environ.get("LLM_ROUTER_CONFIG") or DEFAULT_CONFIG


def _err(msg: str) -> None:
    print(msg, file=sys.stderr)


def cmd_validate(args: argparse.Namespace) -> int:
    """Check each file; one problem per line on stderr, then the aliases no target of which could answer."""
    from .planner import disabled_providers  # no litellm import: that waits for the first request

    failed = False
    for path in args.files:
        try:
            cfg = load_config(path)
        except ConfigError as exc:
            failed = True
            for problem in exc.problems:
                _err(str(problem))
            continue
        n_targets = sum(len(cfg.targets(a)) for a in cfg.aliases)
        print(f"{path}: ok ({len(cfg.providers)} providers, {len(cfg.aliases)} aliases, {n_targets} targets)")
        for note in _credential_notes(cfg) + _tracing_notes(cfg):
            _err(f"{path}: note: {note}")
        dead = cannot_answer(cfg, disabled_providers(cfg, os.environ))
        for alias, reasons in dead.items():
            _err(f"{path}: warning: alias {alias!r} cannot answer: every target is skipped: {_listed(reasons)}")
        if dead:
            verdict = " (--strict)" if args.strict else "; validate --strict exits 1 on this"
            _err(f"{path}: warning: {len(dead)} of {len(cfg.aliases)} aliases would fail every call{verdict}")
            failed = failed or args.strict
    return 1 if failed else 0


def cannot_answer(cfg: RouterConfig, disabled: frozenset[str] = frozenset()) -> dict[str, list[str]]:
    """The aliases every target of which a call would skip, each with why: "<target> (<reason>)" per target.

    Keys may arrive at deploy time, so this is a warning, not a ConfigError; circuits are not considered."""
    from .explain import skip_reason

    out: dict[str, list[str]] = {}
    for alias in cfg.aliases:
        reasons = []
        for t in cfg.targets(alias):
            reason = skip_reason(t, disabled, peek=lambda t: ("closed", 0.0), now=0.0)
            if reason is None or not reason.startswith("SKIPPED: "):
                break
            reasons.append(f"{t.key} ({reason.removeprefix('SKIPPED: ')})")
        else:
            out[alias] = reasons
    return out


def _listed(items: list[str], most: int = 5) -> str:
    more = f", and {len(items) - most} more" if len(items) > most else ""
    return ", ".join(items[:most]) + more


def _tracing_notes(cfg: RouterConfig) -> list[str]:
    if cfg.tracing is None or not cfg.tracing.enabled:
        return []
    try:
        missing = importlib.util.find_spec("opentelemetry.trace") is None
    except ImportError:
        missing = True
    if missing:
        return ["tracing is on but OpenTelemetry is not installed: pip install 'llm-router[otel]' (calls go untraced)"]
    return []


def _credential_notes(cfg: RouterConfig) -> list[str]:
    notes = []
    for name, p in cfg.providers.items():
        for k in p.api_keys():
            if not k.usable:
                need = " or ".join(k.env_vars) or "api_key"
                notes.append(
                    f"{need} is not set: provider {name!r} will be skipped"
                    if len(p.api_keys()) == 1
                    else f"{need} is not set: that key of provider {name!r} will be skipped"
                )
    return notes


def cmd_explain(args: argparse.Namespace) -> int:
    """Print the plan of each alias, as a call made now would follow it."""
    from .client import Router  # no litellm import: that waits for the first request

    r = Router(load_config(args.file), registry=CollectorRegistry())
    try:
        if args.alias and args.alias not in r.config.aliases:
            _err(f"llm-router: unknown alias {args.alias!r} (aliases: {', '.join(r.config.aliases)})")
            return 1
        state = r._state
        if state is not None and not state.wait_synced(2 * state.sync_s + 2 * r.config.state.timeout_s + 1):
            _err(f"llm-router: the {state.backend} state store at {state.where} did not answer: circuits as of now")
        print(r.explain(args.alias))  # with a shared state: the fleet's circuits
        return 0
    finally:
        r.close()


def cmd_generate(args: argparse.Namespace) -> int:
    """One call: the text on stdout, where it came from and what it cost on stderr."""
    from .client import Router  # imports litellm lazily on the first request

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    params = {}
    if args.max_tokens is not None:
        params["max_tokens"] = args.max_tokens
    if args.temperature is not None:
        params["temperature"] = args.temperature
    r = Router.from_yaml(args.config)
    res = r.generate(
        prompt, model=args.model, system=args.system, provider=args.provider, timeout=args.timeout, **params
    )
    print(res.text)
    fallbacks = f", {res.fallbacks} fallback(s)" if res.fallbacks else ""
    tokens = f"{res.usage.input_tokens} in / {res.usage.output_tokens} out tokens"
    _err(
        f"[{res.alias} → {res.provider}/{res.model}] {tokens}, ${res.cost_usd:.6f} ({res.cost_source}), "
        f"{res.latency_s * 1000:.0f} ms, {len(res.attempts)} attempt(s){fallbacks}"
    )
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    """Usage from the ledger over a time window, grouped by dimensions or tags."""
    from .usage import query_usage, render

    by = [b.strip() for b in (args.by or "").split(",") if b.strip()]
    try:
        rows = query_usage(args.config, since=args.since, until=args.until, by=by)
    except ValueError as exc:
        _err(f"llm-router usage: {exc}")
        return 1
    print(render(rows, by, args.format))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the OpenAI-compatible gateway until stopped."""
    if importlib.util.find_spec("uvicorn") is None or (
        args.workers > 1 and importlib.util.find_spec("gunicorn") is None
    ):
        _err("llm-router serve: the server is not installed: pip install 'llm-router[serve]'")
        return 1
    from .gateway.server import ServeOptions, bind_problem, serve

    cfg = load_config(args.config)  # a bad file stops here, before any socket
    problem = bind_problem(args.host, cfg, args.allow_unauthenticated)
    if problem:
        _err(f"llm-router serve: {problem}")
        return 2
    opts = ServeOptions(
        config=args.config,
        host=args.host,
        port=args.port,
        workers=args.workers,
        allow_unauthenticated=args.allow_unauthenticated,
        graceful_timeout_s=args.graceful_timeout,
        watch=args.watch,
        access_log=args.access_log,
        log_level=args.log_level,
    )
    return serve(opts, args.argv)


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the offline demo on the simulated sandbox provider."""
    from .demo import run

    return run(args.config)


def cmd_schema(args: argparse.Namespace) -> int:
    """Print the JSON Schema of the config file."""
    print(json.dumps(config_schema(), indent=2))
    return 0


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, not {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `llm-router`."""
    p = argparse.ArgumentParser(prog="llm-router", description="Config-driven LLM router over litellm.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    v = sub.add_parser("validate", help="check config files; one problem per line, exit 1 if any")
    v.add_argument("files", nargs="+", metavar="FILE")
    v.add_argument(
        "--strict",
        action="store_true",
        help="also exit 1 when an alias cannot answer (every target disabled or without its key), for CI",
    )
    v.set_defaults(func=cmd_validate)

    e = sub.add_parser("explain", help="show each alias's targets in order, credentials and prices")
    e.add_argument("file", metavar="FILE")
    e.add_argument("alias", nargs="?", metavar="ALIAS")
    e.set_defaults(func=cmd_explain)

    g = sub.add_parser("generate", help="one call: text on stdout, provider/tokens/cost/latency on stderr")
    g.add_argument("prompt", help="the prompt, or - to read it from stdin")
    g.add_argument(
        "-c", "--config", default=_default_config(), help="config file (default: $LLM_ROUTER_CONFIG or %(default)s)"
    )
    g.add_argument("-m", "--model", help="alias (default: defaults.model)")
    g.add_argument("--provider", help="use only this provider's targets")
    g.add_argument("--system", help="system prompt")
    g.add_argument("--timeout", type=_positive_float, help="deadline of the whole call in seconds")
    g.add_argument("--max-tokens", type=int)
    g.add_argument("--temperature", type=float)
    g.set_defaults(func=cmd_generate)

    u = sub.add_parser("usage", help="calls, tokens and cost from the ledger, by time window and dimension or tag")
    u.add_argument(
        "-c", "--config", default=_default_config(), help="config file (default: $LLM_ROUTER_CONFIG or %(default)s)"
    )
    u.add_argument("--since", default="24h", help="24h, 30m, 7d, 2w or an ISO date/time in UTC (default: 24h)")
    u.add_argument("--until", default=None, help="end of the window, same forms (default: now)")
    u.add_argument(
        "--by",
        default="",
        help="comma-separated: alias, provider, model, key, outcome, cost_source, day, hour, or tags",
    )
    u.add_argument("--format", choices=["table", "csv", "json"], default="table")
    u.set_defaults(func=cmd_usage)

    sv = sub.add_parser("serve", help="serve the OpenAI-compatible gateway (needs llm-router[serve])")
    sv.add_argument(
        "-c", "--config", default=_default_config(), help="config file (default: $LLM_ROUTER_CONFIG or %(default)s)"
    )
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    sv.add_argument("--port", type=int, default=4000, help="port (default: %(default)s)")
    sv.add_argument("--workers", type=_positive_int, default=1, help="worker processes (default: %(default)s)")
    sv.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="serve a non-loopback address without gateway: keys (something in front checks every request)",
    )
    sv.add_argument(
        "--graceful-timeout",
        type=_positive_float,
        default=30.0,
        help="on SIGTERM, how long answers in flight may take to finish, in seconds (default: %(default)s)",
    )
    sv.add_argument(
        "--no-watch", dest="watch", action="store_false", help="do not reload the config when the file changes"
    )
    sv.add_argument("--no-access-log", dest="access_log", action="store_false", help="no line per request")
    sv.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"], help="(default: info)"
    )
    sv.set_defaults(func=cmd_serve)

    d = sub.add_parser("demo", help="offline demo on the simulated sandbox provider")
    d.add_argument("-c", "--config", default=None, help="sandbox config (default: the built-in config/sandbox.yaml)")
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("schema", help="print the JSON Schema of the config file")
    s.set_defaults(func=cmd_schema)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `llm-router` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # `serve --workers N` executes itself again with it
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        for problem in exc.problems:
            _err(str(problem))
        return 1
    except RouterError as exc:
        _err(f"llm-router: {exc.__class__.__name__}: {exc}")
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `llm-router schema | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
