"""The package layout holds: jaxlm's import graph (every import statement, those inside functions
included) has no cycle, and the lower packages import nothing of the ones built on them. Read from
the source with `ast`, so nothing is imported to check it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "jaxlm"

# What each lower part may import of jaxlm (its own modules aside). The core modules (config,
# errors, storage, parallel, devices, distributed) import only one another.
CORE = {"jaxlm", "jaxlm.config", "jaxlm.errors", "jaxlm.storage", "jaxlm.parallel", "jaxlm.devices"}
ALLOWED = {
    "jaxlm.model": CORE,
    "jaxlm.data": CORE | {"jaxlm.hf.files"},  # a Hugging Face directory's tokenizer files
    "jaxlm.hf": CORE | {"jaxlm.model"},  # the file format of a family's tensors
}


def _module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _type_checking_only(tree: ast.AST) -> set[int]:
    """The ids of import nodes under `if TYPE_CHECKING:`: annotations, never run."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            skipped |= {id(inner) for statement in node.body for inner in ast.walk(statement)}
    return skipped


def import_graph() -> dict[str, set[str]]:
    """module → the jaxlm modules it imports by name (a package's __init__ stands for the package;
    the __init__ that Python runs before any module of its package is not counted, so
    jaxlm.model's, which imports every family to register it, is not a cycle with each)."""
    modules = _module_names()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        skipped = _type_checking_only(tree)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([node.module] if node.module else [])])
                # `from package import module` imports the module; `from module import name`, the module.
                targets = [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target.startswith("jaxlm") and target != name:
                    imported.add(target)
        graph[name] = imported
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_has_no_cycle():
    assert cycles(import_graph()) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_a_lower_part_imports_nothing_built_on_it(part):
    graph = import_graph()
    outside = {
        f"{module} imports {target}"
        for module, targets in graph.items()
        if module == part or module.startswith(part + ".")
        for target in targets
        if not (target == part or target.startswith(part + "."))
        and not any(
            target == allowed or target.startswith(allowed + ".") for allowed in ALLOWED[part] - {"jaxlm"}
        )
        and target != "jaxlm"
    }
    assert sorted(outside) == []


def test_the_top_level_holds_the_entry_point_and_the_core_only():
    top = {path.stem for path in PACKAGE.glob("*.py")}
    assert top == {"__init__", "cli", "config", "errors", "storage", "distributed", "parallel", "devices"}
