"""Every module of the library is used by the library: one that only its tests import is dead code
(as ``netstack/tcp/sequence.py`` was while the connection inlined its own arithmetic)."""

from __future__ import annotations

import ast
from pathlib import Path

import embedmesh

SRC = Path(embedmesh.__file__).resolve().parent.parent

# Modules that nothing inside the library imports, on purpose.
ENTRY_POINTS = {
    "embedmesh.cli.main": "the `embedmesh` console script",
    "embedmesh.runtime.tun": "a TUN device for tests and tools that attach a Netstack to the kernel",
    "embedmesh.sim.network": "the simulator, driven by tests and benchmarks",
    "embedmesh.sim.node": "the simulator, driven by tests and benchmarks",
    "embedmesh.sim.tailnet": "the simulator's tailnet (NATs, DERP, STUN), driven by tests and benchmarks",
    "embedmesh.paths": "issue 9's path layer (disco path choice); the node's wiring imports it next",
    "embedmesh.tailscale.derpclient": "the DERP relay client runtime, a Python API; the node's path layer will use it (issue 10)",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str) -> set[str]:
    """Every module name ``path`` imports, and every ``package.member`` of a from-import."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parents = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*parents, base] if base else parents)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def test_every_module_is_imported_by_the_library() -> None:
    paths = {_module_name(p): p for p in (SRC / "embedmesh").rglob("*.py")}
    used: set[str] = set()
    for name, path in paths.items():
        used.update(imported for imported in _imports(path, name) if imported != name)
    packages = {name for name, path in paths.items() if path.name == "__init__.py"}
    unused = sorted(set(paths) - used - packages - set(ENTRY_POINTS))
    assert unused == [], f"modules only tests (or nothing) import: {unused}; use them or delete them"
    assert set(ENTRY_POINTS) <= set(paths), "an entry point listed here no longer exists"
