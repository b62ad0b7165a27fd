"""Shared fixtures: tiny models built at test time, small datasets, and a CLI runner.

Only fixtures and pytest hooks live here; the plain helpers they use, which test modules import too, are in
helpers.py. Nothing reaches the network: HF_HUB_OFFLINE is set before transformers is imported, and every model
is built locally from a config with seeded random weights.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
from click.testing import CliRunner

# The helpers' asserts report their operands as the tests' own do.
pytest.register_assert_rewrite("helpers")

from helpers import conversations, save_tiny_model, write_json  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session gets its own tokenization cache."""
    monkeypatch.setenv("LMFLOW_CACHE", str(tmp_path_factory.getbasetemp() / "lmflow-cache"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer Llama with the demo tokenizer, saved as a normal model directory."""
    return save_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    """A 2-layer GPT-2 with the demo tokenizer."""
    return save_tiny_model("gpt2", tmp_path_factory.mktemp("tiny-gpt2"))


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
