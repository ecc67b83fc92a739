"""The package's layers, read from the source with ``ast`` (nothing is imported).

``blockllm`` is a library (the optimizer, selection, distributed helpers, integrations) and, under
``blockllm/app/``, the application built on it (command line, training loop, data, models, the
methods it is compared with, the benchmark harness). The rules:

1. Nothing outside ``blockllm/app/`` imports ``blockllm.app``, not even inside a function or under
   ``TYPE_CHECKING``, nor by a dotted name handed to ``importlib`` (``blockllm/__main__.py``, which
   is ``python -m blockllm``, the command line, is the one exception).
2. The library imports the standard library, torch and ``blockllm`` itself. ``transformers`` and
   ``accelerate`` only in ``blockllm/integrations/`` submodules, and only lazily: no library module
   imports such a submodule at module level, so ``import blockllm`` never loads them.
3. No import cycles: none among module-level imports anywhere, and none among the application's
   modules even counting the imports inside functions.
4. No module name (file name) is used twice, so that a name says which job a module does.
5. Inside the library, imports run downward only (``docs/architecture.md``): ``selection`` (the
   policies) imports nothing else of blockllm but ``errors``; ``config`` only ``selection``;
   ``distributed`` only those; ``optim`` not ``integrations``. Under ``TYPE_CHECKING`` anything.

Imports under ``if TYPE_CHECKING:`` never run: rules 2 and 3 ignore them; rule 1 does not.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
APP = "blockllm.app"
ENTRY_POINT = "blockllm.__main__"
# Third-party packages the integrations wrap; imported only when an integration is used.
INTEGRATION_PACKAGES = {"transformers", "accelerate"}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported name, as written (absolute)
    line: int
    kind: str  # "module", "function" (inside a def) or "typing" (under TYPE_CHECKING)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def find_modules(root: Path) -> dict[str, Path]:
    return {module_name(path, root): path for path in sorted((root / "blockllm").rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def read_imports(name: str, path: Path) -> list[Import]:
    """Every import statement of one module, with where it sits."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[Import] = []

    def absolute(module: str | None, level: int) -> str:
        if not level:
            return module or ""
        base = package.split(".")
        base = base[: len(base) - (level - 1)]
        return ".".join(base + ([module] if module else []))

    def visit(node: ast.AST, kind: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend(Import(name, alias.name, child.lineno, kind) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = absolute(child.module, child.level)
                # `from a.b import c` may import the module a.b.c or the name c of a.b: keep
                # both candidates; resolve() picks the module when there is one.
                found.extend(
                    Import(name, f"{base}.{alias.name}" if base else alias.name, child.lineno, kind)
                    for alias in child.names
                )
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, "function" if kind == "module" else kind)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for statement in child.body:
                    visit(ast.Module(body=[statement], type_ignores=[]), "typing")
                for statement in child.orelse:
                    visit(ast.Module(body=[statement], type_ignores=[]), kind)
            else:
                visit(child, kind)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), "module")
    return found


def resolve(target: str, modules: dict[str, Path]) -> str | None:
    """The ``blockllm`` module an import loads (the longest known prefix), or None outside it."""
    while target:
        if target in modules:
            return target
        target = target.rpartition(".")[0]
    return None


def in_app(module: str) -> bool:
    return module == APP or module.startswith(APP + ".")


def dotted_strings(path: Path) -> list[tuple[int, str]]:
    """String constants that name an application module (``importlib.import_module(...)``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and (node.value == APP or node.value.startswith(APP + "."))
    ]


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = 0

    def connect(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph.get(node, ())):
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

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph) + 100))
    try:
        for node in sorted(graph):
            if node not in index:
                connect(node)
    finally:
        sys.setrecursionlimit(limit)
    return cycles


def describe_cycle(component: list[str], graph: dict[str, set[str]]) -> str:
    members = set(component)
    edges = [f"{a} -> {b}" for a in component for b in sorted(graph[a] & members)]
    return "; ".join(edges)


class Package:
    """The modules of a source tree and their imports."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.modules = find_modules(root)
        self.imports = {name: read_imports(name, path) for name, path in self.modules.items()}

    def library(self) -> list[str]:
        return [name for name in self.modules if not in_app(name) and name != ENTRY_POINT]

    def graph(self, kinds: set[str], members: set[str] | None = None) -> dict[str, set[str]]:
        names = set(self.modules) if members is None else members
        graph: dict[str, set[str]] = {name: set() for name in names}
        for name in names:
            for item in self.imports[name]:
                target = resolve(item.target, self.modules)
                if item.kind in kinds and target in names and target != name:
                    graph[name].add(target)
        return graph

    # ------------------------------------------------------------------ the rules

    def library_imports_of_the_app(self) -> list[str]:
        problems = []
        for name in self.library():
            for item in self.imports[name]:
                target = resolve(item.target, self.modules)
                if target is not None and in_app(target):
                    problems.append(f"{name}:{item.line} imports {item.target} ({item.kind})")
            for line, value in dotted_strings(self.modules[name]):
                problems.append(f"{name}:{line} names the application module {value!r}")
        return problems

    def foreign_library_imports(self) -> list[str]:
        problems = []
        allowed = set(sys.stdlib_module_names) | {"torch", "blockllm"}
        for name in self.library():
            integration = name.startswith("blockllm.integrations.")
            for item in self.imports[name]:
                top = item.target.partition(".")[0]
                if item.kind == "typing" or top in allowed:
                    continue
                if integration and top in INTEGRATION_PACKAGES:
                    continue
                problems.append(f"{name}:{item.line} imports {item.target}")
        # The integration submodules that import those packages are loaded lazily: no library
        # module reaches one through module-level imports (integrations/__init__ uses PEP 562).
        heavy = {
            name
            for name in self.library()
            if any(
                item.kind != "typing" and item.target.partition(".")[0] in INTEGRATION_PACKAGES
                for item in self.imports[name]
            )
        }
        eager = self.graph({"module"}, set(self.library()))
        for name in self.library():
            for target in sorted(eager[name] & heavy):
                problems.append(
                    f"{name} imports {target} at module level, which loads "
                    f"{' / '.join(sorted(INTEGRATION_PACKAGES))}"
                )
        return problems

    def upward_library_imports(self) -> list[str]:
        problems = []
        for name in self.library():
            layer = _layer(name)
            allowed = LIBRARY_LAYERS.get(layer)
            if allowed is None:
                continue
            for item in self.imports[name]:
                target = resolve(item.target, self.modules)
                if item.kind == "typing" or target is None or _layer(target) == layer:
                    continue
                if _layer(target) not in allowed:
                    problems.append(f"{name}:{item.line} imports {target} ({item.kind})")
        return problems

    def module_level_cycles(self) -> list[str]:
        graph = self.graph({"module"})
        return [describe_cycle(cycle, graph) for cycle in find_cycles(graph)]

    def app_cycles(self) -> list[str]:
        graph = self.graph({"module", "function"}, {name for name in self.modules if in_app(name)})
        return [describe_cycle(cycle, graph) for cycle in find_cycles(graph)]

    def repeated_module_names(self) -> list[str]:
        by_name: dict[str, list[str]] = {}
        for name, path in self.modules.items():
            if path.name not in ("__init__.py", "__main__.py"):
                by_name.setdefault(path.name, []).append(name)
        return [", ".join(names) for names in by_name.values() if len(names) > 1]


# What each library layer may import (besides itself); a layer not listed here is unconstrained.
LIBRARY_LAYERS = {
    "blockllm.errors": set(),
    "blockllm.selection": {"blockllm.errors"},
    "blockllm.config": {"blockllm.selection", "blockllm.errors"},
    "blockllm.distributed": {"blockllm.selection", "blockllm.config", "blockllm.errors"},
    "blockllm.optim": {
        "blockllm.selection", "blockllm.config", "blockllm.distributed", "blockllm.errors",
    },
}  # fmt: skip


def _layer(module: str) -> str:
    """``blockllm.selection.packing`` -> ``blockllm.selection``; ``blockllm.config`` itself."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


@pytest.fixture(scope="module")
def package():
    return Package(SRC)


def test_the_library_never_imports_the_application(package):
    assert package.library_imports_of_the_app() == []


def test_importing_the_library_loads_no_application_module():
    # The same rule at run time: what `import blockllm` and its subpackages really load.
    code = (
        "import sys, blockllm, blockllm.optim, blockllm.selection, blockllm.integrations\n"
        "print(sorted(m for m in sys.modules if m.startswith('blockllm.app')"
        " or m.split('.')[0] in ('transformers', 'accelerate')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "[]"


def test_the_library_imports_torch_and_lazily_the_integrations_packages(package):
    assert package.foreign_library_imports() == []


def test_library_layers_import_downward_only(package):
    assert package.upward_library_imports() == []


def test_no_import_cycles(package):
    assert package.module_level_cycles() == []
    assert package.app_cycles() == []


def test_no_module_name_is_used_twice(package):
    assert package.repeated_module_names() == []


def test_the_rules_catch_planted_violations(tmp_path):
    """Each rule fails on a small tree that breaks it (so a green run means something)."""
    files = {
        "blockllm/__init__.py": "from blockllm.optim import core\n",
        "blockllm/optim/__init__.py": "",
        "blockllm/optim/core.py": (
            "import importlib\nimport numpy\nfrom blockllm.integrations import hf\n"
            "def later():\n    from blockllm.app.cli import main\n"
            "    return importlib.import_module('blockllm.app.cli')\n"
        ),
        "blockllm/integrations/__init__.py": "",
        "blockllm/integrations/hf.py": "import transformers\nfrom blockllm.optim import core\n",
        "blockllm/app/__init__.py": "",
        "blockllm/app/cli.py": "from blockllm.app.loop import run\n",
        "blockllm/app/loop.py": "def run():\n    from blockllm.app.cli import main\n",
        "blockllm/app/other/core.py": "",
        "blockllm/selection/__init__.py": "",
        "blockllm/selection/rule.py": (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from blockllm.optim import core\n"
            "def upward():\n    from blockllm.optim.core import later\n"
        ),
    }
    for relative, text in files.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(text)
    planted = Package(tmp_path)

    app_imports = planted.library_imports_of_the_app()
    assert any("blockllm.app.cli.main (function)" in problem for problem in app_imports)
    assert any("names the application module 'blockllm.app.cli'" in p for p in app_imports)
    foreign = planted.foreign_library_imports()
    assert any("imports numpy" in problem for problem in foreign)
    assert any("blockllm.optim.core imports blockllm.integrations.hf at module" in p for p in foreign)
    assert not any("imports transformers" in problem for problem in foreign)
    assert planted.module_level_cycles() == [
        "blockllm.integrations.hf -> blockllm.optim.core; "
        "blockllm.optim.core -> blockllm.integrations.hf"
    ]
    assert planted.app_cycles() == ["blockllm.app.cli -> blockllm.app.loop; "
                                    "blockllm.app.loop -> blockllm.app.cli"]  # fmt: skip
    assert planted.repeated_module_names() == ["blockllm.app.other.core, blockllm.optim.core"]
    # An upward import inside a function counts; one for type checking only does not.
    upward = planted.upward_library_imports()
    assert "blockllm.selection.rule:5 imports blockllm.optim.core (function)" in upward
    assert "blockllm.optim.core:3 imports blockllm.integrations.hf (module)" in upward
    assert not any("rule:3" in problem for problem in upward)
