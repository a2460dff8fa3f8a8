"""The house stays straight: no import cycle in src/loraflow, short functions, modules readable in one sitting.

Measured from the code's own imports and definitions (ast; nothing is imported or run).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "loraflow"
MAX_FUNCTION_LINES = 70  # lines of code, the docstring not counted
MAX_MODULE_LINES = 500


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("loraflow", *path.relative_to(PACKAGE).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports (a package importing its own children is no edge)."""
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in names:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + ".") and not target.startswith(name + "."):
                targets.add(target)
    return targets


def test_there_is_no_import_cycle_inside_the_package():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), list(graph[start])
        while todo:
            node = todo.pop()
            if node == goal:
                return True
            if node not in seen:
                seen.add(node)
                todo.extend(graph[node])
        return False

    cycles = sorted(f"{a} <-> {b}" for a in graph for b in graph[a] if reaches(b, a))
    assert cycles == []


def test_the_flavor_package_imports_nothing_else_of_loraflow_but_the_builtin_recipe():
    """It ships inside every model (`code/loraflow/flavor`): what it imports must ship too."""
    modules = _modules()
    outside = {
        (name, target)
        for name, path in modules.items() if name.startswith("loraflow.flavor")
        for target in _imports(name, path, modules)
        if not target.startswith("loraflow.flavor") and target not in ("loraflow", "loraflow.builtin")
    }
    assert outside == set()


def test_functions_are_short_and_modules_readable_in_one_sitting():
    long_functions, long_modules = [], []
    for name, path in _modules().items():
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long_modules.append((name, len(text.splitlines())))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                first = node.body[0]
                if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                    lines -= first.end_lineno - first.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long_functions.append((f"{name}.{node.name}", lines))
    assert long_functions == [] and long_modules == []


def test_the_flavor_surface_is_made_of_real_attributes():
    import inspect

    import loraflow.flavor as flavor

    surface = ("save_model", "log_model", "load_model", "get_default_pip_requirements", "_load_pyfunc")
    assert set(surface) <= set(vars(flavor)) and set(surface) - {"_load_pyfunc"} <= set(dir(flavor))
    assert all(inspect.isfunction(getattr(flavor, name)) for name in surface)
    assert flavor.FLAVOR_NAME == "loraflow" and isinstance(flavor.FLAVOR_VERSION, int)
    assert not hasattr(flavor, "__getattr__")  # nothing reached through a module-level hook
