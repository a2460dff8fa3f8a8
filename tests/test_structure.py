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
    """The flavor is the floor: training builds on it, never the other way round."""
    modules = _modules()
    outside = {
        (name, target)
        for name, path in modules.items() if name.startswith("loraflow.flavor")
        for target in _imports(name, path, modules)
        if not target.startswith("loraflow.flavor") and target not in ("loraflow", "loraflow.builtin")
    }
    assert outside == set()


# Imports in shipped modules on paths that `mlflow.pyfunc.load_model`, `predict` and `mlflow models
# serve` never take: (module, function, imported module).
NOT_ON_THE_SERVING_PATH = {
    ("loraflow.flavor.load", "_for_use", "loraflow.flavor.trainable"),  # `load_model(is_trainable=True)` only
}


def _shipped() -> dict[str, Path]:
    """The modules a saved model ships (`loraflow.flavor.save.SHIPPED` and `SHIPPED_FOR_BUILTIN`), read
    from save.py's source."""
    lists = {node.targets[0].id: ast.literal_eval(node.value) for node in ast.parse((PACKAGE / "flavor" / "save.py").read_text()).body
             if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") in ("SHIPPED", "SHIPPED_FOR_BUILTIN")}
    files = [f for f in (*lists["SHIPPED"], *lists["SHIPPED_FOR_BUILTIN"]) if f.endswith(".py")]
    return {".".join(("loraflow", *Path(f).with_suffix("").parts)).removesuffix(".__init__"): PACKAGE / f for f in files}


def _runtime_imports(tree: ast.AST, modules: dict[str, Path]) -> set[tuple[str, str]]:
    """(enclosing function, imported loraflow module) of every import run at some point (those under
    `if TYPE_CHECKING:` never are)."""
    found = set()

    def visit(node: ast.AST, function: str) -> None:
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            return
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = function or node.name
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                       for a in node.names]
        else:
            targets = []
        found.update((function, t) for t in targets if t.split(".")[0] == "loraflow")
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(tree, "")
    return found


def test_the_shipped_code_imports_only_shipped_code():
    """A saved model ships its loading and serving code only: every loraflow import in a shipped
    module, at module level or inside a function, names a shipped module, except on the listed
    paths that pyfunc and serving never take (tests/flavor/test_save.py loads and serves a model
    where nothing else is importable)."""
    modules, shipped = _modules(), _shipped()
    assert set(shipped) <= set(modules)
    unshipped = sorted(
        (name, function, target)
        for name, path in shipped.items()
        for function, target in _runtime_imports(ast.parse(path.read_text()), modules)
        if target not in shipped and (name, function, target) not in NOT_ON_THE_SERVING_PATH
    )
    assert unshipped == []


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
