"""The run configuration: layers, validation collected into one error, plugin options."""

from __future__ import annotations

import pytest

from lmflow_core import PluginOption
from lmflow_core.config import RunConfig, build_config, load_config_file, resolve_plugin_options
from lmflow_core.demo import demo_settings
from lmflow_core.errors import ConfigError
from lmflow_core.train import configure


def test_later_layers_win_and_values_are_coerced():
    config, problems = build_config({"epochs": 1, "seed": 1}, {"epochs": "2.5", "bf16": "true"})
    assert problems == []
    assert config.epochs == 2.5 and config.seed == 1 and config.bf16 is True


def test_every_problem_is_reported():
    _, problems = build_config(
        {"batch_size": 0, "epochs": -1, "lr_scheduler": "zigzag", "seed": "x", "learning_rat": 1}
    )
    joined = " | ".join(problems)
    assert "--batch-size must be at least 1, got 0" in joined
    assert "--epochs must be greater than 0" in joined
    assert "--lr-scheduler must be one of linear, cosine" in joined
    assert "--seed must be of type int, got 'x'" in joined
    assert "unknown option 'learning_rat' (did you mean 'learning_rate'?)" in joined
    error = ConfigError.collect(problems)
    assert str(error).startswith("5 problems in the run configuration: (1)")


def test_demo_settings_apply_only_without_model_and_dataset(tmp_path):
    demo, _ = configure()
    assert demo.is_demo and demo.learning_rate == demo_settings()["learning_rate"]
    assert demo.template == "chatml" and demo.dataset.endswith("train.json")
    overridden, _ = configure(learning_rate=0.01)
    assert overridden.learning_rate == 0.01 and overridden.epochs == demo_settings()["epochs"]
    data = tmp_path / "d.json"
    own, _ = configure(dataset=str(data))
    assert own.learning_rate == RunConfig().learning_rate and own.eval_dataset is None


def test_a_run_config_object_is_taken_as_given():
    config, _ = configure(RunConfig(model="m", dataset="d.json", max_steps=5))
    assert (config.model, config.dataset, config.max_steps) == ("m", "d.json", 5)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1,\n")
    with pytest.raises(ConfigError, match=r"is not valid YAML at line"):
        load_config_file(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config_file(bad)


def test_plugin_options_get_defaults_types_and_checks():
    declared = {
        "p": [PluginOption("steps", int, 20, min=1), PluginOption("name", str, "x", choices=("x", "y"))]
    }
    config = RunConfig(plugin_options={"p": {"steps": "7"}})
    assert resolve_plugin_options(config, declared) == []
    assert config.plugin_options == {"p": {"steps": 7, "name": "x"}}
    assert config.options_for("p").steps == 7

    config = RunConfig(plugin_options={"p": {"steps": 0, "nmae": "y"}, "q": {"a": 1}})
    problems = resolve_plugin_options(config, declared)
    assert "plugin 'p' has no option 'nmae' (did you mean 'name'?)" in problems
    assert "option --p-steps (p.steps) must be at least 1, got 0" in problems
    assert any("options given for plugin 'q', which is not selected" in p for p in problems)


def test_to_dict_round_trips_through_build_config():
    original = RunConfig(model="m", dataset="d", epochs=2, plugins=[], sample_prompts=["hi"])
    original.plugin_options = {"p": {"a": 1}}
    rebuilt, problems = build_config(original.to_dict())
    assert problems == [] and rebuilt.to_dict() == original.to_dict()


def test_yaml_shapes_users_write_are_understood_or_named():
    config, problems = build_config({"resume": True, "max_steps": "1e3", "learning_rate": "3e-4"})
    assert problems == [] and config.resume == "latest" and config.max_steps == 1000
    _, problems = build_config({"plugins": 5})
    assert problems == ['plugins must be given as names ("a,b" or a list of strings), got 5']
    _, problems = build_config({"templates": 5})
    assert problems == ["the options of plugin 'templates' must be a mapping (templates: {option: value})"]
    _, problems = build_config({"max_steps": 2.5, "warmup": float("inf")})
    assert "--max-steps must be of type int, got 2.5" in problems
    assert "--warmup must be a finite number, got inf" in problems
