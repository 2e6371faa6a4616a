"""Every secret a config holds, in one place: what is scrubbed from errors, logs and traces, and URLs as shown.

The secrets of a config (`RouterConfig.secrets()`, built from the parts here):

- every API key (`api_key`, each key of a pool);
- every value an env var put into a provider header (`Helicone-Auth: "Bearer ${HELI}"`: the value of HELI,
  or its default), and the value of any header whose name says it carries a credential (Authorization,
  X-Api-Key, ...), whole and its last word (the token after "Bearer");
- in `api_base`, `state.url` and `ledger.dsn`: the password of the userinfo (or a user name alone, which is
  a token: `https://TOKEN@host`) and the value of every query parameter whose name says it is a credential
  (`?api-key=`, `?token=`, `?sig=`, `?password=` ...), as written and percent-decoded, and for an http(s)
  URL the Basic auth header its user:password becomes; in a key/value DSN (`host=db password=...`), the
  password.

Texts shorter than MIN_SECRET_CHARS are left alone: "none" or "x" would black out every message.
`guard_logs` scrubs the secrets of every config a Router used from the log records of the router's logger and
of the libraries it sends requests through, whatever their level.
"""

from __future__ import annotations

import base64
import logging
import re
import threading
from collections.abc import Iterable, Sequence
from urllib.parse import unquote

from .errors import redact, scrub

MIN_SECRET_CHARS = 6
MASK = "***"

# A header or query parameter with such a name carries a credential: its value is a secret whatever wrote it.
CREDENTIAL_NAME = re.compile(r"key|token|secret|pass|pwd|auth|sig|cred|session|cookie|code", re.IGNORECASE)

# Loggers whose records can hold a secret: ours, and those of what a request goes through (openai's SDK logs
# the headers and the URL of each request at DEBUG). A filter on a logger sees only the records logged on it.
GUARDED_LOGGERS = (
    "router",
    "openai._base_client",
    "httpx",
    "LiteLLM",
    "LiteLLM Router",
    "psycopg",
    "psycopg.pool",
)

_DSN_PASSWORD = re.compile(r"(\b(?:ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s']+)", re.IGNORECASE)


def url_secrets(url: str) -> list[str]:
    """The secrets in a URL (userinfo, credential query values; as written and decoded) or a key/value DSN."""
    if "://" not in url:
        raw = [m.group(2) for m in _DSN_PASSWORD.finditer(url)]
        return raw + [_unquote_dsn(v) for v in raw]
    scheme, userinfo, _, _, query, _ = _split_url(url)
    found = []
    basic = None
    if userinfo is not None:
        user, colon, password = userinfo.partition(":")
        if colon:
            found.append(password)
            # An http client sends it as Basic auth, which a provider may echo back.
            basic = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode()
        elif scheme.lower() in _TOKEN_AS_USER:
            found.append(user)
    for part in re.split(r"[&;]", query or ""):
        name, eq, value = part.partition("=")
        if eq and CREDENTIAL_NAME.search(unquote(name)):
            found.append(value)
    return found + [unquote(s) for s in found] + ([basic] if basic and scheme.lower() in _TOKEN_AS_USER else [])


def redact_url(url: str) -> str:
    """`url` as it may be shown: `http://user:***@host/v1?api-key=***` (a key/value DSN: `password=***`)."""
    if "://" not in url:
        return _DSN_PASSWORD.sub(lambda m: m.group(1) + MASK, url)
    scheme, userinfo, hostport, path, query, fragment = _split_url(url)
    shown = f"{scheme}://"
    if userinfo is not None:
        user, colon, _ = userinfo.partition(":")
        shown += f"{user}:{MASK}@" if colon else f"{MASK}@" if scheme.lower() in _TOKEN_AS_USER else f"{user}@"
    shown += hostport + path
    if query is not None:
        parts = []
        for part in re.split(r"([&;])", query):
            name, eq, value = part.partition("=")
            parts.append(f"{name}={MASK}" if eq and value and CREDENTIAL_NAME.search(unquote(name)) else part)
        shown += "?" + "".join(parts)
    return shown + ("#" + fragment if fragment is not None else "")


# In an http(s) URL a user name without a password is a token (https://TOKEN@host); elsewhere it is a role.
_TOKEN_AS_USER = ("http", "https")


def _split_url(url: str) -> tuple[str, str | None, str, str, str | None, str | None]:
    """(scheme, userinfo, host[:port], path, query, fragment) as written: no part decoded or normalised."""
    scheme, rest = url.split("://", 1)
    rest, hash_, fragment = rest.partition("#")
    rest, q, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    userinfo, at, hostport = netloc.rpartition("@")
    userinfo_or_none = userinfo if at else None
    return scheme, userinfo_or_none, hostport, slash + path, (query if q else None), (fragment if hash_ else None)


def _unquote_dsn(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == "'":
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def worth_scrubbing(values: Iterable[str]) -> tuple[str, ...]:
    """The values long enough to be secrets, longest first (so one holding another is replaced whole)."""
    return tuple(sorted({v for v in values if len(v) >= MIN_SECRET_CHARS}, key=lambda v: (-len(v), v)))


# -- logs --------------------------------------------------------------------------------------------------

_guarded: tuple[str, ...] = ()
_guard_lock = threading.Lock()


class _RedactSecrets(logging.Filter):
    """Rewrites a record's message, and scrubs its exception chain, before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = _guarded
        if not secrets:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: logging reports it itself when a handler formats it
            return True
        clean = redact(message, secrets)
        if clean != message:
            record.msg, record.args = clean, ()
        if record.exc_info and record.exc_info[1] is not None:
            scrub(record.exc_info[1], secrets)
            record.exc_text = None
        return True


_FILTER = _RedactSecrets()


def guard_logs(secrets: Sequence[str]) -> tuple[str, ...]:
    """Scrub `secrets` (too) from every record of GUARDED_LOGGERS from now on, in this process; returns them."""
    global _guarded
    secrets = tuple(secrets)
    with _guard_lock:
        if not set(secrets) <= set(_guarded):
            _guarded = worth_scrubbing((*_guarded, *secrets))
        for name in GUARDED_LOGGERS:
            logger = logging.getLogger(name)
            if _FILTER not in logger.filters:
                logger.addFilter(_FILTER)
    return secrets
