"""A newcomer's first try of each training plugin works on the embedded demo, with no other flag.

(``--max-steps`` and ``--output-dir`` are added only to keep the tests short and apart.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import assert_one_line_error, invoke
from transformers import AutoModelForCausalLM

from lmflow_core import run

SHORT = ["--max-steps", "2"]


@pytest.fixture(scope="module")
def demo_adapter(tmp_path_factory) -> Path:
    """`lmflow run --plugins lora` on the demo."""
    from click.testing import CliRunner

    out = tmp_path_factory.mktemp("demo-lora") / "out"
    result = invoke(CliRunner(), "run", "--plugins", "lora", *SHORT, "--output-dir", out)
    assert result.exit_code == 0, result.output + result.stderr
    return out


def test_lora_on_the_demo_writes_an_adapter_on_the_demos_saved_base(demo_adapter):
    config = json.loads((demo_adapter / "adapter_config.json").read_text())
    base = Path(config["base_model_name_or_path"])
    assert base.is_dir() and (base / "model.safetensors").is_file() and base.parent.name == "demo"
    # The saved base is the seeded initialisation a demo run starts from: set_seed(42) + from_config.
    from transformers import AutoConfig, set_seed

    from lmflow_core.demo import demo_model_dir

    set_seed(42)
    fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(demo_model_dir()))
    saved = AutoModelForCausalLM.from_pretrained(base)
    for (name, a), (_, b) in zip(fresh.state_dict().items(), saved.state_dict().items()):
        assert torch.equal(a, b), name


def test_generate_chat_merge_and_the_server_loader_work_on_the_demo_adapter(runner, demo_adapter, tmp_path):
    from lmflow_plugins.lora import merge_lora

    from lmflow_core.cli import cli
    from lmflow_core.inference import open_session

    prompt = "What is the opposite of hot?"
    generated = invoke(runner, "generate", demo_adapter, "--prompt", prompt, "--max-new-tokens", "6")
    assert generated.exit_code == 0, generated.stderr
    chat = runner.invoke(
        cli, ["chat", str(demo_adapter), "--max-new-tokens", "6"], input=f"{prompt}\n/exit\n"
    )
    assert chat.exit_code == 0, chat.output
    merged = tmp_path / "merged"
    merge_lora(None, demo_adapter, merged)  # `lmflow merge-lora --adapter DIR --output MERGED`
    session = open_session(str(demo_adapter))  # what `lmflow serve` loads
    ids = session.tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = session.model(ids).logits
        actual = AutoModelForCausalLM.from_pretrained(merged)(ids).logits
    assert torch.allclose(expected, actual, atol=1e-4)


def test_a_demo_adapter_whose_cached_base_was_cleared_still_loads(runner, demo_adapter):
    base = Path(json.loads((demo_adapter / "adapter_config.json").read_text())["base_model_name_or_path"])
    before = (base / "model.safetensors").read_bytes()
    shutil.rmtree(base)
    result = invoke(runner, "generate", demo_adapter, "--prompt", "Hi", "--max-new-tokens", "2")
    assert result.exit_code == 0, result.stderr
    assert (base / "model.safetensors").read_bytes() == before  # rebuilt, identical


@pytest.mark.parametrize(
    "settings",
    [{"plugins": ["lisa"]}, {"plugins": ["rope_scaling"]}, {"plugins": ["flash_attn"]}, {"packing": True}],
    ids=["lisa", "rope_scaling", "flash_attn", "packing"],
)
def test_each_training_plugin_runs_on_the_demo_without_other_settings(settings, tmp_path):
    out = tmp_path / "out"
    result = run(**settings, max_steps=2, output_dir=str(out))
    assert result.global_step == 2
    assert AutoModelForCausalLM.from_pretrained(out) is not None
    if settings.get("plugins") == ["rope_scaling"]:
        rope = json.loads((out / "config.json").read_text())["rope_parameters"]
        assert rope["rope_type"] == "linear" and rope["factor"] == 2.0  # the demo's 512 tokens -> 1024


def test_vocab_extension_on_the_demo_says_what_it_needs(runner, tmp_path):
    result = invoke(runner, "run", "--plugins", "vocab_extension", "--output-dir", tmp_path / "out")
    assert_one_line_error(result, "--tokenizer DIR", "lmflow vocab extend")
    assert not (tmp_path / "out").exists()
