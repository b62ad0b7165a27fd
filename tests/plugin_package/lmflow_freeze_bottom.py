"""Freeze the lowest decoder layers of a model and train the rest; report what was frozen.

A third-party plugin written only against ``lmflow_core``'s public names, exercising what the built-in plugins
do: options and conflicts, checks against the model's configuration, a change to that configuration saved with
the model, a wrapper around the core's tokenizer loading, per-run state, a template, a command that loads a
model through the loading hooks and writes its output atomically.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmflow_core import (
    PluginOption,
    RunConfig,
    StashKey,
    StepContext,
    TurnTemplate,
    check_output_apart,
    check_replaceable,
    hookimpl,
    load_pretrained,
    move_into_place,
    note,
    write_output_record,
)

NAME = "freeze_bottom"
REPORT = "frozen_layers.json"


@dataclass
class RunState:
    vocabulary: int = 0
    frozen: list[str] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


STATE = StashKey[RunState]()


@hookimpl
def declare_options() -> list[PluginOption]:
    return [
        PluginOption("layers", int, 1, "Freeze the N lowest decoder layers.", min=0),
        PluginOption("report", bool, True, f"Write {REPORT} beside the trained model."),
    ]


@hookimpl
def declare_conflicts() -> dict[str, str]:
    return {"lisa": "LISA chooses the trainable layers itself"}


@hookimpl
def validate_config(config: RunConfig, model_config: Any) -> list[str]:
    layers = config.options_for(NAME).layers
    total = getattr(model_config, "num_hidden_layers", None)
    if total is not None and layers > total:
        return [f"--freeze-bottom-layers {layers} exceeds the model's {total} layers; use at most {total}"]
    return []


@hookimpl
def configure_model(config: RunConfig, model_config: Any) -> None:
    model_config.frozen_bottom_layers = config.options_for(NAME).layers


@hookimpl(wrapper=True)
def load_tokenizer(config: RunConfig) -> Any:
    tokenizer = yield
    config.stash.setdefault(STATE, RunState()).vocabulary = len(tokenizer)
    return tokenizer


@hookimpl
def prepare_model(config: RunConfig, model: Any, tokenizer: Any) -> None:
    state = config.stash.setdefault(STATE, RunState())
    for index, layer in enumerate(model.model.layers[: config.options_for(NAME).layers]):
        for name, parameter in layer.named_parameters():
            parameter.requires_grad_(False)
            state.frozen.append(f"model.layers.{index}.{name}")


@hookimpl
def on_step(config: RunConfig, step: StepContext) -> None:
    if step.loss is not None:
        config.stash[STATE].losses.append(step.loss)


@hookimpl
def on_train_end(config: RunConfig, model: Any, tokenizer: Any, output_dir: str) -> None:
    if not config.options_for(NAME).report:
        return
    state = config.stash[STATE]
    report = {"vocabulary": state.vocabulary, "frozen": state.frozen, "losses": state.losses}
    Path(output_dir, REPORT).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    note(f"{len(state.frozen)} frozen parameters listed in {REPORT}")


@hookimpl
def register_templates() -> list[TurnTemplate]:
    return [
        TurnTemplate(
            name="bracket_chat",
            description="[user] ... [/user] [bot] ... [/bot]",
            user="[user] {content} [/user]\n",
            assistant_header="[bot] ",
            assistant="{content} [/bot]",
            assistant_trailer="\n",
            stop_strings=("[/bot]",),
        )
    ]


@hookimpl
def register_commands(cli: Any) -> None:
    import click

    @cli.command("layer-sizes")
    @click.argument("model")
    @click.option("--output", required=True, type=click.Path(path_type=Path), help="Directory to write.")
    @click.option("--overwrite", is_flag=True, help="Replace an earlier output of this command.")
    def layer_sizes(model: str, output: Path, overwrite: bool) -> None:
        """Write the parameter count of each decoder layer of MODEL to OUTPUT/sizes.json."""
        check_output_apart(output, [model])
        check_replaceable(output, overwrite)
        loaded = load_pretrained(model)
        sizes = {
            str(index): sum(p.numel() for p in layer.parameters())
            for index, layer in enumerate(loaded.model.model.layers)
        }
        staging = output.parent / f".staging-{output.name}"
        staging.mkdir(parents=True)
        (staging / "sizes.json").write_text(json.dumps(sizes) + "\n", encoding="utf-8")
        write_output_record(staging, "layer-sizes")
        move_into_place(staging, output)
        note(
            f"{len(sizes)} layers, frozen at training: {getattr(loaded.model_config, 'frozen_bottom_layers', 0)}"
        )
