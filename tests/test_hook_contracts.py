"""The hooks' contracts: what each receives, in every command that calls it."""

from __future__ import annotations

import types

import pytest
from helpers import conversations, write_json

from lmflow_core import ConfigError, PluginOption, hookimpl, run
from lmflow_core.inference import open_session
from lmflow_core.train import configure, execute


def loaded_nothing(monkeypatch) -> list:
    """Record every attempt to load weights (none is expected before the checks)."""
    from transformers import AutoModelForCausalLM

    loads: list = []
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loads.append(a))
    return loads


def problem_plugin(problem: str):
    return types.SimpleNamespace(validate_config=hookimpl(lambda config: [problem]))


def test_lisa_and_lora_problems_are_reported_with_every_other_plugins_before_any_weight_loads(
    tiny_llama, chat_data, tmp_path, monkeypatch
):
    loads = loaded_nothing(monkeypatch)
    common = dict(model=str(tiny_llama), dataset=str(chat_data), template="chatml")
    with pytest.raises(ConfigError) as lisa:
        run(
            **common,
            output_dir=str(tmp_path / "a"),
            plugins=["lisa"],
            lisa={"activated_layers": 99},
            extra_plugins={"other": problem_plugin("the other plugin's problem")},
        )
    message = lisa.value.one_line()
    assert "2 problems" in message and "the other plugin's problem" in message
    assert "--lisa-activated-layers 99 exceeds the model's" in message
    with pytest.raises(ConfigError) as lora:
        run(
            **common,
            output_dir=str(tmp_path / "b"),
            plugins=["lora"],
            lora={"target_modules": "q_proj,not_a_module"},
            extra_plugins={"other": problem_plugin("the other plugin's problem")},
        )
    message = lora.value.one_line()
    assert "2 problems" in message and "the other plugin's problem" in message
    assert "'not_a_module' matches no module of the model" in message
    assert loads == [] and not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_validate_config_receives_the_model_config_in_runs_and_inference(tiny_llama, chat_data, tmp_path):
    seen = []

    def validate_config(config, model_config):
        seen.append((config.model, model_config.model_type, model_config.num_hidden_layers))

    plugin = types.SimpleNamespace(validate_config=hookimpl(validate_config))
    config, plugins = configure(
        model=str(tiny_llama),
        dataset=str(chat_data),
        template="chatml",
        output_dir=str(tmp_path / "o"),
        max_steps=1,
        save_steps=0,
        extra_plugins={"p": plugin},
    )
    assert seen == []  # configure() alone reads no model
    execute(config, plugins)
    assert seen == [(str(tiny_llama), "llama", 2)]
    open_session(str(tmp_path / "o"), extra_plugins={"p": plugin})
    assert seen[1] == (str(tmp_path / "o"), "llama", 2)


class OptionSeer:
    """A plugin with an option that its data and formatting hooks read from the config they receive."""

    def __init__(self):
        self.seen: list[tuple[str, str]] = []

    @hookimpl
    def declare_options(self):
        return [PluginOption("marker", str, "default", "A marker the hooks report.")]

    @hookimpl
    def normalize_record(self, config, record, declared_type, where):
        self.seen.append(("normalize_record", config.options_for("seer").marker))

    @hookimpl
    def format_conversation(self, config, template, conversation, add_generation_prompt, tokenizer):
        self.seen.append(("format_conversation", config.options_for("seer").marker))


def test_format_conversation_and_normalize_record_receive_the_config_in_runs_and_inference(
    tiny_llama, tmp_path
):
    data = write_json(tmp_path / "c.json", {"type": "conversation", "instances": conversations(4)})
    seer = OptionSeer()
    run(
        model=str(tiny_llama),
        dataset=str(data),
        eval_dataset=str(data),
        template="chatml",
        output_dir=str(tmp_path / "o"),
        max_steps=1,
        save_steps=0,
        sample_prompts=["What is 1 plus 1?"],
        extra_plugins={"seer": seer},
        seer={"marker": "training"},
    )
    assert {name for name, _ in seer.seen} == {"normalize_record", "format_conversation"}
    assert {marker for _, marker in seer.seen} == {"training"}
    seer.seen.clear()
    session = open_session(
        str(tmp_path / "o"), extra_plugins={"seer": seer}, plugin_options={"seer": {"marker": "chatting"}}
    )
    session.chat([{"role": "user", "content": "Hi"}])
    assert seer.seen == [("format_conversation", "chatting")]
