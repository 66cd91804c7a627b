"""The package's layers: each folder imports only the layers ARCHITECTURE.md says it may.

Read from the source (every ``import``, at any depth, ``TYPE_CHECKING`` ones
included: a type is a dependency too), so a new import across a layer fails here
before it reaches review.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "runcache"

#: What each layer may import, besides itself. ``base`` is the package's own
#: ``__init__`` (``__version__``), ``errors``, ``keys``, ``logs`` and ``wire``: every layer's.
ALLOWED: dict[str, set[str]] = {
    "base": set(),
    "run": {"base"},
    "stores": {"base"},
    "config": {"base", "run"},  # a setting names a user to run as, looked up when read
    "engine": {"base", "config", "run", "stores"},
    "client": {"base", "config", "engine"},  # the in-process client holds an engine
    "mcp": {"base", "config", "engine", "client"},  # `runcache mcp --server` forwards over HTTP
    "web": {"base", "config", "engine", "mcp"},  # /mcp serves the MCP tools
    "cli": {"base", "config", "engine", "client", "mcp", "web"},
}

BASE = {"__init__", "__version__", "errors", "keys", "logs", "wire"}


def layer_of(module: str) -> str:
    """``runcache.web.routes.jobs`` is in ``web``; ``runcache.wire`` in ``base``."""
    parts = module.split(".")[1:] or ["__init__"]
    if parts[0] in BASE:
        return "base"
    if parts[0] == "__main__":
        return "cli"
    return parts[0]


def module_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def imported(path: Path) -> set[str]:
    """Every ``runcache`` module ``path`` imports, by absolute name."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"  # the package imports absolutely
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "runcache" or name.startswith("runcache.")}


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_is_in_a_known_layer() -> None:
    assert {layer_of(module_of(path)) for path in MODULES} == set(ALLOWED)


@pytest.mark.parametrize("path", MODULES, ids=lambda path: module_of(path))
def test_a_module_imports_only_the_layers_below_it(path: Path) -> None:
    own = layer_of(module_of(path))
    crossing = sorted(name for name in imported(path) if layer_of(name) not in ALLOWED[own] | {own})
    assert not crossing, f"{module_of(path)} ({own}) imports {crossing}"


def test_the_layers_form_no_cycle() -> None:
    """What ALLOWED permits is itself a hierarchy: no layer may reach itself."""

    def reaches(start: str, seen: frozenset[str]) -> None:
        for below in ALLOWED[start]:
            assert below not in seen, f"{below} reaches itself through {sorted(seen)}"
            reaches(below, seen | {below})

    for layer in ALLOWED:
        reaches(layer, frozenset({layer}))
