"""The import graph of rayrcm: no cycles among its modules (function-level imports and
``if TYPE_CHECKING:`` blocks included: a type is a dependency too), and only the orchestration layer, the CLI and the
quickstart name ``ray`` or ``mlflow``."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rayrcm"
MAY_USE_RAY = ("rayrcm.orchestration", "rayrcm.cli", "rayrcm.quickstart")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.AST, package: str) -> list[str]:
    """Every module named by an import statement, wherever it stands."""
    out: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            out.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.append(base)
            out.extend(f"{base}.{a.name}" for a in node.names)  # "from pkg import submodule"
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def _graph() -> tuple[dict[str, set[str]], dict[str, list[str]]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in files}
    externals: dict[str, list[str]] = {}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        names = _imports(ast.parse(path.read_text()), package)
        edges[mod] = {n for n in names if n in files and n != mod}
        externals[mod] = sorted({n.split(".")[0] for n in names} & {"ray", "mlflow"})
    return edges, externals


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := dfs(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := dfs(node)):
            return found
    return None


def test_no_import_cycles_among_rayrcm_modules():
    edges, _ = _graph()
    assert len(edges) > 40  # the whole package was read
    cycle = _cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_only_orchestration_cli_and_quickstart_name_ray_or_mlflow():
    _, externals = _graph()
    bad = {m: e for m, e in externals.items() if e and not m.startswith(MAY_USE_RAY)}
    assert not bad, f"pure modules import {bad}"


def test_type_checking_and_function_level_imports_count():
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import rayrcm.config\n"
                     "def f():\n    from rayrcm import errors\n")
    assert _imports(tree, "rayrcm") == ["typing", "typing.TYPE_CHECKING", "rayrcm.config", "rayrcm", "rayrcm.errors"]
