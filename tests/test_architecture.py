"""The floor plan stays true: which package may import which (README, "Architecture"), no import
loops between modules, and at most 7 layers of packages. Imports are read from the source with
``ast`` (function-level imports included), so a lazy import counts like any other."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "curvdiag"

# unit -> the units it may import (besides itself, the standard library and third parties).
# A unit is a subpackage (cli, loading, ...) or a top-level module (errors, stability, ...).
ALLOWED = {
    "_version": set(),
    "errors": set(),
    "model_state": set(),
    "stability": {"errors"},
    "results": {"errors", "stability", "_version"},
    "curvature": {"errors", "model_state"},
    "loading": {"errors", "stability", "model_state"},
    "probes": {"errors", "stability", "results", "curvature", "loading", "_version"},
    "report": {"errors", "stability", "results", "_version"},
    "plots": {"errors", "results", "report", "_version"},
    "train": {"errors", "stability", "results", "curvature", "loading", "probes", "model_state", "_version"},
    "api": {"errors", "curvature", "loading", "probes", "results"},
    "cli": {"errors", "stability", "results", "curvature", "loading", "probes", "report", "plots", "train", "api",
            "_version"},
    "__init__": {"_version"},  # the public names are imported lazily, by name (importlib)
    "__main__": {"cli"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _unit(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def _imports(path: Path) -> set:
    """Every curvdiag module named by an import statement anywhere in the file."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "curvdiag"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "curvdiag":
                continue
            for alias in node.names:  # `from curvdiag.x import y`: y may be a module itself
                candidate = f"{module}.{alias.name}"
                found.add(candidate if _is_module(candidate) else module)
    return found


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _graph() -> dict:
    return {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_package_imports_only_the_packages_below_it():
    broken = []
    for module, imported in _graph().items():
        unit = _unit(module)
        assert unit in ALLOWED, f"{module}: a new package or top-level module: give it a line in ALLOWED"
        for target in imported:
            other = _unit(target)
            if other != unit and other not in ALLOWED[unit]:
                broken.append(f"{module} imports {target}")
    assert not broken, "imports against the floor plan:\n" + "\n".join(broken)


def test_no_import_loops_between_modules():
    graph = {m: {t for t in ts if t != m} for m, ts in _graph().items()}
    # A package's __init__ that re-exports is not a loop with its own modules.
    graph = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}
    state, stack, loops = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                loops.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not loops, "import loops:\n" + "\n".join(" -> ".join(loop) for loop in loops)


def test_at_most_seven_layers_of_packages():
    units = {}
    for module, imported in _graph().items():
        units.setdefault(_unit(module), set()).update(_unit(t) for t in imported)
    depth = {}

    def layer(unit, seen=()):
        if unit not in depth:
            below = [layer(u, seen + (unit,)) for u in units.get(unit, ()) if u != unit and u not in seen]
            depth[unit] = 1 + max(below, default=0)
        return depth[unit]

    assert max(layer(u) for u in units) <= 7, depth
