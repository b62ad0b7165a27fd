"""The click pieces every ``lmflow`` command shares: ``--debug``, the one builder that turns an
:class:`~lmflow_core.options.Option` into a flag, and the command class that adds the flags of the plugins named
by ``--plugins``.

The commands themselves live in :mod:`lmflow_core.cli` and :mod:`lmflow_core.cli_inference`; both import from
here and neither imports the other's commands.
"""

from __future__ import annotations

from typing import Any

import click

from .config import DATASET_FORMATS, core_options, load_config_file
from .errors import LmflowError
from .options import Option, parse_plugin_names

DEBUG_KEY = "lmflow.debug"
PLUGIN_PARAMS_KEY = "lmflow.plugin_params"
RAW_ARGS_KEY = "lmflow.raw_args"

_METAVARS = {int: "INTEGER", float: "FLOAT"}


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


def click_option(option: Option, plugin: str | None = None) -> click.Option:
    """The flag of a core option (``plugin`` None) or of a plugin's.

    A boolean is a ``--name/--no-name`` flag; a ``list`` option a repeatable flag; an option with a
    ``flag_value`` a flag whose value may be left out (``--resume [PATH]``). Click passes every other value on
    as written: :meth:`Option.check` converts and checks it with the config file's values, so a flag and a
    YAML key accept the same spellings and their problems are reported together.

    The click parameter carries the option (``lmflow_option``), its plugin (``lmflow_plugin``, None for the
    core) and its ``--help`` section (``lmflow_group``).
    """
    flag = option.flag_for(plugin)
    # A core option's value is named after its field (--sample-prompt fills sample_prompts); a plugin's after
    # its flag, which is unique among the selected plugins.
    decls = [flag] if plugin else [flag, option.name]
    shown = option.default is not None and option.default is not False and option.default != []
    text = option.help + (f" [default: {option.default}]" if shown else "")
    if option.type is bool:
        decls[0] = f"{flag}/--no-{flag[2:]}"
        param = click.Option(decls, default=None, help=text)
    elif option.flag_value is not None:
        param = click.Option(
            decls,
            is_flag=False,
            flag_value=option.flag_value,
            metavar=option.metavar,
            default=None,
            help=text,
        )
    elif option.type is list and option.parse is None:
        param = click.Option(decls, multiple=True, metavar=option.metavar, help=option.help + " Repeatable.")
    else:
        if option.metavar:
            metavar = option.metavar
        elif option.choices is not None:
            metavar = "[" + "|".join(map(str, option.choices)) + "]"
        else:
            metavar = _METAVARS.get(option.type, "TEXT")
        param = click.Option(decls, default=None, metavar=metavar, help=text)
    param.lmflow_option = option  # type: ignore[attr-defined]
    param.lmflow_plugin = plugin  # type: ignore[attr-defined]
    param.lmflow_group = option.group or (f"Plugin: {plugin}" if plugin else "General")  # type: ignore[attr-defined]
    return param


def dataset_reading_options(command: Any) -> Any:
    """``--dataset-format``, ``--dataset-config`` and ``--dataset-revision`` for a command that reads a dataset
    outside a run (``data check``, ``evaluate``), with the run's help texts and values."""
    helps = {option.name: option.help for option in core_options()}
    command = click.option("--dataset-revision", help=helps["dataset_revision"])(command)
    command = click.option("--dataset-config", help=helps["dataset_config"])(command)
    return click.option(
        "--dataset-format",
        type=click.Choice(DATASET_FORMATS),
        default="auto",
        show_default=True,
        help=helps["dataset_format"],
    )(command)


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
    return [
        click_option(option, plugin)
        for plugin, options in select_plugins(names).options.items()
        for option in options
    ]


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


def core_values(ctx: click.Context, values: dict[str, Any]) -> dict[str, Any]:
    """The core options given on the command line: ``{field: value}``, as written (a list when repeated)."""
    out: dict[str, Any] = {}
    for param in ctx.command.get_params(ctx):
        if getattr(param, "lmflow_option", None) and param.lmflow_plugin is None and given(ctx, param.name):
            value = values[param.name]
            out[param.lmflow_option.name] = list(value) if isinstance(value, tuple) else value
    return out


def plugin_values(ctx: click.Context, values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The plugin flags given on the command line: ``{plugin: {option: value}}``."""
    out: dict[str, dict[str, Any]] = {}
    for param in ctx.meta.get(PLUGIN_PARAMS_KEY, []):
        if param.name in values and given(ctx, param.name):
            out.setdefault(param.lmflow_plugin, {})[param.lmflow_option.name] = values[param.name]
    return out
