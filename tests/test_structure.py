"""The shape of the tree: imports run one way. No two modules of cadence import each other
(directly or around a circle, lazy imports included), and no technique folder under
``cadence.accel`` imports a sibling technique folder: what two of them share moves up to
``accel/`` (the registry, the calibration store) or down to ``models/``."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
TECHNIQUE_FOLDERS = ("cache", "attention", "quant")


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def import_graph() -> dict[str, set[str]]:
    """module -> the cadence modules it imports, at the top or inside a function."""
    files = {_module_name(path): path for path in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if _is_package(path) else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: `from ..x import y`
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    # `from cadence.x import y`: y is a module when cadence/x/y.py exists, else a name in x
                    targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base)
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _folder(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 3 and parts[:2] == ["cadence", "accel"] and parts[2] in TECHNIQUE_FOLDERS else None


def test_no_import_circles():
    assert cycles(import_graph()) == []


def test_no_technique_folder_imports_a_sibling():
    crossings = [
        f"{module} -> {target}"
        for module, targets in import_graph().items() if _folder(module)
        for target in targets if _folder(target) and _folder(target) != _folder(module)
    ]
    assert crossings == []


def test_the_checks_see_a_circle_and_a_crossing():
    """The two checks above can fail: a circle and a crossing drawn by hand are found."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _folder("cadence.accel.cache.magcache") == "cache"
    assert _folder("cadence.accel.registry") is None
    graph = import_graph()
    assert "cadence.accel.registry" in graph["cadence.accel.cache.magcache"]
    assert "cadence.accel.attention.block_mask" in graph["cadence.accel.attention._triton"]
