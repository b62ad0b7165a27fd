"""DeepSpeed ZeRO stage 2 (plugin ``zero2``): gradients and optimizer state partitioned across processes.

    lmflow run --nproc 4 --plugins zero2 --zero2-offload-optimizer ...

The DeepSpeed config is built from the run's own options (see :mod:`lmflow_plugins.deepspeed_config`) and
handed to the Trainer, which runs the DeepSpeed engine.
"""

from __future__ import annotations

from typing import Any

from lmflow_core import PluginOption, hookimpl

from . import deepspeed_config

NAME = "zero2"
STAGE = 2


@hookimpl
def declare_options() -> list[PluginOption]:
    return deepspeed_config.options(STAGE)


@hookimpl
def declare_conflicts() -> dict[str, str]:
    return {**deepspeed_config.CONFLICTS, "zero3": "choose one ZeRO stage"}


@hookimpl
def validate_config(config: Any) -> list[str]:
    return deepspeed_config.problems(config, NAME, STAGE)


@hookimpl
def adjust_training_args(config: Any, training_args: dict[str, Any]) -> None:
    deepspeed_config.apply(training_args, deepspeed_config.build(config, NAME, STAGE))
