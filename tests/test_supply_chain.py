"""The supply chain where users install: the ranges pyproject.toml gives pip never admit a release known to be
compromised, CI's pins are none of them, the README's install section lists them, and this venv has none.

KNOWN_BAD is the one list; a release found bad later goes here, then into pyproject.toml's range (this test
says which requirement admits it) and the README.
"""

from __future__ import annotations

import re
import sys
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # the dev extra installs tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]

# package -> releases known to be compromised (published with malicious code), with why.
KNOWN_BAD: dict[str, dict[str, str]] = {
    "litellm": {
        "1.82.7": "trojaned release on PyPI",
        "1.82.8": "trojaned release on PyPI",
    },
}


def requirements() -> list[tuple[str, Requirement]]:
    """Every requirement pyproject.toml gives pip: (where, requirement), extras included."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found = [("dependencies", Requirement(r)) for r in project["dependencies"]]
    for extra, reqs in project.get("optional-dependencies", {}).items():
        found += [(f"optional-dependencies.{extra}", Requirement(r)) for r in reqs]
    return found


def test_no_range_in_pyproject_admits_a_known_bad_release() -> None:
    admitted = []
    for package, bad in KNOWN_BAD.items():
        named = [(where, req) for where, req in requirements() if canonicalize_name(req.name) == package]
        assert named, f"pyproject.toml no longer requires {package}: drop it from KNOWN_BAD"
        admitted += [
            f"{where}: {req} admits {package} {v} ({why}); add !={v}"
            for where, req in named
            for v, why in bad.items()
            if req.specifier.contains(v, prereleases=True)
        ]
    assert not admitted, "\n".join(admitted)


def test_ci_pins_no_known_bad_release() -> None:
    pins = {}
    for line in (ROOT / ".ci" / "constraints.txt").read_text().splitlines():
        m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s#;]+).*", line)
        if m:
            pins[canonicalize_name(m.group(1))] = m.group(2)
    assert "litellm" in pins, "CI pins litellm exactly"
    bad = {p: v for p, v in pins.items() if v in KNOWN_BAD.get(p, {})}
    assert not bad, f".ci/constraints.txt pins known-bad releases: {bad}"


def test_the_readme_lists_every_known_bad_release() -> None:
    readme = (ROOT / "README.md").read_text()
    install = readme[readme.index("\n## Install\n") :]
    install = install[: install.index("\n## ", 1)]
    missing = [f"{p} {v}" for p, bad in KNOWN_BAD.items() for v in bad if v not in install]
    assert not missing, f"the README's install section does not list {missing}"


def test_the_installed_releases_are_not_known_bad() -> None:
    installed = {p: version(p) for p in KNOWN_BAD}
    assert not {p: v for p, v in installed.items() if v in KNOWN_BAD[p]}, installed
