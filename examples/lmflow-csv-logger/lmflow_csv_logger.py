"""Write step, epoch, loss and learning rate of every optimizer step to a CSV file."""

from __future__ import annotations

import csv
import os
from typing import TYPE_CHECKING

from lmflow_core import PluginOption, hookimpl

if TYPE_CHECKING:
    from lmflow_core import RunConfig, StepContext

NAME = "csv_logger"


@hookimpl
def declare_options() -> list[PluginOption]:
    return [
        PluginOption("path", str, None, "CSV file to write (default: metrics.csv in the output directory)."),
        PluginOption("every", int, 1, "Write a row every N optimizer steps.", min=1),
    ]


@hookimpl
def validate_config(config: RunConfig) -> list[str]:
    path = config.options_for(NAME).path
    if path and os.path.isdir(path):
        return [f"--csv-logger-path {path} is a directory; give a file name"]
    return []


@hookimpl
def on_step(config: RunConfig, step: StepContext) -> None:
    options = config.options_for(NAME)
    if not step.is_main_process or step.global_step % options.every:
        return
    path = options.path or os.path.join(step.output_dir, "metrics.csv")
    new = not os.path.exists(path)
    with open(path, "a", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        if new:
            writer.writerow(["step", "epoch", "loss", "learning_rate"])
        lr = step.lr_scheduler.get_last_lr()[0] if step.lr_scheduler is not None else ""
        loss = "" if step.loss is None else f"{step.loss:.6f}"
        writer.writerow([step.global_step, f"{step.epoch:.4f}", loss, lr])
