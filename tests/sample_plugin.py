"""A plugin used by the tests: one option of each kind and a hook that records them."""

from lmflow_core import PluginOption, hookimpl

SEEN: dict = {}


@hookimpl
def declare_options():
    return [
        PluginOption("alpha", float, 0.5, "A number between 0 and 1.", min=0.0, max=1.0),
        PluginOption("mode", str, "fast", "How to go.", choices=("fast", "slow")),
        PluginOption("enabled", bool, True, "Switch it off."),
        PluginOption("draft_model", str, None, "A flag without the plugin prefix.", flag="--draft-model"),
    ]


@hookimpl
def validate_config(config):
    SEEN.clear()
    SEEN.update(vars(config.options_for("sample")))
    return []
