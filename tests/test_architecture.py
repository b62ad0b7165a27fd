"""The layout of the core: no import cycle among its modules, and each piece in the module that owns it."""

from __future__ import annotations

import ast
from pathlib import Path

import lmflow_core

CORE = Path(lmflow_core.__file__).parent


def module_names(package_dir: Path) -> dict[str, Path]:
    """``{dotted module name: file}`` for every module of the package in ``package_dir``."""
    names = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported(module: str, path: Path, node: ast.Import | ast.ImportFrom, modules: dict) -> list[str]:
    """The names of what an import statement loads (``from . import x`` loads the module ``x`` when it is one)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    if node.level:
        base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    return [f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names]


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """Which module of the package imports which, at any depth of the code (inside functions too).

    Imports under ``if TYPE_CHECKING:`` are left out: they never run.
    """
    modules = module_names(package_dir)
    top = package_dir.name
    graph: dict[str, set[str]] = {name: set() for name in modules}

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        pending: list[ast.AST] = [tree]
        while pending:
            node = pending.pop()
            if isinstance(node, ast.If) and _is_type_checking(node.test):
                pending.extend(node.orelse)
                continue
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _imported(name, path, node, modules):
                    found = known(target)
                    if found and found != name and found.split(".")[0] == top:
                        graph[name].add(found)
            pending.extend(ast.iter_child_nodes(node))
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for node in graph:
        if node not in index:
            visit(node)
    return cycles


def describe(graph: dict[str, set[str]], group: list[str]) -> str:
    return "; ".join(f"{m} -> {', '.join(sorted(graph[m] & set(group)))}" for m in group)


def test_the_core_has_no_import_cycle():
    graph = import_graph(CORE)
    assert len(graph) > 30 and "lmflow_core.train" in graph
    assert {"lmflow_core.trainer", "lmflow_core.data.pipeline"} <= graph["lmflow_core.train"]
    cycles = import_cycles(graph)
    assert not cycles, "\n".join(describe(graph, group) for group in cycles)


def test_the_cycle_check_sees_function_level_imports_and_skips_type_only_ones(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("def run():\n    from .a import x\n")
    (package / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import b\n"
    )
    (package / "b.py").write_text("def f():\n    from .a import x\n")
    (package / "sub" / "__init__.py").write_text("from .c import y\n")
    (package / "sub" / "c.py").write_text("y = 1\n")
    graph = import_graph(package)
    assert import_cycles(graph) == []  # a -> b is type-only; the facade -> a is not a cycle
    (package / "a.py").write_text("def g():\n    import pkg.b\n")
    assert import_cycles(import_graph(package)) == [["pkg.a", "pkg.b"]]
    (package / "sub" / "c.py").write_text("def h():\n    from .. import a\n")
    (package / "a.py").write_text("from .sub import y\n")
    # c imports a, a imports the subpackage, whose __init__ imports c: a cycle through an __init__
    assert import_cycles(import_graph(package)) == [["pkg.a", "pkg.sub", "pkg.sub.c"]]


def test_defaults_holds_only_the_cores_hook_implementations():
    from lmflow_core import defaults
    from lmflow_core.hookspecs import PROJECT

    tree = ast.parse(Path(defaults.__file__).read_text(encoding="utf-8"))
    functions = [node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
    assert functions, "no hook implementation found"
    plain = [name for name in functions if not hasattr(getattr(defaults, name), f"{PROJECT}_impl")]
    assert not plain, f"defaults.py should hold only hook implementations; move {plain} to their module"


def test_train_keeps_only_the_recipe():
    """The run's steps in train.py; the Trainer, the data pipeline, the run directory in their modules."""
    from lmflow_core import train

    tree = ast.parse(Path(train.__file__).read_text(encoding="utf-8"))
    defined = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    assert {"configure", "run", "execute", "check_run"} <= defined
    assert not defined & {"LmflowTrainer", "HookCallback", "RunRecorder", "prepare_data", "save_final"}
