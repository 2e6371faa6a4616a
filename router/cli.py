"""The `llm-router` command: validate | explain | generate | demo | schema.

`validate`, `explain` and `schema` never import litellm, so they answer in well under a second.
Exit codes: 0 fine, 1 the config or the call failed, 2 the command line is wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from .config import RouterConfig, Target, config_schema, load_config
from .errors import ConfigError, RouterError

DEFAULT_CONFIG = "config/router.yaml"


def _default_config() -> str:
    return os.environ.get("LLM_ROUTER_CONFIG") or DEFAULT_CONFIG


def _err(msg: str) -> None:
    print(msg, file=sys.stderr)


def cmd_validate(args: argparse.Namespace) -> int:
    """Check each file; one problem per line on stderr."""
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
        for note in _credential_notes(cfg):
            _err(f"{path}: note: {note}")
    return 1 if failed else 0


def _credential_notes(cfg: RouterConfig) -> list[str]:
    notes = []
    for name, p in cfg.providers.items():
        if p.api_key is not None and not p.api_key.get_secret_value():
            need = " or ".join(p._key_env_vars) or "api_key"
            notes.append(f"{need} is not set: provider {name!r} will be skipped")
    return notes


def _key_state(t: Target) -> str:
    # Never a character of the key itself: only where it comes from.
    if t.api_key is None:
        return "no key configured"
    if not t.api_key.get_secret_value():
        return f"MISSING: set {' or '.join(t.key_env_vars) or 'api_key'} (skipped)"
    return f"key from ${t.key_env_vars[0]}" if t.key_env_vars else "key: literal in file"


def _price(t: Target) -> str:
    if t.pricing is None:
        return "price: provider-reported or litellm's price map"
    return f"price: ${t.pricing.input_per_token * 1e6:g} in / ${t.pricing.output_per_token * 1e6:g} out per 1M tokens"


def explain(cfg: RouterConfig, alias: str | None = None) -> str:
    """What a call to each alias (or just `alias`) would do: targets in order, credentials, prices."""
    names = [alias] if alias else list(cfg.aliases)
    d = cfg.defaults
    out = [
        f"{cfg.source}: timeout {d.timeout_s:g}s per attempt, deadline {d.deadline_s:g}s per call, "
        f"{d.retry.attempts} tries per target on transient errors",
        f"fall back on: {', '.join(d.fallback_on)}",
    ]
    for name in names:
        a = cfg.aliases[name]
        default = " (default)" if name == d.model else ""
        out.append("")
        out.append(f"{name}{default}")
        if a.system:
            out.append(f"  system: {a.system if len(a.system) <= 60 else a.system[:57] + '...'}")
        if a.params:
            out.append(f"  params: {json.dumps(a.params, sort_keys=True)}")
        for i, t in enumerate(cfg.targets(name), 1):
            params = f"  params {json.dumps(dict(t.params), sort_keys=True)}" if t.params else ""
            base = f", at {t.api_base}" if t.api_base else ""
            out.append(f"  {i}. {t.key}  (litellm model {t.litellm_model}{base}, timeout {t.timeout_s:g}s){params}")
            out.append(f"     {_key_state(t)}; {_price(t)}")
        if not any(t.has_credentials for t in cfg.targets(name)):
            out.append("  ! no target has credentials: calls will raise MissingCredentialsError")
    return "\n".join(out)


def cmd_explain(args: argparse.Namespace) -> int:
    """Print the plan of each alias."""
    cfg = load_config(args.file)
    if args.alias and args.alias not in cfg.aliases:
        _err(f"llm-router: unknown alias {args.alias!r} (aliases: {', '.join(cfg.aliases)})")
        return 1
    print(explain(cfg, args.alias))
    return 0


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
    res = r.generate(prompt, model=args.model, system=args.system, provider=args.provider, timeout=args.timeout, **params)
    print(res.text)
    fallbacks = f", {res.fallbacks} fallback(s)" if res.fallbacks else ""
    _err(
        f"[{res.alias} → {res.provider}/{res.model}] {res.usage.input_tokens} in / {res.usage.output_tokens} out tokens, "
        f"${res.cost_usd:.6f} ({res.cost_source}), {res.latency_s * 1000:.0f} ms, {len(res.attempts)} attempt(s){fallbacks}"
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the offline demo on the simulated sandbox provider."""
    from .demo import run

    return run(args.config)


def cmd_schema(args: argparse.Namespace) -> int:
    """Print the JSON Schema of the config file."""
    print(json.dumps(config_schema(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `llm-router`."""
    p = argparse.ArgumentParser(prog="llm-router", description="Config-driven LLM router over litellm.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    v = sub.add_parser("validate", help="check config files; one problem per line, exit 1 if any")
    v.add_argument("files", nargs="+", metavar="FILE")
    v.set_defaults(func=cmd_validate)

    e = sub.add_parser("explain", help="show each alias's targets in order, credentials and prices")
    e.add_argument("file", metavar="FILE")
    e.add_argument("alias", nargs="?", metavar="ALIAS")
    e.set_defaults(func=cmd_explain)

    g = sub.add_parser("generate", help="one call: text on stdout, provider/tokens/cost/latency on stderr")
    g.add_argument("prompt", help="the prompt, or - to read it from stdin")
    g.add_argument("-c", "--config", default=_default_config(), help="config file (default: $LLM_ROUTER_CONFIG or %(default)s)")
    g.add_argument("-m", "--model", help="alias (default: defaults.model)")
    g.add_argument("--provider", help="use only this provider's targets")
    g.add_argument("--system", help="system prompt")
    g.add_argument("--timeout", type=float, help="deadline of the whole call in seconds")
    g.add_argument("--max-tokens", type=int)
    g.add_argument("--temperature", type=float)
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", help="offline demo on the simulated sandbox provider")
    d.add_argument("-c", "--config", default=None, help="sandbox config (default: the built-in config/sandbox.yaml)")
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("schema", help="print the JSON Schema of the config file")
    s.set_defaults(func=cmd_schema)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `llm-router` console script."""
    args = build_parser().parse_args(argv)
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
    return code


if __name__ == "__main__":
    sys.exit(main())
