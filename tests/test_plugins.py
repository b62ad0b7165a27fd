"""Plugin discovery, selection, validation, conflicts, ordering, tracing and `lmflow plugins`."""

from __future__ import annotations

import json
import types

import pytest
from helpers import invoke

from lmflow_core import PluginOption, hookimpl
from lmflow_core.errors import PluginError
from lmflow_core.options import parse_plugin_names
from lmflow_core.plugins import (
    discover_plugins,
    fold,
    hook_names,
    select_plugins,
)


def make_plugin(name: str, **hooks) -> types.SimpleNamespace:
    """A plugin object whose attributes are marked hook implementations."""
    return types.SimpleNamespace(__name__=name, **{k: hookimpl(v) for k, v in hooks.items()})


def test_builtin_plugins_are_found_through_the_entry_point_group():
    plugins = discover_plugins()
    assert "templates" in plugins
    info = plugins["templates"]
    assert info.builtin and info.source == "built-in"
    assert info.module == "lmflow_plugins.templates"
    assert info.distribution == "lmflow"


def test_selecting_a_builtin_plugin_registers_its_module():
    run_plugins = select_plugins(["templates"])
    assert run_plugins.names == ["templates"]
    assert run_plugins.plugin("templates").__name__ == "lmflow_plugins.templates"
    assert run_plugins.versions()[0]["source"] == "built-in"


def test_unknown_plugin_lists_the_available_ones():
    with pytest.raises(PluginError) as err:
        select_plugins(["templatez"])
    message = str(err.value)
    assert "unknown plugin 'templatez'" in message
    assert "did you mean 'templates'" in message
    assert "available: " in message and "speculative, templates" in message


def test_misspelled_hook_is_an_error_naming_plugin_and_hook():
    bad = make_plugin("bad", on_stepp=lambda config, step: None)
    with pytest.raises(
        PluginError, match=r"plugin 'bad' implements unknown hook 'on_stepp' \(did you mean 'on_step'\?\)"
    ):
        select_plugins([], extra=[("bad", bad)])


def test_hook_with_an_argument_the_spec_lacks_is_an_error():
    bad = make_plugin("bad", on_step=lambda config, step, nonsense: None)
    with pytest.raises(PluginError, match="plugin 'bad' implements a hook wrongly"):
        select_plugins([], extra=[("bad", bad)])


def test_plugin_import_failure_names_the_plugin(monkeypatch):
    from lmflow_core import plugins as plugins_module

    broken = plugins_module.PluginInfo("broken", "no_such_module_xyz", "some-dist", "1.0")
    monkeypatch.setattr(plugins_module, "discover_plugins", lambda: {"broken": broken})
    with pytest.raises(
        PluginError,
        match="plugin 'broken' .*installed package some-dist.* failed to import: ModuleNotFoundError",
    ):
        select_plugins(["broken"])


def test_declared_conflict_fails_naming_both_plugins():
    a = make_plugin("a", declare_conflicts=lambda: {"b": "both freeze layers"})
    b = make_plugin("b")
    with pytest.raises(PluginError, match="plugins 'a' and 'b' cannot be combined: both freeze layers"):
        select_plugins([], extra=[("a", a), ("b", b)])
    # Either plugin alone is fine.
    select_plugins([], extra=[("a", a)])


def test_two_plugins_declaring_the_same_flag_fail():
    a = make_plugin("a", declare_options=lambda: [PluginOption("x", int, 1, flag="--shared")])
    b = make_plugin("b", declare_options=lambda: [PluginOption("y", int, 1, flag="--shared")])
    with pytest.raises(PluginError, match="both declare the flag --shared"):
        select_plugins([], extra=[("a", a), ("b", b)])


def test_hooks_run_in_the_order_plugins_are_named_with_core_last():
    calls = []
    first = make_plugin("first", validate_config=lambda: calls.append("first"))
    second = make_plugin("second", validate_config=lambda: calls.append("second"))
    run_plugins = select_plugins([], extra=[("first", first), ("second", second)])
    run_plugins.hook.validate_config(config=None, model_config=None)
    assert calls == ["first", "second"]
    # first-result hooks ask the named plugins in order, the core's default last
    assert [i.plugin_name for i in reversed(run_plugins.hook.decode.get_hookimpls())] == ["core"]
    picker = make_plugin("picker", decode=lambda: "from picker")
    other = make_plugin("other", decode=lambda: "from other")
    run_plugins = select_plugins([], extra=[("picker", picker), ("other", other)])
    assert (
        run_plugins.hook.decode(
            config=None, model=None, tokenizer=None, input_ids=None, options=None, streamer=None, inputs={}
        )
        == "from picker"
    )


def test_fold_passes_each_result_to_the_next_plugin_and_none_keeps_the_value():
    add = make_plugin("add", prepare_dataset=lambda dataset: dataset + ["add"])
    keep = make_plugin("keep", prepare_dataset=lambda dataset: None)
    double = make_plugin("double", prepare_dataset=lambda dataset: dataset * 2)
    run_plugins = select_plugins([], extra=[("add", add), ("keep", keep), ("double", double)])
    out = fold(
        run_plugins.hook.prepare_dataset, "dataset", config=None, dataset=["x"], tokenizer=None, split="train"
    )
    assert out == ["x", "add", "x", "add"]


def test_tracing_prints_every_hook_call(monkeypatch, capsys):
    monkeypatch.setenv("LMFLOW_TRACE_HOOKS", "1")
    plugin = make_plugin("p", validate_config=lambda config: [])
    run_plugins = select_plugins([], extra=[("p", plugin)])
    run_plugins.hook.validate_config(config=None, model_config=None)
    err = capsys.readouterr().err
    assert "[lmflow hook] validate_config -> p" in err
    assert "[lmflow hook] validate_config returned list" in err


def test_parse_plugin_names_keeps_order_and_drops_blanks_and_repeats():
    assert parse_plugin_names("lisa, flash_attn,,lisa") == ["lisa", "flash_attn"]
    assert parse_plugin_names(["a,b", "c"]) == ["a", "b", "c"]
    assert parse_plugin_names(None) == []


def test_every_hook_has_a_docstring_that_states_when_arguments_returns_and_combine():
    import inspect

    import lmflow_core.hookspecs as specs

    for name in hook_names():
        spec = getattr(specs, name)
        doc = spec.__doc__ or ""
        assert "When:" in doc, name
        assert "Combine:" in doc, name
        assert "Returns" in doc or "return values are ignored" in doc.lower(), name
        arguments = list(inspect.signature(spec).parameters)
        if arguments:
            section = doc.split("Args:")[1].split("Returns")[0].split("Combine:")[0] if "Args:" in doc else ""
            undocumented = [a for a in arguments if f"\n        {a}:" not in section]
            assert not undocumented, f"{name}: arguments without an Args entry: {undocumented}"


def test_plugins_command_lists_name_version_source_and_hooks(runner):
    result = invoke(runner, "plugins")
    assert result.exit_code == 0
    assert "templates 0.1.0 (built-in)" in result.output
    assert "hooks: register_templates" in result.output

    rows = json.loads(invoke(runner, "plugins", "--json").output)
    row = next(r for r in rows if r["name"] == "templates")
    assert row == {**row, "version": "0.1.0", "source": "built-in", "hooks": ["register_templates"]}


@pytest.mark.parametrize("hook", ["prepare_model", "wrap_optimizer", "model_init_kwargs", "evaluate"])
def test_a_wrapper_on_a_hook_the_core_calls_one_by_one_is_refused_at_registration(hook):
    """pluggy's wrappers do not run around fold/per-plugin hooks: a wrapper would hand back a generator."""
    with pytest.raises(PluginError) as caught:
        select_plugins([], extra=[("wrapping", _with_spec_arguments(hook))])
    assert f"plugin 'wrapping' implements {hook} as a wrapper" in str(caught.value)
    assert "Drop wrapper=True" in str(caught.value)


def _with_spec_arguments(hook: str) -> object:
    """A plugin whose ``hook`` is a wrapper taking the hook's first argument."""
    from lmflow_core import hookspecs

    first = [a for a in hookspecs.__dict__[hook].__code__.co_varnames][0]
    namespace: dict = {}
    exec(f"def {hook}({first}):\n    return (yield)\n", namespace)
    return types.SimpleNamespace(__name__="wrapping", **{hook: hookimpl(wrapper=True)(namespace[hook])})


def test_a_wrapper_on_a_first_result_hook_wraps_the_core_default(tiny_llama):
    """E.g. a plugin adjusting the tokenizer the default loader returns, without importing that loader."""

    class Wrapping:
        @hookimpl(wrapper=True)
        def load_tokenizer(self, config):
            tokenizer = yield
            tokenizer.lmflow_wrapped = True
            return tokenizer

    from lmflow_core import RunConfig

    run_plugins = select_plugins([], extra=[("wrapping", Wrapping())])
    tokenizer = run_plugins.hook.load_tokenizer(config=RunConfig(model=str(tiny_llama)))
    assert tokenizer.lmflow_wrapped and tokenizer.vocab_size > 0


def test_fold_and_call_each_are_only_for_their_hooks():
    run_plugins = select_plugins([])
    with pytest.raises(RuntimeError, match="not a fold hook"):
        fold(run_plugins.hook.load_model, "model", config=None, model_config=None, init_kwargs={})
    from lmflow_core.plugins import call_each

    with pytest.raises(RuntimeError, match="not a per-plugin hook"):
        call_each(run_plugins.hook.prepare_model, config=None, model=None, tokenizer=None)
