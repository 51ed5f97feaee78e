"""The package's shape: no import cycle among actdb's modules, and layers that point one way
(`query -> compute -> store`). Every import that runs counts, inside functions too; an import under
`if TYPE_CHECKING:` runs only for type checkers and names a type, so it counts for layering but not for cycles."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOP = {"store": "actdb.store", "compute": "actdb.compute", "query": "actdb.query"}
LAYER = {"actdb.store": 0, "actdb.compute": 1, "actdb.query": 2}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([TOP[parts[0]], *parts[1:]])


def _actdb_imports(tree: ast.AST, typing_too: bool) -> set[str]:
    """Every actdb module an import statement in the module names (with `typing_too`, also under
    `if TYPE_CHECKING:`)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test) and not typing_too:
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("actdb"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from actdb.x import module`
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("actdb"))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph(typing_too: bool = False) -> dict[str, set[str]]:
    files = [p for top in TOP for p in (ROOT / top).rglob("*.py")]
    modules = {_module_name(p): p for p in files}
    graph = {}
    for name, path in modules.items():
        targets = _actdb_imports(ast.parse(path.read_text(), str(path)), typing_too)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def _layer(module: str) -> int:
    return LAYER[".".join(module.split(".")[:2])]


def test_no_import_cycle_among_actdb_modules():
    assert _cycles(import_graph()) == []


def test_the_cycle_check_finds_a_planted_cycle():
    graph = import_graph()
    graph["actdb.store.errors"] = graph["actdb.store.errors"] | {"actdb.store.refs"}  # refs imports errors
    assert any({"actdb.store.errors", "actdb.store.refs"} <= set(cycle) for cycle in _cycles(graph))


def test_layers_point_one_way():
    backwards = [
        (src, dst)
        for src, targets in import_graph(typing_too=True).items()
        for dst in targets
        if _layer(dst) > _layer(src)
    ]
    assert backwards == []


def test_every_study_room_is_a_package_the_wheel_lists():
    """A newcomer lists compute/ to see the studies; pyproject lists every subpackage so the wheel ships it."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    for init in [p for top in TOP for p in (ROOT / top).rglob("__init__.py")]:
        package = _module_name(init)
        assert f'"{package}"' in pyproject, f"{package} is missing from pyproject's packages"
    studies = {p.name for p in (ROOT / "compute").iterdir() if (p / "__init__.py").exists()}
    assert {"correlation", "persistence", "ablation", "explain", "similarity", "planning"} <= studies


def test_the_architecture_document_names_every_module_and_folder():
    """docs/ARCHITECTURE.md's tree is where a newcomer looks for a module: each module and folder of store/,
    compute/ and query/ (and of query/serve/) is named there."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    rooms = [ROOT / name for name in TOP] + [ROOT / "query" / "serve"]
    missing = [
        str(path.relative_to(ROOT))
        for room in rooms
        for path in sorted(room.iterdir())
        if (path.suffix == ".py" and path.name != "__init__.py") or (path.is_dir() and path.name != "__pycache__")
        if not re.search(rf"(?<![\w/]){re.escape(path.name)}{'/' if path.is_dir() else ''}(?!\w)", text)
    ]
    assert not missing, f"docs/ARCHITECTURE.md does not name {missing}"
