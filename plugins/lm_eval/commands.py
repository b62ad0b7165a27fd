"""``lmflow lm-eval``: the command line of ``lm_eval_model``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import click


def add_commands(cli: click.Group) -> None:
    """Add ``lmflow lm-eval`` to ``cli``."""
    import click

    @cli.command("lm-eval")
    @click.argument("model")
    @click.option(
        "--tasks",
        required=True,
        help="lm-eval tasks, comma-separated: names (hellaswag), globs (mmlu_*) or task YAML files.",
    )
    @click.option("--include-path", help="A folder of task YAML files of your own.")
    @click.option(
        "--limit",
        type=click.FloatRange(min=0, min_open=True),
        help="Score only the first N examples of each task (below 1: a fraction of each); for quick checks.",
    )
    @click.option(
        "--num-fewshot", type=click.IntRange(min=0), help="Examples in each prompt (default: the task's own)."
    )
    @click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
    @click.option(
        "--output",
        type=click.Path(dir_okay=False),
        help="JSON report path (default: lm-eval-<model folder name>.json).",
    )
    @click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1...")
    @click.option(
        "--dtype",
        type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
        default="auto",
        show_default=True,
        help="Weights dtype (auto: bfloat16 on a GPU that has it, else float32).",
    )
    @click.option(
        "--plugins",
        default="",
        help="Comma-separated plugins whose loading hooks load the model (with their default options).",
    )
    @click.option(
        "--trust-remote-code", is_flag=True, help="Allow model code from the hub repository to run."
    )
    def lm_eval_command(model: str, output: str | None, plugins: str, **values: Any) -> None:
        """Score MODEL (a model directory, a LoRA adapter directory or a hub id) on lm-evaluation-harness tasks.

        The model loads as `lmflow generate` loads it and is scored in this process. Prints lm-eval's table and
        writes a JSON report: lm-eval's results plus the scores under lmflow's metric names
        (lm_eval/<task>/<metric>). Tasks over local files run offline; a task whose data is not on this
        machine needs the Hugging Face hub.
        """
        from lmflow_core import LmflowError

        from . import default_output, lm_eval_model, table_of

        path = Path(output) if output else default_output(model)
        if path.is_dir():
            raise LmflowError(f"--output {path} is a directory", "give the path of the JSON file to write")
        report = lm_eval_model(
            model, plugins=[name.strip() for name in plugins.split(",") if name.strip()], **values
        )
        write_json(report, path)
        click.echo(f"model: {model} | tasks: {', '.join(report['tasks'])} | {report['seconds']:.1f}s")
        click.echo(table_of(report).rstrip("\n"))
        click.echo(f"report: {path}")


def write_json(data: dict[str, Any], path: Path) -> None:
    """Write ``data`` as JSON so that ``path`` holds the old report or the new one, never a part."""
    from lmflow_core import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(data, indent=2) + "\n")
