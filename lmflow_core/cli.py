"""The ``lmflow`` command line.

Errors a user can cause end with one line on stderr (``Error: <problem>. <fix>``) and a non-zero exit; add
``--debug`` (or set ``LMFLOW_DEBUG=1``) to see the traceback. Heavy libraries are imported inside commands so
that ``lmflow --help`` answers at once.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from .cli_inference import INFERENCE_COMMANDS
from .clickopts import (
    DEBUG_KEY,
    RAW_ARGS_KEY,
    PluginCommand,
    click_option,
    core_values,
    dataset_reading_options,
    debug_option,
    plugin_values,
    set_debug,
)
from .config import RunConfig, core_options
from .errors import LmflowError
from .options import parse_plugin_names
from .version import __version__


class LmflowGroup(click.Group):
    """The top-level group: turns every failure into one line and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            ctx.exit(130)
        except BrokenPipeError:
            # The reader of stdout went away (`lmflow data check big.jsonl | head`): stop quietly, as other
            # command-line tools do; stdout is pointed at /dev/null so that flushing it at exit cannot fail.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            ctx.exit(141)
        except Exception as exc:  # report anything else on one line; --debug shows the traceback
            if ctx.meta.get(DEBUG_KEY) or os.environ.get("LMFLOW_DEBUG"):
                raise
            if isinstance(exc, LmflowError):
                click.echo(f"Error: {exc.one_line()}", err=True)
                ctx.exit(exc.exit_code)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            click.echo(
                f"Error: {type(exc).__name__}: {first} (run again with --debug for the traceback)", err=True
            )
            ctx.exit(1)


@click.group(cls=LmflowGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lmflow")
@debug_option
def cli() -> None:
    """lmflow: fine-tune, chat with and measure large language models.

    Run `lmflow run` with no arguments to fine-tune the bundled demo model on two CPU cores.
    """


# --------------------------------------------------------------------------------------------------------------
# lmflow run
# --------------------------------------------------------------------------------------------------------------


def _run_params() -> list[click.Parameter]:
    params: list[click.Parameter] = [
        click.Option(
            ["--config", "config_file"],
            type=click.Path(dir_okay=False),
            help="YAML file with run settings; flags override it.",
        ),
    ]
    params[0].lmflow_group = "General"  # type: ignore[attr-defined]
    params += [click_option(option) for option in core_options()]
    from .launch import launch_params

    return params + launch_params()


def _run_callback(
    config_file: str | None,
    nproc: int,
    nnodes: int,
    node_rank: int,
    master_addr: str | None,
    master_port: int,
    **values: Any,
) -> None:
    from .launch import Launch, check_launch, start, strip_launch_args
    from .train import check_run, configure, execute

    ctx = click.get_current_context()
    flags: dict[str, Any] = {**plugin_values(ctx, values), **core_values(ctx, values)}
    launch = Launch(nproc, nnodes, node_rank, master_addr, master_port)
    check_launch(launch)
    config, plugins = configure(config_file=config_file, **flags)
    if launch.distributed:
        from .report import Reporter

        Reporter(main=False).activate()  # plugins' notes come from the run's first process, not twice
        check_run(config, plugins)  # report a mistake once, here, rather than from every process
        run_args = strip_launch_args(ctx.meta[RAW_ARGS_KEY])
        if ctx.meta.get(DEBUG_KEY) and "--debug" not in run_args:
            run_args.append("--debug")  # given to the group (lmflow --debug run ...)
        code = start(launch, run_args)
        if code != 0:
            raise LmflowError(
                f"the run failed in one of its processes (exit code {code})", "see the messages above"
            )
        return
    execute(config, plugins)
    _close_process_group()


def _close_process_group() -> None:
    """End a launched process's process group before the interpreter exits: left to exit, the communication
    threads of gloo/DeepSpeed can abort the process after a successful run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


run_command = PluginCommand(
    "run",
    callback=_run_callback,
    params=[
        *_run_params(),
        click.Option(
            ["--debug"],
            is_flag=True,
            expose_value=False,
            is_eager=True,
            callback=set_debug,
            help="Show the full traceback when something fails.",
        ),
    ],
    help=(
        "Fine-tune a causal language model.\n\n"
        "With no --model and no --dataset, fine-tunes the bundled demo model on its bundled conversations. "
        "Plugin flags appear once the plugin is named: `lmflow run --plugins NAME --help`."
    ),
    short_help="Fine-tune a model (no arguments: the bundled demo).",
)
cli.add_command(run_command)
for _command in INFERENCE_COMMANDS:  # generate, chat, evaluate, serve
    cli.add_command(_command)


# --------------------------------------------------------------------------------------------------------------
# lmflow plugins
# --------------------------------------------------------------------------------------------------------------


@cli.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
@debug_option
def plugins_command(as_json: bool) -> None:
    """List the installed plugins: name, version, source and the hooks each implements."""
    from .errors import PluginError
    from .plugins import discover_plugins, import_plugin, new_plugin_manager, plugin_hooks, register_plugin

    rows = []
    for name, info in discover_plugins().items():
        row: dict[str, Any] = {
            "name": name,
            "version": info.version,
            "source": info.source,
            "module": info.module,
        }
        try:
            pm = new_plugin_manager()
            module = import_plugin(info)
            register_plugin(pm, module, name)
            row["hooks"] = plugin_hooks(pm, module)
            doc = (getattr(module, "__doc__", None) or "").strip().splitlines()
            row["description"] = doc[0] if doc else ""
        except PluginError as exc:
            row["hooks"], row["error"] = [], exc.one_line()
        rows.append(row)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("No plugins installed.")
        return
    for row in rows:
        click.echo(f"{row['name']} {row['version']} ({row['source']})")
        if row.get("description"):
            click.echo(f"    {row['description']}")
        if row.get("error"):
            click.echo(f"    error: {row['error']}")
        else:
            click.echo(f"    hooks: {', '.join(row['hooks']) or 'none'}")


# --------------------------------------------------------------------------------------------------------------
# lmflow data
# --------------------------------------------------------------------------------------------------------------


@cli.group("data")
def data_group() -> None:
    """Inspect datasets."""


@data_group.command("check")
@click.argument("path", type=click.Path())
@click.option(
    "--model", help="Model whose tokenizer, context and stored template apply (default: the bundled demo)."
)
@click.option("--tokenizer", help="Tokenizer to count tokens with (default: the model's).")
@click.option(
    "--template", help="Template for conversation data (default: the model's stored one, else chatml)."
)
@click.option(
    "--block-size",
    type=click.IntRange(min=8),
    help="Block size to check against (default: what `lmflow run` would use for the model).",
)
@click.option("--plugins", help="Plugins whose format_conversation hook should render conversations.")
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON.")
@click.option(
    "--preprocessing-workers",
    type=click.IntRange(min=1),
    help="Processes that tokenize (default: the cores available; one under 10,000 records).",
)
@dataset_reading_options
@debug_option
def data_check(
    path: str,
    model: str | None,
    tokenizer: str | None,
    template: str | None,
    block_size: int | None,
    plugins: str | None,
    as_json: bool,
    preprocessing_workers: int | None,
    dataset_format: str,
    dataset_config: str | None,
    dataset_revision: str | None,
) -> None:
    """Validate the dataset at PATH and print its statistics.

    PATH is a .json/.jsonl file, a directory of them, or a Hugging Face hub dataset (org/name[:split]). Every
    record is checked (a malformed one is reported with its file and index), then tokenized exactly as
    `lmflow run` would: the format detected, counts, token lengths, trained tokens, and how many examples the
    block size truncates.
    """
    from .catalog import get_template
    from .data import load_raw_dataset, tokenize_dataset
    from .data.formats import FORMAT_NAMES
    from .data.pipeline import formatter_fingerprint
    from .models import block_size_for, load_model_config, model_source, stored_run
    from .plugins import select_plugins
    from .report import Reporter, preparation_summary, quiet_libraries, reporting

    quiet_libraries()
    # The model `lmflow run --dataset PATH` would train (the bundled demo without --model), and its block size
    # decided by the same rule.
    config = RunConfig(model=model, tokenizer=tokenizer, block_size=block_size)
    run_plugins = select_plugins(parse_plugin_names(plugins))
    source = model_source(config)
    stored = stored_run(source)
    template_name = template or stored.get("template") or "chatml"
    chosen = get_template(template_name)

    def normalize(record: Any, declared_type: str | None, where: str, data_file: Any) -> Any:
        return run_plugins.hook.normalize_record(
            config=config, record=record, declared_type=declared_type, where=where, data_file=data_file
        )

    def render(template: Any, conversation: Any, add_generation_prompt: bool = False) -> Any:
        return run_plugins.hook.format_conversation(
            config=config,
            template=template,
            conversation=conversation,
            add_generation_prompt=add_generation_prompt,
            tokenizer=tok,
        )

    with reporting(Reporter(stream=sys.stderr if as_json else sys.stdout)):  # notes never break --json
        raw = load_raw_dataset(
            path,
            chosen,
            normalize=normalize if run_plugins.hook.normalize_record.get_hookimpls() else None,
            dataset_format=dataset_format,
            dataset_config=dataset_config,
            dataset_revision=dataset_revision,
        )
        blocks = block_size_for(config, load_model_config(source), stored.get("block_size"))
        tok = run_plugins.hook.load_tokenizer(config=config)
        # The same tokenization and cache as `lmflow run`'s: a second check of unchanged data (or a run after
        # a check) reads the cache.
        _, stats = tokenize_dataset(
            raw,
            tok,
            blocks,
            chosen if raw.uses_template else None,
            render,
            cache_extra=formatter_fingerprint(run_plugins),
            workers=preprocessing_workers,
        )
    info = stats.to_dict()
    info.update(
        path=path,
        files=[str(f) for f in raw.files],
        formats=dict(raw.formats),
        hub=raw.hub,
        tokenizer="bundled demo" if model is None and tokenizer is None else (tokenizer or model),
        template=template_name if raw.uses_template else None,
    )
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    if raw.hub is not None:
        click.echo(f"dataset: {path} ({raw.type}, {raw.hub_description})")
    else:
        click.echo(f"dataset: {path} ({raw.type}, {len(raw.files)} file{'s' if len(raw.files) > 1 else ''})")
    how = "detected" if dataset_format == "auto" else "--dataset-format"
    click.echo(
        "format: "
        + ", ".join(
            f"{FORMAT_NAMES[name]} ({count:,} record{'s' if count != 1 else ''})"
            for name, count in raw.formats.most_common()
        )
        + f" ({how})"
    )
    converted = "".join(f" ({n} converted from {k})" for k, n in stats.converted.items())
    click.echo(
        f"records: {stats.records:,}{converted}"
        + (
            " (tokenized before: read from the cache)"
            if stats.cached
            else f", {preparation_summary(stats, raw)}"
        )
    )
    what = f"tokenizer {info['tokenizer']}" + (f", template {template_name}" if info["template"] else "")
    unit = "pair" if raw.paired else "example"
    if raw.paired:
        click.echo(f"pairs: {stats.examples:,} (each a prompt with a chosen and a rejected answer)")
    click.echo(
        f"tokens per {unit} ({what}{'; prompt and the longer answer' if raw.paired else ''}): min {stats.length_min}, "
        f"mean {stats.length_mean:.1f}, "
        f"median {stats.length_median:g}, p95 {stats.length_p95}, max {stats.length_max}"
    )
    share = stats.trained_tokens / stats.tokens if stats.tokens else 0.0
    click.echo(f"trained tokens: {stats.trained_tokens:,} of {stats.tokens:,} ({share:.1%})")
    if raw.type == "text_only":
        click.echo(f"block size {blocks}: texts are concatenated and cut into {stats.examples:,} blocks")
    else:
        click.echo(
            f"block size {blocks}: {stats.truncated:,} {unit}{'s' if stats.truncated != 1 else ''} would be "
            f"truncated, {stats.dropped_untrained:,} would have no trained token left"
            + (" in an answer (dropped)" if raw.paired else "")
        )
    click.echo("OK: every record is valid")


# --------------------------------------------------------------------------------------------------------------
# lmflow templates
# --------------------------------------------------------------------------------------------------------------


@cli.group("templates")
def templates_group() -> None:
    """List, show and render conversation templates."""


@templates_group.command("list")
@debug_option
def templates_list() -> None:
    """List the available templates."""
    from .catalog import available_templates

    templates = available_templates()
    width = max(map(len, templates), default=0)
    for name, template in templates.items():
        click.echo(f"{name:<{width}}  {template.description}")


EXAMPLE = [
    {"role": "user", "content": "What is 2 plus 2?"},
    {"role": "assistant", "content": "2 plus 2 is 4."},
    {"role": "user", "content": "And 3 plus 3?"},
    {"role": "assistant", "content": "3 plus 3 is 6."},
]


def _load_tokenizer(source: str | None) -> Any:
    if source is None:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise LmflowError(f"cannot load a tokenizer from '{source}'", "check --tokenizer") from exc


tokenizer_option = click.option(
    "--tokenizer",
    help="Tokenizer (id or directory) for {bos_token}/{eos_token} and the `tokenizer` template.",
)


@templates_group.command("show")
@click.argument("name")
@click.option(
    "--system",
    default="You are a helpful assistant.",
    show_default=True,
    help="System prompt of the example.",
)
@tokenizer_option
@debug_option
def templates_show(name: str, system: str, tokenizer: str | None) -> None:
    """Render an example conversation with template NAME; trained text is shown in [[double brackets]]."""
    from .catalog import get_template
    from .templates import Conversation

    template = get_template(name)
    click.echo(f"{template.name}: {template.description}")
    if template.system_note:
        click.echo(f"system prompt: {template.system_note}")
    click.echo("")
    conversation = Conversation.from_messages(EXAMPLE, system)
    try:
        template.check(conversation)
    except LmflowError:
        conversation = Conversation.from_messages(EXAMPLE)  # a family without any system prompt
    segments = template.render(conversation, False, _load_tokenizer(tokenizer))
    click.echo("".join(f"[[{s.text}]]" if s.trained else s.text for s in segments))


@templates_group.command("render")
@click.argument("name")
@click.option(
    "--messages",
    "messages_file",
    required=True,
    type=click.Path(dir_okay=False),
    help='JSON list of {role, content}, or {"messages": [...], "system"?, "tools"?}.',
)
@click.option(
    "--add-generation-prompt", is_flag=True, help="End with the header of the assistant's next turn."
)
@tokenizer_option
@debug_option
def templates_render(
    name: str, messages_file: str, add_generation_prompt: bool, tokenizer: str | None
) -> None:
    """Write exactly the text template NAME renders for a conversation, and nothing else."""
    from .catalog import get_template
    from .templates import Conversation, render_text

    template = get_template(name)
    conversation = Conversation.from_file(messages_file)
    segments = template.render(conversation, add_generation_prompt, _load_tokenizer(tokenizer))
    sys.stdout.write(render_text(segments))


# --------------------------------------------------------------------------------------------------------------


def _register_plugin_commands() -> None:
    """Let every installed plugin add commands; a plugin that fails is reported and left out."""
    from .plugins import call_order, load_catalog

    pm, broken = load_catalog()
    for name, problem in broken.items():
        click.echo(f"warning: plugin '{name}' is left out: {problem}", err=True)
    for impl in call_order(pm.hook.register_commands):
        before = dict(cli.commands)
        try:
            impl.function(*[{"cli": cli}[name] for name in impl.argnames])
        except Exception as exc:  # a broken third-party plugin must not break every command
            click.echo(
                f"warning: plugin '{impl.plugin_name}' failed to add its commands "
                f"({type(exc).__name__}: {exc}); they are left out",
                err=True,
            )
        for name, command in cli.commands.items():
            if before.get(name) is not command:
                add_debug_option(command)


def add_debug_option(command: click.Command) -> None:
    """Give a plugin's command, and each command of a plugin's group, the core's ``--debug`` (unless it has
    one): every lmflow command shows the traceback of a failure the same way."""
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            add_debug_option(sub)
        return
    if not any("--debug" in getattr(param, "opts", ()) for param in command.params):
        debug_option(command)


def main() -> None:
    """Console-script entry point."""
    _register_plugin_commands()
    cli(prog_name="lmflow")


if __name__ == "__main__":
    main()
