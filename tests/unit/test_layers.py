"""Imports run one way: the layers of the package, checked on its source.

    cli  ->  app  ->  demo  ->  admin, modelserver  ->  detect, alerts  ->  dataplane  ->  protocol  ->  bottom

The bottom (config, metrics, logs, durable, tls, execution, repository, eventloop, jsonbody, httpd, and the package's
own ``__init__``) imports nothing else of sidewatch. A module may import modules of its own layer's
package and of lower layers, never of a higher layer, and never a sibling package of the same layer
(detect and alerts know nothing of each other). No import cycle between modules, counting imports under
TYPE_CHECKING too. Imports inside functions are allowed only in the two top modules (cli and app, to keep
``sidewatch --help`` and a sidecar without detectors light), and there they follow the same rules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "agent"

# Lowest first. A module belongs to the first entry that is its name or a prefix of it (by package).
LAYERS: list[tuple[str, ...]] = [
    ("agent", "agent.config", "agent.metrics", "agent.logs", "agent.durable", "agent.tls", "agent.execution",
     "agent.repository", "agent.eventloop", "agent.jsonbody", "agent.memory", "agent.httpd"),
    ("agent.protocol",),
    ("agent.dataplane",),
    ("agent.detect", "agent.alerts"),
    ("agent.admin", "agent.modelserver"),
    ("agent.demo",),
    ("agent.app",),
    ("agent.cli",),
]
TOP_MODULES = {"agent.cli", "agent.app"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def unit_of(module: str) -> tuple[int, str]:
    """(layer index, the unit: the bottom module or package it belongs to)."""
    best: tuple[int, str] | None = None
    for index, units in enumerate(LAYERS):
        for unit in units:
            if unit == "agent":
                if module == "agent":
                    return index, unit
                continue
            if (module == unit or module.startswith(unit + ".")) and (best is None or len(unit) > len(best[1])):
                best = (index, unit)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")
    return best


class Imports(ast.NodeVisitor):
    """The ``agent`` modules a source file imports: (line, imported module, inside a function)."""

    def __init__(self, module: str, is_package: bool) -> None:
        self.module = module
        self.package = module if is_package else module.rpartition(".")[0]
        self.found: list[tuple[int, str, bool]] = []
        self._depth = 0

    def visit_FunctionDef(self, node) -> None:  # noqa: N802 - ast's naming
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef  # noqa: N815

    def visit_Import(self, node: ast.Import) -> None:  # noqa: N802
        for alias in node.names:
            if alias.name == "agent" or alias.name.startswith("agent."):
                self.found.append((node.lineno, alias.name, self._depth > 0))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:  # noqa: N802
        if node.level:
            base = self.package.split(".")
            base = base[:len(base) - node.level + 1]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        if not (source == "agent" or source.startswith("agent.")):
            return
        for alias in node.names:
            # `from agent.x import y`: y is a module when agent/x/y.py or agent/x/y/ exists.
            candidate = f"{source}.{alias.name}"
            target = candidate if _exists(candidate) else source
            self.found.append((node.lineno, target, self._depth > 0))


def _exists(module: str) -> bool:
    path = PACKAGE.parent.joinpath(*module.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def all_imports() -> dict[str, list[tuple[int, str, bool]]]:
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name.endswith("_pb2.py"):
            continue
        module = module_name(path)
        visitor = Imports(module, path.name == "__init__.py")
        visitor.visit(ast.parse(path.read_text(), str(path)))
        graph[module] = visitor.found
    return graph


GRAPH = all_imports()


def _violations() -> list[str]:
    problems = []
    for module, imports in GRAPH.items():
        layer, unit = unit_of(module)
        for line, target, in_function in imports:
            where = f"{module}:{line} imports {target}"
            if in_function and module not in TOP_MODULES:
                problems.append(f"{where} inside a function (only {', '.join(sorted(TOP_MODULES))} may)")
            if target == "agent" or target == unit or target.startswith(unit + "."):
                continue  # the package's own __init__ (the version), or its own unit
            target_layer, target_unit = unit_of(target)
            if layer == 0 and unit != "agent":
                problems.append(f"{where}: the bottom layer ({unit}) imports nothing else of sidewatch")
            elif target_layer > layer:
                problems.append(f"{where}: upward, from layer {unit} to {target_unit}")
            elif target_layer == layer:
                problems.append(f"{where}: sideways, {unit} and {target_unit} must not know each other")
    return problems


def test_imports_run_downward_only():
    assert _violations() == []


def test_no_import_cycle_between_modules():
    edges = {module: {target for _, target, _ in imports if target in GRAPH and target != module}
             for module, imports in GRAPH.items()}
    # Tarjan's strongly connected components: any component with two or more modules is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in edges[node]:
            if successor not in index:
                connect(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in edges:
        if node not in index:
            connect(node)
    assert cycles == []


@pytest.mark.parametrize("source, expected", [
    ("from agent.dataplane.tap import Tap\n", "upward, from layer agent.protocol to agent.dataplane"),
    ("def f():\n    from agent.protocol import codec\n", "inside a function"),
])
def test_the_check_catches_what_it_forbids(source, expected, tmp_path):
    # A module of agent.protocol importing upward, and one importing inside a function.
    visitor = Imports("agent.protocol.example", False)
    visitor.visit(ast.parse(source))
    GRAPH["agent.protocol.example"] = visitor.found
    try:
        assert any(expected in problem for problem in _violations())
    finally:
        del GRAPH["agent.protocol.example"]
