"""A third-party plugin written only against the public API (tests/plugin_package) does what the built-ins do.

It is pip-installed as a user would install one, found through its entry point, and used from the command line:
options and conflicts, checks against the model's configuration, a configuration change saved with the model,
a wrapper around the core's tokenizer loading, per-run state, a template, a command with atomic output.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, pip_installed
from safetensors.torch import load_file
from transformers import AutoTokenizer

LMFLOW = Path(sys.executable).with_name("lmflow")
PACKAGE = REPO / "tests" / "plugin_package"


def lmflow(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(LMFLOW), *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def installed_plugin():
    with pip_installed(PACKAGE, "lmflow-freeze-bottom"):
        yield


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0, result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


@pytest.mark.slow
def test_a_plugin_written_against_the_public_api_does_what_the_builtins_do(
    installed_plugin, tiny_llama, chat_data, tmp_path
):
    listing = json.loads(lmflow("plugins", "--json").stdout)
    row = next(r for r in listing if r["name"] == "freeze_bottom")
    assert row["source"] == "installed package lmflow-freeze-bottom" and row["version"] == "0.3.0"
    assert "bracket_chat" in lmflow("templates", "list").stdout

    base = ["run", "--plugins", "freeze_bottom", "--model", tiny_llama, "--dataset", chat_data]
    base += ["--template", "bracket_chat", "--max-steps", "3", "--logging-steps", "1", "--save-steps", "0"]
    # Its checks against the model's configuration, reported before anything loads, in one line.
    refused = lmflow(*base, "--freeze-bottom-layers", "5", "--output-dir", tmp_path / "refused")
    assert "--freeze-bottom-layers 5 exceeds the model's 2 layers" in one_line_error(refused)
    conflict = lmflow(*base, "--plugins", "freeze_bottom,lisa", "--output-dir", tmp_path / "conflict")
    assert "LISA chooses the trainable layers itself" in one_line_error(conflict)
    assert not (tmp_path / "refused").exists() and not (tmp_path / "conflict").exists()

    out = tmp_path / "out"
    trained = lmflow(*base, "--freeze-bottom-layers", "1", "--output-dir", out)
    assert trained.returncode == 0, trained.stderr
    assert "note: 9 frozen parameters listed in frozen_layers.json" in trained.stdout
    before = load_file(str(Path(tiny_llama) / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    assert torch.equal(
        before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"]
    )
    assert not torch.equal(
        before["model.layers.1.mlp.up_proj.weight"], after["model.layers.1.mlp.up_proj.weight"]
    )
    assert (
        json.loads((out / "config.json").read_text())["frozen_bottom_layers"] == 1
    )  # configure_model, saved
    report = json.loads((out / "frozen_layers.json").read_text())
    assert report["vocabulary"] == len(
        AutoTokenizer.from_pretrained(out)
    )  # the wrapper saw the core's tokenizer
    assert len(report["losses"]) == 3 and all(name.startswith("model.layers.0.") for name in report["frozen"])
    record = json.loads((out / "lmflow_run.json").read_text())
    assert record["template"] == "bracket_chat" and "frozen_layers.json" in record["outputs"]

    # Its command: the model loaded through the hooks, the output written atomically, never over a user's files.
    sizes = tmp_path / "sizes"
    made = lmflow("layer-sizes", out, "--output", sizes)
    assert made.returncode == 0, made.stderr
    assert "note: 2 layers, frozen at training: 1" in made.stdout
    assert set(json.loads((sizes / "sizes.json").read_text())) == {"0", "1"}
    assert "already" in one_line_error(lmflow("layer-sizes", out, "--output", sizes)).lower()
    assert lmflow("layer-sizes", out, "--output", sizes, "--overwrite").returncode == 0
    (sizes / "mine.txt").write_text("a user's file")
    one_line_error(lmflow("layer-sizes", out, "--output", sizes, "--overwrite"))
    assert (sizes / "mine.txt").read_text() == "a user's file"
    assert "--debug" in lmflow("layer-sizes", "--help").stdout
