"""A PII redactor as a router hook: emails and phone numbers are masked in prompts before they leave the process,
and in answers (plain or streamed) before the caller sees them.

    from pii_redactor import PiiRedactor          # this file, on your path (or copied into your code)
    r = Router.from_yaml("config/router.yaml", hooks=[PiiRedactor()])
    r.generate("Write to jane.doe@example.com or call +1 415 555 0100")
    # the provider is sent:  "Write to [email] or call [phone]"

What it shows of the hook seam (`router.hooks`):
- `rewrite_request` returns a new request body per target; the cache, tracing, budgets and the provider all
  see the masked body, so no unmasked prompt is ever cached, traced or sent.
- `rewrite_text` sees a plain answer once, and a stream delta by delta. A stream can split an address across
  deltas ("jane.doe@exa" + "mple.com"), so the redactor holds back the tail that could still grow into one, and
  flushes it, masked, when the hook is called with `final=True` at the end.
- A rewrite that raises fails the call (`HookFailedError`) instead of sending what it should have masked.

It is an example, not a compliance tool: the patterns are simple and miss much that counts as personal data.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from router import Call, Hook, Target

EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# A run of digits and the separators phone numbers are written with, holding 8 to 15 digits.
PHONE = re.compile(r"(?<![\w@])\+?\(?\d[\d\s().-]{6,}\d(?![\w@])")
# What may still grow into an email or a phone number at the end of a stream's text so far.
_GROWING_WORD = re.compile(r"[^\s]*$")
_GROWING_DIGITS = re.compile(r"[+(\d][\d\s().+-]*$")
MAX_HELD = 256  # never hold back more than this many characters


def mask(text: str) -> str:
    """`text` with every email replaced by [email] and every phone number by [phone]."""
    text = EMAIL.sub("[email]", text)
    return PHONE.sub(lambda m: "[phone]" if 8 <= sum(c.isdigit() for c in m.group()) <= 15 else m.group(), text)


def _mask_content(content: Any) -> Any:
    if isinstance(content, str):
        return mask(content)
    if isinstance(content, list):  # OpenAI content parts: mask the text ones
        return [
            {**part, "text": mask(part["text"])} if isinstance(part, dict) and isinstance(part.get("text"), str)
            else part
            for part in content
        ]  # fmt: skip
    return content


class PiiRedactor(Hook):
    """Masks emails and phone numbers in what is sent and in what comes back (see the module docstring)."""

    def rewrite_request(self, call: Call, target: Target, request: Mapping[str, Any]) -> Mapping[str, Any]:
        messages = [{**m, "content": _mask_content(m.get("content"))} for m in request.get("messages", ())]
        return {**request, "messages": messages}

    def rewrite_text(self, call: Call, text: str, final: bool) -> str:
        if not call.stream:
            return mask(text)
        held = call.data.get("pii", "") + text
        if final:
            call.data["pii"] = ""
            return mask(held)
        cut = _safe_cut(held)
        call.data["pii"] = held[cut:]
        return mask(held[:cut])


def _safe_cut(text: str) -> int:
    """Where the text that can be masked and passed on ends: before the trailing word (an email has no spaces)
    and before a trailing run of digits and separators (a phone number has spaces)."""
    cut = _GROWING_WORD.search(text).start()  # type: ignore[union-attr]
    digits = _GROWING_DIGITS.search(text)
    if digits is not None:
        cut = min(cut, digits.start())
    return max(cut, len(text) - MAX_HELD)
