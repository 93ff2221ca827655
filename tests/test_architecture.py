"""The package's imports flow one way: source -> HeadModel -> scores -> taxonomy -> report -> cli.

Every ``import`` and ``from ... import`` of every module under ``headclass/`` is read with
``ast`` (at module level and inside functions, so lazy imports count too) and checked:

* no module imports a module of a higher layer (:data:`LAYERS`);
* the import graph between headclass modules has no cycle.

Importing a submodule also runs its parent packages' ``__init__`` (Python's rule); those
implicit edges are not counted, only the imports written in the code.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "headclass"

#: Layer of each module, by longest matching dotted prefix; a module may import its own layer
#: and those below it. The package's ``__init__`` re-exports from every layer.
LAYERS: dict[str, int] = {
    "headclass._version": 0,
    "headclass._startup": 0,
    "headclass.errors": 0,
    "headclass.atomic": 0,
    "headclass.heap": 0,
    "headclass.config": 0,
    "headclass.loading": 1,
    "headclass.probes": 2,
    "headclass.scores": 3,
    "headclass.toy": 3,
    "headclass.testing": 3,
    "headclass.taxonomy": 4,
    "headclass.report": 5,
    "headclass.sweep": 5,
    "headclass.workflows": 5,
    "headclass.cli": 6,
    "headclass.__main__": 6,
    "headclass": 7,
}


#: Imports against the layering that are allowed, each inside a function and for a stated reason.
#: ``HeadTaxonomy.to_csv/to_json/to_html...`` delegate to the report layer's writers the way
#: pandas' ``DataFrame.to_parquet`` imports its writer: on call, never at import time.
LAZY_DELEGATIONS: dict[tuple[str, str], str] = {
    ("headclass.taxonomy.result", "headclass.report.export"): "HeadTaxonomy.save and its to_* methods",
    ("headclass.taxonomy.result", "headclass.report.cards"): "HeadTaxonomy.card builds the report's HeadCard",
}


def module_names(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``root`` (a package folder)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The headclass modules that ``name``'s code imports (anywhere in the file), less the
    allowed function-level :data:`LAZY_DELEGATIONS`."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    top_level = {id(node) for node in tree.body}
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # ``from pkg import sub`` imports the submodule when there is one
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # ``import headclass.scores.patterns as x``
                target = target.rpartition(".")[0]
            if target and not ((name, target) in LAZY_DELEGATIONS and id(node) not in top_level):
                found.add(target)
    found.discard(name)
    return found


def layer_of(module: str) -> int:
    best = max((prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")), key=len)
    return LAYERS[best]


def import_graph(root: Path) -> dict[str, set[str]]:
    names = module_names(root)
    known = set(names)
    return {name: imported_modules(name, path, known) for name, path in names.items()}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
        for a, targets in graph.items()
        for b in targets
        if layer_of(b) > layer_of(a)
    )


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as a list of modules (first == last), or [] when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = 2
        path.pop()
        return []

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return []


def test_every_module_has_a_layer():
    for name in module_names(PACKAGE):
        assert layer_of(name) >= 0  # max() above raises for a module no prefix covers


def test_no_module_imports_a_higher_layer():
    problems = upward_imports(import_graph(PACKAGE))
    assert not problems, "imports against the layering:\n" + "\n".join(problems)


def test_no_import_cycle_between_headclass_modules():
    cycle = find_cycle(import_graph(PACKAGE))
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_report_is_never_imported_by_the_taxonomy():
    graph = import_graph(PACKAGE)
    offenders = sorted(
        a
        for a, targets in graph.items()
        if a.startswith("headclass.taxonomy") and any(t.startswith("headclass.report") for t in targets)
    )
    assert offenders == []


# -- the checker itself finds what it must --------------------------------------------------------
@pytest.fixture
def fake_package(tmp_path):
    root = tmp_path / "headclass"
    for rel, text in {
        "__init__.py": "",
        "errors.py": "",
        "taxonomy/__init__.py": "from headclass.taxonomy.result import X\n",
        "taxonomy/result.py": "def f():\n    from headclass.report import table\n",  # lazy, upward
        "report/__init__.py": "",
        "report/table.py": "from headclass.taxonomy import result\n",
        "scores/__init__.py": "",
        "scores/patterns.py": "from . import weights\n",
        "scores/weights.py": "import headclass.scores.patterns as p\n",  # a cycle, same layer
    }.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_checker_finds_a_lazy_upward_import(fake_package):
    problems = upward_imports(import_graph(fake_package))
    assert problems == ["headclass.taxonomy.result (layer 4) imports headclass.report.table (layer 5)"]


def test_lazy_delegation_is_allowed_only_inside_functions(tmp_path):
    root = tmp_path / "headclass"
    (root / "taxonomy").mkdir(parents=True)
    (root / "report").mkdir()
    for rel in ("__init__.py", "taxonomy/__init__.py", "report/__init__.py", "report/export.py"):
        (root / rel).write_text("")
    (root / "taxonomy/result.py").write_text("def save():\n    from headclass.report import export\n")
    assert upward_imports(import_graph(root)) == []
    (root / "taxonomy/result.py").write_text("from headclass.report import export\n")
    assert upward_imports(import_graph(root)) == [
        "headclass.taxonomy.result (layer 4) imports headclass.report.export (layer 5)"
    ]


def test_checker_finds_a_cycle(fake_package):
    cycle = find_cycle(import_graph(fake_package))
    assert cycle[0] == cycle[-1] and len(cycle) >= 3
    assert set(cycle) in (
        {"headclass.scores.patterns", "headclass.scores.weights"},
        {"headclass.report.table", "headclass.taxonomy.result"},
    )
