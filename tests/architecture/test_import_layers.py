"""The import layers of DESIGN (README, Architecture): a lower layer never imports a higher one, and no module
imports itself back through others (no import circles, lazy function-level imports included).

Read from the source with ``ast``, so the check sees every import, also those
inside functions and under ``TYPE_CHECKING`` (a type-only import from a higher
layer is still a dependency on it; only circles through ``TYPE_CHECKING``
imports are allowed, since they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: Package folders and the import name their modules have.
PACKAGES = {ROOT / "xdask": "xdask", ROOT / "server" / "xdask_server": "xdask_server",
            ROOT / "extensions" / "xdask_jupyter": "xdask_jupyter"}

#: Layers, lowest first: a module may import from its own layer and the ones below.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("ground", ("xdask.config", "xdask.errors", "xdask.logs")),
    ("registry, api", ("xdask.registry", "xdask.api", "xdask.auth")),
    ("engines, hub", ("xdask.engines", "xdask.hub")),
    ("cluster", ("xdask.cluster",)),
    ("client, batch", ("xdask.client", "xdask.batch")),
    ("server", ("xdask_server",)),
    # ``xdask`` itself is the facade users import (``xdask.Client``, loaded lazily): it sits on top.
    ("extensions, cli", ("xdask_jupyter", "xdask.jupyter", "xdask.cli", "xdask.cli_cluster", "xdask.cli_local",
                         "xdask")),
]


def _modules() -> dict[str, Path]:
    found = {}
    for folder, name in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([name, *parts])] = path
    return found


MODULES = _modules()


def layer_of(module: str) -> int:
    """The layer index of ``module``: the longest matching prefix wins (``xdask`` alone is only the facade)."""
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or (prefix != "xdask" and module.startswith(prefix + "."))) \
                    and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best


def _resolve(importer: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    is_package = MODULES[importer].name == "__init__.py"
    base = importer.split(".")[: len(importer.split(".")) - node.level + (1 if is_package else 0)]
    return ".".join([*base, node.module] if node.module else base)


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports_of(module: str) -> list[tuple[str, int, bool]]:
    """``(imported module, line, type-only)`` for every import of one of our packages in ``module``."""
    tree = ast.parse(MODULES[module].read_text())
    typing_only = _type_checking_lines(tree)
    out = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node)
            # ``from pkg import mod`` imports the submodule when there is one.
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != module:
                out.append((name, node.lineno, node.lineno in typing_only))
    return out


def test_every_module_is_in_a_layer() -> None:
    for module in MODULES:
        layer_of(module)


def test_no_lower_layer_imports_a_higher_one() -> None:
    wrong = []
    for module in sorted(MODULES):
        mine = layer_of(module)
        for imported, line, _ in imports_of(module):
            if layer_of(imported) > mine:
                wrong.append(f"{module}:{line} ({LAYERS[mine][0]}) imports {imported} "
                             f"({LAYERS[layer_of(imported)][0]})")
    assert not wrong, "imports from a higher layer:\n" + "\n".join(wrong)


def _parent_packages(module: str) -> set[str]:
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def test_no_import_circles() -> None:
    """Tarjan's strongly connected components over the run-time import graph (package ``__init__`` edges to
    their own submodules aside: a package re-exporting its modules is not a circle)."""
    graph = {m: sorted({i for i, _, typing in imports_of(m) if not typing and m not in _parent_packages(i)
                        and i not in _parent_packages(m)}) for m in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in graph:
        if module not in index:
            visit(module)
    assert not circles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in circles)


@pytest.mark.parametrize("module", ["xdask.config", "xdask.errors"])
def test_ground_imports_nothing_of_ours(module: str) -> None:
    assert [i for i, _, _ in imports_of(module)] == []
