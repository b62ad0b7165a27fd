"""Plain helpers shared by the tests: tiny models, small datasets, CLI calls and checks.

Fixtures live in conftest.py; test modules import what they need from here (``from helpers import ...``).
Heavy libraries (torch, transformers, the CLI) are imported inside the functions, so importing this module
costs nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

REPO = Path(__file__).resolve().parent.parent
# Reference data beside the project (../shared/reference), or where LMFLOW_SHARED_REFERENCE points.
SHARED = Path(os.environ.get("LMFLOW_SHARED_REFERENCE") or REPO.parent / "shared" / "reference")

# The default shape of a tiny model of each type; other types give their whole shape as overrides.
TINY_SHAPES = {
    "llama": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
    },
    "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 256},
}


def tiny_model(
    model_type: str, *, seed: int = 0, dtype=None, attn_implementation: str | None = None, **overrides
):
    """A causal LM of ``model_type`` with random weights drawn after ``torch.manual_seed(seed)``, in eval mode.

    Its config is ``TINY_SHAPES[model_type]`` (if any) updated with ``overrides``; ``dtype`` converts the
    weights, ``attn_implementation`` is passed on to ``from_config``.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **{**TINY_SHAPES.get(model_type, {}), **overrides})
    options = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, **options)
    return (model if dtype is None else model.to(dtype)).eval()


def save_tiny_model(model_type: str, out_dir: Path, **overrides) -> Path:
    """A ``tiny_model`` sized to the demo tokenizer, saved with that tokenizer as a normal model directory.

    The vocabulary size and the EOS, padding and BOS (= EOS) ids come from the tokenizer unless ``overrides``
    set them; ``overrides`` go on to ``tiny_model``. Returns ``out_dir``.
    """
    from transformers import AutoTokenizer

    from lmflow_core.demo import demo_model_dir

    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir())
    ids = {
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.eos_token_id,
    }
    tiny_model(model_type, **{**ids, **overrides}).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def write_json(path: Path, data) -> Path:
    """Write ``data`` as JSON to ``path``; returns ``path``."""
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def conversations(n: int = 24) -> list[dict]:
    """``n`` two-message conversations ("What is i plus 1?"), the instances of a conversation dataset."""
    out = []
    for i in range(n):
        out.append(
            {
                "messages": [
                    {"role": "user", "content": f"What is {i} plus 1?"},
                    {"role": "assistant", "content": f"{i} plus 1 is {i + 1}."},
                ]
            }
        )
    return out


def invoke(runner: CliRunner, *args: str):
    """Run the CLI in-process; returns click's Result (exit_code, stdout, stderr)."""
    from lmflow_core.cli import cli

    return runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)


def copy_tree(src: Path, dst: Path) -> Path:
    """Copy the directory ``src`` to ``dst``; returns ``dst``."""
    shutil.copytree(src, dst)
    return dst


def stopped_run(finished: Path, checkpoint: str, where: Path) -> Path:
    """What a run stopped right after ``checkpoint`` leaves in ``where``: that checkpoint and its run record."""
    shutil.copytree(finished / checkpoint, where / checkpoint)
    record = json.loads((finished / "lmflow_run.json").read_text())
    (where / "lmflow_run.json").write_text(json.dumps({**record, "status": "running", "outputs": []}))
    return where


def assert_one_line_error(result, *fragments: str) -> str:
    """A failed CLI call that printed exactly one ``Error: ...`` line containing ``fragments``."""
    assert result.exit_code != 0, result.output
    error = result.stderr.strip()
    assert error.startswith("Error: ") and "\n" not in error, error
    assert "Traceback" not in result.output + result.stderr
    for fragment in fragments:
        assert fragment in error, (fragment, error)
    return error


def plugin_commands(plugin, name: str):
    """Add a plugin's commands (``register_commands``) to the CLI object ``invoke`` runs; undo afterwards.

    A generator for fixtures: ``yield from plugin_commands(plugin, "command")``.
    """
    from lmflow_core.cli import add_debug_option, cli

    added = name not in cli.commands
    if added:
        plugin.register_commands(cli)
        add_debug_option(cli.commands[name])  # as the core does for every plugin's commands
    yield
    if added:
        cli.commands.pop(name, None)


@contextlib.contextmanager
def pip_installed(source: Path, package: str):
    """pip install the package in ``source`` as a user would (no dependencies: lmflow is here already), found
    through its entry points like any installed plugin; uninstalled after unless it was installed before."""
    pip = [sys.executable, "-m", "pip"]
    present = subprocess.run([*pip, "show", "--quiet", package], capture_output=True).returncode == 0
    subprocess.run([*pip, "install", "--quiet", "--no-deps", "--no-build-isolation", str(source)], check=True)
    try:
        yield
    finally:
        if not present:
            subprocess.run([*pip, "uninstall", "--quiet", "--yes", package], check=True)


def add_to_catalog(monkeypatch, plugin, name: str) -> None:
    """Make ``plugin`` part of the catalog (the hooks called on every installed plugin), as if it were installed."""
    from lmflow_core import plugins as plugins_module

    real = plugins_module.load_catalog

    def catalog():
        pm, broken = real()
        pm.register(plugin, name=name)
        return pm, broken

    monkeypatch.setattr(plugins_module, "load_catalog", catalog)
