"""The package's layering, checked statically (the modules are parsed, never imported).

- the package's folders are its layers, lowest first (LAYERS); a module imports only from its
  own layer and those below it, and no .py file sits at the top but __init__ and __main__;
- only untrac_ray/results/ imports mlflow, and only engine/, run/, search/ and submit/ import
  ray (where work is placed);
- no module is over MAX_LINES lines;
- no cycle in the graph of imports between untrac_ray modules, counting imports inside
  functions and under `if TYPE_CHECKING:` (a deferred import still ties two modules together);
- no module uses another untrac_ray module's private names (`from untrac_ray.x import _y`, or
  `x._y` on an imported untrac_ray module);
- every name imported from an untrac_ray module exists there (a deferred import of a moved
  name fails only when its command runs);
- every module file a docstring names (`untrac_ray/compute/memory.py`, `layer/x.py`, or `x.py`
  beside the module) exists.
"""

from __future__ import annotations

import ast
import re
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


def _imports(module: str, trees: dict[str, ast.Module] = TREES) -> list[Import]:
    """Every import in the module, at any depth (functions, TYPE_CHECKING blocks, ...)."""
    is_package = MODULES[module].name == "__init__.py"
    found = []
    for node in ast.walk(trees[module]):
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


# --- the layers ---------------------------------------------------------------------------------

LAYERS = ("inputs", "compute", "methods", "results", "engine", "run", "search", "calibrate",
          "submit", "cli")
# Third-party packages only some layers may import: MLflow only where results are written and
# read, Ray only where work is placed.
ONLY_IN = {"mlflow": ("results",), "ray": ("engine", "run", "search", "submit")}
MAX_LINES = 500


def _layer(module: str) -> str | None:
    """The layer a module belongs to (its subpackage), None for the package's top."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def layer_violations(trees: dict[str, ast.Module]) -> list[str]:
    """Every import that runs up the layers (or sideways out of them) and every import of a
    package outside the layers allowed to use it, as 'where: what' lines."""
    out = []
    for module in trees:
        layer = _layer(module)
        if layer is None:  # untrac_ray/__init__.py, __main__.py: above every layer
            continue
        rank = LAYERS.index(layer)
        for imp in _imports(module, trees):
            for target in _targets(imp):
                up = _layer(target)
                if up is not None and LAYERS.index(up) > rank:
                    out.append(f"{imp.where}: {layer} imports {target} ({up} is above it)")
            top = imp.module.split(".")[0]
            if top in ONLY_IN and layer not in ONLY_IN[top]:
                out.append(f"{imp.where}: {layer} imports {top} (only "
                           f"{', '.join(ONLY_IN[top])} may)")
    return out


def test_each_layer_imports_only_from_the_layers_below_it():
    violations = layer_violations(TREES)
    assert not violations, "imports that break the layering:\n" + "\n".join(violations)


def test_every_module_is_in_a_layer_and_under_the_size_limit():
    loose = [str(path.relative_to(ROOT.parent)) for module, path in MODULES.items()
             if _layer(module) is None and module != PACKAGE
             and path.name not in ("__init__.py", "__main__.py")]
    loose += [str(path.relative_to(ROOT.parent)) for module, path in MODULES.items()
              if path.parent == ROOT and path.name not in ("__init__.py", "__main__.py")]
    assert not loose, f"modules outside the layer subpackages: {sorted(set(loose))}"
    assert {p.name for p in ROOT.iterdir() if p.is_dir() and p.name != "__pycache__"} == set(
        LAYERS)
    big = {str(path.relative_to(ROOT.parent)): n for path in MODULES.values()
           if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def _with_line(module: str, line: str) -> dict[str, ast.Module]:
    """The package's trees with one line added at the end of a module (nothing is written)."""
    trees = dict(TREES)
    trees[module] = ast.parse(MODULES[module].read_text() + "\n" + line + "\n")
    return trees


def test_the_layering_check_fails_on_a_back_running_import():
    """The rule catches what it is for: an import that runs up the layers, even deferred inside
    a function, and mlflow or ray where they do not belong."""
    assert not layer_violations(TREES)
    cases = {
        ("untrac_ray.inputs.spec", "from untrac_ray.compute.modeling import build_model"):
            "inputs imports untrac_ray.compute.modeling (compute is above it)",
        ("untrac_ray.methods.plans", "def f():\n    from untrac_ray.results import scoring"):
            "methods imports untrac_ray.results.scoring (results is above it)",
        ("untrac_ray.engine.pool", "import untrac_ray.run.session"):
            "engine imports untrac_ray.run.session (run is above it)",
        ("untrac_ray.compute.training", "import mlflow"):
            "compute imports mlflow (only results may)",
        ("untrac_ray.results.tracking", "from ray import tune"):
            "results imports ray (only engine, run, search, submit may)",
    }
    for (module, line), expected in cases.items():
        found = [v.split(": ", 1)[1] for v in layer_violations(_with_line(module, line))]
        assert expected in found, (module, line, found)


def test_the_checks_see_the_whole_package():
    """Guard against a check that passes because it looked at nothing."""
    graph = _graph()
    assert f"{PACKAGE}.cli.main" in MODULES and f"{PACKAGE}.results.tracking" in MODULES
    assert f"{PACKAGE}.inputs.errors" in graph[f"{PACKAGE}.cli.main"]
    assert any(imp.module == "mlflow" for imp in _imports(f"{PACKAGE}.results.runs"))
    assert {_layer(m) for m in MODULES} == {None, *LAYERS}


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


# A file name in a docstring: `x.py`, or a path of folders to one (`compute/memory.py`).
_FILE_PATH = re.compile(r"(?<![\w./-])((?:[\w.-]+/)*[A-Za-z_]\w*\.py)\b")


def _named_files(module: str, tree: ast.Module) -> list[tuple[str, str]]:
    """(path, where) for each file path named in a docstring of the module (its own, its
    classes' and its functions')."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=False)
            where = _where(module, node.body[0]) if node.body else module
            found += [(m.group(1), where) for m in _FILE_PATH.finditer(doc or "")]
    return found


def _missing_files(module: str, tree: ast.Module) -> list[str]:
    """The named files that exist nowhere a reader would look: a path from the repository
    (untrac_ray/..., benchmarks/...) or from the package (a layer's folder: compute/...),
    and a bare name beside the module itself."""
    here = MODULES[module].parent
    bad = []
    for path, where in _named_files(module, tree):
        places = [ROOT.parent / path, ROOT / path] if "/" in path else [here / path]
        if not any(place.is_file() for place in places):
            bad.append(f"{where}: {path}")
    return bad


def test_every_module_file_a_docstring_names_exists():
    missing = [line for m, tree in TREES.items() for line in _missing_files(m, tree)]
    assert not missing, "docstrings name files that do not exist:\n" + "\n".join(missing)
    named = {path for m, tree in TREES.items() for path, _ in _named_files(m, tree)}
    assert {"compute/memory.py", "inputs/redaction.py"} <= named  # the check reads docstrings


def test_the_docstring_path_check_fails_on_a_module_that_does_not_exist():
    module = "untrac_ray.methods.tasks"
    tree = ast.parse('"""Scores in methods/lds.py and optim.py; results/lds.py exists."""')
    assert [line.split(": ")[1] for line in _missing_files(module, tree)] == [
        "methods/lds.py", "optim.py"]
