"""Shared fixtures: tiny models built at test time, small datasets, and a CLI runner.

Nothing reaches the network: HF_HUB_OFFLINE is set before transformers is imported, and every model is built
locally from a config with seeded random weights.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
from click.testing import CliRunner

REPO = Path(__file__).resolve().parent.parent
# Reference data beside the project (../shared/reference), or where LMFLOW_SHARED_REFERENCE points.
SHARED = Path(os.environ.get("LMFLOW_SHARED_REFERENCE") or REPO.parent / "shared" / "reference")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session gets its own tokenization cache."""
    monkeypatch.setenv("LMFLOW_CACHE", str(tmp_path_factory.getbasetemp() / "lmflow-cache"))


def _save_tiny(model_type: str, out: Path, **overrides) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lmflow_core.demo import demo_model_dir

    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir())
    common = {
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.eos_token_id,
    }
    shapes = {
        "llama": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
        },
        "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 256},
    }[model_type]
    config = AutoConfig.for_model(model_type, **{**common, **shapes, **overrides})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer Llama with the demo tokenizer, saved as a normal model directory."""
    return _save_tiny("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    """A 2-layer GPT-2 with the demo tokenizer."""
    return _save_tiny("gpt2", tmp_path_factory.mktemp("tiny-gpt2"))


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def conversations(n: int = 24) -> list[dict]:
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


@pytest.fixture
def chat_data(tmp_path) -> Path:
    """A small LMFlow conversation dataset."""
    return write_json(tmp_path / "chat.json", {"type": "conversation", "instances": conversations()})


@pytest.fixture
def text_data(tmp_path) -> Path:
    return write_json(
        tmp_path / "text.json",
        {
            "type": "text_only",
            "instances": [{"text": f"Sentence number {i} is about the sea."} for i in range(40)],
        },
    )


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def invoke(runner: CliRunner, *args: str):
    """Run the CLI in-process; returns click's Result (exit_code, stdout, stderr)."""
    from lmflow_core.cli import cli

    return runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def fast_run_args(tiny_llama, chat_data, tmp_path) -> list[str]:
    """CLI arguments for a few-step run of the tiny Llama on conversations."""
    return [
        "run",
        "--model",
        tiny_llama,
        "--dataset",
        chat_data,
        "--template",
        "chatml",
        "--output-dir",
        tmp_path / "out",
        "--max-steps",
        "4",
        "--batch-size",
        "4",
        "--logging-steps",
        "1",
        "--learning-rate",
        "1e-3",
        "--save-steps",
        "2",
    ]


def copy_tree(src: Path, dst: Path) -> Path:
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
    """Add a plugin's commands (``register_commands``) to the CLI object ``invoke`` runs; undo afterwards."""
    from lmflow_core.cli import add_debug_option, cli

    added = name not in cli.commands
    if added:
        plugin.register_commands(cli)
        add_debug_option(cli.commands[name])  # as the core does for every plugin's commands
    yield
    if added:
        cli.commands.pop(name, None)


@pytest.fixture
def model_loads(monkeypatch):
    """Records every model load, so tests can prove a failure came before it."""
    from transformers import AutoModelForCausalLM

    calls = []
    for name in ("from_pretrained", "from_config"):
        real = getattr(AutoModelForCausalLM, name).__func__

        def spy(cls, *args, _real=real, **kwargs):
            calls.append(args)
            return _real(cls, *args, **kwargs)

        monkeypatch.setattr(AutoModelForCausalLM, name, classmethod(spy))
    return calls


@pytest.fixture(scope="session")
def chat_model(tiny_llama, tmp_path_factory) -> Path:
    """The tiny Llama fine-tuned by lmflow for 3 steps (so it carries its template, chatml); read-only."""
    from lmflow_core import run

    tmp = tmp_path_factory.mktemp("chat-model")
    data = write_json(tmp / "c.json", {"type": "conversation", "instances": conversations(16)})
    run(
        model=str(tiny_llama),
        dataset=str(data),
        template="chatml",
        output_dir=str(tmp / "model"),
        max_steps=3,
        save_steps=0,
        learning_rate=1e-3,
    )
    return tmp / "model"
