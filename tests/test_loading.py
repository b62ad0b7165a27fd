"""One loading path: every command that loads a model (run, generate, chat, serve, evaluate, merge-lora) calls
load_tokenizer, configure_model, model_init_kwargs and load_model, in that order, and uses what they return.

The plugin in tests/loading_recorder.py loads tokenizer and model itself and records each call; it is installed
for the CLI the way tests/test_run.py installs its sample plugin.
"""

from __future__ import annotations

import json
import types

import loading_recorder as recorder
import pytest
import torch
from helpers import assert_one_line_error, invoke, plugin_commands
from transformers import AutoModelForCausalLM

from lmflow_core import hookimpl
from lmflow_core import plugins as plugins_module
from lmflow_core.cli import cli
from lmflow_core.inference import open_session
from lmflow_core.launch import free_port

LOADING_ORDER = ["configure_model", "load_tokenizer", "model_init_kwargs", "load_model"]


@pytest.fixture
def installed_recorder(monkeypatch):
    """tests/loading_recorder.py as an installed plugin named 'recorder', its records cleared."""
    real = plugins_module.discover_plugins

    def discover():
        found = real()
        found["recorder"] = plugins_module.PluginInfo(
            "recorder", "loading_recorder", "lmflow-loading-tests", "1.0"
        )
        return found

    monkeypatch.setattr(plugins_module, "discover_plugins", discover)
    recorder.reset()
    yield recorder
    recorder.reset()


@pytest.fixture
def merge_cli():
    from lmflow_plugins import lora

    yield from plugin_commands(lora, "merge-lora")


@pytest.fixture(scope="module")
def adapter(chat_model, tmp_path_factory):
    """A LoRA adapter of the tiny chat model (random, non-zero updates), and the merged model's logits."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(chat_model),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    directory = tmp_path_factory.mktemp("adapter") / "adapter"
    peft_model.save_pretrained(directory)
    (directory / "lmflow_run.json").write_text(json.dumps({"template": "chatml"}))
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        merged_logits = peft_model.merge_and_unload()(ids).logits
    return directory, ids, merged_logits


def test_open_session_loads_through_a_plugin_object(chat_model):
    calls = []

    class Loader:
        @hookimpl
        def load_tokenizer(self, config):
            calls.append("load_tokenizer")

        @hookimpl
        def configure_model(self, config, model_config):
            calls.append("configure_model")

        @hookimpl
        def model_init_kwargs(self, config):
            calls.append("model_init_kwargs")
            return {"attn_implementation": "eager"}

        @hookimpl
        def load_model(self, config, model_config, init_kwargs):
            calls.append("load_model")
            self.model = AutoModelForCausalLM.from_pretrained(
                config.model, config=model_config, **init_kwargs
            )
            return self.model

    loader = Loader()
    session = open_session(str(chat_model), extra_plugins={"loader": loader})
    assert calls == LOADING_ORDER
    assert session.model is loader.model and not session.model.training
    assert session.model.config._attn_implementation == "eager"


def test_run_loads_through_the_plugin(runner, installed_recorder, fast_run_args, tmp_path):
    args = [*fast_run_args[:-6], "--max-steps", "1", "--save-steps", "0"]
    result = invoke(runner, *args, "--plugins", "recorder")
    assert result.exit_code == 0, result.output + result.stderr
    assert recorder.hook_names() == LOADING_ORDER and recorder.USED == [True]
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["recorder_marker"] == recorder.MARKER


def test_generate_chat_and_evaluate_load_through_the_plugin(
    runner, installed_recorder, chat_model, chat_data, tmp_path
):
    commands = {
        "generate": ["generate", chat_model, "--prompt", "Hello", "--max-new-tokens", "3", "--no-stream"],
        "chat": ["chat", chat_model, "--max-new-tokens", "3"],
        "evaluate": ["evaluate", chat_model, "--dataset", chat_data, "--max-samples", "2"],
    }
    commands["evaluate"] += ["--output", tmp_path / "eval.json"]
    for name, args in commands.items():
        recorder.reset()
        result = runner.invoke(  # chat reads one message from its (piped) input
            cli,
            [str(a) for a in (*args, "--plugins", "recorder")],
            input="Hi!\n" if name == "chat" else None,
            catch_exceptions=False,
        )
        assert result.exit_code == 0, (name, result.output, result.stderr)
        assert recorder.hook_names() == LOADING_ORDER, name
        assert {model for _, model in recorder.CALLS} == {str(chat_model)}
        assert recorder.USED == [True], name  # prepare_inference saw the plugin's model and tokenizer
    assert json.loads((tmp_path / "eval.json").read_text())["metrics"]["eval_samples"] == 2


def test_serve_loads_through_the_plugin_and_answers_with_its_model(
    runner, installed_recorder, chat_model, monkeypatch
):
    from fastapi.testclient import TestClient

    import lmflow_core.serve as serve

    served = []
    monkeypatch.setattr(serve, "run_server", lambda session, settings: served.append((session, settings)))
    result = invoke(runner, "serve", chat_model, "--port", free_port(), "--plugins", "recorder", "--no-ui")
    assert result.exit_code == 0, result.output + result.stderr
    assert recorder.hook_names() == LOADING_ORDER and recorder.USED == [True]
    session, settings = served[0]
    assert session.model is recorder.LOADED[0]

    server = serve.Server(session, settings)
    try:
        with TestClient(serve.create_app(session, settings, server)) as client:
            response = client.post(
                "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 4, "temperature": 0},
            )
    finally:
        server.engine.close()
    assert response.status_code == 200, response.text
    expected = session.chat([{"role": "user", "content": "Hi!"}], serve.GenerationOptions(max_new_tokens=4))
    assert response.json()["choices"][0]["message"]["content"] == expected.text


def test_an_adapter_loads_its_base_through_the_plugin(installed_recorder, adapter, chat_model):
    directory, ids, merged_logits = adapter
    session = open_session(str(directory), plugins=["recorder"])
    # The hooks load the base the adapter names; the adapter goes on top of what load_model returned.
    assert recorder.CALLS == [(name, str(chat_model)) for name in LOADING_ORDER]
    assert type(session.model).__name__ == "PeftModelForCausalLM" and recorder.USED == [True]
    assert session.model.get_base_model() is recorder.LOADED[0]
    assert session.config.model == str(directory) and session.template_name == "chatml"
    with torch.no_grad():
        assert torch.allclose(session.model(ids).logits, merged_logits, atol=1e-4)


def test_merge_lora_loads_its_base_through_the_plugin(
    runner, merge_cli, installed_recorder, adapter, chat_model, tmp_path
):
    directory, ids, merged_logits = adapter
    out = tmp_path / "merged"
    result = invoke(runner, "merge-lora", "--adapter", directory, "--output", out, "--plugins", "recorder")
    assert result.exit_code == 0, result.output + result.stderr
    base = json.loads((directory / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorder.CALLS == [(name, base) for name in LOADING_ORDER]
    assert json.loads((out / "config.json").read_text())["recorder_marker"] == recorder.MARKER
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        assert (merged(ids).logits - merged_logits).abs().max() < 1e-4


def test_merge_lora_refuses_an_unknown_plugin(runner, merge_cli, adapter, tmp_path):
    result = invoke(
        runner, "merge-lora", "--adapter", adapter[0], "--output", tmp_path / "m", "--plugins", "nope"
    )
    assert_one_line_error(result, "nope")
    assert not (tmp_path / "m").exists()


def test_flash_attn_chooses_the_attention_for_inference_too(chat_model, capsys):
    from lmflow_plugins import flash_attn

    if flash_attn.detect_machine().cuda_capability is not None:
        pytest.skip("checks the CPU fallback")
    session = open_session(str(chat_model), plugins=["flash_attn"], device="cpu")
    assert session.model.config._attn_implementation == "sdpa"
    captured = capsys.readouterr()
    notes = [line for line in captured.err.splitlines() if "flash_attn:" in line]
    assert (
        len(notes) == 1
        and notes[0].startswith("note: flash_attn: ")
        and notes[0].endswith("using PyTorch SDPA")
    )
    assert "flash_attn" not in captured.out  # stdout stays for what the command prints


def test_a_plugin_load_model_that_quantizes_would_reach_the_adapters_base(adapter, chat_model):
    """A loader that changes the weights (here: halves the LM head, standing in for a quantizer) changes what the
    adapter directory generates with: the plugin's model really is the base."""
    directory, ids, merged_logits = adapter

    def load_model(config, model_config, init_kwargs):
        model = AutoModelForCausalLM.from_pretrained(config.model, config=model_config, **init_kwargs)
        with torch.no_grad():
            model.lm_head.weight.mul_(0.5)
        return model

    plugin = types.SimpleNamespace(load_model=hookimpl(load_model))
    session = open_session(str(directory), extra_plugins={"halving": plugin}, device="cpu")
    with torch.no_grad():
        logits = session.model(ids).logits
    assert torch.allclose(logits, merged_logits * 0.5, atol=1e-4)
