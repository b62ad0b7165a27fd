"""The plugin API: what ``lmflow_core`` exports is all a plugin imports; it resolves, it is documented, and it
is cheap to import."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
from helpers import REPO, add_to_catalog

import lmflow_core

PLUGIN_SOURCES = sorted(
    path
    for folder in ("plugins", "examples", "tests/plugin_package")
    for path in (REPO / folder).rglob("*.py")
    if "build" not in path.relative_to(REPO).parts
)


def lmflow_imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """Every import of lmflow in a file, anywhere in it (functions included): ``(line, module, names)``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "lmflow_core":
                    found.append((node.lineno, alias.name, []))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] == "lmflow_core":
                found.append((node.lineno, node.module, [alias.name for alias in node.names]))
    return found


def test_the_sources_checked_include_every_plugin_and_example():
    names = {path.name for path in PLUGIN_SOURCES}
    assert {"lora.py", "templates.py", "lmflow_csv_logger.py"} <= names
    assert {"lmflow_acme_template.py", "lmflow_freeze_bottom.py"} <= names
    package = REPO / "plugins" / "vocab_extension"
    assert set(package.glob("*.py")) <= set(PLUGIN_SOURCES)
    assert {"__init__.py", "commands.py"} <= {path.name for path in package.glob("*.py")}


@pytest.mark.parametrize("path", PLUGIN_SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_plugins_and_examples_import_only_the_public_names(path):
    """A built-in plugin is written as a third-party one would be: ``from lmflow_core import <name>``."""
    problems = []
    for line, module, names in lmflow_imports(path):
        where = f"{path.relative_to(REPO)}:{line}"
        if module != "lmflow_core":
            problems.append(f"{where} imports {module}; import its names from lmflow_core")
        for name in names:
            if name not in lmflow_core.__all__:
                problems.append(f"{where} imports {name}, which is not in lmflow_core.__all__")
    assert not problems, "\n".join(problems)


def test_the_import_check_sees_every_form(tmp_path):
    source = tmp_path / "plugin.py"
    source.write_text(
        "import lmflow_core.cli\n"
        "from lmflow_core import note, debug_option\n"
        "def command():\n"
        "    from lmflow_core.train import quiet_libraries\n"
    )
    assert lmflow_imports(source) == [
        (1, "lmflow_core.cli", []),
        (2, "lmflow_core", ["note", "debug_option"]),
        (4, "lmflow_core.train", ["quiet_libraries"]),
    ]
    assert "debug_option" not in lmflow_core.__all__


def test_every_public_name_resolves():
    assert len(set(lmflow_core.__all__)) == len(lmflow_core.__all__)
    for name in lmflow_core.__all__:
        assert getattr(lmflow_core, name) is not None, name
        assert name in dir(lmflow_core)
    # A public name is the core's own object, not a copy: what the core raises is what a plugin catches.
    for name, (module, attribute) in lmflow_core._LAZY.items():
        assert name in lmflow_core.__all__, name
        assert getattr(lmflow_core, name) is getattr(
            importlib.import_module(f"lmflow_core.{module}"), attribute
        )
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        lmflow_core.no_such_name  # noqa: B018


def test_renamed_public_names_keep_their_internal_names():
    from lmflow_core import models

    assert lmflow_core.model_context_length is models.model_context


def test_no_public_name_is_a_hook_implementation():
    """pluggy registers every marked function it finds in a plugin module: a public name carrying the
    ``hookimpl`` marker would become a hook of every plugin that imports it at module level."""
    marked = [name for name in lmflow_core.__all__ if hasattr(getattr(lmflow_core, name), "lmflow_impl")]
    assert marked == []


def imported_after(code: str) -> set[str]:
    heavy = ("torch", "transformers", "datasets", "peft")
    script = f"import sys\n{code}\nprint(' '.join(m for m in {heavy!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return set(result.stdout.split())


def test_importing_lmflow_core_does_not_load_torch_or_transformers():
    """The CLI imports lmflow_core at every start; `lmflow --help` must answer at once."""
    assert imported_after("import lmflow_core") == set()


def test_the_light_public_names_and_the_builtin_plugins_load_no_heavy_library():
    """Every installed plugin is imported at CLI start (register_commands): what a plugin imports at its top
    (note, the helpers, the template types...) must not load torch or transformers."""
    plugins = sorted(
        [p.stem for p in (REPO / "plugins").glob("*.py") if p.stem != "__init__"]
        + [p.parent.name for p in (REPO / "plugins").glob("*/__init__.py")]
    )
    assert "vocab_extension" in plugins
    code = f"from lmflow_core import {', '.join(lmflow_core.__all__)}\n" + "".join(
        f"import lmflow_plugins.{name}\n" for name in plugins
    )
    assert imported_after(code) == set()


def test_plugin_commands_get_debug_from_the_core(monkeypatch):
    """A plugin's command has --debug without declaring it: the failure's traceback instead of one line."""
    import click
    from click.testing import CliRunner

    from lmflow_core import cli as cli_module

    def register_commands(cli):
        @cli.command("fail-test")
        def fail():
            raise RuntimeError("plugin command failed")

        @cli.group("group-test")
        def group():
            """A plugin's group."""

        @group.command("inner")
        @click.option("--debug", is_flag=True, help="The plugin's own --debug.")
        def inner(debug):
            click.echo(f"own debug: {debug}")

    module = types.SimpleNamespace(register_commands=lmflow_core.hookimpl(register_commands))
    add_to_catalog(monkeypatch, module, "debug_test_plugin")
    cli_module._register_plugin_commands()
    try:
        runner = CliRunner()
        plain = runner.invoke(cli_module.cli, ["fail-test"])
        assert plain.exit_code == 1
        assert "RuntimeError: plugin command failed (run again with --debug" in plain.output
        debug = runner.invoke(cli_module.cli, ["fail-test", "--debug"])
        assert isinstance(debug.exception, RuntimeError)  # raised: the traceback is shown
        assert "--debug" in runner.invoke(cli_module.cli, ["fail-test", "--help"]).output
        # A command that declares --debug itself keeps its own.
        assert runner.invoke(cli_module.cli, ["group-test", "inner", "--debug"]).output == "own debug: True\n"
    finally:
        cli_module.cli.commands.pop("fail-test", None)
        cli_module.cli.commands.pop("group-test", None)


def readme_plugin_api() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    match = re.search(r"^### Plugin API\n(.*?)(?=^##)", text, re.S | re.M)
    assert match, "README.md has no '### Plugin API' section"
    return match.group(1)


def test_every_public_name_is_documented_in_the_readme():
    section = readme_plugin_api()
    missing = [name for name in lmflow_core.__all__ if f"`{name}" not in section]
    assert not missing, f"README's Plugin API section does not list {missing}"
