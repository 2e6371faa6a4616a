"""LiteLLM's model map (prices, context windows, capabilities), read as the JSON file the litellm package ships.

The direct engine never imports litellm (seconds and ~170 MB): `importlib.util.find_spec` finds the package's
directory without running it, and the map is read from there, once, on first use.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config import Target
    from ..types import Usage

log = logging.getLogger("router")


class PriceMap:
    """LiteLLM's model map (prices, context windows, capabilities), read from the JSON file the litellm package
    ships, found with importlib.util.find_spec (which does not run the package): LiteLLM itself is never imported.
    Without the file, every model is unpriced and unknown."""

    FILE = "model_prices_and_context_window_backup.json"

    def __init__(self) -> None:
        self._models: dict[str, Any] | None = None
        self._rules: list[tuple[re.Pattern[str], dict[str, Any]]] | None = None
        self._lock = threading.Lock()

    @property
    def models(self) -> dict[str, Any]:
        """The map, read on first use (~50 ms)."""
        if self._models is None:
            with self._lock:
                if self._models is None:
                    self._models = self._read()
        return self._models

    def _read(self) -> dict[str, Any]:
        path = self.path()
        if path is None:
            log.warning("LiteLLM's model map was not found: direct targets without a config price cost 'unknown'")
            return {}
        with open(path, "rb") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}

    @classmethod
    def path(cls) -> Path | None:
        """Where the litellm package keeps its model map, if it is installed."""
        try:
            spec = importlib.util.find_spec("litellm")
        except (ImportError, ValueError):
            return None
        if spec is None or not spec.submodule_search_locations:
            return None
        for root in spec.submodule_search_locations:
            path = Path(root) / cls.FILE
            if path.is_file():
                return path
        return None

    def entry(self, target: Target) -> Mapping[str, Any] | None:
        """The map's entry for the target's model, as LiteLLM looks it up: `kind/model`, then `model` (listed
        under this kind); for a model the map does not name, what its generalization rules say of it."""
        models = self.models
        names = (f"{target.kind}/{target.model}", target.model)
        for name in names:
            info = models.get(name)
            if isinstance(info, dict) and (name != target.model or info.get("litellm_provider") == target.kind):
                return info
        if any(n in models for n in names):
            return None  # a model the map lists under another provider: known, and not this one
        return self._generalized(names)

    def _generalized(self, names: tuple[str, ...]) -> Mapping[str, Any] | None:
        """The union of the capability rules (LiteLLM's `fallback_generalizations`) matching any of `names`."""
        if self._rules is None:
            with self._lock:
                if self._rules is None:
                    self._rules = _capability_rules(self.models)
        for name in names:
            matched = [info for pattern, info in self._rules if pattern.search(name)]
            if matched:
                return {k: v for info in matched for k, v in info.items()}
        return None

    def cost(self, target: Target, usage: Usage) -> float | None:
        """The cost of `usage` by the map; None when the model is not in it, or is in it without a price (as the
        LiteLLM engine decides, a zero counts only for a model marked free: OpenRouter's `:free` variants)."""
        info = self.entry(target)
        if info is None:
            return None
        per_in, per_out = info.get("input_cost_per_token") or 0, info.get("output_cost_per_token") or 0
        cost = usage.input_tokens * float(per_in) + usage.output_tokens * float(per_out)
        if cost == 0 and (usage.input_tokens or usage.output_tokens) and not target.model.endswith(":free"):
            return None
        return cost


def _capability_rules(models: Mapping[str, Any]) -> list[tuple[re.Pattern[str], dict[str, Any]]]:
    """LiteLLM's capability rules for models its map does not name: (pattern, what a match says of the model)."""
    block = models.get("fallback_generalizations")
    rules = block.get("rules") if isinstance(block, dict) else None
    out = []
    for rule in rules if isinstance(rules, list) else ():
        info = rule.get("model_info") if isinstance(rule, dict) else None
        if not isinstance(info, dict):
            continue
        said = {k: v for k, v in info.items() if k != "litellm_provider"}
        if not said:
            continue  # a rule that only routes a bare name to a provider
        try:
            out.append((re.compile(str(rule.get("pattern", "")), re.IGNORECASE), said))
        except re.error:
            continue
    return out
