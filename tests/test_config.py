"""The run configuration: layers, validation collected into one error, plugin options."""

from __future__ import annotations

import json
import types

import pytest

from lmflow_core import PluginOption, hookimpl
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
    assert "--seed must be an integer, got 'x'" in joined
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
    _, problems = build_config({"templates": 5}, plugin_names=lambda: ["lora", "templates"])
    assert problems == ["the options of plugin 'templates' must be a mapping (templates: {option: value})"]
    _, problems = build_config({"templates": 5})  # not known as a plugin's name
    assert problems == ["unknown option 'templates' (did you mean 'template'?)"]
    with pytest.raises(ConfigError, match=r"the options of plugin 'lisa' must be a mapping"):
        configure(lisa=3)  # the runner tells build_config the installed plugins
    _, problems = build_config({"max_steps": 2.5, "warmup": float("inf")})
    assert "--max-steps must be an integer, got 2.5" in problems
    assert "--warmup must be a finite number, got inf" in problems


# --------------------------------------------------------------------------------------------------------------
# One option schema: the core's options and the plugins' are one type, coerced and checked by one function
# --------------------------------------------------------------------------------------------------------------

SWITCH_PLUGIN = types.SimpleNamespace(
    declare_options=hookimpl(lambda: [PluginOption("switch", bool, False, "A plugin's boolean.")])
)
TRUE_SPELLINGS = ["true", "True", "YES", "yes", "on", "On", "1", 1, True]
FALSE_SPELLINGS = ["false", "FALSE", "no", "No", "off", "OFF", "0", 0, False]
REFUSED_SPELLINGS = ["maybe", "tru", "", "2", 2, 0.5, "enabled"]


def both_booleans(config) -> tuple[bool, bool]:
    return config.gradient_checkpointing, config.options_for("p").switch


@pytest.mark.parametrize(
    "value, expected", [(v, True) for v in TRUE_SPELLINGS] + [(v, False) for v in FALSE_SPELLINGS]
)
def test_core_and_plugin_booleans_accept_the_same_spellings_from_python_and_a_config_file(
    value, expected, tmp_path
):
    config, _ = configure(
        extra_plugins={"p": SWITCH_PLUGIN}, gradient_checkpointing=value, p={"switch": value}
    )
    assert both_booleans(config) == (expected, expected)
    file = tmp_path / "run.yaml"
    file.write_text(json.dumps({"gradient_checkpointing": value, "p": {"switch": value}}))  # JSON is YAML
    config, _ = configure(config_file=file, extra_plugins={"p": SWITCH_PLUGIN})
    assert both_booleans(config) == (expected, expected)


def test_yaml_words_for_booleans_mean_the_same_for_the_core_and_a_plugin(tmp_path):
    file = tmp_path / "run.yaml"
    for word, expected in [
        ("on", True),
        ("Off", False),
        ("yes", True),
        ("NO", False),
        ("1", True),
        ("0", False),
    ]:
        file.write_text(f"gradient_checkpointing: {word}\np:\n  switch: '{word}'\n")
        config, _ = configure(config_file=file, extra_plugins={"p": SWITCH_PLUGIN})
        assert both_booleans(config) == (expected, expected), word


@pytest.mark.parametrize("value", REFUSED_SPELLINGS)
def test_core_and_plugin_booleans_refuse_the_same_values_with_one_message(value, tmp_path):
    spellings = "true/false, yes/no, on/off, 1/0"
    expected = [
        f"--gradient-checkpointing must be a boolean ({spellings}), got {value!r}",
        f"option --p-switch (p.switch) must be a boolean ({spellings}), got {value!r}",
    ]
    with pytest.raises(ConfigError) as python:
        configure(extra_plugins={"p": SWITCH_PLUGIN}, gradient_checkpointing=value, p={"switch": value})
    file = tmp_path / "run.yaml"
    file.write_text(json.dumps({"gradient_checkpointing": value, "p": {"switch": value}}))
    with pytest.raises(ConfigError) as from_file:
        configure(config_file=file, extra_plugins={"p": SWITCH_PLUGIN})
    for error in (python.value, from_file.value):
        assert "\n" not in str(error)
        for problem in expected:
            assert problem in str(error)


def invoke(runner, *args):
    """``lmflow ARGS`` in-process (click's CliRunner)."""
    from lmflow_core.cli import cli

    return runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def captured_run(monkeypatch, tmp_path):
    """``lmflow run`` up to the configuration: the config the run would train with, nothing loaded."""
    from lmflow_core import train

    monkeypatch.chdir(tmp_path)
    seen = {}
    monkeypatch.setattr(train, "execute", lambda config, plugins, *a, **k: seen.update(config=config))
    return seen


@pytest.mark.parametrize(
    "flags, expected",
    [
        ([], (False, False)),
        (["--gradient-checkpointing", "--lisa-freeze-embeddings"], (True, True)),
        (["--no-gradient-checkpointing", "--no-lisa-freeze-embeddings"], (False, False)),
    ],
)
def test_core_and_plugin_boolean_flags_are_built_alike(runner, captured_run, tmp_path, flags, expected):
    result = invoke(runner, "run", "--plugins", "lisa", *flags)
    assert result.exit_code == 0, result.stderr
    config = captured_run["config"]
    assert (config.gradient_checkpointing, config.options_for("lisa").freeze_embeddings) == expected


@pytest.mark.parametrize("word, expected", [("on", True), ("OFF", False), ("Yes", True), ("0", False)])
def test_a_config_file_given_on_the_command_line_reads_booleans_alike_and_flags_win(
    runner, captured_run, tmp_path, word, expected
):
    file = tmp_path / "run.yaml"
    file.write_text(
        f"plugins: [lisa]\ngradient_checkpointing: '{word}'\nlisa:\n  freeze_embeddings: '{word}'\n"
    )
    assert invoke(runner, "run", "--config", file).exit_code == 0
    config = captured_run["config"]
    assert (config.gradient_checkpointing, config.options_for("lisa").freeze_embeddings) == (
        expected,
        expected,
    )
    flag = "--no-" if expected else "--"
    args = ["run", "--config", file, f"{flag}gradient-checkpointing", f"{flag}lisa-freeze-embeddings"]
    assert invoke(runner, *args).exit_code == 0
    config = captured_run["config"]
    assert (config.gradient_checkpointing, config.options_for("lisa").freeze_embeddings) == (
        not expected,
        not expected,
    )


def test_command_line_values_of_core_and_plugin_options_are_checked_by_one_function(runner, captured_run):
    result = invoke(runner, "run", "--plugins", "lisa", "--max-steps", "1e3", "--lisa-interval-steps", "1e3")
    assert result.exit_code == 0, result.stderr
    config = captured_run["config"]
    assert (config.max_steps, config.options_for("lisa").interval_steps) == (1000, 1000)
    result = invoke(runner, "run", "--plugins", "lisa", "--max-steps", "x", "--lisa-interval-steps", "0")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "2 problems" in result.stderr
    assert "--max-steps must be an integer, got 'x'" in result.stderr
    assert "option --lisa-interval-steps (lisa.interval_steps) must be at least 1, got 0" in result.stderr


def test_a_core_field_and_a_plugin_option_are_one_type_and_one_click_builder():
    from lmflow_core.clickopts import click_option
    from lmflow_core.config import core_options
    from lmflow_core.options import Option

    core = {option.name: option for option in core_options()}
    assert all(isinstance(option, Option) for option in core.values()) and PluginOption is Option
    assert core["gradient_checkpointing"].type is bool and core["block_size"].type is int
    assert core["block_size"].nullable and not core["epochs"].nullable
    core_flag = click_option(core["gradient_checkpointing"])
    plugin_flag = click_option(PluginOption("switch", bool, False, "A plugin's boolean."), "p")
    assert core_flag.opts == ["--gradient-checkpointing"] and core_flag.secondary_opts == [
        "--no-gradient-checkpointing"
    ]
    assert plugin_flag.opts == ["--p-switch"] and plugin_flag.secondary_opts == ["--no-p-switch"]
    assert (core_flag.lmflow_group, plugin_flag.lmflow_group) == ("Training", "Plugin: p")
