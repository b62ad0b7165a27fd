"""DeepSpeed ZeRO stage 3 (plugin ``zero3``): parameters, gradients and optimizer state partitioned across processes.

    lmflow run --nproc 4 --plugins zero3 --zero3-offload-optimizer --zero3-offload-params ...

The DeepSpeed config is built from the run's own options (see :mod:`lmflow_plugins.deepspeed_config`) and
handed to the Trainer, which runs the DeepSpeed engine. The model is created already partitioned (the
Trainer's arguments exist before it loads), and at the end its weights are gathered into an ordinary model
directory that ``from_pretrained`` loads.
"""

from __future__ import annotations

from typing import Any

from lmflow_core import PluginOption, hookimpl

from . import deepspeed_config

NAME = "zero3"
STAGE = 3


@hookimpl
def declare_options() -> list[PluginOption]:
    return deepspeed_config.options(STAGE)


@hookimpl
def declare_conflicts() -> dict[str, str]:
    return {**deepspeed_config.CONFLICTS, "zero2": "choose one ZeRO stage"}


@hookimpl
def validate_config(config: Any) -> list[str]:
    return deepspeed_config.problems(config, NAME, STAGE)


@hookimpl
def adjust_training_args(config: Any, training_args: dict[str, Any]) -> None:
    deepspeed_config.apply(training_args, deepspeed_config.build(config, NAME, STAGE))
