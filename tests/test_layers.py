"""The package's layering, checked statically (the modules are parsed, never imported).

- no cycle in the graph of imports between untrac_ray modules, counting imports inside
  functions and under `if TYPE_CHECKING:` (a deferred import still ties two modules together);
- no module uses another untrac_ray module's private names (`from untrac_ray.x import _y`, or
  `x._y` on an imported untrac_ray module);
- only untrac_ray/results/ imports mlflow;
- every name imported from an untrac_ray module exists there (a deferred import of a moved
  name fails only when its command runs).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

PACKAGE = "untrac_ray"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


def _module_name(path: Path) -> str:
    parts = (PACKAGE, *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
TREES: dict[str, ast.Module] = {
    name: ast.parse(path.read_text(), filename=str(path)) for name, path in MODULES.items()
}


def _where(module: str, node: ast.AST) -> str:
    return f"{MODULES[module].relative_to(ROOT.parent)}:{node.lineno}"


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


@dataclass(frozen=True)
class Import:
    """One import statement's target: `module` (dotted, absolute), `name` for `from ... import
    name` (None for `import module`), where it is, and the local name it binds."""

    module: str
    name: str | None
    where: str
    binds: str


def _imports(module: str) -> list[Import]:
    """Every import in the module, at any depth (functions, TYPE_CHECKING blocks, ...)."""
    is_package = MODULES[module].name == "__init__.py"
    found = []
    for node in ast.walk(TREES[module]):
        if isinstance(node, ast.Import):
            for alias in node.names:
                # `import a.b` binds `a`; `import a.b as c` binds c to a.b.
                binds = alias.asname or alias.name.split(".")[0]
                target = alias.name if alias.asname else alias.name.split(".")[0]
                found.append(Import(alias.name, None, _where(module, node), f"{binds}={target}"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = module.split(".")
                if not is_package:
                    package = package[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            for alias in node.names:
                found.append(Import(base, alias.name, _where(module, node),
                                    alias.asname or alias.name))
    return found


def _targets(imp: Import) -> list[str]:
    """The untrac_ray modules an import loads (besides the packages above them)."""
    out = []
    if imp.module in MODULES:
        out.append(imp.module)
    if imp.name is not None and f"{imp.module}.{imp.name}" in MODULES:
        out.append(f"{imp.module}.{imp.name}")  # `from untrac_ray import x`: a submodule
    return out


def _graph() -> dict[str, dict[str, str]]:
    """module -> {imported untrac_ray module: where (first occurrence)}."""
    graph: dict[str, dict[str, str]] = {m: {} for m in MODULES}
    for module in MODULES:
        for imp in _imports(module):
            for target in _targets(imp):
                if target != module:
                    graph[module].setdefault(target, imp.where)
    return graph


def _cycles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)

    cycles = []
    for component in components:
        start = min(component)
        # Shortest path back to `start` inside the component (breadth first).
        parents: dict[str, str] = {}
        frontier = [start]
        while frontier and start not in parents:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v]):
                    if w in component and w not in parents:
                        parents[w] = v
                        nxt.append(w)
            frontier = nxt
        path = [start]
        v = parents[start]
        while v != start:
            path.append(v)
            v = parents[v]
        path.append(start)
        cycles.append(path[::-1])
    return cycles


def test_no_import_cycle_between_modules():
    graph = _graph()
    cycles = _cycles(graph)
    report = [
        " -> ".join(cycle) + "\n" + "\n".join(
            f"    {a} imports {b} at {graph[a][b]}" for a, b in pairwise(cycle)
        )
        for cycle in cycles
    ]
    assert not cycles, "import cycles between untrac_ray modules:\n" + "\n".join(report)


def _dotted(node: ast.AST) -> list[str] | None:
    """`a.b.c` as ["a", "b", "c"], or None if it does not start at a plain name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return parts[::-1]


def test_no_module_uses_another_modules_private_names():
    offenders = []
    for module in MODULES:
        modules_bound: dict[str, str] = {}  # local name -> untrac_ray module it is bound to
        for imp in _imports(module):
            if imp.name is None:  # import untrac_ray.x [as y]
                local, target = imp.binds.split("=")
                if target in MODULES:
                    modules_bound[local] = target
                continue
            if imp.module in MODULES and f"{imp.module}.{imp.name}" in MODULES:
                modules_bound[imp.binds] = f"{imp.module}.{imp.name}"
            elif imp.module in MODULES and imp.module != module and _is_private(imp.name):
                offenders.append(f"{imp.where}: from {imp.module} import {imp.name}")
        for node in ast.walk(TREES[module]):
            # Each prefix of a chain is its own node: `a._b.c` is checked as `a._b`.
            parts = _dotted(node) if isinstance(node, ast.Attribute) else None
            if not parts or parts[0] not in modules_bound:
                continue
            # Walk down the chain while it names modules; the next part is the attribute used.
            target, rest = modules_bound[parts[0]], parts[1:]
            while rest and f"{target}.{rest[0]}" in MODULES:
                target, rest = f"{target}.{rest[0]}", rest[1:]
            if len(rest) == 1 and target != module and _is_private(rest[0]):
                offenders.append(f"{_where(module, node)}: {'.'.join(parts)} ({target})")
    assert not offenders, "private names used across untrac_ray modules:\n" + "\n".join(
        sorted(set(offenders)))


def test_only_results_imports_mlflow():
    offenders = [
        f"{imp.where}: {'import ' + imp.module if imp.name is None else 'from ' + imp.module}"
        for module in MODULES if not module.startswith(f"{PACKAGE}.results.")
        for imp in _imports(module)
        if imp.module.split(".")[0] == "mlflow"
    ]
    assert not offenders, "mlflow imported outside untrac_ray/results/:\n" + "\n".join(offenders)


def test_the_checks_see_the_whole_package():
    """Guard against a check that passes because it looked at nothing."""
    graph = _graph()
    assert f"{PACKAGE}.cli.main" in MODULES and f"{PACKAGE}.results.tracking" in MODULES
    assert f"{PACKAGE}.inputs.errors" in graph[f"{PACKAGE}.cli.main"]
    assert any(imp.module == "mlflow" for imp in _imports(f"{PACKAGE}.results.runs"))


def _top_level_names(module: str) -> set[str]:
    """The names a module binds at its top level (definitions, assignments, imports)."""
    names: set[str] = set()
    for node in TREES[module].body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names |= {a.asname or a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.If | ast.Try):  # TYPE_CHECKING blocks, optional imports
            for inner in ast.walk(node):
                if isinstance(inner, ast.Import | ast.ImportFrom):
                    names |= {a.asname or a.name.split(".")[0] for a in inner.names}
                elif isinstance(inner, ast.FunctionDef | ast.ClassDef):
                    names.add(inner.name)
    return names


def test_every_name_imported_from_an_untrac_ray_module_exists_there():
    """A name moved to another module leaves no import behind, not even one deferred inside
    a function that only some command reaches."""
    missing = []
    for module in MODULES:
        for imp in _imports(module):
            if imp.name is None or imp.module not in MODULES or imp.name == "*":
                continue
            if f"{imp.module}.{imp.name}" in MODULES:  # a submodule
                continue
            if imp.name not in _top_level_names(imp.module):
                missing.append(f"{imp.where}: from {imp.module} import {imp.name}")
    assert not missing, "imports of names that do not exist:\n" + "\n".join(sorted(missing))
