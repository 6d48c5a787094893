"""The import structure, read from the source (ast): imports go one way, commands -> evaluation ->
training -> tracking -> storage / data -> utils -> spot (tuning above pipelines); no circle; and no import
hidden inside a function but an optional or heavy third-party one that says why (a ``lazy`` comment)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("spot", "pipelines", "tuning")
# a module may import modules of its own layer's package and of lower ranks only
RANKS = {
    "spot": 0,
    "pipelines.utils": 1,
    "pipelines.storage": 2,
    "pipelines.data": 2,
    "pipelines.tracking": 3,  # the pending reports live in the run's storage
    "pipelines.training": 4,
    "pipelines.evaluation": 5,  # the built-in data's name and place are the run configuration's
    "pipelines": 6,  # the commands
    "tuning": 7,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def layer(module: str) -> str:
    """The longest RANKS key that ``module`` is in (``pipelines.finetune`` -> ``pipelines``)."""
    return max((k for k in RANKS if module == k or module.startswith(k + ".")), key=len)


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".")
    is_package = MODULES[module].name == "__init__.py"
    base = package[: len(package) - node.level + (1 if is_package else 0)]
    return ".".join([*base, *([node.module] if node.module else [])])


def imports(module: str) -> list[tuple[str, int, bool]]:
    """``(imported project module, line, inside a function)`` of every import of ``module`` (not under
    ``if TYPE_CHECKING``)."""
    tree = ast.parse(MODULES[module].read_text())
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        inside = in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node)
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        for name in names:
            found.append((name, node.lineno, in_function))
        for child in ast.iter_child_nodes(node):
            visit(child, inside)

    visit(tree, False)
    return found


def project(name: str) -> str | None:
    """The project module ``name`` refers to (a module or the package holding a name), else None."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def test_every_module_is_placed_in_a_layer():
    assert len(MODULES) > 60
    assert all(layer(m) for m in MODULES)


def test_imports_go_down_the_layers_only():
    wrong = []
    for module in MODULES:
        own = layer(module)
        for name, line, _ in imports(module):
            target = project(name)
            if target is None or layer(target) == own:
                continue
            if RANKS[layer(target)] >= RANKS[own]:
                wrong.append(f"{MODULES[module].relative_to(ROOT)}:{line} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_utils_and_spot_import_nothing_of_the_pipelines():
    for module in MODULES:
        if layer(module) in ("spot", "pipelines.utils"):
            targets = {project(n) for n, _, _ in imports(module)} - {None}
            assert all(t == "spot" or t.startswith(("spot.", "pipelines.utils")) for t in targets), module


def test_no_import_circle():
    graph = {m: {t for n, _, _ in imports(m) if (t := project(n)) and t != m} for m in MODULES}
    # a package's __init__ is imported with each of its modules: leave those edges out of the circle search
    graph = {m: {t for t in targets if not m.startswith(t + ".")} for m, targets in graph.items()}
    state: dict[str, int] = {}
    circles = []

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append(" -> ".join([*path[path.index(nxt):], nxt]))
            elif nxt not in state:
                walk(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module, [module])
    assert not circles, "\n".join(circles)


def test_no_import_hidden_in_a_function_without_a_reason():
    """Project modules are imported at the top, always; a third-party one may wait inside a function only
    when it is optional or heavy and a ``lazy`` comment on or above the line says so."""
    hidden = []
    for module, path in MODULES.items():
        lines = path.read_text().splitlines()
        for name, line, in_function in imports(module):
            if not in_function:
                continue
            said = any("lazy" in text.lower() for text in lines[max(line - 3, 0) : line])
            if project(name) is not None or not said:
                hidden.append(f"{path.relative_to(ROOT)}:{line} imports {name} inside a function")
    assert not hidden, "\n".join(hidden)


@pytest.mark.parametrize("module", ["pipelines.tracking.pyfunc_model"])
def test_registered_models_load_with_spot_alone(module):
    """The MLflow pyfunc wrapper of registered models imports nothing of the pipelines but itself."""
    targets = {project(n) for n, _, _ in imports(module)} - {None}
    assert all(t == "spot" or t.startswith("spot.") for t in targets), targets
