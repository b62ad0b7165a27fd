"""The tests' own layout: conftest.py is pytest's, for fixtures and hooks only; the plain helpers the test
modules share live in helpers.py, an ordinary module they import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
SOURCES = sorted(TESTS.rglob("*.py"))


def conftest_imports(path: Path) -> list[str]:
    """``line: statement`` for every import of the conftest module in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0:
            modules = [node.module or ""]
        elif isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        else:
            continue
        if any(module.split(".")[0] == "conftest" for module in modules):
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_the_sources_checked_include_the_test_modules_and_the_helpers():
    names = {path.name for path in SOURCES}
    assert {"conftest.py", "helpers.py", "test_run.py", "test_test_layout.py"} <= names


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(TESTS)))
def test_no_test_file_imports_from_conftest(path):
    assert conftest_imports(path) == [], f"{path.name}: import these from helpers instead"


def test_the_check_finds_every_form_of_importing_conftest(tmp_path):
    source = tmp_path / "sample.py"
    # spelled through {m}, so that a plain search of the tests for conftest imports finds none here either
    lines = [
        "from {m} import invoke",
        "import {m}",
        "import {m} as c",
        "def f():",
        "    from {m} import REPO",
    ]
    lines += ["from helpers import invoke", "import {m}_like"]
    source.write_text("\n".join(lines).format(m="conftest") + "\n")
    assert [line.split(":")[0] for line in conftest_imports(source)] == ["1", "2", "3", "5"]


def test_conftest_defines_only_fixtures_and_hooks():
    tree = ast.parse((TESTS / "conftest.py").read_text(encoding="utf-8"))
    plain = [
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and not node.name.startswith("pytest_")
        and not any("fixture" in ast.unparse(decorator) for decorator in node.decorator_list)
    ]
    assert plain == [], "move these to helpers.py"
