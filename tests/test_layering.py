"""The subpackages' import graph: no cycles, storage below serving, the device side free of export/."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "kernels", "memory", "devices", "runtime", "learn", "export")
DEVICE_SIDE = ("core", "kernels", "memory", "devices", "runtime", "learn")

# what each subpackage may import (README, "Architecture")
ALLOWED = {
    "core": set(),
    "kernels": set(),
    "memory": {"core", "kernels"},
    "devices": {"core"},
    "runtime": {"core", "kernels", "memory", "devices"},
    "learn": {"core", "kernels", "memory", "devices", "runtime"},
    "export": {"core", "kernels", "runtime", "devices"},
}


def imports_of(package: str) -> dict[str, set[str]]:
    """Module path -> the inducekv subpackages it imports (at any depth, lazy imports included)."""
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        found = set()
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for n in names:
                parts = n.split(".")
                if parts[0] == "inducekv" and len(parts) > 1 and parts[1] in PACKAGES:
                    found.add(parts[1])
        out[str(path.relative_to(ROOT))] = found - {package}
    return out


def graph() -> dict[str, set[str]]:
    return {p: set().union(*imports_of(p).values()) for p in PACKAGES}


def test_each_subpackage_imports_only_what_it_may():
    bad = {mod: sorted(deps - ALLOWED[mod.split("/")[0]])
           for p in PACKAGES for mod, deps in imports_of(p).items() if deps - ALLOWED[p]}
    assert bad == {}


def test_no_cycles_between_subpackages():
    g = graph()

    def reach(start):
        seen, todo = set(), list(g[start])
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo += g[n]
        return seen

    assert [p for p in PACKAGES if p in reach(p)] == []


def test_storage_and_device_side():
    g = graph()
    assert not g["memory"] & {"runtime", "learn", "export"}
    assert all("export" not in g[p] for p in DEVICE_SIDE)
    assert g["core"] == set()


def test_shipped_docs_cite_no_missing_design_doc():
    """Docstrings and docs point at files a user of the repo has (README, FORMAT.md), not DESIGN.md."""
    hits = [str(p.relative_to(ROOT)) for pkg in PACKAGES + ("benchmarks",) for p in (ROOT / pkg).rglob("*.py")
            if "DESIGN.md" in p.read_text(encoding="utf-8")]
    assert hits == []
