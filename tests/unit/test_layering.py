"""The package's imports: no cycle between modules, and none against the layer table.

Every module under ``src/weighted_mtp`` is parsed with ``ast``; every ``import`` counts, at
module level or inside a function (a lazy import delays a dependency, it does not remove it).
The layer table is read from docs/ARCHITECTURE.md, section "Layers".
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src"
PACKAGE = "weighted_mtp"
ROW = re.compile(r"^\|\s*(\d+)\s*\|([^|]*)\|")


def module_files(src: Path, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of the package."""
    modules = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module an imported name lives in (``pkg.mod.func`` -> ``pkg.mod``)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """``(imported module, line)`` for every import of a package module in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package upward
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            target = _resolve(name, modules)
            if target and target != module and name.split(".")[0] == module.split(".")[0]:
                found.append((target, node.lineno))
                break  # one edge per statement is enough
    return found


def import_graph(src: Path, package: str = PACKAGE) -> dict[str, list[tuple[str, int]]]:
    modules = module_files(src, package)
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def find_cycles(graph: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target, _ in graph.get(node, []):
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
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def parse_layers(doc: str) -> dict[str, int]:
    """Unit -> layer from the table under ``## Layers`` of docs/ARCHITECTURE.md."""
    section = doc.split("\n## Layers", 1)[1].split("\n## ", 1)[0]
    layers = {}
    for line in section.splitlines():
        row = ROW.match(line)
        if row:
            for unit in re.findall(r"`([^`]+)`", row.group(2)):
                layers[unit] = int(row.group(1))
    return layers


def unit_of(module: str) -> str:
    """``weighted_mtp.storage.models`` -> ``storage``; the package itself -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer_violations(
    graph: dict[str, list[tuple[str, int]]], layers: dict[str, int], src: Path = SRC
) -> list[str]:
    files = module_files(src)
    problems = []
    for module, targets in sorted(graph.items()):
        unit = unit_of(module)
        if unit not in layers:
            problems.append(f"{module}: unit {unit!r} is not in the layer table")
            continue
        for target, line in targets:
            other = unit_of(target)
            if other == unit or other not in layers:
                continue  # inside one unit (cycles are checked apart); unknown: reported above
            if layers[other] >= layers[unit]:
                where = files[module].relative_to(src).as_posix()
                problems.append(
                    f"{where}:{line}: {unit} (layer {layers[unit]}) imports {target} "
                    f"({other}, layer {layers[other]})"
                )
    return problems


@pytest.fixture(scope="module")
def graph() -> dict[str, list[tuple[str, int]]]:
    return import_graph(SRC)


@pytest.fixture(scope="module")
def layers() -> dict[str, int]:
    return parse_layers((REPO / "docs/ARCHITECTURE.md").read_text(encoding="utf-8"))


def test_no_import_cycle(graph):
    assert find_cycles(graph) == []


def test_imports_follow_the_layer_table(graph, layers):
    assert layer_violations(graph, layers) == []


def test_the_table_names_every_unit_and_only_those(graph, layers):
    units = {unit_of(m) for m in graph}
    assert set(layers) == units
    assert layers["base"] == 0 and layers["models"] < layers["storage"] > layers["data"]


def test_function_level_imports_are_seen(graph):
    # cli imports every sub-command's module inside its handler (start-up time).
    assert "weighted_mtp.train.loop" in {t for t, _ in graph["weighted_mtp.cli"]}


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "weighted_mtp" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


TABLE = """# Architecture

## Layers

| layer | units | what |
|---|---|---|
| 0 | `__init__`, `base` | floor |
| 1 | `models` | models |
| 2 | `storage` | building |

## Next
"""


def test_a_bad_tree_fails_both_rules(tmp_path):
    src = _tree(
        tmp_path,
        {
            "__init__.py": "",
            "base/__init__.py": "",
            "base/layout.py": "import os\n",
            # upward, and hidden in a function: base must not know models
            "base/io.py": "def f():\n    from weighted_mtp.models.core import Model\n",
            "models/__init__.py": "",
            "models/core.py": "from weighted_mtp.base import layout\nclass Model: ...\n",
            # a cycle inside storage, one side relative
            "storage/__init__.py": "",
            "storage/a.py": "from weighted_mtp.storage.b import x\ny = 1\n",
            "storage/b.py": "def g():\n    from .a import y\nx = 1\n",
            # a unit the table does not name
            "extra.py": "import weighted_mtp.base.layout\n",
        },
    )
    graph = import_graph(src)
    assert find_cycles(graph) == [["weighted_mtp.storage.a", "weighted_mtp.storage.b"]]
    problems = layer_violations(graph, parse_layers(TABLE), src)
    assert problems == [
        "weighted_mtp/base/io.py:2: base (layer 0) imports weighted_mtp.models.core (models, layer 1)",
        "weighted_mtp.extra: unit 'extra' is not in the layer table",
    ]


def test_a_good_tree_passes(tmp_path):
    src = _tree(
        tmp_path,
        {
            "__init__.py": "",
            "base/__init__.py": "",
            "base/layout.py": "import os\n",
            "models/__init__.py": "from .core import Model\n",
            "models/core.py": "from weighted_mtp.base import layout\nclass Model: ...\n",
            "storage/__init__.py": "",
            "storage/a.py": "def f():\n    from weighted_mtp.models import Model\n",
        },
    )
    graph = import_graph(src)
    assert find_cycles(graph) == []
    assert layer_violations(graph, parse_layers(TABLE), src) == []
    assert graph["weighted_mtp.storage.a"] == [("weighted_mtp.models", 2)]
