"""The import graph of src/kubetrain has no cycle, counting imports inside functions too.

A cycle that only lazy imports close still ties the modules together: neither can be understood,
tested or moved without the other. Edges are read with ``ast`` from every ``import`` and
``from ... import`` anywhere in a module (functions and methods included), ``if TYPE_CHECKING:``
blocks too: two modules whose annotations name each other's types cannot be read apart either.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).parents[2] / "src" / "kubetrain"

# Edges allowed to close a cycle, each only while it exists, each with the change that removes it
# (none left: the step server went with issue #12 item 1, the study moved to tune.study).
ALLOWED: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the kubetrain modules it imports (a ``from pkg import sub`` counts as pkg.sub)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    for alias in node.names
                ]
            else:
                continue
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_graph_is_read_from_lazy_imports_too():
    graph = import_graph()
    # kubetrain.pipeline.steps imports these only inside its functions.
    assert {"kubetrain.launch", "kubetrain.evaluate.compare"} <= graph["kubetrain.pipeline.steps"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_kubetrain():
    graph = import_graph()
    for source, target in ALLOWED:
        if source in graph:
            graph[source].discard(target)
    assert find_cycle(graph) is None


def test_every_package_is_in_the_wheel():
    import tomllib

    pyproject = tomllib.loads((PACKAGE.parents[1] / "pyproject.toml").read_text())
    listed = set(pyproject["tool"]["setuptools"]["packages"])
    packages = {module_name(p) for p in PACKAGE.rglob("__init__.py")}
    assert packages - listed == set()


# -- layers ---------------------------------------------------------------------------------------
# Each package imports only packages of the layers below its own (never above, never a peer):
# lazy imports, TYPE_CHECKING blocks and the modules named in strings (importlib targets such as
# ``"kubetrain.tasks.images:ImageTask"``, ``-m`` targets of worker processes) all count. The
# top-level ``components/`` and ``pipelines/`` folders ship as ``kubetrain.components`` and
# ``kubetrain.pipelines``: the pipeline layer, beside ``kubetrain.pipeline``.
LAYERS: list[set[str]] = [
    {"kubetrain", "core"},
    {"data"},
    {"models"},
    {"tasks"},
    {"train"},
    {"quantize"},
    {"evaluate"},
    {"launch"},
    {"tune"},
    {"registry"},
    {"tracking"},
    {"pipeline", "components", "pipelines"},
    {"cli"},
]
ROOT = PACKAGE.parents[1]
TREES = {"kubetrain": PACKAGE, "components": ROOT / "components", "pipelines": ROOT / "pipelines"}
MODULE_STRING = re.compile(r"^kubetrain(\.\w+)+(:\w+)?$")


def layer_of(package: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if package in layer)


def package_of(module: str) -> str:
    """The package (``tasks``) or top-level module (``cli``) of ``module``; "" if not ours
    (``kubetrain.promoted`` is an MLflow tag, ``kubetrain.yaml`` a file name)."""
    parts = module.split(".")
    if parts[0] != "kubetrain":
        return ""
    if len(parts) == 1 or parts[1] == "__version__":
        return "kubetrain"
    ours = (
        parts[1] in TREES or (PACKAGE / parts[1]).is_dir() or (PACKAGE / f"{parts[1]}.py").exists()
    )
    return parts[1] if ours else ""


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every absolute import and every module named by a string constant."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Constant) and MODULE_STRING.match(str(node.value)):
            # an importlib target or the ``-m`` module of a worker process
            found.append((node.lineno, str(node.value).partition(":")[0]))
    return found


def layer_violations() -> list[str]:
    problems = []
    for top, tree_root in TREES.items():
        for path in sorted(tree_root.rglob("*.py")):
            rel = path.relative_to(tree_root)
            own = rel.parts[0].removesuffix(".py") if top == "kubetrain" else top
            if own == "__init__":
                own = "kubetrain"
            own_layer = layer_of(own)
            for line, module in imported_modules(ast.parse(path.read_text(), str(path))):
                target = package_of(module)
                if not target or target == own:
                    continue
                if (
                    layer_of(target) >= own_layer and not LAYERS[own_layer] >= {own, target}
                ) or layer_of(target) > own_layer:
                    problems.append(f"{top}/{rel}:{line}: {own} imports {module} ({target})")
    return problems


def test_every_package_has_a_layer():
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    layered = set().union(*LAYERS)
    assert packages | modules | {"components", "pipelines"} <= layered, "packages with no layer"
    assert not layered - packages - modules - {"kubetrain", "components", "pipelines"}, (
        "layers naming a package that does not exist"
    )


def test_packages_import_only_the_layers_below():
    assert layer_violations() == []
