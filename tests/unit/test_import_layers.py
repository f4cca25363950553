"""The package's import graph (ast, in-function imports included): no circles, and arrows point
down only — cli -> serve -> core -> backends -> kernels. kernels/ knows nothing of plugins or
generation; core/ never imports serve/ or the CLI."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import ernie_hal

ROOT = Path(ernie_hal.__file__).resolve().parent
OUTSIDE = {"tests", "benchmarks", "scripts", "docs", "build", "dist"}
# a top-level room may import the rooms listed for it (itself always)
ALLOWED = {
    "": {"cli", "core", "serve", "backends", "kernels"},      # __init__.py, __main__.py
    "cli": {"core", "serve", "backends", "kernels"},
    "serve": {"core", "backends", "kernels"},
    "core": {"kernels"},                # backends are reached by dotted name through the registry
    "backends": {"core", "kernels"},    # the contract they implement (core/plugins) and kernels
    "kernels": set(),
}


def package_modules(root: Path = ROOT) -> dict:
    """module name (relative to the package) -> (path, is_package)"""
    out = {}
    for d, subs, files in os.walk(root):
        subs[:] = [s for s in subs if s not in OUTSIDE and not s.startswith((".", "__pycache__"))
                   and not s.endswith(".egg-info")]
        for f in files:
            if f.endswith(".py"):
                rel = (Path(d) / f).relative_to(root).with_suffix("")
                parts = list(rel.parts)
                is_pkg = parts[-1] == "__init__"
                if is_pkg:
                    parts = parts[:-1]
                out[".".join(parts)] = (Path(d) / f, is_pkg)
    return out


def imports_of(module: str, path: Path, is_pkg: bool, known: set) -> set:
    """Package-internal modules that `module` imports anywhere in its body."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name.removeprefix("ernie_hal.") for a in node.names if a.name.startswith("ernie_hal.")]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if (node.module or "").startswith("ernie_hal."):
                    base = node.module.removeprefix("ernie_hal.")
                    targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                base = module.split(".") if module else []
                base = base if is_pkg else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                pkg = ".".join(base + ([node.module] if node.module else []))
                targets = [pkg] + [f"{pkg}.{a.name}" if pkg else a.name for a in node.names]
        for t in targets:
            if t in known and t != module:
                out.add(t)
    return out


def import_graph() -> dict:
    mods = package_modules()
    known = set(mods)
    return {m: imports_of(m, p, is_pkg, known) for m, (p, is_pkg) in mods.items()}


def _room(module: str) -> str:
    return module.split(".")[0] if "." in module or module in ALLOWED else ""


def circles(graph: dict, packages: set | None = None) -> list:
    """Strongly connected components of more than one module (Tarjan). A package's __init__
    re-exporting its children is not an edge back: importing a child runs the parent first by
    design, so edges *into* package inits are left out."""
    if packages is None:
        packages = {m for m, (_, is_pkg) in package_modules().items() if is_pkg}
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w in packages:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_walker_sees_deferred_imports():
    graph = import_graph()
    # api.devices() imports the smoke test inside the function body
    assert "core.plugins.device_smoke" in graph["core.api"]
    assert "core.plugins.hookspecs" in graph["backends.cpu.fallback_plugin"]


def test_no_import_circles():
    assert circles(import_graph()) == []


def test_arrows_point_down_only():
    bad = []
    for module, targets in import_graph().items():
        room = _room(module)
        for t in targets:
            troom = _room(t)
            if troom and troom != room and troom not in ALLOWED[room]:
                bad.append(f"{module} -> {t}")
    assert bad == []


def test_kernels_are_plain_functions():
    graph = import_graph()
    leaks = [f"{m} -> {t}" for m, ts in graph.items() if m.startswith("kernels") for t in ts
             if not t.startswith("kernels")]
    assert leaks == []


def test_the_circle_finder_finds_a_deferred_circle():
    # the shape of the circle this layout removed: api -> smoke -> conformance -> api
    graph = {"core.api": {"core.checks.smoke"}, "core.checks.smoke": {"core.checks.conformance"},
             "core.checks.conformance": {"core.api"}, "core.checks": set()}
    assert circles(graph, packages={"core.checks"}) == [
        ["core.api", "core.checks.conformance", "core.checks.smoke"]]
    # an edge into a package __init__ is a re-export, not a circle
    assert circles({"a.x": {"a"}, "a": {"a.x"}}, packages={"a"}) == []


def test_the_rooms_exist():
    for room in ["cli", "core/model", "core/plugins", "core/runtime", "core/memory", "core/parallel", "core/checks"]:
        assert (ROOT / room / "__init__.py").is_file(), room


# Inside core/, the rooms stand on floors; a room imports only rooms on lower floors.
CORE_FLOORS = {
    "core.atomic": 1, "core.sizes": 1, "core.rss": 1, "core.plugins": 1,   # small helpers and the contract
    "core.quant": 1,      # weight-only formats: plain math over tensors, below the model
    "core.model": 2,      # what a model is
    "core.runtime": 3,    # running it
    "core.memory": 4,     # where its weights live (stages into the executor's layer weights)
    "core.parallel": 5,   # how its weights split over ranks (each rank stages its slices through memory)
    "core.api": 6,        # load(), devices(), Model
    "core.checks": 7,     # the conformance matrix loads models through the API
}


def _core_room(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_core_rooms_import_only_lower_floors():
    bad = []
    for module, targets in import_graph().items():
        if not module.startswith("core.") or _core_room(module) not in CORE_FLOORS:
            continue
        floor = CORE_FLOORS[_core_room(module)]
        for t in targets:
            room = _core_room(t)
            if room in CORE_FLOORS and room != _core_room(module) and CORE_FLOORS[room] >= floor:
                bad.append(f"{module} -> {t}")
    assert bad == []
