"""The click pieces every ``lmflow`` command shares: ``--debug``, and the command class that adds the flags of
the plugins named by ``--plugins``.

The commands themselves live in :mod:`lmflow_core.cli` and :mod:`lmflow_core.cli_inference`; both import from
here and neither imports the other's commands.
"""

from __future__ import annotations

from typing import Any

import click

from .config import load_config_file
from .errors import LmflowError
from .plugins import parse_plugin_names

DEBUG_KEY = "lmflow.debug"
PLUGIN_PARAMS_KEY = "lmflow.plugin_params"
RAW_ARGS_KEY = "lmflow.raw_args"


def set_debug(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    """Callback of ``--debug``: failures show their traceback."""
    if value:
        ctx.meta[DEBUG_KEY] = True
    return value


debug_option = click.option(
    "--debug",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=set_debug,
    help="Show the full traceback when something fails.",
)


def plugin_click_options(args: list[str]) -> list[click.Option]:
    """Flags of the plugins named on the command line or in the --config file."""
    from .plugins import select_plugins

    # As for every option, the last --plugins on the command line wins over the config file's plugins.
    given = _scan_values(args, "--plugins")
    config_files = _scan_values(args, "--config")
    names: list[str] = []
    try:
        if given:
            names = parse_plugin_names(given[-1])
        elif config_files:
            names = parse_plugin_names(load_config_file(config_files[-1]).get("plugins"))
    except LmflowError:
        return []  # reported properly when the command runs
    if not names:
        return []
    params = []
    for plugin, options in select_plugins(names).options.items():
        for opt in options:
            flag = opt.flag_for(plugin)
            decls = [f"{flag}/--no-{flag[2:]}"] if opt.type is bool else [flag]
            extra = f" [default: {opt.default}]" if opt.default is not None else ""
            param = click.Option(
                decls,
                type=None
                if opt.type is bool
                else (click.Choice([str(c) for c in opt.choices]) if opt.choices else opt.type),
                default=None,
                help=(opt.help or "") + extra,
            )
            param.lmflow_plugin = (plugin, opt.name)  # type: ignore[attr-defined]
            param.lmflow_group = f"Plugin: {plugin}"  # type: ignore[attr-defined]
            params.append(param)
    return params


def _scan_values(args: list[str], flag: str) -> list[str]:
    values = []
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            values.append(args[i + 1])
        elif arg.startswith(flag + "="):
            values.append(arg.split("=", 1)[1])
    return values


class PluginCommand(click.Command):
    """A command with ``--plugins``: the flags of the named plugins are added, in their own help section."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--debug" in args:  # plugins load while arguments are parsed, before click sees --debug
            ctx.meta[DEBUG_KEY] = True
        ctx.meta[PLUGIN_PARAMS_KEY] = plugin_click_options(args)
        ctx.meta[RAW_ARGS_KEY] = list(args)
        return super().parse_args(ctx, args)

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        params = super().get_params(ctx)
        return params[:-1] + ctx.meta.get(PLUGIN_PARAMS_KEY, []) + params[-1:]  # keep --help last

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        groups: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record:
                groups.setdefault(getattr(param, "lmflow_group", "General"), []).append(record)
        for name, records in groups.items():
            with formatter.section(name):
                formatter.write_dl(records)


def given(ctx: click.Context, name: str | None) -> bool:
    """Whether the option was given on the command line (not a default)."""
    return name is not None and ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE


def plugin_values(ctx: click.Context, values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The plugin flags given on the command line: ``{plugin: {option: value}}``."""
    out: dict[str, dict[str, Any]] = {}
    for param in ctx.meta.get(PLUGIN_PARAMS_KEY, []):
        if param.name in values and given(ctx, param.name):
            plugin, option = param.lmflow_plugin
            out.setdefault(plugin, {})[option] = values[param.name]
    return out
